"""The collator: padding, masks, position ids and the gather indices, for both layouts."""

import pytest
import torch

from hsd.data import (
    HindsightCollator,
    LayoutConfig,
    extract_tuples,
    group_by_conversation,
    read_conversations,
    tokenize_conversation,
    tokenize_tuple,
)
from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer

CFG = LayoutConfig(history_messages=None)


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def setup(request):
    tok = tiny_chat_tokenizer(request.param, pad="eos")  # pad == eos on purpose
    convs = read_conversations(synthetic_wildchat_rows(5, seed=11, min_turns=2, max_turns=4))
    groups = list(group_by_conversation(extract_tuples(convs)))
    return tok, groups


def test_tuple_batch_gathers_the_same_targets_for_student_and_teacher(setup):
    tok, groups = setup
    examples = [tokenize_tuple(t, tok, "offline", CFG) for g in groups for t in g][:5]
    batch = HindsightCollator.from_tokenizer(tok, pad_to_multiple_of=8)(examples)
    B = len(examples)
    assert batch["student_input_ids"].shape[0] == B and batch["student_input_ids"].shape[1] % 8 == 0
    assert batch["student_attention_mask"].sum(1).tolist() == [len(e.student_ids) for e in examples]
    assert batch["teacher_attention_mask"].sum(1).tolist() == [len(e.teacher_ids) for e in examples]
    assert batch["student_position_ids"][0, :4].tolist() == [0, 1, 2, 3]
    prefix = batch["teacher_prefix_lens"]
    assert prefix.tolist() == [e.prefix_len for e in examples]
    assert torch.equal(batch["teacher_suffix_position_ids"][:, 0], prefix)
    b, s = batch["scored_batch_index"], batch["student_scored_positions"]
    target = batch["target_ids"]
    assert torch.equal(batch["student_input_ids"][b, s + 1], target)
    assert torch.equal(batch["teacher_input_ids"][b, batch["teacher_scored_positions"] + 1], target)
    assert torch.equal(batch["teacher_suffix_ids"][b, batch["teacher_suffix_scored_indices"] + 1], target)
    assert torch.equal(batch["teacher_suffix_position_ids"][b, batch["teacher_suffix_scored_indices"]],
                       batch["teacher_scored_positions"])
    assert torch.equal(batch["scored_tuple_index"], b)
    # pad == eos: the end-of-turn token is still scored once per tuple, and padding is masked.
    assert int((target == tok.eos_token_id).sum()) == B
    for key in ("student", "teacher"):
        ids, mask = batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"]
        assert torch.all(ids[mask == 0] == tok.pad_token_id)


def test_packed_batch_gathers_the_same_targets_for_student_and_teacher(setup):
    tok, groups = setup
    examples = [ex for g in groups for ex in tokenize_conversation(g, tok, "online", CFG)]
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    n_tuples = sum(len(e.tuples) for e in examples)
    assert batch["teacher_suffix_ids"].shape[0] == n_tuples == batch["teacher_prefix_offsets"].numel()
    assert batch["attention_mask"].sum(1).tolist() == [len(e.input_ids) for e in examples]
    assert batch["teacher_batch_index"].tolist() == [i for i, e in enumerate(examples) for _ in e.tuples]
    b, s, t = batch["scored_batch_index"], batch["student_scored_positions"], batch["scored_tuple_index"]
    target = batch["target_ids"]
    assert torch.equal(batch["input_ids"][b, s + 1], target)
    assert torch.equal(batch["teacher_suffix_ids"][t, batch["teacher_suffix_scored_indices"] + 1], target)
    assert torch.equal(batch["teacher_batch_index"][t], b)
    assert torch.equal(
        batch["teacher_suffix_position_ids"][t, batch["teacher_suffix_scored_indices"]], batch["teacher_scored_positions"]
    )
    # Teacher positions continue from the prefix inside the student row it extends.
    assert torch.all(batch["teacher_prefix_offsets"] <= batch["attention_mask"].sum(1)[batch["teacher_batch_index"]])
    assert target.numel() == sum(len(e.target_ids) for e in examples)


def test_collator_rejects_mixed_or_empty_batches_and_missing_pad(setup):
    tok, groups = setup
    per_tuple = tokenize_tuple(groups[0][0], tok, "offline", CFG)
    (packed, *_) = tokenize_conversation(groups[0], tok, "offline", CFG)
    collate = HindsightCollator(tok.pad_token_id)
    with pytest.raises(ValueError, match="only TupleExample or only ConversationExample"):
        collate([per_tuple, packed])
    with pytest.raises(ValueError, match="only TupleExample .* got dict"):
        collate([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="single example"):
        collate(packed)
    with pytest.raises(ValueError, match="list of examples, got int"):
        collate(3)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    no_pad = tiny_chat_tokenizer("chatml", pad=None)
    assert HindsightCollator.from_tokenizer(no_pad).pad_token_id == no_pad.eos_token_id
    for bad in (None, "0", -1, True, 1.0):
        with pytest.raises(ValueError, match="pad_token_id must be a non-negative int"):
            HindsightCollator(bad)
    for bad in (0, -8, 2.5, "8"):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
            HindsightCollator(0, pad_to_multiple_of=bad)
