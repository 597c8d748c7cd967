"""Interaction tuples (x, y, o) from conversations, with the paper's filters (METHOD.md §1).

A conversation ``u0, a1, u1, a2, u2, ...`` yields one tuple per assistant message followed by a
user message: x is everything before that assistant message, y the assistant message, o the
next user message. Filters run first on the whole conversation, then on each tuple; everything
dropped is counted in a :class:`~hsd.data.report.DataReport` under the reason names below.

Two presets (:meth:`FilterConfig.preset`):

* ``"none"`` (the default): keep every well-formed conversation; a run of same-role messages
  collapses to its first message; empty messages stay in the history and only drop the tuple
  whose y, o or last user message they are; x is the whole history before y.
* ``"paper"``: the authors' preprocessing script for WildChat: language ``"English"`` or
  ``"en"``; empty and whitespace-only messages removed before anything else (before pairing);
  at least 3 messages left, <= 100,000 characters in total, <= 4,096 per message; x is the
  last 5 messages before y, cut *before* same-role runs are collapsed (then leading assistant
  messages dropped and runs collapsed to their first message, exactly as the script does); a
  run of consecutive assistant messages yields no tuple (``assistant_run``). The authors'
  WildFeedback script instead takes the last message of such a run as y:
  ``FilterConfig.paper(assistant_runs="last")``.

Conversation-level reasons: ``misplaced_system`` (a system message after the first message),
``language``, ``message_too_long``, ``conversation_too_long``, ``too_few_messages``,
``non_alternating`` (same-role run with ``same_role_runs="drop"``), ``no_tuples``.
Tuple-level reasons: ``no_prompt`` (no user message before y), ``empty_response``,
``empty_followup``, ``empty_prompt``, ``collapsed`` (a logged target removed by collapsing),
``assistant_run`` (y is a run of assistant messages and ``assistant_runs="skip"``).
Adjustments (kept): ``collapsed_same_role``, ``removed_system``, ``removed_empty_message``,
``history_cut``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

from .records import ASSISTANT, ROLE_ALIASES, SYSTEM, USER, Conversation, DataError
from .report import DataReport

__all__ = ["FilterConfig", "InteractionTuple", "extract_tuples", "conversation_tuples", "group_by_conversation"]


@dataclass
class FilterConfig:
    """Which conversations and tuples to keep. Defaults keep everything well-formed.

    Attributes:
        languages: keep conversations whose ``language`` is one of these (case-insensitive,
            surrounding spaces ignored); None keeps all.
        min_nonempty_messages: drop conversations with fewer non-whitespace messages.
        max_total_chars: drop conversations whose messages hold more characters in total.
        max_message_chars: drop conversations with any longer message.
        keep_system: keep a leading system message in x (else it is removed and counted).
        same_role_runs: ``"collapse"`` keeps one message of a run of same-role messages and
            counts the rest under ``adjusted["collapsed_same_role"]``; ``"drop"`` drops the
            conversation (``non_alternating``).
        assistant_runs: with ``"collapse"``, what a run of consecutive assistant messages gives:
            ``"first"`` (its first message is y, the others are removed), ``"last"`` (its last
            message, the one the user answered, is y: the authors' WildFeedback script) or
            ``"skip"`` (no tuple, ``dropped_tuples["assistant_run"]``; its first message stays
            as history: the authors' WildChat script). A run of user messages always keeps its
            first message (both scripts).
        drop_empty_messages: remove empty and whitespace-only messages from the conversation
            before pairing (the authors' scripts); else they stay in the history and the
            ``drop_empty_*`` rules below decide per tuple.
        history_messages: cut x to the last k messages of the history *before* collapsing
            same-role runs, then drop leading assistant messages and collapse (the authors'
            scripts); a leading system message is kept on top and not counted. The tuple's
            :attr:`InteractionTuple.full_x` keeps the whole history for the packed layout.
            None (default) keeps the whole history in x (the per-tuple layout has its own
            ``LayoutConfig.history_messages`` cut, applied after collapsing).
        drop_empty_response, drop_empty_followup, drop_empty_prompt: drop tuples whose y, o, or
            last user message of x is empty or whitespace.
    """

    languages: tuple[str, ...] | None = None
    min_nonempty_messages: int = 0
    max_total_chars: int | None = None
    max_message_chars: int | None = None
    keep_system: bool = True
    same_role_runs: str = "collapse"
    assistant_runs: str = "first"
    drop_empty_messages: bool = False
    history_messages: int | None = None
    drop_empty_response: bool = True
    drop_empty_followup: bool = True
    drop_empty_prompt: bool = True

    def __post_init__(self):
        if self.same_role_runs not in ("collapse", "drop"):
            raise ValueError(f"same_role_runs must be 'collapse' or 'drop', got {self.same_role_runs!r}")
        if self.assistant_runs not in ("first", "last", "skip"):
            raise ValueError(f"assistant_runs must be 'first', 'last' or 'skip', got {self.assistant_runs!r}")
        if isinstance(self.languages, str):
            self.languages = (self.languages,)
        if self.history_messages is not None and self.history_messages < 1:
            raise ValueError(f"history_messages must be >= 1 or None, got {self.history_messages}")

    @classmethod
    def paper(cls, **overrides) -> "FilterConfig":
        """The authors' WildChat preprocessing: English (``"English"`` or ``"en"``), empty
        messages removed first, >= 3 messages, <= 100,000 characters in total, <= 4,096
        characters per message, x cut to the last 5 messages before collapsing same-role runs,
        no tuple from a run of assistant messages (their WildFeedback script:
        ``assistant_runs="last"``).

        Where hsd differs from the scripts: message text is kept verbatim (their WildChat script
        strips it), a leading system message is kept on top of x and not counted in the 5
        (their scripts drop system messages), and ``"last"`` gives an x that ends with the user
        message before the run (their WildFeedback rows end with the run's other replies, which
        a chat template cannot render as a prompt)."""
        base = cls(
            languages=("English", "en"),
            min_nonempty_messages=3,
            max_total_chars=100_000,
            max_message_chars=4096,
            assistant_runs="skip",
            drop_empty_messages=True,
            history_messages=5,
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FilterConfig":
        """A named preset: ``"paper"`` or ``"none"`` (the defaults)."""
        if name == "paper":
            return cls.paper(**overrides)
        if name == "none":
            return cls(**overrides)
        raise ValueError(f"unknown filter preset {name!r}; expected 'paper' or 'none'")


_ROLES = frozenset(ROLE_ALIASES.values())


def _check_messages(value: Any, name: str) -> None:
    if not isinstance(value, list):
        raise DataError(f"InteractionTuple.{name} must be a list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(
                f"InteractionTuple.{name}[{i}] must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}"
            )


@dataclass
class InteractionTuple:
    """One (x, y, o) tuple. Fields are checked when built: a wrong type raises :class:`DataError`.

    Attributes:
        x: the history before y, ending with a user message (a leading system message included).
        y: the logged assistant response.
        o: the user's next message (the follow-up).
        conversation_id: the source conversation's id.
        turn_index: 0-based index of y among the conversation's assistant messages.
        message_index: index of y in the normalised conversation (``len(full_history)``).
        user_key: the conversation's user key (personalisation), if any.
        metadata: anything else (language, source model).
        full_x: the whole history before y when x is a cut of it (``FilterConfig.history_messages``);
            None when x is the whole history. The packed layout, which conditions every y on the
            conversation before it, uses :attr:`full_history`.
    """

    x: list[dict[str, str]]
    y: str
    o: str
    conversation_id: str
    turn_index: int
    message_index: int
    user_key: str | None = None
    metadata: dict = field(default_factory=dict)
    full_x: list[dict[str, str]] | None = None

    def __post_init__(self):
        # Hand-built tuples fail here, naming the field, not later inside a tokenizer.
        _check_messages(self.x, "x")
        if not self.x or self.x[-1]["role"] != USER:
            raise DataError("InteractionTuple.x must end with a user message (the prompt y answers)")
        for name in ("y", "o", "conversation_id"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"InteractionTuple.{name} must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("turn_index", "message_index"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"InteractionTuple.{name} must be an int >= 0, got {value!r}")
        if self.user_key is not None and not isinstance(self.user_key, str):
            raise DataError(f"InteractionTuple.user_key must be a string or None, got {type(self.user_key).__name__}")
        if not isinstance(self.metadata, dict):
            raise DataError(f"InteractionTuple.metadata must be a dict, got {type(self.metadata).__name__}")
        if self.full_x is not None:
            _check_messages(self.full_x, "full_x")
        if self.message_index != len(self.full_history):
            raise DataError(
                f"InteractionTuple.message_index ({self.message_index}) must be the index of y in the "
                f"conversation, len(full_history) = {len(self.full_history)}"
            )

    @property
    def full_history(self) -> list[dict[str, str]]:
        """The whole conversation before y (``full_x`` if x is a cut, else ``x``)."""
        return self.full_x if self.full_x is not None else self.x

    def to_row(self) -> dict:
        """The authors' preprocessed-tuple schema (readable back with ``format="tuples"``)."""
        names = {USER: "human", ASSISTANT: "gpt", SYSTEM: "system"}
        return {
            "id": f"{self.conversation_id}#{self.turn_index}",
            "prompt": [{"from": names[m["role"]], "value": m["content"]} for m in self.x],
            "completion": {"from": "gpt", "value": self.y},
            "user_response": {"from": "human", "value": self.o},
            "turn_index": self.turn_index,
            "user_id": self.user_key,
        }


def _blank(text: str) -> bool:
    return not text.strip()


def _clean_messages(conversation: Conversation, filters: FilterConfig, report: DataReport):
    """Apply the conversation-level filters.

    Returns ``(messages, None)`` with the kept messages as ``(original index, message)`` pairs
    (empty or system messages removed when the filters say so, same-role runs not collapsed
    yet), or ``(None, reason)``.
    """
    messages = conversation.messages
    if any(m["role"] == SYSTEM for m in messages[1:]):
        return None, "misplaced_system"
    if filters.languages is not None:
        wanted = {lang.strip().lower() for lang in filters.languages}
        if (conversation.language or "").strip().lower() not in wanted:
            return None, "language"
    indexed = list(enumerate(messages))
    if filters.drop_empty_messages:
        nonblank = [(i, m) for i, m in indexed if not _blank(m["content"])]
        if len(nonblank) < len(indexed):
            report.adjusted["removed_empty_message"] += len(indexed) - len(nonblank)
        indexed = nonblank
    if filters.max_message_chars is not None and any(len(m["content"]) > filters.max_message_chars for _, m in indexed):
        return None, "message_too_long"
    if filters.max_total_chars is not None and sum(len(m["content"]) for _, m in indexed) > filters.max_total_chars:
        return None, "conversation_too_long"
    if sum(not _blank(m["content"]) for _, m in indexed) < filters.min_nonempty_messages:
        return None, "too_few_messages"
    if not filters.keep_system and indexed and indexed[0][1]["role"] == SYSTEM:
        report.adjusted["removed_system"] += 1
        indexed = indexed[1:]
    return indexed, None


def _runs(indexed: list[tuple[int, dict]]) -> list[list[tuple[int, dict]]]:
    """Consecutive same-role messages grouped into runs."""
    runs: list[list[tuple[int, dict]]] = []
    for item in indexed:
        if runs and runs[-1][0][1]["role"] == item[1]["role"]:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def _authors_history(before: list[dict], keep: int) -> list[dict]:
    """The authors' ``truncate_history_starting_with_human``: the last ``keep`` messages, leading
    assistant messages dropped, then same-role runs collapsed to their first message (a leading
    system message, which their scripts never see, stays on top and is not counted)."""
    system = before[:1] if before and before[0]["role"] == SYSTEM else []
    body = before[len(system) :][-keep:]
    while body and body[0]["role"] == ASSISTANT:
        body = body[1:]
    collapsed: list[dict] = []
    for m in body:
        if not collapsed or collapsed[-1]["role"] != m["role"]:
            collapsed.append(m)
    return system + collapsed


def conversation_tuples(
    conversation: Conversation,
    filters: FilterConfig | None = None,
    report: DataReport | None = None,
) -> list[InteractionTuple]:
    """The tuples of one conversation after filtering (see the module docstring for reasons)."""
    filters = filters or FilterConfig()
    report = report if report is not None else DataReport()
    indexed, reason = _clean_messages(conversation, filters, report)
    if indexed is None:
        report.dropped_conversations[reason] += 1
        return []
    runs = _runs(indexed)
    if filters.same_role_runs == "drop" and any(len(run) > 1 for run in runs):
        report.dropped_conversations["non_alternating"] += 1
        return []
    # One message per run: the run's first, or an assistant run's last with assistant_runs="last".
    messages: list[dict[str, str]] = []
    new_index: dict[int, int] = {}  # original message index -> index after cleaning
    raw_start: list[int] = []  # index in `indexed` of each kept message's run start
    run_length: list[int] = []
    position = 0
    for run in runs:
        chosen = run[-1] if run[0][1]["role"] == ASSISTANT and filters.assistant_runs == "last" else run[0]
        new_index[chosen[0]] = len(messages)
        messages.append(chosen[1])
        raw_start.append(position)
        run_length.append(len(run))
        position += len(run)
        if len(run) > 1:
            report.adjusted["collapsed_same_role"] += len(run) - 1
    raw = [m for _, m in indexed]

    targets = None
    if conversation.response_indices is not None:
        targets = {new_index[i] for i in conversation.response_indices if i in new_index}
        report.dropped_tuples["collapsed"] += len(conversation.response_indices) - len(targets)

    tuples = []
    turn_index = -1
    for i, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        turn_index += 1
        if i + 1 >= len(messages) or (targets is not None and i not in targets):
            continue  # the final answer has no follow-up; untargeted turns are context only
        full_x, y, o = messages[:i], message["content"], messages[i + 1]["content"]
        x = full_x
        if filters.history_messages is not None:
            # Cut the logged history before collapsing (the run's own messages excluded).
            x = _authors_history(raw[: raw_start[i]], filters.history_messages)
            if x != full_x:
                report.adjusted["history_cut"] += 1
        reason = None
        if not x or x[-1]["role"] != USER:
            reason = "no_prompt"
        elif run_length[i] > 1 and filters.assistant_runs == "skip":
            reason = "assistant_run"
        elif filters.drop_empty_response and _blank(y):
            reason = "empty_response"
        elif filters.drop_empty_followup and _blank(o):
            reason = "empty_followup"
        elif filters.drop_empty_prompt and _blank(x[-1]["content"]):
            reason = "empty_prompt"
        if reason is not None:
            report.dropped_tuples[reason] += 1
            continue
        tuples.append(
            InteractionTuple(
                x=list(x),
                y=y,
                o=o,
                conversation_id=conversation.id,
                turn_index=turn_index,
                message_index=i,
                user_key=conversation.user_key,
                metadata={"language": conversation.language, "source_model": conversation.source_model},
                full_x=None if x is full_x or x == full_x else list(full_x),
            )
        )
    if tuples:
        report.conversations_kept += 1
        report.tuples_kept += len(tuples)
    else:
        report.dropped_conversations["no_tuples"] += 1
    return tuples


def extract_tuples(
    conversations: Iterable[Conversation],
    filters: FilterConfig | None = None,
    report: DataReport | None = None,
) -> Iterator[InteractionTuple]:
    """Stream the tuples of many conversations, in order, counting drops into ``report``."""
    filters = filters or FilterConfig()
    report = report if report is not None else DataReport()
    for conversation in conversations:
        yield from conversation_tuples(conversation, filters, report)


def _continues(t: InteractionTuple, previous: InteractionTuple) -> bool:
    """Whether ``t`` is a later turn of ``previous``'s conversation (ids alone are not unique:
    WildChat's ``conversation_hash`` repeats for repeated conversations)."""
    i = previous.message_index
    history = t.full_history
    return (
        t.conversation_id == previous.conversation_id
        and t.message_index > i
        and history[:i] == previous.full_history
        and history[i]["content"] == previous.y
    )


def group_by_conversation(tuples: Iterable[InteractionTuple]) -> Iterator[list[InteractionTuple]]:
    """Group consecutive tuples of the same conversation (as :func:`extract_tuples` yields them).

    A new group starts where the id changes or where a tuple does not continue the previous
    one's conversation (two logged conversations sharing an id).
    """
    group: list[InteractionTuple] = []
    for t in tuples:
        if group and not _continues(t, group[-1]):
            yield group
            group = []
        group.append(t)
    if group:
        yield group
