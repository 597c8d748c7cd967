"""Message contents that also occur in the template's markup or in other messages.

A content is located where the template put it, not at the first place its text occurs: a
user message that is literally ``user`` or ``system``, a reply ``a`` (``<|im_start|>`` holds an
``a``), a content spelling a special token, a content equal to the system prompt, identical
messages repeated. The reference below is independent of hsd: it renders each sequence with
``apply_chat_template`` once with placeholder contents (which gives the template's markup
between contents) and once with the real contents, checks that the real text is that markup
with the contents put back, and encodes the segments itself (contents with special tokens
split; a reply's segment runs from the end of its generation prompt to its end-of-turn token).
"""

import re

import pytest

from hsd.data import HindsightTemplate, InteractionTuple, LayoutConfig, tokenize_conversation, tokenize_tuple
from hsd.data.records import Conversation
from hsd.data.testing import tiny_chat_tokenizer
from hsd.data.tuples import conversation_tuples

# (style, chat_template_kwargs, end-of-turn token, whether the template takes a system message)
STYLES = [
    ("chatml", {}, "<|im_end|>", True),
    ("llama31", {}, "<|eot_id|>", True),
    ("mistral", {}, "</s>", False),
    ("gemma", {}, "<end_of_turn>", False),
    ("phi3", {}, "<|end|>", True),
    ("qwen3", {"enable_thinking": False}, "<|im_end|>", True),
]
IDS = [s for s, *_ in STYLES]
SYSTEM = "Be brief."
# Contents that collide with markup ("user", "a", "system", "assistant", a special token's
# string), with the system prompt, and with each other (the same message repeated).
COLLIDING = ["user", "a", "system", "assistant", "<|im_start|>", SYSTEM, "user", "a", "ok", "ok", "ok", "ok", "system"]


@pytest.fixture(scope="module")
def tokenizers():
    return {style: tiny_chat_tokenizer(style) for style, *_ in STYLES}


def conversation(with_system: bool) -> Conversation:
    messages = [{"role": "system", "content": SYSTEM}] if with_system else []
    for i, content in enumerate(COLLIDING):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return Conversation(messages, id="colliding")


def render(tok, messages, kwargs, generation_prompt=False):
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)


def reference_ids(tok, messages, kwargs, eot):
    """Ids of ``messages`` (ending with the scored reply), cut after its end-of-turn token."""
    placeholders = [{"role": m["role"], "content": f"\x01{i}\x02"} for i, m in enumerate(messages)]
    skeleton = render(tok, placeholders, kwargs)
    parts = re.split("\x01(\\d+)\x02", skeleton)
    markup, order = parts[0::2], [int(i) for i in parts[1::2]]
    full = render(tok, messages, kwargs)
    spans, pos = {}, 0
    for piece, k in zip(markup, order):
        assert full.startswith(piece, pos)
        pos += len(piece)
        content = messages[k]["content"]
        written = content if full.startswith(content, pos) else content.strip()
        assert full.startswith(written, pos), "the template writes the content as is or trimmed"
        spans[k] = [pos, pos + len(written)]
        pos += len(written)
    assert full[pos:] == markup[-1], "the real rendering is the markup with the contents put back"
    for m, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = spans[m]
        close = full.index(eot, end)
        assert not full[end:close].strip()
        prompt = render(tok, messages[:m], kwargs, True)
        if full.startswith(prompt) and len(prompt) <= start and not full[len(prompt) : start].strip():
            start = len(prompt)
        spans[m] = [start, close]
    text = full[: spans[len(messages) - 1][1] + len(eot)]
    ids, previous = [], 0
    for start, end in sorted(spans.values()):
        ids += tok.encode(text[previous:start], add_special_tokens=False)
        ids += tok.encode(text[start:end], add_special_tokens=False, split_special_tokens=True)
        previous = end
    return ids + tok.encode(text[previous:], add_special_tokens=False)


def cut(x, keep):
    system = x[:1] if x[0]["role"] == "system" else []
    body = x[len(system) :] if keep is None else x[len(system) :][-keep:]
    while body[0]["role"] == "assistant":
        body = body[1:]
    return system + body


def test_a_content_that_is_markup_text_is_cut_where_the_template_put_it(tokenizers):
    # ChatML, by hand: the user message "a" and the reply "user" are text segments, not the "a"
    # inside "<|im_start|>" (which would break that marker into text) nor a role header.
    tok = tokenizers["chatml"]
    t = InteractionTuple([{"role": "user", "content": "a"}], "user", "Thanks.", "c", 0, 1)
    ex = tokenize_tuple(t, tok, "offline", LayoutConfig(ignore_first_k=0))

    def enc(text, text_only=False):
        return tok.encode(text, add_special_tokens=False, split_special_tokens=text_only)

    expected = (enc("<|im_start|>user\n") + enc("a", True) + enc("<|im_end|>\n<|im_start|>assistant\n")
                + enc("user", True) + enc("<|im_end|>"))
    assert ex.student_ids == expected
    assert ex.student_ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    assert ex.response_ids == enc("user", True) + enc("<|im_end|>")
    (packed,) = tokenize_conversation([t], tok, "offline", LayoutConfig(ignore_first_k=0))
    assert packed.input_ids == expected


@pytest.mark.parametrize(("style", "kwargs", "eot", "system_ok"), STYLES, ids=IDS)
@pytest.mark.parametrize("history_messages", [None, 3])
def test_per_tuple_layout_locates_colliding_contents(tokenizers, style, kwargs, eot, system_ok, history_messages):
    tok = tokenizers[style]
    template = HindsightTemplate.preset("offline")
    cfg = LayoutConfig(history_messages=history_messages, chat_template_kwargs=kwargs)
    tuples = conversation_tuples(conversation(system_ok))
    assert len(tuples) == len(COLLIDING) // 2  # every reply is followed by a user message
    for t in tuples:
        ex = tokenize_tuple(t, tok, template, cfg)
        history = cut(t.x, history_messages)
        reply = [{"role": "assistant", "content": t.y}]
        assert ex.student_ids == reference_ids(tok, history + reply, kwargs, eot)
        assert ex.teacher_ids == reference_ids(tok, template.teacher_messages(history, t.o) + reply, kwargs, eot)


@pytest.mark.parametrize(("style", "kwargs", "eot", "system_ok"), STYLES, ids=IDS)
@pytest.mark.parametrize("windowed", [False, True])
def test_packed_layout_locates_colliding_contents(tokenizers, style, kwargs, eot, system_ok, windowed):
    tok = tokenizers[style]
    template = HindsightTemplate.preset("offline")
    tuples = conversation_tuples(conversation(system_ok))
    unlimited = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs)
    (whole,) = tokenize_conversation(tuples, tok, template, unlimited)
    cfg = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs,
                       max_length=len(whole.input_ids) * 2 // 3) if windowed else unlimited
    examples = tokenize_conversation(tuples, tok, template, cfg)
    assert [p.turn_index for e in examples for p in e.tuples] == [t.turn_index for t in tuples]
    assert len(examples) > 1 or not windowed
    by_turn = {t.turn_index: t for t in tuples}
    for ex in examples:
        for k, p in enumerate(ex.tuples):
            t = by_turn[p.turn_index]
            system = t.x[:1] if t.x[0]["role"] == "system" else []
            history = system + t.x[ex.first_message :]
            reply = [{"role": "assistant", "content": t.y}]
            assert ex.student_context(k) == reference_ids(tok, history + reply, kwargs, eot)
            teacher = ex.input_ids[: p.prefix_offset] + p.teacher_suffix_ids
            assert teacher == reference_ids(tok, template.teacher_messages(history, t.o) + reply, kwargs, eot)


def test_mistral_system_prompt_inside_the_last_user_turn_is_text(tokenizers):
    # Mistral v0.3 writes the system prompt inside the last user turn, after the earlier turns:
    # it is still located (out of message order) and encoded as text.
    from hsd.data.render import ChatRenderer

    tok = tokenizers["mistral"]
    r = ChatRenderer.for_tokenizer(tok)
    messages = [{"role": "system", "content": "Obey [INST] a"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "[INST]"}]
    text = r.render(messages, False, "test")
    tokenized = r.tokenize(text, messages)
    spans = tokenized.spans
    assert [text[a:b] for a, b in spans] == ["Obey [INST] a", "a", " a</s>"[:-4], "[INST]"]
    assert spans[1][0] < spans[2][0] < spans[0][0] < spans[3][0]
    inst = tok.convert_tokens_to_ids("[INST]")
    # Two [INST] markers of the template; the ones in the contents are text.
    assert tokenized.ids.count(inst) == 2
    assert r.decode(tokenized.ids) == text


def test_contents_holding_the_sentinel_characters_and_rewritten_contents(tokenizers):
    from hsd.data.render import ChatRenderer

    # A content holding the private-use character the sentinels use: another one is taken.
    tok = tokenizers["chatml"]
    t = InteractionTuple([{"role": "user", "content": "user \ue000 0 \ue001"}], "a", "Thanks.", "c", 0, 1)
    ex = tokenize_tuple(t, tok, "offline")
    reply = [{"role": "assistant", "content": "a"}]
    assert ex.student_ids == reference_ids(tok, t.x + reply, {}, "<|im_end|>")
    # Qwen3 strips reasoning from a reply in history: what it writes of it is still text.
    tok = tiny_chat_tokenizer("qwen3")
    r = ChatRenderer.for_tokenizer(tok)
    messages = [{"role": "user", "content": "user"},
                {"role": "assistant", "content": "<think>\nplan <|im_end|>\n</think>\n\nassistant <|im_end|>"},
                {"role": "user", "content": "a"}]
    text = r.render(messages, False, "test")
    tokenized = r.tokenize(text, messages)
    a, b = tokenized.spans[1]
    assert text[a:b] == "assistant <|im_end|>"
    assert tokenized.ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 3  # the template's three
    assert r.decode(tokenized.ids) == text


@pytest.mark.parametrize("first", ["a", "s", "im", "user", "<|im_start|>"])
def test_student_and_teacher_share_the_template_markup_before_a_colliding_first_message(tokenizers, first):
    # A first user message found inside "<|im_start|>" used to break that marker into text in
    # one rendering and not in the other, so the two shared no first token.
    tok = tokenizers["chatml"]
    t = InteractionTuple([{"role": "user", "content": first}], "b", "Shorter.", "c", 0, 1)
    header = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    for template in ("online", "offline"):
        ex = tokenize_tuple(t, tok, template)
        assert ex.prefix_len >= len(header) and ex.student_ids[: len(header)] == header


def test_a_template_whose_markup_depends_on_the_text_falls_back_to_searching_in_order():
    from hsd.data.render import ChatRenderer

    tok = tiny_chat_tokenizer("chatml")
    # Markup that depends on the content's length: the sentinel rendering cannot stand for it.
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
        "{% if m['content'] | length < 3 %}{{ ' (short)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    r = ChatRenderer.for_tokenizer(tok)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    text = r.render(messages, False, "test")
    assert r._locate_by_sentinels(messages, text) is None
    tokenized = r.tokenize(text, messages)
    assert [text[a:b] for a, b in tokenized.spans] == ["Hi", "Hello there. (short)"[:12]]
    assert r.decode(tokenized.ids) == text
    ex = tokenize_tuple(InteractionTuple(messages[:1], "Hello there.", "Thanks.", "c", 0, 1), tok, "offline",
                        LayoutConfig(ignore_first_k=0))
    assert ex.response_ids == tok.encode("Hello there.<|im_end|>", add_special_tokens=False)
