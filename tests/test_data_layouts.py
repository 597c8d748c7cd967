"""Per-tuple and packed layouts: ids, shared prefixes, scored positions, truncation, templates."""

import pytest

from hsd.data import (
    ChatTemplateError,
    Conversation,
    DataReport,
    HindsightTemplate,
    InteractionTuple,
    LayoutConfig,
    append_to_system,
    conversation_tuples,
    extract_tuples,
    group_by_conversation,
    iter_examples,
    read_conversations,
    tokenize_conversation,
    tokenize_tuple,
)
from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer

STYLES = ["chatml", "llama3"]
TEMPLATES = ["offline", "online"]
NO_LIMIT = LayoutConfig(history_messages=None)


@pytest.fixture(scope="module")
def tokenizers():
    return {style: tiny_chat_tokenizer(style) for style in (*STYLES, "qwen3")}


@pytest.fixture(scope="module")
def conversations():
    return list(read_conversations(synthetic_wildchat_rows(12, seed=3, min_turns=2, max_turns=5)))


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def rendered_up_to_reply(tok, messages):
    """The template's text of ``messages`` (ending with the reply) cut after its end-of-turn token."""
    text = tok.apply_chat_template(messages, tokenize=False)
    return text[: text.rindex(tok.eos_token) + len(tok.eos_token)]


def tuple_with(x, y, o, conversation_id="c", turn_index=0):
    return InteractionTuple(x=x, y=y, o=o, conversation_id=conversation_id, turn_index=turn_index, message_index=len(x))


def check_shared_prefix(student, teacher, prefix):
    assert student[:prefix] == teacher[:prefix]
    assert student[prefix] != teacher[prefix], "the ids must differ right after the shared prefix"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("template_name", TEMPLATES)
def test_per_tuple_ids_decode_to_the_chat_template_rendering(tokenizers, conversations, style, template_name):
    tok = tokenizers[style]
    template = HindsightTemplate.preset(template_name)
    for t in extract_tuples(conversations):
        ex = tokenize_tuple(t, tok, template, NO_LIMIT)
        y = [{"role": "assistant", "content": t.y}]
        assert decode(tok, ex.teacher_ids) == rendered_up_to_reply(tok, template.teacher_messages(t.x, t.o) + y)
        assert decode(tok, ex.student_ids) == rendered_up_to_reply(tok, t.x + y)
        check_shared_prefix(ex.student_ids, ex.teacher_ids, ex.prefix_len)
        assert ex.teacher_suffix_ids == ex.teacher_ids[ex.prefix_len :]
        assert ex.teacher_suffix_positions == list(range(ex.prefix_len, len(ex.teacher_ids)))
        assert ex.student_ids[ex.student_prompt_len :] == ex.teacher_ids[ex.teacher_prompt_len :]


@pytest.mark.parametrize("style", STYLES)
def test_prefix_ends_exactly_at_the_end_of_the_last_user_content(tokenizers, conversations, style):
    tok = tokenizers[style]
    for t in list(extract_tuples(conversations))[:6]:
        ex = tokenize_tuple(t, tok, "offline", NO_LIMIT)
        shared_text = decode(tok, ex.student_ids[: ex.prefix_len])
        prompt_text = tok.apply_chat_template(t.x, tokenize=False, add_generation_prompt=True)
        content = t.x[-1]["content"].strip()
        assert shared_text == prompt_text[: prompt_text.rindex(content) + len(content)]
    # The same tuple under another template has another prefix length: it is measured, not assumed.
    other = "llama3" if style == "chatml" else "chatml"
    assert ex.prefix_len != tokenize_tuple(t, tokenizers[other], "offline", NO_LIMIT).prefix_len


@pytest.mark.parametrize("style", STYLES)
def test_scored_positions_predict_the_same_response_tokens(tokenizers, conversations, style):
    t = next(iter(extract_tuples(conversations)))
    ex = tokenize_tuple(t, tokenizers[style], "online", LayoutConfig(history_messages=None, ignore_first_k=2))
    n = len(ex.response_ids)
    assert ex.response_mask == [0, 0] + [1] * (n - 2)
    assert ex.response_ids[-1] == tokenizers[style].eos_token_id
    assert len(ex.student_scored_positions) == len(ex.teacher_scored_positions) == len(ex.target_ids) == n - 2
    for s, te, target in zip(ex.student_scored_positions, ex.teacher_scored_positions, ex.target_ids):
        assert ex.student_ids[s + 1] == target == ex.teacher_ids[te + 1]
    assert min(ex.teacher_scored_positions) >= ex.prefix_len
    suffix = ex.teacher_suffix_ids
    assert [suffix[i + 1] for i in ex.teacher_suffix_scored_indices] == ex.target_ids


def test_short_response_still_scores_end_of_turn(tokenizers):
    t = tuple_with([{"role": "user", "content": "Write code."}], "A", "Again.")
    ex = tokenize_tuple(t, tokenizers["chatml"], "offline", LayoutConfig(ignore_first_k=5))
    assert ex.target_ids == [tokenizers["chatml"].eos_token_id]
    assert ex.response_mask[-1] == 1 and sum(ex.response_mask) == 1


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("template_name", TEMPLATES)
def test_packed_layout_scores_each_response_once_with_its_conversation_context(
    tokenizers, conversations, style, template_name
):
    tok = tokenizers[style]
    template = HindsightTemplate.preset(template_name)
    for group in group_by_conversation(extract_tuples(conversations)):
        (ex,) = tokenize_conversation(group, tok, template, NO_LIMIT)
        assert len(ex.tuples) == len(group)
        scored = [p for p in ex.student_scored_positions]
        assert len(scored) == len(set(scored)), "a token is scored twice"
        for t, packed in zip(group, ex.tuples):
            start, end = packed.response_start, packed.response_end
            per_tuple = tokenize_tuple(t, tok, template, LayoutConfig(history_messages=None, ignore_first_k=0))
            # Student context of y is exactly the conversation before it, and equals the per-tuple layout.
            assert ex.input_ids[:start] == per_tuple.student_ids[: per_tuple.student_prompt_len]
            assert ex.input_ids[start:end] == per_tuple.response_ids
            # Every response token (y + end-of-turn) is a target exactly once (ignore_first_k aside).
            assert packed.target_ids == per_tuple.response_ids[2:]
            teacher = ex.input_ids[: packed.prefix_offset] + packed.teacher_suffix_ids
            assert teacher == per_tuple.teacher_ids
            y = [{"role": "assistant", "content": t.y}]
            assert decode(tok, teacher) == rendered_up_to_reply(tok, template.teacher_messages(t.x, t.o) + y)
            check_shared_prefix(ex.input_ids, teacher, packed.prefix_offset)
            assert packed.teacher_suffix_positions[0] == packed.prefix_offset
            for s, te, target in zip(packed.student_scored_positions, packed.teacher_scored_positions, packed.target_ids):
                assert ex.input_ids[s + 1] == target == teacher[te + 1]
        assert ex.response_spans == [(p.response_start, p.response_end) for p in ex.tuples]


def test_packed_covers_every_response_token_when_nothing_is_ignored(tokenizers, conversations):
    cfg = LayoutConfig(history_messages=None, ignore_first_k=0)
    for group in group_by_conversation(extract_tuples(conversations)):
        (ex,) = tokenize_conversation(group, tokenizers["chatml"], "offline", cfg)
        covered = sorted(p + 1 for p in ex.student_scored_positions)
        expected = sorted(i for start, end in ex.response_spans for i in range(start, end))
        assert covered == expected


def test_custom_builder_moves_the_prefix_and_stays_consistent(tokenizers, conversations):
    tok = tokenizers["chatml"]
    template = HindsightTemplate("\n\nLater the user said: {followup}", builder=append_to_system)
    t = list(extract_tuples(conversations))[3]
    ex = tokenize_tuple(t, tok, template, NO_LIMIT)
    default = tokenize_tuple(t, tok, HindsightTemplate("\n\nLater the user said: {followup}"), NO_LIMIT)
    assert ex.prefix_len < default.prefix_len
    check_shared_prefix(ex.student_ids, ex.teacher_ids, ex.prefix_len)
    (packed,) = tokenize_conversation([t], tok, template, NO_LIMIT)
    assert packed.input_ids[: packed.tuples[0].prefix_offset] + packed.tuples[0].teacher_suffix_ids == ex.teacher_ids


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_qwen3_style_template_gets_student_branches_equal_to_the_per_tuple_sequences(tokenizers, conversations, kwargs):
    tok = tokenizers["qwen3"]
    cfg = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs)
    group = next(g for g in group_by_conversation(extract_tuples(conversations)) if len(g) > 2)
    (ex,) = tokenize_conversation(group, tok, "offline", cfg)
    # Every reply but the last is rendered without its think block as history: one branch each.
    assert len(ex.student_branches) == len(group) - 1
    for k, (t, packed) in enumerate(zip(group, ex.tuples)):
        per_tuple = tokenize_tuple(t, tok, "offline", cfg)
        assert decode(tok, per_tuple.student_ids[: per_tuple.student_prompt_len]).endswith("assistant\n<think>\n\n</think>\n\n")
        assert ex.student_context(k) == per_tuple.student_ids
        assert ex.input_ids[: packed.prefix_offset] + packed.teacher_suffix_ids == per_tuple.teacher_ids
        assert packed.target_ids == per_tuple.target_ids
        assert packed.prefix_offset <= ex.trunk_len
        branch = ex.branch_of(packed.response_start)
        if k < len(group) - 1:
            # The branch starts after the assistant header: the think block, y, end-of-turn.
            assert branch is not None and packed.response_end == branch.end
            assert decode(tok, ex.input_ids[branch.start : packed.response_start]).startswith("<think>")
            assert decode(tok, ex.input_ids[: branch.attach]).endswith("<|im_start|>assistant\n")
            assert ex.position_ids[packed.response_start] == per_tuple.student_prompt_len
        else:
            assert branch is None
    # Later turns see the reply as history (without the think block), never the branch.
    assert "<think>" not in decode(tok, ex.input_ids[: ex.tuples[-1].response_start - 8])


def test_non_thinking_kwargs_reach_the_template(tokenizers, conversations):
    t = next(iter(extract_tuples(conversations)))
    cfg = LayoutConfig(history_messages=None, chat_template_kwargs={"enable_thinking": False})
    ex = tokenize_tuple(t, tokenizers["qwen3"], "offline", cfg)
    assert decode(tokenizers["qwen3"], ex.student_ids[: ex.student_prompt_len]).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def test_history_is_cut_by_whole_messages_identically_for_student_and_teacher(tokenizers):
    tok = tokenizers["chatml"]
    x = []
    for i in range(6):
        x += [{"role": "user", "content": f"Question {i} about code."}, {"role": "assistant", "content": f"Answer {i}."}]
    x.append({"role": "user", "content": "Final question please."})
    t = tuple_with([{"role": "system", "content": "Be brief."}] + x, "Sure thing.", "Shorter please.")
    ex = tokenize_tuple(t, tok, "offline", LayoutConfig(history_messages=5))
    student_text = decode(tok, ex.student_ids)
    assert ex.kept_history_messages == 1 + 5  # system + last 5 (starting with a user turn)
    assert "Be brief." in student_text and "Question 4" in student_text and "Answer 3" not in student_text
    # Both sides see the same history: the teacher's text before the block equals the student's.
    assert decode(tok, ex.teacher_ids[: ex.prefix_len]) == decode(tok, ex.student_ids[: ex.prefix_len])
    full = tokenize_tuple(t, tok, "offline", LayoutConfig(history_messages=None))
    budget = LayoutConfig(history_messages=None, max_prompt_tokens=full.student_prompt_len - 1)
    report = DataReport()
    cut = tokenize_tuple(t, tok, "offline", budget, report)
    assert cut.student_prompt_len <= full.student_prompt_len - 1
    assert cut.kept_history_messages < full.kept_history_messages and report.adjusted["history_cut_for_budget"] >= 1
    assert decode(tok, cut.teacher_ids).count("Question") == decode(tok, cut.student_ids).count("Question")
    # A long follow-up never shortens the teacher's history relative to the student's (METHOD.md §2).
    long_o = tuple_with(t.x, t.y, "more " * 200)
    cut_long = tokenize_tuple(long_o, tok, "offline", budget)
    assert cut_long.kept_history_messages == cut.kept_history_messages


def test_budgets_drop_and_count(tokenizers):
    tok = tokenizers["llama3"]
    t = tuple_with([{"role": "user", "content": "Write a story."}], "the " * 50, "Shorter " * 40)
    report = DataReport()
    assert tokenize_tuple(t, tok, "offline", LayoutConfig(max_response_tokens=10), report) is None
    assert report.dropped_tuples["response_over_budget"] == 1
    assert tokenize_tuple(t, tok, "offline", LayoutConfig(max_followup_tokens=20), report) is None
    assert report.dropped_tuples["followup_over_budget"] == 1
    assert tokenize_tuple(t, tok, "offline", LayoutConfig(max_prompt_tokens=3), report) is None
    assert report.dropped_tuples["prompt_over_budget"] == 1
    assert report.examples_built == 0


def test_followup_truncation_keeps_its_budget(tokenizers):
    tok = tokenizers["chatml"]
    template = HindsightTemplate.preset("online")
    t = tuple_with([{"role": "user", "content": "Write a story."}], "Once.", "Shorter please " * 40)
    report = DataReport()
    budget = len(tok.encode(template.render(""), add_special_tokens=False)) + 10
    ex = tokenize_tuple(t, tok, template, LayoutConfig(max_followup_tokens=budget, followup_overflow="truncate"), report)
    assert report.adjusted["followup_truncated"] == 1
    block = decode(tok, ex.teacher_ids[ex.prefix_len : ex.teacher_prompt_len])
    assert "Shorter please" in block and block.count("Shorter") < 40
    assert len(tok.encode(block.split("<|im_end|>")[0], add_special_tokens=False)) <= budget + 2


def test_packed_windows_split_long_conversations(tokenizers):
    tok = tokenizers["chatml"]
    rows = synthetic_wildchat_rows(1, seed=5, min_turns=6, max_turns=6, words=(8, 8))
    (conv,) = read_conversations(rows)
    tuples = conversation_tuples(conv)
    (whole,) = tokenize_conversation(tuples, tok, "offline", NO_LIMIT)
    max_length = len(whole.input_ids) // 2
    report = DataReport()
    windows = tokenize_conversation(tuples, tok, "offline", LayoutConfig(max_length=max_length), report)
    assert len(windows) >= 2 and all(len(w.input_ids) <= max_length for w in windows)
    turns = [p.turn_index for w in windows for p in w.tuples]
    assert turns == [t.turn_index for t in tuples], "every tuple is scored in exactly one window"
    assert [w.first_message for w in windows] == sorted(w.first_message for w in windows)
    for w in windows:
        for p in w.tuples:
            t = tuples[p.turn_index]
            window_tuple = tuple_with(t.x[w.first_message :], t.y, t.o)
            per_tuple = tokenize_tuple(window_tuple, tok, "offline", NO_LIMIT)
            assert w.input_ids[: p.response_start] == per_tuple.student_ids[: per_tuple.student_prompt_len]
            assert w.input_ids[: p.prefix_offset] + p.teacher_suffix_ids == per_tuple.teacher_ids
    tiny = tokenize_conversation(tuples, tok, "offline", LayoutConfig(max_length=8), report)
    assert tiny == [] and report.dropped_tuples["window_over_budget"] == len(tuples)


def test_template_errors_name_the_record(tokenizers):
    tok = tiny_chat_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    x = [{"role": "user", "content": "Hello!"}, {"role": "user", "content": "Write code."}]
    with pytest.raises(ChatTemplateError, match=r"conversation 'greeting' turn 1: .*alternate"):
        tokenize_tuple(tuple_with(x, "Ok.", "Thanks.", "greeting", 1), tok, "offline", NO_LIMIT)
    # A leading assistant message (a greeting) is dropped, as the paper does: no role error.
    greeting = [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write code."}]
    ex = tokenize_tuple(tuple_with(greeting, "Ok.", "Thanks.", "greeting", 1), tok, "offline", NO_LIMIT)
    assert "Hello!" not in decode(tok, ex.student_ids)


def test_tokenizer_without_chat_template_is_a_clear_error():
    t = tuple_with([{"role": "user", "content": "Hi."}], "Hello.", "Thanks.")
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tokenize_tuple(t, tiny_chat_tokenizer("chatml", with_template=False), "offline")


def test_end_of_turn_token_is_read_from_the_template():
    tok = tiny_chat_tokenizer("chatml")
    tok.eos_token = "<|endoftext|>"  # a base tokenizer's eos; the template closes turns with <|im_end|>
    t = tuple_with([{"role": "user", "content": "Hi."}], "Hello.", "Thanks.")
    ex = tokenize_tuple(t, tok, "offline")
    assert ex.target_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tokenize_tuple(t, tok, "offline", LayoutConfig(end_of_turn_token="<|im_end|>")).student_ids == ex.student_ids


def test_template_that_closes_turns_without_a_token_is_a_clear_error():
    tok = tiny_chat_tokenizer("chatml")
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    t = tuple_with([{"role": "user", "content": "Hi."}], "Hello.", "Thanks.")
    with pytest.raises(ChatTemplateError, match="end_of_turn_token"):
        tokenize_tuple(t, tok, "offline")


def test_tokenizer_that_prefixes_every_encode_with_a_space_is_a_clear_error():
    # SentencePiece-style tokenizers (prepend "▁" to each encode call) would turn "Hello" into
    # " Hello" in every tokenised reply; the renderer refuses them instead.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hsd.data.testing import CHAT_TEMPLATES

    spm = Tokenizer(models.BPE(unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    spm.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special, show_progress=False)
    spm.train_from_iterator(["Hi Hello user assistant\n"] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=spm, eos_token="<|im_end|>")
    tok.chat_template = CHAT_TEMPLATES["chatml"][0]
    t = tuple_with([{"role": "user", "content": "Hi"}], "Hello", "Again.")
    with pytest.raises(ChatTemplateError, match="prefix space"):
        tokenize_tuple(t, tok)


def test_packed_rejects_tuples_of_different_conversations(tokenizers, conversations):
    groups = list(group_by_conversation(extract_tuples(conversations)))
    with pytest.raises(Exception, match="group_by_conversation"):
        tokenize_conversation(groups[0] + groups[1], tokenizers["chatml"], "offline")


def test_paper_layout_preset():
    cfg = LayoutConfig.paper()
    assert (cfg.history_messages, cfg.max_prompt_tokens, cfg.max_response_tokens, cfg.ignore_first_k) == (5, 2048, 2048, 2)
    with pytest.raises(ValueError, match="followup_overflow"):
        LayoutConfig(followup_overflow="cut")


@pytest.mark.parametrize("name", ["history_messages", "max_prompt_tokens", "max_followup_tokens", "max_length"])
def test_budgets_below_one_are_rejected_up_front(name):
    # history_messages=0 used to fail later, per tuple, with "the history must end with a user message".
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        LayoutConfig(**{name: 0})


def test_conversation_record_targets_only_the_logged_completion(tokenizers):
    conv = Conversation(
        messages=[
            {"role": "user", "content": "Write code."},
            {"role": "assistant", "content": "Here."},
            {"role": "user", "content": "Explain it."},
            {"role": "assistant", "content": "It works."},
            {"role": "user", "content": "Thanks."},
        ],
        id="row7",
        response_indices=(3,),
    )
    (t,) = conversation_tuples(conv)
    (ex,) = tokenize_conversation([t], tokenizers["chatml"], "offline", NO_LIMIT)
    assert [p.turn_index for p in ex.tuples] == [1]
    assert decode(tokenizers["chatml"], ex.input_ids).endswith("It works.<|im_end|>")


# ---- windows, cost, bad records -----------------------------------------------------------


@pytest.fixture(scope="module")
def long_conversation():
    from hsd.data.testing import synthetic_conversation

    messages = synthetic_conversation(24, seed=7, user_words=(3, 20), assistant_words=(10, 60))
    return conversation_tuples(Conversation(messages, id="long"))


@pytest.mark.parametrize("style", ["chatml", "qwen3"])
def test_windows_share_and_give_every_reply_half_a_window_of_context(tokenizers, long_conversation, style):
    tok, tuples = tokenizers[style], long_conversation
    (whole,) = tokenize_conversation(tuples, tok, "offline", NO_LIMIT)
    history = {p.turn_index: whole.position_ids[p.response_start] for p in whole.tuples}
    max_length = 1024
    report = DataReport()
    windows = tokenize_conversation(tuples, tok, "offline", LayoutConfig(max_length=max_length), report)
    assert len(windows) >= 3 and "window_context_below_half" not in report.adjusted
    assert [p.turn_index for w in windows for p in w.tuples] == [t.turn_index for t in tuples]
    for w in windows:
        assert len(w.input_ids) <= max_length  # branches included
        for k, p in enumerate(w.tuples):
            context = w.position_ids[p.response_start]
            assert context >= min(history[p.turn_index], max_length // 2)
            t = tuples[p.turn_index]
            per_tuple = tokenize_tuple(tuple_with(t.x[w.first_message :], t.y, t.o), tok, "offline", NO_LIMIT)
            assert w.student_context(k) == per_tuple.student_ids
            assert w.input_ids[: p.prefix_offset] + p.teacher_suffix_ids == per_tuple.teacher_ids
    # The ratio is counted: every window's ids (branches included) over the conversation's.
    assert report.student_tokens == sum(len(w.input_ids) for w in windows)
    assert report.conversation_tokens == whole.trunk_len  # the conversation, once
    per_tuple_tokens = sum(len(whole.student_context(k)) for k in range(len(whole.tuples)))
    assert report.student_tokens < per_tuple_tokens / 2
    if style == "chatml":
        # Windows overlap by about half a window: about 2x the conversation's tokens.
        assert 1.0 < report.student_token_ratio < 2.3


def test_window_plan_is_the_least_student_tokens_any_plan_can_have(tokenizers):
    # The planner's dynamic programme against exhaustive search, on its own token estimates
    # (exact for ChatML up to a window's first markup token or two): every split of the replies
    # into consecutive groups, each group at its best start (any user message giving its first
    # reply min(history, L/2) tokens of context, at most L tokens). Non-consecutive groups are
    # never better: a window spans from its start to its last reply, so it holds the replies in
    # between anyway. So no plan of whole-message windows gets a lower student-token ratio.
    import itertools

    from hsd.data import tokenization as T
    from hsd.data.render import ChatRenderer
    from hsd.data.testing import synthetic_conversation

    r = ChatRenderer.for_tokenizer(tokenizers["chatml"])
    # A conversation where filling each window in turn costs 6% more than the optimum.
    messages = synthetic_conversation(11, seed=2, user_words=(3, 20), assistant_words=(10, 60))
    conv = T._Conversation(r, messages, "test")
    replies = [j for j in range(conv.first + 1, len(messages)) if messages[j]["role"] == "assistant"]
    starts = T._window_starts(conv)
    length = 4 * conv.est_length(conv.first, replies) // 10
    need = {j: min(length // 2, conv.est_context(conv.first, j)) for j in replies}

    def best_window(group):
        costs = [conv.est_length(s, group) for s in starts if s < group[0] and conv.est_context(s, group[0]) >= need[group[0]]]
        return min([c for c in costs if c <= length], default=None)

    best = None
    for cuts in itertools.product([False, True], repeat=len(replies) - 1):
        groups, group = [], [replies[0]]
        for cut, j in zip(cuts, replies[1:]):
            if cut:
                groups.append(group)
                group = []
            group.append(j)
        costs = [best_window(g) for g in groups + [group]]
        if None not in costs and (best is None or sum(costs) < best):
            best = sum(costs)
    plan = T._plan_windows(conv, replies, length, starts)
    assert len(plan) >= 3 and all(s is not None for s, _, _ in plan)
    assert sum(conv.est_length(s, replies[i:k]) for s, i, k in plan) == best


def test_tokenisation_grows_linearly_with_turns(tokenizers):
    # Count what is encoded and rendered, not seconds: doubling the turns at most ~doubles both.
    from hsd.data.render import ChatRenderer
    from hsd.data.testing import synthetic_conversation

    tok = tokenizers["chatml"]
    r = ChatRenderer.for_tokenizer(tok)
    counts = {}
    encode, encode_batch, render = r.encode, r.encode_batch, r.render

    def counting_encode(text, split=False):
        counts["encoded"] += len(text)
        return encode(text, split)

    def counting_encode_batch(texts, split=False):
        counts["encoded"] += sum(map(len, texts))
        return encode_batch(texts, split)

    def counting_render(messages, generation_prompt, where):
        text = render(messages, generation_prompt, where)
        counts["rendered"] += len(text)
        return text

    r.encode, r.encode_batch, r.render = counting_encode, counting_encode_batch, counting_render
    try:
        per_turns = {}
        for turns in (20, 40, 80):
            messages = synthetic_conversation(turns, seed=turns, user_words=(3, 20), assistant_words=(10, 60))
            tuples = conversation_tuples(Conversation(messages, id=f"c{turns}"))
            for layout, run in (
                ("packed", lambda: tokenize_conversation(tuples, r, "offline", LayoutConfig(max_length=512))),
                ("tuple", lambda: [tokenize_tuple(t, r, "offline", LayoutConfig()) for t in tuples]),
            ):
                r.clear_cache()
                counts.update(encoded=0, rendered=0)
                run()
                per_turns[layout, turns] = dict(counts)
    finally:
        del r.encode, r.encode_batch, r.render
    for layout in ("packed", "tuple"):
        for key in ("encoded", "rendered"):
            assert per_turns[layout, 80][key] <= 2.3 * per_turns[layout, 40][key], (layout, key, per_turns)
            assert per_turns[layout, 40][key] <= 2.3 * per_turns[layout, 20][key], (layout, key, per_turns)
    # Each message is encoded about once in either layout (the history is never re-encoded).
    assert per_turns["packed", 80]["encoded"] <= 1.5 * per_turns["tuple", 80]["encoded"]


def test_iter_examples_skips_bad_records_by_reason(tokenizers):
    tok = tiny_chat_tokenizer("gemma")  # role rules, no system role
    good = tuple_with([{"role": "user", "content": "Write code."}], "Here.", "Thanks.", "good")
    two_users = tuple_with([{"role": "user", "content": "Hi."}, {"role": "user", "content": "Write code."}],
                           "Ok.", "Thanks.", "two-users")
    system = tuple_with([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write."}],
                        "Ok.", "More.", "system")
    greeting = tuple_with([{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write code."}],
                          "Ok.", "Thanks.", "greeting", 1)
    broken = tuple_with([{"role": "user", "content": "Write code."}], "Ok.", "Thanks.", "broken")
    broken.y = None  # modified after it was built
    records = [good, two_users, system, greeting, broken]
    for layout in ("tuple", "packed"):
        report = DataReport()
        examples = list(iter_examples(records, tok, "offline", NO_LIMIT, layout, report, on_error="skip"))
        # The conversation that opens with an assistant message is kept (the greeting is dropped).
        assert [e.conversation_id for e in examples] == ["good", "greeting"]
        assert report.skipped_records == {"template_error": 2, "invalid_tuple": 1}
        assert report.skipped_locations["template_error"] == ["conversation 'two-users' turn 0", "conversation 'system' turn 0"] \
            if layout == "tuple" else ["conversation 'two-users'", "conversation 'system'"]
        assert "broken" in report.skipped_locations["invalid_tuple"][0]
    with pytest.raises(ChatTemplateError, match="two-users.*alternate"):
        list(iter_examples(records, tok, "offline", NO_LIMIT, "packed"))
    with pytest.raises(ValueError, match="on_error"):
        list(iter_examples(records, tok, on_error="ignore"))


@pytest.mark.parametrize("style", ["chatml", "llama3", "qwen3"])
def test_packed_layout_accepts_a_conversation_that_opens_with_an_assistant_message(tokenizers, style):
    x = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Write code."},
         {"role": "assistant", "content": "Here it is."}, {"role": "user", "content": "Explain it."}]
    t0 = tuple_with(x[:2], x[2]["content"], x[3]["content"], "greet", 1)
    t1 = tuple_with(x, "It works.", "Thanks.", "greet", 2)
    (ex,) = tokenize_conversation([t0, t1], tokenizers[style], "offline", NO_LIMIT)
    assert ex.first_message == 1 and "Hello!" not in decode(tokenizers[style], ex.input_ids)
    for k, t in enumerate([t0, t1]):
        assert ex.student_context(k) == tokenize_tuple(t, tokenizers[style], "offline", NO_LIMIT).student_ids


def test_both_layouts_report_the_student_token_ratio(tokenizers, long_conversation):
    tok = tokenizers["chatml"]
    reports = {}
    for layout in ("tuple", "packed"):
        reports[layout] = DataReport()
        examples = list(iter_examples(long_conversation, tok, "offline", NO_LIMIT, layout, reports[layout]))
        ids = [e.student_ids if layout == "tuple" else e.input_ids for e in examples]
        assert reports[layout].student_tokens == sum(len(i) for i in ids)
    # The same conversation, counted once, in both; the per-tuple layout repeats its history.
    assert reports["tuple"].conversation_tokens == reports["packed"].conversation_tokens > 0
    assert reports["packed"].student_token_ratio == 1.0
    assert reports["tuple"].student_token_ratio > 5
