"""Interaction tuples (x, y, o) from conversations, with the paper's filters (METHOD.md §1).

A conversation ``u0, a1, u1, a2, u2, ...`` yields one tuple per assistant message followed by a
user message: x is everything before that assistant message, y the assistant message, o the
next user message. Filters run first on the whole conversation, then on each tuple; everything
dropped is counted in a :class:`~hsd.data.report.DataReport` under the reason names below.

Conversation-level reasons: ``misplaced_system`` (a system message after the first message),
``language``, ``message_too_long``, ``conversation_too_long``, ``too_few_messages``,
``non_alternating`` (same-role run with ``same_role_runs="drop"``), ``no_tuples``.
Tuple-level reasons: ``no_prompt`` (no user message before y), ``empty_response``,
``empty_followup``, ``empty_prompt``, ``collapsed`` (a logged target removed by collapsing).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from .records import ASSISTANT, SYSTEM, USER, Conversation
from .report import DataReport

__all__ = ["FilterConfig", "InteractionTuple", "extract_tuples", "conversation_tuples", "group_by_conversation"]


@dataclass
class FilterConfig:
    """Which conversations and tuples to keep. Defaults keep everything well-formed.

    Attributes:
        languages: keep conversations whose ``language`` is one of these (case-insensitive);
            None keeps all.
        min_nonempty_messages: drop conversations with fewer non-whitespace messages.
        max_total_chars: drop conversations whose messages hold more characters in total.
        max_message_chars: drop conversations with any longer message.
        keep_system: keep a leading system message in x (else it is removed and counted).
        same_role_runs: ``"collapse"`` keeps the first message of a run of same-role messages
            (the paper) and counts the rest under ``adjusted``; ``"drop"`` drops the conversation.
        drop_empty_response, drop_empty_followup, drop_empty_prompt: drop tuples whose y, o, or
            last user message of x is empty or whitespace.
    """

    languages: tuple[str, ...] | None = None
    min_nonempty_messages: int = 0
    max_total_chars: int | None = None
    max_message_chars: int | None = None
    keep_system: bool = True
    same_role_runs: str = "collapse"
    drop_empty_response: bool = True
    drop_empty_followup: bool = True
    drop_empty_prompt: bool = True

    def __post_init__(self):
        if self.same_role_runs not in ("collapse", "drop"):
            raise ValueError(f"same_role_runs must be 'collapse' or 'drop', got {self.same_role_runs!r}")
        if isinstance(self.languages, str):
            self.languages = (self.languages,)

    @classmethod
    def paper(cls, **overrides) -> "FilterConfig":
        """The paper's WildChat filters: English, >= 3 non-empty messages, <= 100,000 characters
        in total, <= 4,096 characters per message."""
        base = cls(languages=("English",), min_nonempty_messages=3, max_total_chars=100_000, max_message_chars=4096)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FilterConfig":
        """A named preset: ``"paper"`` or ``"none"`` (the defaults)."""
        if name == "paper":
            return cls.paper(**overrides)
        if name == "none":
            return cls(**overrides)
        raise ValueError(f"unknown filter preset {name!r}; expected 'paper' or 'none'")


@dataclass
class InteractionTuple:
    """One (x, y, o) tuple.

    Attributes:
        x: the history before y, ending with a user message (a leading system message included).
        y: the logged assistant response.
        o: the user's next message (the follow-up).
        conversation_id: the source conversation's id.
        turn_index: 0-based index of y among the conversation's assistant messages.
        message_index: index of y in the normalised conversation (``len(x)``).
        user_key: the conversation's user key (personalisation), if any.
    """

    x: list[dict[str, str]]
    y: str
    o: str
    conversation_id: str
    turn_index: int
    message_index: int
    user_key: str | None = None
    metadata: dict = field(default_factory=dict)

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
    """Apply the conversation-level filters; return (messages, targets) or (None, reason)."""
    messages = conversation.messages
    if any(m["role"] == SYSTEM for m in messages[1:]):
        return None, "misplaced_system"
    if filters.languages is not None:
        wanted = {lang.lower() for lang in filters.languages}
        if (conversation.language or "").lower() not in wanted:
            return None, "language"
    if filters.max_message_chars is not None and any(len(m["content"]) > filters.max_message_chars for m in messages):
        return None, "message_too_long"
    if filters.max_total_chars is not None and sum(len(m["content"]) for m in messages) > filters.max_total_chars:
        return None, "conversation_too_long"
    if sum(not _blank(m["content"]) for m in messages) < filters.min_nonempty_messages:
        return None, "too_few_messages"

    kept: list[dict[str, str]] = []
    new_index: dict[int, int] = {}  # original message index -> index after cleaning
    for i, message in enumerate(messages):
        if message["role"] == SYSTEM and not filters.keep_system:
            report.adjusted["removed_system"] += 1
            continue
        if kept and kept[-1]["role"] == message["role"]:
            if filters.same_role_runs == "drop":
                return None, "non_alternating"
            report.adjusted["collapsed_same_role"] += 1
            continue
        new_index[i] = len(kept)
        kept.append(message)
    return kept, new_index


def conversation_tuples(
    conversation: Conversation,
    filters: FilterConfig | None = None,
    report: DataReport | None = None,
) -> list[InteractionTuple]:
    """The tuples of one conversation after filtering (see the module docstring for reasons)."""
    filters = filters or FilterConfig()
    report = report if report is not None else DataReport()
    messages, new_index = _clean_messages(conversation, filters, report)
    if messages is None:
        report.dropped_conversations[new_index] += 1
        return []
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
        x, y, o = messages[:i], message["content"], messages[i + 1]["content"]
        reason = None
        if not x or x[-1]["role"] != USER:
            reason = "no_prompt"
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
    return (
        t.conversation_id == previous.conversation_id
        and t.message_index > i
        and t.x[:i] == previous.x
        and t.x[i]["content"] == previous.y
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
