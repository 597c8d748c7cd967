"""Building the per-tuple and packed layouts from interaction tuples.

See :mod:`hsd.data.layouts` for the records and the truncation policy, and
:mod:`hsd.data.render` for the one tokenisation rule both layouts share.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from .layouts import ConversationExample, LayoutConfig, PackedTuple, TupleExample
from .records import ASSISTANT, SYSTEM, USER, DataError
from .render import ChatRenderer, ChatTemplateError, EncodedText, common_prefix_len
from .report import DataReport
from .templates import HindsightTemplate
from .tuples import InteractionTuple, group_by_conversation

__all__ = ["tokenize_tuple", "tokenize_conversation", "iter_examples"]


# ---- shared steps -------------------------------------------------------------------------


def _record(t: InteractionTuple) -> str:
    return f"conversation {t.conversation_id!r} turn {t.turn_index}"


def _response_mask(n_tokens: int, ignore_first_k: int) -> list[int]:
    # The last token is the end-of-turn token: always scored, so the model learns to stop.
    return [0 if i < ignore_first_k and i < n_tokens - 1 else 1 for i in range(n_tokens)]


def _fit_followup(r: ChatRenderer, template: HindsightTemplate, o: str, cfg: LayoutConfig, report: DataReport):
    """The follow-up to use (maybe truncated), or None when the tuple must be dropped."""
    budget = cfg.max_followup_tokens
    if budget is None or len(r.encode(template.render(o))) <= budget:
        return o
    if cfg.followup_overflow == "truncate":
        # Cut o at a character boundary (decoding a cut between the byte tokens of one character
        # gives U+FFFD): the longest prefix that fits, by bisection; o[:high] never fits.
        low, high = 0, len(o)
        while high - low > 1:
            middle = (low + high) // 2
            if len(r.encode(template.render(o[:middle]))) <= budget:
                low = middle
            else:
                high = middle
        if low > 0:
            report.adjusted["followup_truncated"] += 1
            return o[:low]
    report.dropped_tuples["followup_over_budget"] += 1
    return None


def _build_teacher(
    r: ChatRenderer,
    template: HindsightTemplate,
    history: list[dict],
    followup: str,
    reply: str,
    student_text: str,
    student_ids: list[int],
    student_prompt_len: int,
    spans: list[tuple[int, int]],
    response_ids: list[int],
    where: str,
) -> tuple[list[int], int, int]:
    """Teacher ids, teacher prompt length and shared prefix length for one tuple.

    ``student_text``/``spans``: the student's rendered text and its reply spans, so the teacher
    is cut at the same places inside the text both share (identical ids there).
    """
    teacher_history = template.teacher_messages(history, followup)
    teacher_before, teacher_reply = r.locate_reply(teacher_history, reply, where + " (teacher)")
    if teacher_reply != reply:
        raise ChatTemplateError(f"{where}: the template renders y differently for the teacher than for the student")
    shared_chars = common_prefix_len(student_text, teacher_before)
    teacher_prompt = r.encode_with_cuts(teacher_before, [s for s in spans if s[1] <= shared_chars]).ids
    teacher_ids = teacher_prompt + response_ids
    # The teacher's first scored hidden state (teacher_prompt_len - 1) must lie in its suffix.
    prefix = min(common_prefix_len(student_ids, teacher_ids), student_prompt_len, len(teacher_prompt) - 1)
    return teacher_ids, len(teacher_prompt), prefix


def _cut_history(x: list[dict], keep: int | None) -> list[dict]:
    """Last ``keep`` messages (system kept on top), starting with a user message (the paper);
    ``keep=None`` returns x as logged."""
    if keep is None:
        return list(x)
    system = x[:1] if x and x[0]["role"] == SYSTEM else []
    body = x[len(system) :]
    body = body[max(0, len(body) - keep) :]
    while body and body[0]["role"] == ASSISTANT:
        body = body[1:]
    return system + body


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
    consistently.
    """
    cfg = config or LayoutConfig()
    report = report if report is not None else DataReport()
    r = ChatRenderer.for_tokenizer(tokenizer, cfg.chat_template_kwargs, cfg.end_of_turn_token)
    template = HindsightTemplate.resolve(template)
    where = _record(t)

    followup = _fit_followup(r, template, t.o, cfg, report)
    if followup is None:
        return None
    history = _cut_history(t.x, cfg.history_messages)
    while True:
        if not history or history[-1]["role"] != USER:
            raise DataError(f"{where}: the history must end with a user message")
        before, reply = r.locate_reply(history, t.y, where)
        spans = [s for s in r.reply_spans(history, before, where, strict=False) if s is not None]
        prompt = r.encode_with_cuts(before, spans)
        if cfg.max_prompt_tokens is None or len(prompt.ids) <= cfg.max_prompt_tokens:
            break
        body_len = len(history) - (1 if history[0]["role"] == SYSTEM else 0)
        if body_len <= 1:
            report.dropped_tuples["prompt_over_budget"] += 1
            return None
        shorter = _cut_history(history, body_len - 1)
        report.adjusted["history_cut_for_budget"] += 1
        history = shorter

    response_ids = r.encode(reply) + [r.end_of_turn_id]
    if cfg.max_response_tokens is not None and len(response_ids) > cfg.max_response_tokens:
        report.dropped_tuples["response_over_budget"] += 1
        return None
    student_ids = prompt.ids + response_ids
    teacher_ids, teacher_prompt_len, prefix = _build_teacher(
        r, template, history, followup, reply, before, student_ids, len(prompt.ids), spans, response_ids, where
    )
    report.examples_built += 1
    return TupleExample(
        conversation_id=t.conversation_id,
        turn_index=t.turn_index,
        student_ids=student_ids,
        teacher_ids=teacher_ids,
        prefix_len=prefix,
        student_prompt_len=len(prompt.ids),
        teacher_prompt_len=teacher_prompt_len,
        response_mask=_response_mask(len(response_ids), cfg.ignore_first_k),
        kept_history_messages=len(history),
    )


# ---- packed conversation layout -----------------------------------------------------------


def _conversation_messages(tuples: list[InteractionTuple]) -> list[dict]:
    """The conversation up to the last scored y, checked against every tuple's x and y."""
    last = tuples[-1]
    messages = last.full_history + [{"role": ASSISTANT, "content": last.y}]
    for t in tuples:
        if t.conversation_id != last.conversation_id:
            raise DataError(
                f"tokenize_conversation got tuples of conversations {t.conversation_id!r} and "
                f"{last.conversation_id!r}; group them with group_by_conversation"
            )
        if messages[: t.message_index] != t.full_history or messages[t.message_index]["content"] != t.y:
            raise DataError(f"{_record(t)}: its history is not a prefix of the conversation's")
    return messages


class _Windows:
    """Encodes sub-conversations ``system + messages[first : last + 1]`` (memoised)."""

    def __init__(self, r: ChatRenderer, messages: list[dict], where: str):
        self.r, self.messages, self.where = r, messages, where
        self.system = messages[:1] if messages and messages[0]["role"] == SYSTEM else []
        self._cache: dict[tuple[int, int], tuple[list[dict], str, list, EncodedText]] = {}

    def encode(self, first: int, last: int):
        if (first, last) not in self._cache:
            window = self.system + self.messages[first : last + 1]
            text = self.r.render(window, False, self.where)
            spans = self.r.reply_spans(window, text, self.where, strict=True)
            self._cache[(first, last)] = (window, text, spans, self.r.encode_with_cuts(text, spans))
        return self._cache[(first, last)]

    def length(self, first: int, last: int) -> int:
        # The sequence ends with the end-of-turn token of its last reply.
        return self.encode(first, last)[3].reply_token_spans[-1][1] + 1


def _plan_windows(w: _Windows, tuples: list[InteractionTuple], max_length: int | None, report: DataReport):
    """Assign each tuple to one window ``(first, tuples)``: as much history as fits."""
    start = len(w.system)
    if max_length is None:
        return [(start, tuples)]
    starts = [start] + [i for i, m in enumerate(w.messages) if m["role"] == USER and i > start]
    windows: list[tuple[int, list[InteractionTuple]]] = []
    for t in tuples:
        j = t.message_index
        if windows and w.length(windows[-1][0], j) <= max_length:
            windows[-1][1].append(t)
            continue
        lowest = windows[-1][0] if windows else start
        first = next((s for s in starts if lowest <= s < j and w.length(s, j) <= max_length), None)
        if first is None:
            report.dropped_tuples["window_over_budget"] += 1
            continue
        windows.append((first, [t]))
    return windows


def tokenize_conversation(
    tuples: Iterable[InteractionTuple],
    tokenizer,
    template: HindsightTemplate | str = "offline",
    config: LayoutConfig | None = None,
    report: DataReport | None = None,
) -> list[ConversationExample]:
    """Tokenise the tuples of one conversation into the packed layout (one example per window).

    The student sequence is the whole conversation up to the last scored reply; each tuple gets
    a teacher suffix whose prefix is ``input_ids[:prefix_offset]``. ``history_messages`` and
    ``max_prompt_tokens`` do not apply (each y sees the conversation before it, within its
    window). Raises :class:`ChatTemplateError` when the template renders a reply differently as
    history than as the last reply (the packed sequence would then disagree with the per-tuple one).
    """
    cfg = config or LayoutConfig()
    report = report if report is not None else DataReport()
    r = ChatRenderer.for_tokenizer(tokenizer, cfg.chat_template_kwargs, cfg.end_of_turn_token)
    template = HindsightTemplate.resolve(template)
    tuples = sorted(tuples, key=lambda t: t.message_index)
    if not tuples:
        return []
    messages = _conversation_messages(tuples)
    where = f"conversation {tuples[0].conversation_id!r}"
    w = _Windows(r, messages, where)

    followups = {}
    for t in tuples:
        followups[t.message_index] = _fit_followup(r, template, t.o, cfg, report)
    kept = [t for t in tuples if followups[t.message_index] is not None]

    examples = []
    for window_index, (first, window_tuples) in enumerate(_plan_windows(w, kept, cfg.max_length, report)):
        last = window_tuples[-1].message_index
        window, text, spans, encoded = w.encode(first, last)
        input_ids = encoded.ids[: w.length(first, last)]
        offset = len(w.system) - first  # conversation index -> window index
        reply_of = {i: k for k, i in enumerate(i for i, m in enumerate(window) if m["role"] == ASSISTANT)}
        packed = []
        for t in window_tuples:
            j = t.message_index + offset
            k = reply_of[j]
            (char_start, char_end), (tok_start, tok_end) = spans[k], encoded.reply_token_spans[k]
            if input_ids[tok_end] != r.end_of_turn_id:
                raise ChatTemplateError(f"{_record(t)}: the reply is not followed by the end-of-turn token")
            student_prompt = r.encode_with_cuts(text[:char_start], spans[:k]).ids
            if student_prompt != input_ids[:tok_start]:
                at = common_prefix_len(student_prompt, input_ids[:tok_start])
                raise ChatTemplateError(
                    f"{_record(t)}: the conversation's ids before this reply differ from the reply's own prompt "
                    f"ids at token {at}; the packed layout would give it a different context than the per-tuple one"
                )
            response_ids = input_ids[tok_start : tok_end + 1]
            if cfg.max_response_tokens is not None and len(response_ids) > cfg.max_response_tokens:
                report.dropped_tuples["response_over_budget"] += 1
                continue
            teacher_ids, teacher_prompt_len, prefix = _build_teacher(
                r, template, window[:j], followups[t.message_index], text[char_start:char_end], text,
                input_ids, tok_start, spans[:k], response_ids, _record(t),
            )
            packed.append(
                PackedTuple(
                    turn_index=t.turn_index,
                    response_start=tok_start,
                    response_end=tok_end + 1,
                    prefix_offset=prefix,
                    teacher_prompt_len=teacher_prompt_len,
                    teacher_suffix_ids=teacher_ids[prefix:],
                    response_mask=_response_mask(len(response_ids), cfg.ignore_first_k),
                )
            )
        if packed:
            report.examples_built += 1
            examples.append(ConversationExample(tuples[0].conversation_id, window_index, first, input_ids, packed))
    return examples


def iter_examples(
    tuples: Iterable[InteractionTuple],
    tokenizer,
    template: HindsightTemplate | str = "offline",
    config: LayoutConfig | None = None,
    layout: str = "tuple",
    report: DataReport | None = None,
) -> Iterator[TupleExample | ConversationExample]:
    """Stream examples of one layout (``"tuple"`` or ``"packed"``); dropped tuples are counted."""
    if layout == "tuple":
        for t in tuples:
            example = tokenize_tuple(t, tokenizer, template, config, report)
            if example is not None:
                yield example
    elif layout == "packed":
        for group in group_by_conversation(tuples):
            yield from tokenize_conversation(group, tokenizer, template, config, report)
    else:
        raise ValueError(f"layout must be 'tuple' or 'packed', got {layout!r}")
