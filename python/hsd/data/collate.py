"""Padded batches of either layout, with the gather indices the loss needs.

Every batch carries, for each scored response token n (flattened over the batch, in order):
``scored_tuple_index[n]`` (which tuple; the loss averages per tuple), ``scored_batch_index[n]``
(which student row), ``student_scored_positions[n]`` (column of the student hidden state),
``teacher_suffix_scored_indices[n]`` (column in the padded teacher suffix),
``teacher_scored_positions[n]`` (the same as a teacher position id) and ``target_ids[n]``.
Padding is on the right and every mask is explicit, so ``pad_token_id == eos_token_id`` is
safe: the end-of-turn token is scored from ``response_mask``, never inferred from ids.

A packed batch is a batch of token trees (:class:`~hsd.data.layouts.ConversationExample`):
``position_ids`` [B, L] holds each row's position ids (trunk index i -> i, the j-th token of a
branch -> its attach point + j; padding continues from the row's largest position),
``trunk_lengths`` [B] the trunk length of each row, and ``student_branch_batch_index``,
``student_branch_starts``, ``student_branch_ends``, ``student_branch_attach`` [num_branches]
describe every student branch (empty when there is none). Attention: a trunk token q attends
trunk tokens k <= q; a token q of a branch attends trunk tokens k < attach and its own branch's
tokens up to q; nothing else attends a branch token.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .layouts import ConversationExample, TupleExample

__all__ = ["HindsightCollator"]

logger = logging.getLogger("hsd.data")


class HindsightCollator:
    """Collate :class:`TupleExample` or :class:`ConversationExample` lists into tensors.

    Args:
        pad_token_id: id written into padding (masked out everywhere).
        pad_to_multiple_of: round padded lengths up to a multiple of this.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        if pad_to_multiple_of is not None and (
            isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1
        ):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> "HindsightCollator":
        """Use ``tokenizer.pad_token_id``, else its EOS id (safe here: masks are explicit)."""
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
            logger.info("tokenizer has no pad token; padding with eos id %s (masks are explicit)", pad)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token; pass pad_token_id")
        return cls(pad, pad_to_multiple_of)

    def _pad(self, rows: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max((len(r) for r in rows), default=0)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        out = torch.full((len(rows), width), value, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return out, mask

    def _positions(self, starts: Sequence[int], width: int) -> torch.Tensor:
        return torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(width, dtype=torch.long)[None, :]

    def __call__(self, examples: Sequence[TupleExample | ConversationExample]) -> dict[str, torch.Tensor]:
        if isinstance(examples, (TupleExample, ConversationExample)):
            raise ValueError("the collator takes a list of examples, got a single example; wrap it in a list")
        try:
            examples = list(examples)
        except TypeError:
            raise ValueError(f"the collator takes a list of examples, got {type(examples).__name__}") from None
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        if all(isinstance(e, TupleExample) for e in examples):
            return self._collate_tuples(examples)
        if all(isinstance(e, ConversationExample) for e in examples):
            return self._collate_packed(examples)
        kinds = sorted({type(e).__name__ for e in examples})
        raise ValueError(
            f"a batch must hold only TupleExample or only ConversationExample items, got {', '.join(kinds)}"
        )

    def _scored(self, tuples, batch_rows) -> dict[str, torch.Tensor]:
        fields = {k: [] for k in ("scored_tuple_index", "scored_batch_index", "student_scored_positions",
                                  "teacher_scored_positions", "teacher_suffix_scored_indices", "target_ids")}
        for tuple_index, (t, row) in enumerate(zip(tuples, batch_rows)):
            n = len(t.target_ids)
            fields["scored_tuple_index"] += [tuple_index] * n
            fields["scored_batch_index"] += [row] * n
            fields["student_scored_positions"] += t.student_scored_positions
            fields["teacher_scored_positions"] += t.teacher_scored_positions
            fields["teacher_suffix_scored_indices"] += t.teacher_suffix_scored_indices
            fields["target_ids"] += t.target_ids
        return {k: torch.tensor(v, dtype=torch.long) for k, v in fields.items()}

    def _collate_tuples(self, examples: Sequence[TupleExample]) -> dict[str, torch.Tensor]:
        student, student_mask = self._pad([e.student_ids for e in examples], self.pad_token_id)
        teacher, teacher_mask = self._pad([e.teacher_ids for e in examples], self.pad_token_id)
        suffix, suffix_mask = self._pad([e.teacher_suffix_ids for e in examples], self.pad_token_id)
        prefix = [e.prefix_len for e in examples]
        return {
            "student_input_ids": student,
            "student_attention_mask": student_mask,
            "student_position_ids": self._positions([0] * len(examples), student.shape[1]),
            "teacher_input_ids": teacher,
            "teacher_attention_mask": teacher_mask,
            "teacher_position_ids": self._positions([0] * len(examples), teacher.shape[1]),
            "teacher_prefix_lens": torch.tensor(prefix, dtype=torch.long),
            "teacher_suffix_ids": suffix,
            "teacher_suffix_attention_mask": suffix_mask,
            "teacher_suffix_position_ids": self._positions(prefix, suffix.shape[1]),
            **self._scored(examples, range(len(examples))),
        }

    def _collate_packed(self, examples: Sequence[ConversationExample]) -> dict[str, torch.Tensor]:
        ids, mask = self._pad([e.input_ids for e in examples], self.pad_token_id)
        # Padding positions only need to increase: continue from the row's largest position id.
        positions = torch.zeros_like(ids)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            positions[row, :n] = torch.tensor(e.position_ids, dtype=torch.long)
            last = max(e.position_ids, default=-1)
            positions[row, n:] = torch.arange(last + 1, last + 1 + ids.shape[1] - n, dtype=torch.long)
        branches = [(row, b) for row, e in enumerate(examples) for b in e.student_branches]
        tuples = [t for e in examples for t in e.tuples]
        rows = [row for row, e in enumerate(examples) for _ in e.tuples]
        suffix, suffix_mask = self._pad([t.teacher_suffix_ids for t in tuples], self.pad_token_id)
        offsets = [t.prefix_offset for t in tuples]

        def column(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.long)

        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "trunk_lengths": column(e.trunk_len for e in examples),
            "student_branch_batch_index": column(row for row, _ in branches),
            "student_branch_starts": column(b.start for _, b in branches),
            "student_branch_ends": column(b.end for _, b in branches),
            "student_branch_attach": column(b.attach for _, b in branches),
            "teacher_batch_index": column(rows),
            "teacher_prefix_offsets": column(offsets),
            "teacher_suffix_ids": suffix,
            "teacher_suffix_attention_mask": suffix_mask,
            "teacher_suffix_position_ids": self._positions(offsets, suffix.shape[1]),
            **self._scored(tuples, rows),
        }
