"""Building the per-tuple and packed layouts from interaction tuples.

See :mod:`hsd.data.layouts` for the records and the truncation policy, and
:mod:`hsd.data.render` for the one tokenisation rule both layouts share.

Cost: the packed layout renders and tokenises each window once (the trunk); per tuple it
renders the student's and the teacher's views (text only) and tokenises only the part of each
that departs from the trunk (the hindsight block, the assistant header, a branched reply), so
its time grows linearly with the number of turns.
"""

from __future__ import annotations

import bisect
import logging
from typing import Iterable, Iterator

from .layouts import ConversationExample, LayoutConfig, PackedTuple, StudentBranch, TupleExample
from .records import ASSISTANT, SYSTEM, USER, DataError
from .render import ChatRenderer, ChatTemplateError, Tokenized, common_prefix_len
from .report import DataReport
from .templates import HindsightTemplate
from .tuples import InteractionTuple, group_by_conversation

__all__ = ["tokenize_tuple", "tokenize_conversation", "iter_examples"]

logger = logging.getLogger("hsd.data")


# ---- shared steps -------------------------------------------------------------------------


def _record(t: InteractionTuple) -> str:
    return f"conversation {t.conversation_id!r} turn {t.turn_index}"


def _check_tuple(t) -> None:
    """Hand-built (or later modified) tuples: a clear DataError before any tokenizer sees a bad
    field. Messages are checked where a layout uses them (:func:`_check_messages`)."""
    if not isinstance(t, InteractionTuple):
        raise DataError(f"expected an InteractionTuple, got {type(t).__name__}")
    for name, value in (("y", t.y), ("o", t.o), ("conversation_id", t.conversation_id)):
        if not isinstance(value, str):
            raise DataError(f"{_record(t)}: InteractionTuple.{name} must be a string, got {type(value).__name__}")
    if not isinstance(t.x, list) or not isinstance(t.full_history, list):
        raise DataError(f"{_record(t)}: InteractionTuple.x must be a list of messages, got {type(t.x).__name__}")


def _check_messages(messages: list, where: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (USER, ASSISTANT, SYSTEM):
            raise DataError(
                f"{where}: message {i} of x must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}"
            )


def _response_mask(n_tokens: int, ignore_first_k: int) -> list[int]:
    # The last token is the end-of-turn token: always scored, so the model learns to stop.
    return [0 if i < ignore_first_k and i < n_tokens - 1 else 1 for i in range(n_tokens)]


def _fit_followup(r: ChatRenderer, template: HindsightTemplate, o: str, cfg: LayoutConfig, report: DataReport):
    """The follow-up to use (maybe truncated), or None when the tuple must be dropped."""
    budget = cfg.max_followup_tokens
    if budget is None or len(r.encode(template.render(o), True)) <= budget:
        return o
    if cfg.followup_overflow == "truncate":
        # Cut o at a character boundary (decoding a cut between the byte tokens of one character
        # gives U+FFFD): the longest prefix that fits, by bisection; o[:high] never fits.
        low, high = 0, len(o)
        while high - low > 1:
            middle = (low + high) // 2
            if len(r.encode(template.render(o[:middle]), True)) <= budget:
                low = middle
            else:
                high = middle
        if low > 0:
            report.adjusted["followup_truncated"] += 1
            return o[:low]
    report.dropped_tuples["followup_over_budget"] += 1
    return None


def _reply(y: str) -> dict:
    return {"role": ASSISTANT, "content": y}


def _view(r: ChatRenderer, history: list[dict], y: str, where: str, base: Tokenized | None) -> tuple[Tokenized, int]:
    """``history`` + y rendered as the last turn and tokenised (reusing ``base`` where the texts
    agree); returns the tokens and the index of y's first token."""
    view = r.reply_view(history, y, where)
    messages = history + [_reply(y)]
    if base is None:
        tok = r.tokenize(view.text, messages, spans=view.spans)
    else:
        tok = r.extend(base, view.text, messages, spans=view.spans)
    start, end = tok.token_span(len(messages) - 1)
    if end != len(tok.ids) - 1 or tok.ids[-1] != r.end_of_turn_id:
        raise ChatTemplateError(
            f"{where}: the reply is not followed by exactly one end-of-turn token {r.end_of_turn_token!r}"
        )
    if end == start:
        raise ChatTemplateError(f"{where}: the reply renders to no tokens")
    return tok, start


def _teacher(r, template, history, followup, y, response_ids, where, base) -> tuple[list[int], int]:
    """Teacher ids and teacher prompt length; the teacher scores exactly the student's y."""
    teacher, prompt_len = _view(r, template.teacher_messages(history, followup), y, where + " (teacher)", base)
    if teacher.ids[prompt_len:] != response_ids:
        raise ChatTemplateError(f"{where}: the template renders y differently for the teacher than for the student")
    return teacher.ids, prompt_len


def _drop_leading_assistants(messages: list[dict]) -> list[dict]:
    system = messages[:1] if messages and messages[0]["role"] == SYSTEM else []
    body = messages[len(system) :]
    while body and body[0]["role"] == ASSISTANT:
        body = body[1:]
    return system + body


def _cut_history(x: list[dict], keep: int | None) -> list[dict]:
    """Last ``keep`` messages (system kept on top; None: all), starting with a user message
    (the paper drops leading assistant messages; chat templates with role rules need it)."""
    if keep is None:
        return _drop_leading_assistants(x)
    system = x[:1] if x and x[0]["role"] == SYSTEM else []
    body = x[len(system) :]
    return _drop_leading_assistants(system + body[max(0, len(body) - keep) :])


# ---- per-tuple layout ---------------------------------------------------------------------


def tokenize_tuple(
    t: InteractionTuple,
    tokenizer,
    template: HindsightTemplate | str = "offline",
    config: LayoutConfig | None = None,
    report: DataReport | None = None,
) -> TupleExample | None:
    """Tokenise one tuple into the per-tuple layout; None if a budget drops it (counted).

    ``tokenizer`` is a Hugging Face tokenizer with a chat template (or a :class:`ChatRenderer`).
    Raises :class:`ChatTemplateError` naming the tuple when the template cannot render it
    consistently, :class:`DataError` for a malformed tuple.
    """
    _check_tuple(t)
    cfg = config or LayoutConfig()
    report = report if report is not None else DataReport()
    r = ChatRenderer.for_tokenizer(tokenizer, cfg.chat_template_kwargs, cfg.end_of_turn_token)
    template = HindsightTemplate.resolve(template)
    where = _record(t)

    followup = _fit_followup(r, template, t.o, cfg, report)
    if followup is None:
        return None
    _check_messages(t.x[:1] + t.x[-(cfg.history_messages or len(t.x)) - 1 :], where)  # what the cut reads
    history = _cut_history(t.x, cfg.history_messages)
    while True:
        if not history or history[-1]["role"] != USER:
            raise DataError(f"{where}: the history must end with a user message")
        student, prompt_len = _view(r, history, t.y, where, None)
        if cfg.max_prompt_tokens is None or prompt_len <= cfg.max_prompt_tokens:
            break
        body_len = len(history) - (1 if history[0]["role"] == SYSTEM else 0)
        if body_len <= 1:
            report.dropped_tuples["prompt_over_budget"] += 1
            return None
        report.adjusted["history_cut_for_budget"] += 1
        history = _cut_history(history, body_len - 1)

    response_ids = student.ids[prompt_len:]
    if cfg.max_response_tokens is not None and len(response_ids) > cfg.max_response_tokens:
        report.dropped_tuples["response_over_budget"] += 1
        return None
    teacher_ids, teacher_prompt_len = _teacher(r, template, history, followup, t.y, response_ids, where, student)
    # The teacher's first scored hidden state (teacher_prompt_len - 1) must lie in its suffix.
    prefix = min(common_prefix_len(student.ids, teacher_ids), prompt_len, teacher_prompt_len - 1)
    report.examples_built += 1
    report.student_tokens += len(student.ids)
    return TupleExample(
        conversation_id=t.conversation_id,
        turn_index=t.turn_index,
        student_ids=student.ids,
        teacher_ids=teacher_ids,
        prefix_len=prefix,
        student_prompt_len=prompt_len,
        teacher_prompt_len=teacher_prompt_len,
        response_mask=_response_mask(len(response_ids), cfg.ignore_first_k),
        kept_history_messages=len(history),
    )


# ---- packed conversation layout -----------------------------------------------------------


def _conversation_messages(tuples: list[InteractionTuple]) -> list[dict]:
    """The conversation up to the last scored y, checked against every tuple's x and y."""
    last = tuples[-1]
    messages = last.full_history + [_reply(last.y)]
    for t in tuples:
        if t.conversation_id != last.conversation_id:
            raise DataError(
                f"tokenize_conversation got tuples of conversations {t.conversation_id!r} and "
                f"{last.conversation_id!r}; group them with group_by_conversation"
            )
        if messages[: t.message_index] != t.full_history or messages[t.message_index]["content"] != t.y:
            raise DataError(f"{_record(t)}: its history is not a prefix of the conversation's")
    return messages


class _Conversation:
    """One conversation: its messages, its whole tokenisation and per-message token offsets
    (the window planner's estimates), and window trunks."""

    def __init__(self, r: ChatRenderer, messages: list[dict], where: str):
        self.r, self.messages, self.where = r, messages, where
        self.system = messages[:1] if messages and messages[0]["role"] == SYSTEM else []
        # Windows start at a user message: a leading assistant message is dropped (as the
        # per-tuple layout does), and templates with role rules render every window.
        self.first = next(i for i in range(len(self.system), len(messages)) if messages[i]["role"] == USER)
        self.full = self.trunk(self.first, len(messages) - 1)
        # Token offset where each message's rendering begins (its markup), in ``full``.
        self.begin: dict[int, int] = {}
        self.reply_start: dict[int, int] = {}
        self.end: dict[int, int] = {}
        offset = len(self.system)
        system_span, first_span = self.full.spans[0], self.full.spans[len(self.system)]
        # The system block is the head of every window when the template writes it first
        # (Mistral v0.3 writes it inside the last user turn: no head).
        previous_end = (self.full.token_index(system_span[1])
                        if self.system and system_span and (first_span is None or system_span[1] <= first_span[0]) else 0)
        for i in range(self.first, len(messages)):
            span = self.full.spans[i - self.first + offset]
            self.begin[i] = previous_end
            if span is not None:
                self.reply_start[i] = self.full.token_index(span[0])
                previous_end = self.full.token_index(span[1])
            self.end[i] = previous_end + (1 if messages[i]["role"] == ASSISTANT else 0)
        self.head = self.begin[self.first]  # BOS, system block: in every window

    def window(self, first: int, last: int) -> list[dict]:
        return self.system + self.messages[first : last + 1]

    def trunk(self, first: int, last: int) -> Tokenized:
        """The window ``system + messages[first:last + 1]`` rendered and tokenised, cut after
        its last reply's end-of-turn token."""
        window = self.window(first, last)
        text = self.r.render(window, False, self.where)
        spans = self.r.locate(window, text)
        if spans[-1] is None or not text.startswith(self.r.end_of_turn_token, spans[-1][1]):
            raise ChatTemplateError(
                f"{self.where}, message {last}: the rendered conversation does not contain this reply followed by "
                f"the end-of-turn token {self.r.end_of_turn_token!r}"
            )
        text = text[: spans[-1][1] + len(self.r.end_of_turn_token)]
        return self.r.tokenize(text, window, spans=spans)

    # Estimates from the whole tokenisation (exact for templates whose windows render as
    # slices of the conversation; the built windows are checked against max_length anyway).
    def est_length(self, first: int, replies: list[int]) -> int:
        n = self.head + self.end[replies[-1]] - self.begin[first]
        if self.r.replies_branch:  # every reply but the window's last gets a branch
            n += sum(self.end[j] - self.reply_start.get(j, self.begin[j]) + 8 for j in replies[:-1])
        return n

    def est_context(self, first: int, j: int) -> int:
        bias = self.context_bias if first != self.first else 0
        return self.head + self.reply_start.get(j, self.begin[j]) - self.begin[first] + bias

    #: Built windows' context minus its estimate, at most 0 (the markup that closes the message
    #: before a window start is counted in the estimate but not rendered in the window).
    context_bias = 0


def _build_window(conv, first, window_tuples, followups, r, template, cfg, report, window_index):
    """One :class:`ConversationExample` (trunk plus student branches) and each tuple's context."""
    last = window_tuples[-1].message_index
    whole = first == conv.first and last == len(conv.messages) - 1
    trunk = conv.full if whole else conv.trunk(first, last)
    offset = len(conv.system) - first  # conversation index -> window index
    window = trunk.messages
    input_ids = list(trunk.ids)
    trunk_ids = trunk.ids
    branches: list[StudentBranch] = []
    packed, contexts = [], []
    for t in window_tuples:
        j = t.message_index + offset
        where = _record(t)
        student, prompt_len = _view(r, window[:j], t.y, where, trunk)
        response_ids = student.ids[prompt_len:]
        if cfg.max_response_tokens is not None and len(response_ids) > cfg.max_response_tokens:
            report.dropped_tuples["response_over_budget"] += 1
            continue
        attach = common_prefix_len(student.ids, trunk_ids)
        if attach == len(student.ids):  # the student's context is a prefix of the trunk
            start, end = prompt_len, len(student.ids)
        else:
            # A student branch: the student's ids after the trunk, attached where they part
            # (at least one token before y, so y's first prediction row is in the branch).
            attach = min(attach, prompt_len - 1)
            branch = StudentBranch(len(input_ids), len(input_ids) + len(student.ids) - attach, attach)
            input_ids.extend(student.ids[attach:])
            branches.append(branch)
            start, end = branch.start + prompt_len - attach, branch.end
        teacher_ids, teacher_prompt_len = _teacher(
            r, template, window[:j], followups[t.message_index], t.y, response_ids, where, trunk
        )
        # The teacher prefix lies in the trunk, before y's first scored hidden state.
        prefix = min(common_prefix_len(teacher_ids, trunk_ids), teacher_prompt_len - 1,
                     start if start < len(trunk_ids) else attach)
        packed.append(
            PackedTuple(
                turn_index=t.turn_index,
                response_start=start,
                response_end=end,
                prefix_offset=prefix,
                teacher_prompt_len=teacher_prompt_len,
                teacher_suffix_ids=teacher_ids[prefix:],
                response_mask=_response_mask(len(response_ids), cfg.ignore_first_k),
            )
        )
        contexts.append(prompt_len)  # the reply's position id: tokens of context before it
    if not packed:
        return None, contexts
    # Trunk tokens that no scored reply, branch or teacher prefix uses are not kept.
    needed = max([p.response_end for p in packed if p.response_end <= len(trunk_ids)]
                 + [b.attach for b in branches] + [p.prefix_offset for p in packed])
    if needed < len(trunk_ids):
        cut = len(trunk_ids) - needed
        input_ids = input_ids[:needed] + input_ids[len(trunk_ids) :]
        branches = [StudentBranch(b.start - cut, b.end - cut, b.attach) for b in branches]
        for p in packed:
            if p.response_start >= len(trunk_ids):
                p.response_start -= cut
                p.response_end -= cut
    example = ConversationExample(
        window_tuples[0].conversation_id, window_index, first, input_ids, packed,
        trunk_len=len(input_ids) - sum(b.end - b.start for b in branches), student_branches=branches,
    )
    return example, contexts


def _window_starts(conv: _Conversation) -> list[int]:
    return [i for i in range(conv.first, len(conv.messages)) if conv.messages[i]["role"] == USER]


def _window_start(conv: _Conversation, starts: list[int], j: int, L: int) -> tuple[int | None, int]:
    """Where a window whose first scored reply is message ``j`` starts, and the context it
    must give that reply: the latest user message leaving ``min(history, L // 2)`` tokens of
    context, or, for a reply too long for that, the earliest start that fits (None: none does)."""
    need = min(L // 2, conv.est_context(conv.first, j))
    earliest_fitting = None
    # Walk back from j: later starts are shorter; stop once a start leaves enough context
    # or no longer fits (so the walk is as long as one window, not the conversation).
    for s in reversed(starts[: bisect.bisect_left(starts, j)]):
        if conv.est_length(s, [j]) > L:
            break
        if conv.est_context(s, j) >= need:
            return s, need
        earliest_fitting = s
    return earliest_fitting, need


def _plan_windows(conv: _Conversation, replies: list[int], L: int, starts: list[int]) -> list[tuple[int, int, int]]:
    """Windows ``(start, first reply, end reply)`` (reply indices into ``replies``, end
    exclusive) with the fewest student tokens in total (estimated), each reply scored once with
    at least ``min(history, L // 2)`` tokens of context: a window is fixed by its first reply
    (which sets its start) and its last; dynamic programming over the first reply of the next
    window. A reply no window can hold is left out (``start`` None, a one-reply entry)."""
    n = len(replies)
    start = [_window_start(conv, starts, j, L)[0] for j in replies]
    cost = [0] * (n + 1)
    choice = [n] * n
    for i in range(n - 1, -1, -1):
        if start[i] is None:
            cost[i], choice[i] = cost[i + 1], i + 1
            continue
        best = None
        for k in range(i + 1, n + 1):
            length = conv.est_length(start[i], replies[i:k])
            if length > L and k > i + 1:
                break
            if best is None or length + cost[k] < best:
                best, choice[i] = length + cost[k], k
        cost[i] = best
    plan, i = [], 0
    while i < n:
        plan.append((start[i], i, choice[i]))
        i = choice[i]
    return plan


def _plan_and_build(conv, tuples, followups, r, template, cfg, report) -> list[ConversationExample]:
    """Windows of at most ``max_length`` student tokens (branches included) that start at a
    user message, where every scored reply sees at least ``min(its history, max_length // 2)``
    tokens of context, with the fewest student tokens the window starts allow (see
    :func:`_plan_windows`). Estimates come from the whole conversation's tokenisation; every
    built window is checked, and the plan redone from there if one comes out too long."""
    L = cfg.max_length
    if L is None or conv.est_length(conv.first, [t.message_index for t in tuples]) <= L:
        example, _ = _build_window(conv, conv.first, tuples, followups, r, template, cfg, report, 0)
        if L is None or example is None or len(example.input_ids) <= L:
            return [example] if example is not None else []
    starts = _window_starts(conv)
    examples: list[ConversationExample] = []
    pending = list(tuples)
    plan = _plan_windows(conv, [t.message_index for t in pending], L, starts)
    while pending:
        s, i, k = plan[0]
        assert i == 0
        if s is None:
            report.dropped_tuples["window_over_budget"] += 1
            pending, plan = pending[1:], [(s2, i2 - 1, k2 - 1) for s2, i2, k2 in plan[1:]]
            continue
        group = pending[:k]
        j0 = group[0].message_index
        need = _window_start(conv, starts, j0, L)[1]
        built, contexts = _build_window(conv, s, group, followups, r, template, cfg, report, len(examples))
        fits = built is not None and len(built.input_ids) <= L
        predicted = conv.est_context(s, j0)
        if fits and contexts and contexts[0] < need and predicted >= need and s != conv.first:
            # The context estimate was high: learn by how much and plan the rest again.
            bias = max(-8, conv.context_bias + contexts[0] - predicted)
            if bias < conv.context_bias:
                conv.context_bias = bias
                plan = _plan_windows(conv, [t.message_index for t in pending], L, starts)
                continue
        if built is None or fits:
            if fits and contexts and contexts[0] < need:
                report.adjusted["window_context_below_half"] += 1  # a reply too long for it
            if fits:
                examples.append(built)
            pending, plan = pending[k:], [(s2, i2 - k, k2 - k) for s2, i2, k2 in plan[1:]]
            continue
        # Too long (the estimate was short): fewer replies from the same start; else the first
        # reply alone from the latest start that fits with enough context (else the most
        # context that fits). Then plan the rest again.
        used, built = 0, None
        for size in range(len(group) - 1, 0, -1):
            candidate, contexts = _build_window(conv, s, group[:size], followups, r, template, cfg, report, len(examples))
            if candidate is None or len(candidate.input_ids) <= L:
                used, built = size, candidate
                break
        if not used:
            used, dropped = 1, False
            for s2 in sorted((s2 for s2 in starts if s2 < j0), reverse=True):
                candidate, contexts = _build_window(conv, s2, group[:1], followups, r, template, cfg, report,
                                                    len(examples))
                if candidate is None:
                    dropped = True  # a response budget dropped it (counted)
                    break
                if len(candidate.input_ids) > L:
                    break
                built = candidate
                if contexts[0] >= need:
                    break
            if built is None and not dropped:
                report.dropped_tuples["window_over_budget"] += 1
        if built is not None:
            if built.position_ids[built.tuples[0].response_start] < need:
                report.adjusted["window_context_below_half"] += 1
            examples.append(built)
        pending = pending[used:]
        plan = _plan_windows(conv, [t.message_index for t in pending], L, starts) if pending else []
    return examples


def _prefetch_teacher_contents(r, template, conv, tuples, followups) -> None:
    """Encode in one batch the message contents the teachers add (the last user message with
    its hindsight block, for the default builder): each teacher view would otherwise encode
    its own in a tokenizer call. Only a cache hint: a content the template writes otherwise
    is encoded when met, so exactness never depends on it."""
    known = {id(m) for m in conv.messages}
    texts = []
    for t in tuples:
        j = t.message_index
        last_user = next((i for i in range(j - 1, len(conv.system) - 1, -1) if conv.messages[i]["role"] == USER), None)
        if last_user is None:
            continue
        short = conv.system + [conv.messages[last_user]]  # what the builder changes, not the whole history
        try:
            teacher = template.teacher_messages(short, followups[j])
        except Exception:  # a custom builder that needs more: the views will say so
            return
        texts += [m["content"] for m in teacher
                  if isinstance(m, dict) and id(m) not in known and isinstance(m.get("content"), str)]
    r.prefetch(texts)


def tokenize_conversation(
    tuples: Iterable[InteractionTuple],
    tokenizer,
    template: HindsightTemplate | str = "offline",
    config: LayoutConfig | None = None,
    report: DataReport | None = None,
) -> list[ConversationExample]:
    """Tokenise the tuples of one conversation into the packed layout (one example per window).

    Each example is a token tree (see :class:`ConversationExample`): the trunk is the window as
    the template renders it as history; a reply the template renders differently as the last
    turn (Qwen3's empty think block) is scored in a student branch, so that every tuple's
    student context equals its per-tuple student sequence (history unlimited) token for token.
    Each tuple gets a teacher suffix whose prefix is ``input_ids[:prefix_offset]`` (in the
    trunk). ``history_messages`` and ``max_prompt_tokens`` do not apply (each y sees the
    conversation before it, within its window); a leading assistant message is dropped.
    """
    cfg = config or LayoutConfig()
    report = report if report is not None else DataReport()
    r = ChatRenderer.for_tokenizer(tokenizer, cfg.chat_template_kwargs, cfg.end_of_turn_token)
    template = HindsightTemplate.resolve(template)
    tuples = list(tuples)
    for t in tuples:
        _check_tuple(t)
    tuples.sort(key=lambda t: t.message_index)
    if not tuples:
        return []
    where = f"conversation {tuples[0].conversation_id!r}"
    _check_messages(tuples[-1].full_history, where)
    messages = _conversation_messages(tuples)
    conv = _Conversation(r, messages, where)

    followups = {t.message_index: _fit_followup(r, template, t.o, cfg, report) for t in tuples}
    kept = [t for t in tuples if followups[t.message_index] is not None and t.message_index > conv.first]
    if not kept:
        return []
    _prefetch_teacher_contents(r, template, conv, kept, followups)
    examples = _plan_and_build(conv, kept, followups, r, template, cfg, report)
    report.examples_built += len(examples)
    report.student_tokens += sum(len(e.input_ids) for e in examples)
    report.conversation_tokens += len(conv.full.ids)
    return examples


def iter_examples(
    tuples: Iterable[InteractionTuple],
    tokenizer,
    template: HindsightTemplate | str = "offline",
    config: LayoutConfig | None = None,
    layout: str = "tuple",
    report: DataReport | None = None,
    on_error: str = "raise",
) -> Iterator[TupleExample | ConversationExample]:
    """Stream examples of one layout (``"tuple"`` or ``"packed"``); dropped tuples are counted.

    ``on_error="skip"``: a tuple (per-tuple layout) or conversation (packed) that cannot be
    tokenised (the template raises, breaks its own role rules, renders inconsistently; a
    malformed hand-built tuple) is counted in ``report.skipped_records`` under
    ``template_error`` or ``invalid_tuple`` with where it was, and the run goes on;
    ``"raise"`` (default) raises the :class:`DataError`. Conversations whose text holds a
    special token's string are counted in ``report.records_with_special_tokens``.
    """
    if layout not in ("tuple", "packed"):
        raise ValueError(f"layout must be 'tuple' or 'packed', got {layout!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    cfg = config or LayoutConfig()
    report = report if report is not None else DataReport()
    r = ChatRenderer.for_tokenizer(tokenizer, cfg.chat_template_kwargs, cfg.end_of_turn_token)

    def guarded(build, where: str, count: int):
        try:
            return build()
        except DataError as e:
            if on_error == "raise":
                raise
            reason = "template_error" if isinstance(e, ChatTemplateError) else "invalid_tuple"
            report.skip(reason, where, str(e))
            if count > 1:
                report.dropped_tuples[reason] += count
            return None

    for group in _groups(tuples, on_error, report):
        texts = [m.get("content") if isinstance(m, dict) else None for m in group[-1].full_history]
        texts += [t.y for t in group] + [t.o for t in group]
        if any(isinstance(s, str) and r.contains_special_text(s) for s in texts):
            report.records_with_special_tokens += 1
        if layout == "tuple":
            built = 0
            for t in group:
                example = guarded(lambda: tokenize_tuple(t, r, template, cfg, report), _where(t), 1)
                if example is not None:
                    built += 1
                    yield example
            if built:
                report.conversation_tokens += _conversation_tokens(r, group)
        else:
            examples = guarded(lambda: tokenize_conversation(group, r, template, cfg, report), _where(group[0], False),
                               len(group))
            yield from examples or []


def _conversation_tokens(r: ChatRenderer, group: list[InteractionTuple]) -> int:
    """Tokens of the conversation up to its last scored reply, rendered once (the per-tuple
    layout's DataReport ratio; its contents' ids are memoised already, so this costs a render)."""
    try:
        messages = _drop_leading_assistants(_conversation_messages(group))
        return len(_Conversation(r, messages, f"conversation {group[0].conversation_id!r}").full.ids)
    except DataError:
        return 0  # the tuples were built from cut histories the whole conversation does not render as


def _where(t, turn: bool = True) -> str:
    location = t.metadata.get("location") if isinstance(getattr(t, "metadata", None), dict) else None
    name = _record(t) if turn else f"conversation {t.conversation_id!r}"
    return f"{location}: {name}" if location else name


def _groups(tuples, on_error, report) -> Iterator[list[InteractionTuple]]:
    """Conversation groups; under ``skip`` a non-tuple item is counted, not fatal."""
    def checked():
        for t in tuples:
            try:
                _check_tuple(t)
            except DataError as e:
                if on_error == "raise":
                    raise
                report.skip("invalid_tuple", _where(t) if isinstance(t, InteractionTuple) else repr(t)[:60], str(e))
                continue
            yield t

    yield from group_by_conversation(checked())
