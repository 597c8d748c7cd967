"""Token layouts for the student and the teacher: per-tuple and packed conversation.

The records and their configuration; :mod:`hsd.data.tokenization` builds them.

Both layouts obey the same contract for every scored response token k (in order):
``student_scored_positions[k]`` is the student position whose hidden state predicts
``target_ids[k]``, and ``teacher_scored_positions[k]`` the teacher position (a position id,
counted from the start of the teacher sequence) predicting the same token. The teacher
sequence is ``shared prefix + teacher_suffix_ids``; the prefix is found on token ids (longest
common prefix of the student and teacher tokenisations), never assumed from the template.

Truncation (METHOD.md §2): per-tuple, the history is cut once from the left by whole messages
(first to ``history_messages``, then until the student prompt fits ``max_prompt_tokens``), so
the student and teacher see the same history; the hindsight block has ``max_followup_tokens``
and y + end-of-turn ``max_response_tokens``. A leading assistant message of x is dropped in
both layouts (the paper; templates with role rules could not render it). Packed, a
conversation longer than ``max_length`` is split into windows that start at a user message:
each window holds at most ``max_length`` student tokens (branches included), every scored reply
sees at least ``min(its whole history, max_length // 2)`` tokens of context, and the windows are
chosen for the fewest student tokens in total (``DataReport.student_token_ratio``: about 2x the
conversation's tokens; a little more when turns are long, since a window can only end after a
whole reply and start before a whole user message: a window after the first holds at least
``max_length // 2`` tokens of context, so it costs more than twice what it adds unless it is
exactly full and its context exactly half; dynamic programming finds the least total over all
plans of such windows, on token counts estimated from the whole conversation's tokenisation).
A response over its budget is never cut:
the tuple is dropped and counted (``response_over_budget``, ``prompt_over_budget``,
``window_over_budget``, ``followup_over_budget``).

Scored ids (both layouts): a reply's ids are the tokenizer's ids for the text between the end
of the generation prompt and the end-of-turn token (with the whitespace a template adds, e.g.
Mistral's ``' ' + reply``), then the end-of-turn token; message contents are encoded with
special tokens split. Caveat: sequences are tokenised in segments cut at message contents, which
can differ from one whole-text encode where BPE would merge across a cut (a newline between a
header and a reply, say); both layouts, student and teacher, use the same cuts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["LayoutConfig", "TupleExample", "PackedTuple", "StudentBranch", "ConversationExample"]


@dataclass
class LayoutConfig:
    """How tuples become token sequences.

    Attributes:
        history_messages: per-tuple layout keeps the last k messages of x (paper: 5); a leading
            system message is kept on top and not counted; None keeps all.
        max_prompt_tokens: per-tuple budget of the student prompt (history + generation prompt).
        max_followup_tokens: budget of the rendered hindsight block.
        max_response_tokens: budget of y plus its end-of-turn token.
        max_length: packed layout: most student tokens in one example (trunk plus student
            branches); longer conversations are windowed (see the module docstring).
        ignore_first_k: the first k tokens of y are not scored (paper: 2); end-of-turn always is.
        followup_overflow: ``"drop"`` the tuple, or ``"truncate"`` the follow-up to its budget.
        chat_template_kwargs: passed to the chat template (e.g. ``{"enable_thinking": False}``).
        end_of_turn_token: token closing a reply; by default read from the chat template (the
            special token it writes after a probe reply: ``<|im_end|>``, ``<|eot_id|>``, Gemma's
            ``<end_of_turn>``, Phi-3's ``<|end|>``), else ``tokenizer.eos_token``.
    """

    history_messages: int | None = 5
    max_prompt_tokens: int | None = None
    max_followup_tokens: int | None = None
    max_response_tokens: int | None = None
    max_length: int | None = None
    ignore_first_k: int = 2
    followup_overflow: str = "drop"
    chat_template_kwargs: dict = field(default_factory=dict)
    end_of_turn_token: str | None = None

    def __post_init__(self):
        if self.followup_overflow not in ("drop", "truncate"):
            raise ValueError(f"followup_overflow must be 'drop' or 'truncate', got {self.followup_overflow!r}")
        if self.ignore_first_k < 0:
            raise ValueError("ignore_first_k must be >= 0")
        for name in ("history_messages", "max_prompt_tokens", "max_followup_tokens", "max_response_tokens", "max_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")

    @classmethod
    def paper(cls, **overrides) -> "LayoutConfig":
        """The authors' offline settings: 5 history messages, 2048 prompt and 2048 completion
        tokens, ignore_first_k=2; the follow-up gets 512 tokens of its own."""
        base = cls(history_messages=5, max_prompt_tokens=2048, max_followup_tokens=512, max_response_tokens=2048)
        return dataclasses.replace(base, **overrides)


def _scored(mask: list[int], first_position: int) -> list[int]:
    return [first_position + i for i, keep in enumerate(mask) if keep]


@dataclass
class TupleExample:
    """Per-tuple layout: a student sequence and a teacher sequence sharing ``prefix_len`` tokens.

    ``student_ids`` = prompt(x) + y + end-of-turn; ``teacher_ids`` = prompt(x with hindsight)
    + y + end-of-turn; ``response_mask`` covers the y + end-of-turn tokens (the last
    ``len(response_mask)`` ids of both sequences).
    """

    conversation_id: str
    turn_index: int
    student_ids: list[int]
    teacher_ids: list[int]
    prefix_len: int
    student_prompt_len: int
    teacher_prompt_len: int
    response_mask: list[int]
    kept_history_messages: int  # messages of x kept after truncation (system included)

    @property
    def response_ids(self) -> list[int]:
        return self.student_ids[self.student_prompt_len :]

    @property
    def teacher_suffix_ids(self) -> list[int]:
        return self.teacher_ids[self.prefix_len :]

    @property
    def teacher_suffix_positions(self) -> list[int]:
        """Position ids of the teacher suffix: they continue from the shared prefix."""
        return list(range(self.prefix_len, len(self.teacher_ids)))

    @property
    def student_scored_positions(self) -> list[int]:
        return _scored(self.response_mask, self.student_prompt_len - 1)

    @property
    def teacher_scored_positions(self) -> list[int]:
        return _scored(self.response_mask, self.teacher_prompt_len - 1)

    @property
    def teacher_suffix_scored_indices(self) -> list[int]:
        """Indices into the teacher suffix (for a teacher that computes only the suffix)."""
        return [p - self.prefix_len for p in self.teacher_scored_positions]

    @property
    def target_ids(self) -> list[int]:
        return [t for t, keep in zip(self.response_ids, self.response_mask) if keep]

    def to_dict(self) -> dict:
        """Stored fields plus the derived positions, JSON-ready."""
        return {
            **dataclasses.asdict(self),
            "layout": "tuple",
            "student_scored_positions": self.student_scored_positions,
            "teacher_scored_positions": self.teacher_scored_positions,
            "target_ids": self.target_ids,
        }


@dataclass
class PackedTuple:
    """One scored tuple inside a packed conversation sequence.

    The student's view is ``student_context(k)`` of the enclosing :class:`ConversationExample`
    (``input_ids[:response_end]`` for a reply in the trunk); the teacher's is
    ``input_ids[:prefix_offset] + teacher_suffix_ids`` (hindsight block, end of the user turn,
    assistant header, y, end-of-turn), with suffix position ids starting at ``prefix_offset``
    (the prefix always lies in the trunk). ``response_start``/``response_end`` index
    ``input_ids``; a branched reply never starts its branch, so ``response_start - 1`` (the row
    predicting its first token) is always in the same branch or trunk as the reply.
    """

    turn_index: int
    response_start: int
    response_end: int
    prefix_offset: int
    teacher_prompt_len: int
    teacher_suffix_ids: list[int]
    response_mask: list[int]

    @property
    def response_ids(self) -> list[int]:
        return self.teacher_suffix_ids[len(self.teacher_suffix_ids) - len(self.response_mask) :]

    @property
    def teacher_suffix_positions(self) -> list[int]:
        return list(range(self.prefix_offset, self.prefix_offset + len(self.teacher_suffix_ids)))

    @property
    def student_scored_positions(self) -> list[int]:
        return _scored(self.response_mask, self.response_start - 1)

    @property
    def teacher_scored_positions(self) -> list[int]:
        return _scored(self.response_mask, self.teacher_prompt_len - 1)

    @property
    def teacher_suffix_scored_indices(self) -> list[int]:
        return [p - self.prefix_offset for p in self.teacher_scored_positions]

    @property
    def target_ids(self) -> list[int]:
        return [t for t, keep in zip(self.response_ids, self.response_mask) if keep]


@dataclass(frozen=True)
class StudentBranch:
    """A student-only continuation of the trunk (see :class:`ConversationExample`).

    Its tokens are ``input_ids[start:end]`` (``start >= trunk_len``); it continues the trunk
    after ``input_ids[:attach]``, so its j-th token has position id ``attach + j``. It holds
    at least one token before its reply (so the row predicting the reply's first token is in
    the branch).
    """

    start: int
    end: int
    attach: int


@dataclass
class ConversationExample:
    """Packed layout: one student token tree for a conversation (or one window of it).

    ``input_ids[:trunk_len]`` is the **trunk**: the window as the chat template renders it as
    history. A reply whose last-turn rendering differs from its history rendering (Qwen3's
    empty think block, reasoning stripped from history, ...) is scored in a **student branch**:
    ``input_ids[b.start:b.end]`` for ``b`` in ``student_branches``, stored after the trunk,
    branch after branch, continuing the trunk after ``input_ids[:b.attach]``.

    Attention rule (the only one): a trunk token q attends trunk tokens k <= q; a token q of
    branch b attends trunk tokens k < b.attach and tokens b.start <= k <= q of its own branch;
    no other token ever attends a branch token. ``position_ids[i]`` is i in the trunk and
    ``b.attach + (i - b.start)`` in a branch. Without branches, ``trunk_len == len(input_ids)``
    and this is one causal sequence.

    Each :class:`PackedTuple`'s ``response_start``/``response_end`` and
    ``student_scored_positions`` index ``input_ids`` (inside the branch for a branched reply);
    its teacher prefix ``input_ids[:prefix_offset]`` always lies in the trunk.
    """

    conversation_id: str
    window_index: int
    first_message: int  # conversation index of the window's first non-system message
    input_ids: list[int]
    tuples: list[PackedTuple]
    trunk_len: int | None = None
    position_ids: list[int] | None = None
    student_branches: list[StudentBranch] = field(default_factory=list)

    def __post_init__(self):
        if self.trunk_len is None:
            self.trunk_len = len(self.input_ids) - sum(b.end - b.start for b in self.student_branches)
        expected = self.trunk_len
        for b in self.student_branches:
            if b.start != expected or b.end <= b.start or not 0 <= b.attach <= self.trunk_len:
                raise ValueError(
                    f"student branch {b} does not follow the trunk ({self.trunk_len} tokens) and the branches before it"
                )
            expected = b.end
        if expected != len(self.input_ids):
            raise ValueError(f"trunk and branches cover {expected} of {len(self.input_ids)} input ids")
        if self.position_ids is None:
            self.position_ids = list(range(self.trunk_len))
            for b in self.student_branches:
                self.position_ids.extend(range(b.attach, b.attach + b.end - b.start))
        if len(self.position_ids) != len(self.input_ids):
            raise ValueError(f"position_ids has {len(self.position_ids)} entries for {len(self.input_ids)} input ids")

    def branch_of(self, index: int) -> StudentBranch | None:
        """The branch holding ``input_ids[index]``, or None for a trunk token."""
        if index < self.trunk_len:
            return None
        for b in self.student_branches:
            if b.start <= index < b.end:
                return b
        raise IndexError(f"index {index} is outside input_ids ({len(self.input_ids)} tokens)")

    def student_context(self, k: int) -> list[int]:
        """The ids the k-th tuple's student sees, up to and including its end-of-turn token.

        ``input_ids[:response_end]`` for a trunk reply, ``input_ids[:attach] +
        input_ids[start:response_end]`` for a branched one; it equals the per-tuple layout's
        ``student_ids`` for the same tuple and window (history unlimited).
        """
        t = self.tuples[k]
        b = self.branch_of(t.response_start)
        if b is None:
            return self.input_ids[: t.response_end]
        return self.input_ids[: b.attach] + self.input_ids[b.start : t.response_end]

    def attends(self, q: int, k: int) -> bool:
        """Whether row ``q`` attends row ``k`` under the tree's attention rule (for tests and
        reference implementations; a forward builds the mask from the collated fields)."""
        if k > q:
            return False
        bq, bk = self.branch_of(q), self.branch_of(k)
        if bq is None:
            return bk is None
        return bk is bq or (bk is None and k < bq.attach)

    @property
    def response_spans(self) -> list[tuple[int, int]]:
        """``[start, end)`` of each scored tuple's y + end-of-turn tokens in ``input_ids``."""
        return [(t.response_start, t.response_end) for t in self.tuples]

    @property
    def student_scored_positions(self) -> list[int]:
        return [p for t in self.tuples for p in t.student_scored_positions]

    @property
    def target_ids(self) -> list[int]:
        return [i for t in self.tuples for i in t.target_ids]

    def to_dict(self) -> dict:
        """Stored fields plus per-tuple derived positions, JSON-ready."""
        tuples = [
            {
                **dataclasses.asdict(t),
                "student_scored_positions": t.student_scored_positions,
                "teacher_scored_positions": t.teacher_scored_positions,
                "target_ids": t.target_ids,
            }
            for t in self.tuples
        ]
        return {**dataclasses.asdict(self), "layout": "packed", "tuples": tuples}
