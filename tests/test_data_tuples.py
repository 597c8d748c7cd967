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


# ---- the paper preset: the authors' preprocessing scripts, worked by hand ----------------------


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_paper_preset_cuts_the_history_before_collapsing_same_role_runs():
    # Raw: u0 a1 u1 u1b a2 u2 a3 u3 a4 u4. For y=a4 the authors take the last 5 raw messages
    # [u1b a2 u2 a3 u3]; collapsing first and cutting after would give [u1 a2 u2 a3 u3].
    c = conv(("user", "u0"), ("assistant", "a1"), ("user", "u1"), ("user", "u1b"), ("assistant", "a2"),
             ("user", "u2"), ("assistant", "a3"), ("user", "u3"), ("assistant", "a4"), ("user", "u4"))
    report = DataReport()
    tuples = conversation_tuples(c, FilterConfig.preset("paper"), report)
    assert [(t.y, t.o) for t in tuples] == [("a1", "u1"), ("a2", "u2"), ("a3", "u3"), ("a4", "u4")]
    assert tuples[0].x == msgs(("user", "u0"))
    assert tuples[1].x == msgs(("user", "u0"), ("assistant", "a1"), ("user", "u1"))  # u1b collapsed away
    # y=a3: last 5 raw = [a1 u1 u1b a2 u2] -> leading a1 dropped -> [u1 u1b a2 u2] -> collapsed
    assert tuples[2].x == msgs(("user", "u1"), ("assistant", "a2"), ("user", "u2"))
    assert tuples[3].x == msgs(("user", "u1b"), ("assistant", "a2"), ("user", "u2"), ("assistant", "a3"), ("user", "u3"))
    # The whole (collapsed) history stays available to the packed layout.
    assert tuples[3].full_history == msgs(("user", "u0"), ("assistant", "a1"), ("user", "u1"), ("assistant", "a2"),
                                          ("user", "u2"), ("assistant", "a3"), ("user", "u3"))
    assert tuples[1].full_x is None and tuples[3].message_index == 7 == len(tuples[3].full_history)
    assert report.adjusted == {"collapsed_same_role": 1, "history_cut": 2}
    # Both cut tuples still group as one conversation (the packed layout needs that).
    assert [len(g) for g in group_by_conversation(tuples)] == [4]
    # The default cuts nothing here: x is the whole collapsed history.
    assert conversation_tuples(c)[3].x == tuples[3].full_history


def test_paper_preset_assistant_runs_wildchat_none_wildfeedback_last():
    c = conv(("user", "u0"), ("assistant", "a1"), ("assistant", "a1b"), ("user", "u1"), ("assistant", "a2"),
             ("user", "u2"), ("assistant", "a3"))
    # WildChat script: (a1b, u1) has a history ending with a1 -> no tuple; a2 sees [u0 a1 u1].
    report = DataReport()
    (t,) = conversation_tuples(c, FilterConfig.paper(), report)
    assert (t.x, t.y, t.o, t.turn_index) == (msgs(("user", "u0"), ("assistant", "a1"), ("user", "u1")), "a2", "u2", 1)
    assert report.dropped_tuples == {"assistant_run": 1}
    # WildFeedback script: the last message of the run (the one the user answered) is y; later
    # histories collapse the run to its first message, as the script's history does.
    first, second = conversation_tuples(c, FilterConfig.paper(assistant_runs="last"))
    assert (first.x, first.y, first.o) == (msgs(("user", "u0")), "a1b", "u1")
    assert second.x == msgs(("user", "u0"), ("assistant", "a1"), ("user", "u1"))
    assert second.full_history == msgs(("user", "u0"), ("assistant", "a1b"), ("user", "u1"))
    assert [len(g) for g in group_by_conversation([first, second])] == [2]
    # hsd's default: the run's first message is y.
    assert [(t.y, t.o) for t in conversation_tuples(c)] == [("a1", "u1"), ("a2", "u2")]
    with pytest.raises(ValueError, match="assistant_runs"):
        FilterConfig(assistant_runs="all")


def test_paper_preset_drops_empty_messages_before_pairing():
    # Raw u0 a1 "  " a2 u2 a3 u3: without the blank the two replies form a run.
    c = conv(("user", "u0"), ("assistant", "a1"), ("user", "  "), ("assistant", "a2"), ("user", "u2"),
             ("assistant", "a3"), ("user", "u3"))
    report = DataReport()
    (t,) = conversation_tuples(c, FilterConfig.paper(), report)
    assert (t.x, t.y, t.o) == (msgs(("user", "u0"), ("assistant", "a1"), ("user", "u2")), "a3", "u3")
    assert report.adjusted["removed_empty_message"] == 1 and report.dropped_tuples == {"assistant_run": 1}
    # The default keeps the blank in the history and drops only the tuples it empties.
    report = DataReport()
    (t,) = conversation_tuples(c, report=report)
    assert t.x == c.messages[:5] and t.y == "a3"
    assert report.dropped_tuples == {"empty_followup": 1, "empty_prompt": 1}
    # Three messages are needed after the blanks are gone.
    report = DataReport()
    short = conv(("user", "u0"), ("assistant", ""), ("user", "u1"), ("assistant", " "))
    assert conversation_tuples(short, FilterConfig.paper(), report) == []
    assert report.dropped_conversations == {"too_few_messages": 1}


@pytest.mark.parametrize("language, kept", [("English", True), ("en", True), (" EN ", True), ("english", True),
                                            ("French", False), ("eng", False), (None, False)])
def test_paper_preset_accepts_the_language_code(language, kept):
    assert bool(conversation_tuples(conv(*BASIC_PAIRS, language=language), FilterConfig.paper())) == kept


BASIC_PAIRS = [(m["role"], m["content"]) for m in BASIC.messages]


def test_paper_preset_a_leading_assistant_message_leaves_the_cut_history():
    c = conv(("assistant", "Hi! How can I help?"), ("user", "u0"), ("assistant", "a1"), ("user", "u1"))
    (t,) = conversation_tuples(c, FilterConfig.paper())
    assert t.x == msgs(("user", "u0")) and t.full_history == c.messages[:2] and t.turn_index == 1


# ---- hand-built records ------------------------------------------------------------------------


GOOD_TUPLE = dict(x=[{"role": "user", "content": "u"}], y="y", o="o", conversation_id="c", turn_index=0, message_index=1)


@pytest.mark.parametrize("change, message", [
    ({"y": None}, r"InteractionTuple.y must be a string, got NoneType"),
    ({"o": None}, r"InteractionTuple.o must be a string"),
    ({"x": None}, r"InteractionTuple.x must be a list of messages, got NoneType"),
    ({"x": [{"role": "user", "content": None}]}, r"InteractionTuple.x\[0\] must be"),
    ({"x": [{"role": "human", "content": "u"}]}, r"InteractionTuple.x\[0\] must be"),
    ({"x": [None]}, r"InteractionTuple.x\[0\] must be"),
    ({"x": []}, r"must end with a user message"),
    ({"x": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], "message_index": 2},
     r"must end with a user message"),
    ({"conversation_id": None}, r"conversation_id must be a string"),
    ({"turn_index": None}, r"turn_index must be an int >= 0, got None"),
    ({"turn_index": -1}, r"turn_index must be an int >= 0"),
    ({"message_index": 3}, r"message_index \(3\) must be the index of y"),
    ({"user_key": 7}, r"user_key must be a string or None"),
    ({"metadata": None}, r"metadata must be a dict"),
    ({"full_x": [{"role": "user"}]}, r"InteractionTuple.full_x\[0\] must be"),
])
def test_hand_built_tuples_with_bad_fields_raise_data_error(change, message):
    from hsd.data import DataError

    with pytest.raises(DataError, match=message):
        InteractionTuple(**{**GOOD_TUPLE, **change})
