"""followup_overflow="truncate": the follow-up is cut at a character boundary, never mid-character."""

import pytest

from hsd.data import DataReport, HindsightTemplate, InteractionTuple, LayoutConfig, tokenize_tuple
from hsd.data.testing import tiny_chat_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer("chatml")


# Characters of 2, 3 and 4 UTF-8 bytes: the tiny byte-level vocabulary has one token per byte,
# so a cut between tokens can fall inside a character.
FOLLOWUPS = ["too long " + "é" * 12, "ok " + "✓" * 9, "hm " + "\U0001F600" * 8]


@pytest.mark.parametrize("o", FOLLOWUPS)
def test_truncated_followups_end_at_a_character_boundary(tok, o):
    template = HindsightTemplate.preset("offline")
    block_tokens = len(tok.encode(template.render(""), add_special_tokens=False))
    full = len(tok.encode(template.render(o), add_special_tokens=False))
    t = InteractionTuple(x=[{"role": "user", "content": "write a poem"}], y="the poem", o=o,
                         conversation_id="c", turn_index=0, message_index=1)
    seen = set()
    for budget in range(block_tokens + 1, full):
        report = DataReport()
        cfg = LayoutConfig(max_followup_tokens=budget, followup_overflow="truncate")
        example = tokenize_tuple(t, tok, template, cfg, report)
        if example is None:  # not even the first character fits
            assert report.dropped_tuples == {"followup_over_budget": 1}
            continue
        teacher = tok.decode(example.teacher_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        start = teacher.index("Future User Message: ") + len("Future User Message: ")
        kept = teacher[start : teacher.index("<|im_end|>", start)]
        assert "\ufffd" not in kept, f"budget {budget}: the cut fell inside a character: {kept!r}"
        assert o.startswith(kept) and 0 < len(kept) < len(o)
        assert len(tok.encode(template.render(kept), add_special_tokens=False)) <= budget
        # The longest prefix that fits: one more character does not.
        assert len(tok.encode(template.render(o[: len(kept) + 1]), add_special_tokens=False)) > budget
        assert report.adjusted["followup_truncated"] == 1
        seen.add(len(kept))
    assert len(seen) >= 3, "the budgets must exercise several cut points"
