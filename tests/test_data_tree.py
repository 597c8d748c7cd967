"""The packed layout's token tree (student branches): positions, the attention rule, student
contexts and the collated tree fields, on a hand-built branched example."""

import pytest
import torch

from hsd.data import ConversationExample, HindsightCollator, PackedTuple, StudentBranch


def branched_example():
    """A trunk of 10 tokens and two branches.

    trunk ids 100..109; branch 0 (3 tokens, ids 200..202) attaches after trunk[:4];
    branch 1 (4 tokens, ids 300..303) attaches after trunk[:8]. The reply of tuple 0 is
    ids 201, 202 (branch 0), tuple 1 the trunk's 108, 109, tuple 2 ids 302, 303 (branch 1).
    """
    trunk = list(range(100, 110))
    ids = trunk + [200, 201, 202] + [300, 301, 302, 303]
    branches = [StudentBranch(10, 13, 4), StudentBranch(13, 17, 8)]

    def packed(turn, start, end, prefix):
        return PackedTuple(turn, start, end, prefix, prefix + 2, [7, 8] + ids[start:end], [1] * (end - start))

    tuples = [packed(0, 11, 13, 2), packed(1, 8, 10, 6), packed(2, 15, 17, 6)]
    return ConversationExample("c", 0, 0, ids, tuples, trunk_len=10, student_branches=branches)


def reference_mask(example) -> torch.Tensor:
    """The contract's attention rule written out directly from the branch list."""
    n, trunk = len(example.input_ids), example.trunk_len
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for q in range(trunk):
        allowed[q, : q + 1] = True
    for b in example.student_branches:
        for q in range(b.start, b.end):
            allowed[q, : b.attach] = True
            allowed[q, b.start : q + 1] = True
    return allowed


def test_positions_continue_from_each_attach_point():
    ex = branched_example()
    assert ex.position_ids == list(range(10)) + [4, 5, 6] + [8, 9, 10, 11]
    assert ex.branch_of(3) is None and ex.branch_of(11) == ex.student_branches[0]
    assert ex.branch_of(16) == ex.student_branches[1]


def test_attention_rule_matches_the_contract():
    ex = branched_example()
    expected = reference_mask(ex)
    got = torch.tensor([[ex.attends(q, k) for k in range(len(ex.input_ids))] for q in range(len(ex.input_ids))])
    assert torch.equal(got, expected)
    # Spelled out: branch 1 sees trunk[:8] and itself, never branch 0 nor the trunk after its attach point.
    assert ex.attends(14, 7) and not ex.attends(14, 8) and not ex.attends(14, 12) and ex.attends(14, 13)
    # No trunk token attends a branch token, whatever its index.
    assert not any(ex.attends(q, k) for q in range(10) for k in range(10, 17))


def test_student_context_follows_the_tree():
    ex = branched_example()
    assert ex.student_context(0) == list(range(100, 104)) + [200, 201, 202]
    assert ex.student_context(1) == list(range(100, 110))
    assert ex.student_context(2) == list(range(100, 108)) + [300, 301, 302, 303]
    # Each student context, read with its position ids, is one causal sequence 0..n-1.
    for k, t in enumerate(ex.tuples):
        rows = [i for i in range(t.response_end) if ex.attends(t.response_end - 1, i)]
        assert [ex.input_ids[i] for i in rows] == ex.student_context(k)
        assert [ex.position_ids[i] for i in rows] == list(range(len(rows)))
        # The scored rows predict the reply tokens inside the student's own context.
        for s, target in zip(t.student_scored_positions, t.target_ids):
            assert ex.attends(s + 1, s) and ex.input_ids[s + 1] == target


def test_inconsistent_trees_are_rejected():
    ids = list(range(12))
    with pytest.raises(ValueError, match="does not follow the trunk"):
        ConversationExample("c", 0, 0, ids, [], trunk_len=8, student_branches=[StudentBranch(9, 12, 3)])
    with pytest.raises(ValueError, match="cover"):
        ConversationExample("c", 0, 0, ids, [], trunk_len=8, student_branches=[StudentBranch(8, 10, 3)])
    with pytest.raises(ValueError, match="position_ids"):
        ConversationExample("c", 0, 0, ids, [], position_ids=[0, 1])
    plain = ConversationExample("c", 0, 0, ids, [])
    assert plain.trunk_len == 12 and plain.position_ids == ids and plain.student_branches == []


def test_collator_carries_the_tree():
    ex, plain = branched_example(), ConversationExample("d", 0, 0, [5, 6, 7], [])
    batch = HindsightCollator(0, pad_to_multiple_of=4)([plain, ex])
    assert batch["input_ids"].shape == (2, 20)
    assert batch["trunk_lengths"].tolist() == [3, 10]
    assert batch["position_ids"][1, :17].tolist() == ex.position_ids
    assert batch["position_ids"][0, :3].tolist() == [0, 1, 2]
    # Padding positions keep increasing from the row's largest position id.
    assert batch["position_ids"][1, 17:].tolist() == [12, 13, 14]
    assert torch.all(batch["position_ids"][0, 1:] > batch["position_ids"][0, :-1])
    assert batch["student_branch_batch_index"].tolist() == [1, 1]
    assert batch["student_branch_starts"].tolist() == [10, 13]
    assert batch["student_branch_ends"].tolist() == [13, 17]
    assert batch["student_branch_attach"].tolist() == [4, 8]
    b, s = batch["scored_batch_index"], batch["student_scored_positions"]
    assert torch.equal(batch["input_ids"][b, s + 1], batch["target_ids"])
    assert s.tolist() == [10, 11, 7, 8, 14, 15]
    # No branch anywhere: empty int64 tensors, not missing keys.
    plain_batch = HindsightCollator(0)([plain])
    for key in ("student_branch_batch_index", "student_branch_starts", "student_branch_ends", "student_branch_attach"):
        assert plain_batch[key].dtype == torch.long and plain_batch[key].shape == (0,)
