"""Tuple extraction (METHOD.md §1), filters and the drop report; hindsight templates."""

import pytest

from hsd.data import (
    HINDSIGHT_PRESETS,
    Conversation,
    DataReport,
    FilterConfig,
    HindsightTemplate,
    InteractionTuple,
    append_to_last_user,
    conversation_tuples,
    extract_tuples,
    group_by_conversation,
    read_conversations,
)


def conv(*pairs, language="English", id="c1", **kw):
    return Conversation(messages=[{"role": r, "content": c} for r, c in pairs], id=id, language=language, **kw)


BASIC = conv(("user", "u0"), ("assistant", "a1"), ("user", "u1"), ("assistant", "a2"), ("user", "u2"), ("assistant", "a3"))


def test_one_tuple_per_assistant_message_with_a_follow_up():
    tuples = conversation_tuples(BASIC)
    assert [(t.y, t.o) for t in tuples] == [("a1", "u1"), ("a2", "u2")]
    assert [t.turn_index for t in tuples] == [0, 1] and [t.message_index for t in tuples] == [1, 3]
    assert tuples[1].x == BASIC.messages[:3] and tuples[1].x[-1]["role"] == "user"
    assert tuples[0].conversation_id == "c1"


def test_paper_preset_filters_and_counts_each_reason():
    long_message = "w" * 5000
    conversations = [
        BASIC,
        conv(("user", "u0"), ("assistant", "a1"), ("user", "u1"), language="French", id="fr"),
        conv(("user", long_message), ("assistant", "a1"), ("user", "u1"), id="long-msg"),
        conv(*[("user", "x" * 4000), ("assistant", "y" * 4000)] * 13, ("user", "z"), id="long-conv"),
        conv(("user", "u0"), ("assistant", "  "), ("user", "\n"), id="few"),
        conv(("system", "s"), ("user", "u0"), ("assistant", "a1"), id="single-turn"),
    ]
    report = DataReport()
    tuples = list(extract_tuples(conversations, FilterConfig.preset("paper"), report))
    assert {t.conversation_id for t in tuples} == {"c1"}
    assert report.dropped_conversations == {
        "language": 1, "message_too_long": 1, "conversation_too_long": 1, "too_few_messages": 1, "no_tuples": 1,
    }
    assert report.conversations_kept == 1 and report.tuples_kept == 2
    assert "dropped conversations: language" in report.summary()
    assert report.as_dict()["dropped_conversations"]["language"] == 1


def test_filters_are_individually_configurable():
    cfg = FilterConfig.paper(languages=None, max_message_chars=None)
    assert cfg.min_nonempty_messages == 3 and cfg.max_total_chars == 100_000 and cfg.languages is None
    french = conv(("user", "u0"), ("assistant", "a1"), ("user", "u1"), language="french")
    assert len(conversation_tuples(french, FilterConfig(languages="French"))) == 1
    with pytest.raises(ValueError, match="unknown filter preset"):
        FilterConfig.preset("strict")


def test_empty_and_whitespace_messages_drop_the_tuple_not_the_history():
    c = conv(("user", "u0"), ("assistant", " "), ("user", "u1"), ("assistant", "a2"), ("user", ""),
             ("assistant", "a3"), ("user", "u3"), ("assistant", "a4"), ("user", "u4"))
    report = DataReport()
    tuples = conversation_tuples(c, report=report)
    assert [t.y for t in tuples] == ["a4"]
    assert report.dropped_tuples == {"empty_response": 1, "empty_followup": 1, "empty_prompt": 1}
    kept = conversation_tuples(c, FilterConfig(drop_empty_followup=False, drop_empty_prompt=False))
    assert [t.y for t in kept] == ["a2", "a3", "a4"]


def test_non_alternating_roles_collapse_to_the_first_or_drop():
    c = conv(("user", "first"), ("user", "second"), ("assistant", "a1"), ("assistant", "a1b"), ("user", "u1"))
    report = DataReport()
    (t,) = conversation_tuples(c, report=report)
    assert t.x == [{"role": "user", "content": "first"}] and (t.y, t.o) == ("a1", "u1")
    assert report.adjusted["collapsed_same_role"] == 2
    report = DataReport()
    assert conversation_tuples(c, FilterConfig(same_role_runs="drop"), report) == []
    assert report.dropped_conversations["non_alternating"] == 1
    with pytest.raises(ValueError, match="same_role_runs"):
        FilterConfig(same_role_runs="merge")


def test_system_messages():
    c = conv(("system", "Be brief."), ("user", "u0"), ("assistant", "a1"), ("user", "u1"))
    (t,) = conversation_tuples(c)
    assert t.x[0] == {"role": "system", "content": "Be brief."}
    report = DataReport()
    (t,) = conversation_tuples(c, FilterConfig(keep_system=False), report)
    assert t.x == [{"role": "user", "content": "u0"}] and report.adjusted["removed_system"] == 1
    misplaced = conv(("user", "u0"), ("system", "Now be rude."), ("assistant", "a1"), ("user", "u1"))
    report = DataReport()
    assert conversation_tuples(misplaced, report=report) == []
    assert report.dropped_conversations["misplaced_system"] == 1


def test_leading_assistant_reply_has_no_prompt():
    c = conv(("assistant", "Hi! How can I help?"), ("user", "u0"), ("assistant", "a1"), ("user", "u1"))
    report = DataReport()
    (t,) = conversation_tuples(c, report=report)
    assert t.y == "a1" and t.x[0]["role"] == "assistant" and t.turn_index == 1
    assert report.dropped_tuples["no_prompt"] == 1


def test_tuple_rows_round_trip(tmp_path):
    import json

    tuples = conversation_tuples(BASIC)
    path = tmp_path / "tuples.jsonl"
    path.write_text("".join(json.dumps(t.to_row()) + "\n" for t in tuples))
    back = [t for c in read_conversations(path) for t in conversation_tuples(c)]
    assert [(t.x, t.y, t.o) for t in back] == [(t.x, t.y, t.o) for t in tuples]


def test_group_by_conversation_keeps_order():
    other = conv(("user", "v0"), ("assistant", "b1"), ("user", "v1"), id="c2")
    groups = list(group_by_conversation(extract_tuples([BASIC, other])))
    assert [[t.y for t in g] for g in groups] == [["a1", "a2"], ["b1"]]


# ---- hindsight templates ------------------------------------------------------------------------


def test_presets_are_the_authors_blocks_verbatim():
    assert HindsightTemplate.preset("offline").render("Too long.") == (
        "\n\n[HINDSIGHT CONTEXT]\nThe following is a user response to your previous, insufficient attempt. "
        "Improve your response to the user prompt.\nFuture User Message: Too long."
    )
    assert HindsightTemplate.preset("online").render("Too long.") == (
        "\n\n=== HINDSIGHT CONTEXT ===\n[The following is a future user message. "
        "Use this to guide your answer to the user prompt.]\nToo long."
    )
    assert set(HINDSIGHT_PRESETS) == {"offline", "online"}


def test_user_format_strings_are_validated():
    t = HindsightTemplate("\n\nNext the user said: {followup} {{literal}}")
    assert t.render("hi") == "\n\nNext the user said: hi {literal}"
    for bad, message in [("no field", "must contain"), ("{followup} {user}", "unknown field"), ("{followup", "invalid")]:
        with pytest.raises(ValueError, match=message):
            HindsightTemplate(bad)
    with pytest.raises(ValueError, match="unknown hindsight preset"):
        HindsightTemplate.preset("paper")
    assert HindsightTemplate.resolve("online").name == "online"


def test_default_builder_appends_to_the_last_user_message_only():
    x = [{"role": "user", "content": "u0"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u1"}]
    teacher = HindsightTemplate.preset("online").teacher_messages(x, "o")
    assert teacher[:2] == x[:2] and teacher[2]["content"].startswith("u1\n\n=== HINDSIGHT") and teacher[2]["content"].endswith("\no")
    assert x[2]["content"] == "u1", "the student's history must not be modified"
    with pytest.raises(ValueError, match="no user message"):
        append_to_last_user([{"role": "assistant", "content": "a"}], "block")


def test_interaction_tuple_is_a_plain_record():
    t = InteractionTuple(x=[{"role": "user", "content": "u"}], y="y", o="o", conversation_id="c", turn_index=0, message_index=1)
    assert t.to_row()["completion"] == {"from": "gpt", "value": "y"}


def test_group_by_conversation_splits_conversations_that_share_an_id():
    # WildChat's conversation_hash repeats for repeated conversations; each must stay its own group,
    # else the packed layout scores one response twice or rejects a valid conversation.
    twin = conv(("user", "u0"), ("assistant", "a1"), ("user", "u1"), ("assistant", "a2"), ("user", "u2"))
    other = conv(("user", "v0"), ("assistant", "b1"), ("user", "v1"), ("assistant", "b2"), ("user", "v2"))
    groups = list(group_by_conversation(extract_tuples([BASIC, twin, other])))
    assert [[t.y for t in g] for g in groups] == [["a1", "a2"], ["a1", "a2"], ["b1", "b2"]]
