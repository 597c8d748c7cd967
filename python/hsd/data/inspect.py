"""Looking at a dataset: text histograms and examples rendered with the shared prefix marked."""

from __future__ import annotations

from typing import Sequence

from .layouts import ConversationExample, TupleExample

__all__ = ["text_histogram", "render_example", "SHARED_PREFIX_MARK"]

#: Printed where the teacher's own tokens start.
SHARED_PREFIX_MARK = "⟦end of shared prefix⟧"


def text_histogram(values: Sequence[int], bins: int = 8, width: int = 40, title: str = "") -> str:
    """A fixed-width text histogram of integer values (e.g. token lengths)."""
    if not values:
        return f"{title}: no values"
    low, high = min(values), max(values)
    step = max(1, -(-(high - low + 1) // bins))
    counts = [0] * (-(-(high - low + 1) // step))
    for v in values:
        counts[(v - low) // step] += 1
    peak = max(counts)
    lines = [f"{title}: n={len(values)} min={low} mean={sum(values) / len(values):.1f} max={high}"]
    for i, n in enumerate(counts):
        start = low + i * step
        lines.append(f"  [{start:>6}, {start + step:>6})  {'#' * max(1 if n else 0, n * width // peak):<{width}} {n}")
    return "\n".join(lines)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def render_example(example: TupleExample | ConversationExample, tokenizer) -> str:
    """Decoded student and teacher views with :data:`SHARED_PREFIX_MARK` where they part."""
    if isinstance(example, TupleExample):
        head = f"conversation {example.conversation_id!r} turn {example.turn_index}: prefix_len={example.prefix_len}"
        shared = _decode(tokenizer, example.student_ids[: example.prefix_len])
        return "\n".join([
            head,
            "--- shared prefix ---", shared + SHARED_PREFIX_MARK,
            "--- student continues ---", _decode(tokenizer, example.student_ids[example.prefix_len :]),
            "--- teacher continues ---", _decode(tokenizer, example.teacher_suffix_ids),
        ])
    branches = example.student_branches
    lines = [f"conversation {example.conversation_id!r} window {example.window_index}: "
             f"{len(example.input_ids)} tokens ({example.trunk_len} trunk"
             + (f", {len(branches)} student branches" if branches else "")
             + f"), {len(example.tuples)} scored responses"]
    for t in example.tuples:
        branch = example.branch_of(t.response_start)
        where = (f"on a student branch attached after trunk token {branch.attach}: "
                 f"{_decode(tokenizer, example.input_ids[branch.start : t.response_start])!r} + reply"
                 if branch is not None else "in the trunk")
        lines += [
            f"--- turn {t.turn_index}: prefix_offset={t.prefix_offset}, response tokens [{t.response_start}, "
            f"{t.response_end}) {where} ---",
            "..." + _decode(tokenizer, example.input_ids[max(0, t.prefix_offset - 12) : t.prefix_offset]) + SHARED_PREFIX_MARK,
            "student reply: " + _decode(tokenizer, example.input_ids[t.response_start : t.response_end]),
            "teacher suffix: " + _decode(tokenizer, t.teacher_suffix_ids),
        ]
    return "\n".join(lines)
