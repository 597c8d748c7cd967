"""The shared-prefix step against a naive implementation, on tiny random models.

The naive path is the paper's: for every tuple a separate full student forward and a separate
full teacher forward, full logits, and the float64 reference loss. hsd's step (one tree-masked
student pass per row, teacher branches over the student's detached keys/values, the fused loss
from hidden states) must give the same teacher log-probs and the same student gradients:
float64 models to 1e-9 relative, float32 to 1e-4.
"""

import logging

import pytest
import torch

import hsd
from hsd.data import (FilterConfig, HindsightCollator, LayoutConfig, extract_tuples, group_by_conversation,
                      read_conversations, tokenize_conversation, tokenize_tuple)
from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer
from hsd.forward import EMATeacher, TreeBatch, hindsight_hidden_states, student_tree_allowed
from hsd.step import hindsight_step

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "qwen2_sliding", "qwen3", "mistral", "gemma3"]
WINDOW = 12  # small enough that the sliding layers really cut the tiny conversations
# transformers' eager attention takes its softmax in float32 even for float64 models, so key
# sets of different lengths agree to float32 rounding there; sdpa stays in float64.
TOL = {"sdpa": 1e-9, "eager": 1e-6}


def make_model(arch, vocab, attn="sdpa", dtype=torch.float64, seed=0):
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  attn_implementation=attn)
    t = transformers
    if arch == "llama":
        cls, cfg = t.LlamaForCausalLM, t.LlamaConfig(**common)
    elif arch == "qwen2_sliding":  # layer 0 full, layer 1 sliding
        cls, cfg = t.Qwen2ForCausalLM, t.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW,
                                                     max_window_layers=1)
    elif arch == "qwen3":
        cls, cfg = t.Qwen3ForCausalLM, t.Qwen3Config(**common, head_dim=8)
    elif arch == "mistral":  # every layer sliding
        cls, cfg = t.MistralForCausalLM, t.MistralConfig(**common, sliding_window=WINDOW)
    elif arch == "gemma3":  # alternating sliding/full layers, attention soft-capping
        cls, cfg = t.Gemma3ForCausalLM, t.Gemma3TextConfig(
            **common, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=20.0)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    return exact_norms(model) if dtype == torch.float64 else model


def exact_norms(model):
    """transformers' RMSNorms compute in float32 even for float64 models; the same norm in the
    input dtype makes float64 comparisons exact to float64 rounding (the subject here is the
    shared-prefix pass, not the model's own precision choices)."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
            gemma = type(module).__name__.startswith("Gemma")

            def forward(x, module=module, eps=eps, gemma=gemma):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                return y * ((1.0 + module.weight) if gemma else module.weight)

            module.forward = forward
    return model


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer("chatml")


@pytest.fixture(scope="module")
def tuples():
    convs = list(read_conversations(synthetic_wildchat_rows(5, seed=11, min_turns=2, max_turns=7, words=(2, 8))))
    return list(extract_tuples(convs, FilterConfig()))


def examples_for(tuples, tok, layout, max_length=None):
    if layout == "tuple":
        cfg = LayoutConfig(history_messages=None)
        return [e for t in tuples if (e := tokenize_tuple(t, tok, "online", cfg)) is not None]
    cfg = LayoutConfig(history_messages=None, max_length=max_length)
    return [e for g in group_by_conversation(tuples) for e in tokenize_conversation(g, tok, "online", cfg)]


def naive_sequences(examples, layout):
    """(student ids, student scored positions, teacher ids, teacher scored positions, targets)
    per tuple, in the collator's order, built from the layout records alone."""
    out = []
    for e in examples:
        if layout == "tuple":
            out.append((e.student_ids, e.student_scored_positions, e.teacher_ids, e.teacher_scored_positions,
                        e.target_ids))
            continue
        positions = getattr(e, "position_ids", None) or list(range(len(e.input_ids)))
        for k, t in enumerate(e.tuples):
            context = e.student_context(k) if hasattr(e, "student_context") else e.input_ids[: t.response_end]
            out.append((context, [positions[c] for c in t.student_scored_positions],
                        e.input_ids[: t.prefix_offset] + t.teacher_suffix_ids, t.teacher_scored_positions,
                        t.target_ids))
    return out


def naive_loss(model, examples, layout, teacher_model=None, teacher_ctx=None, **loss_options):
    student, teacher, targets, seq = [], [], [], []
    for k, (s_ids, s_pos, t_ids, t_pos, y) in enumerate(naive_sequences(examples, layout)):
        student.append(model(input_ids=torch.tensor([s_ids])).logits[0, s_pos])
        with torch.no_grad(), (teacher_ctx() if teacher_ctx else _null()):
            teacher.append((teacher_model or model)(input_ids=torch.tensor([t_ids])).logits[0, t_pos])
        targets += y
        seq += [k] * len(y)
    return hsd.hindsight_loss(torch.cat(student), torch.cat(teacher), torch.tensor(targets),
                              seq_ids=torch.tensor(seq), backend="reference", **loss_options)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_step_matches_naive(model, batch, examples, layout, tol, teacher_model=None, teacher_ctx=None,
                             step_kwargs=None, **loss_options):
    model.zero_grad()
    out = hindsight_step(model, batch, hsd.HindsightLoss(**loss_options), **(step_kwargs or {}))
    out.loss.backward()
    fused = grads(model)
    model.zero_grad()
    ref = naive_loss(model, examples, layout, teacher_model, teacher_ctx, **loss_options)
    ref.backward()
    expected = grads(model)
    assert rel(out.loss.detach(), ref.detach()) <= tol
    assert fused.keys() == expected.keys()
    for name in expected:
        assert rel(fused[name], expected[name]) <= tol, name
    return out


# ---- teacher hidden states equal plain forwards ---------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["packed", "tuple"])
@pytest.mark.parametrize("strategy", ["masked", "loop"])
def test_teacher_states_equal_plain_forwards(tok, tuples, arch, attn, layout, strategy):
    examples = examples_for(tuples, tok, layout)
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model(arch, len(tok), attn)
    hs = hindsight_hidden_states(model, batch, strategy=strategy)
    assert hs.counts["teacher_strategy"] == strategy
    decoder = model.get_decoder()
    expected = []
    for s_ids, s_pos, t_ids, t_pos, _ in naive_sequences(examples, layout):
        with torch.no_grad():
            expected.append(decoder(input_ids=torch.tensor([t_ids])).last_hidden_state[0, t_pos])
            student = decoder(input_ids=torch.tensor([s_ids])).last_hidden_state[0, s_pos]
        expected[-1] = (expected[-1], student)
    teacher_ref = torch.cat([t for t, _ in expected])
    student_ref = torch.cat([s for _, s in expected])
    assert rel(hs.teacher, teacher_ref) <= TOL[attn]
    assert rel(hs.student.detach(), student_ref) <= TOL[attn]
    assert not hs.teacher.requires_grad and hs.student.requires_grad
    # the teacher computed only its branches; the prefixes were reused
    tb = TreeBatch.from_batch(batch)
    assert hs.counts["teacher_tokens"] == int(tb.suffix_lengths.sum())
    assert hs.counts["teacher_tokens_saved"] == int(tb.teacher_prefix_offsets.sum()) > 0


def test_a_wrong_offset_is_detected(tok, tuples):
    """The comparison above can fail: shifting one prefix offset changes the teacher states."""
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok))
    good = hindsight_hidden_states(model, batch).teacher
    batch["teacher_prefix_offsets"] = batch["teacher_prefix_offsets"] - 1
    assert rel(hindsight_hidden_states(model, batch).teacher, good) > 1e-3


# ---- the whole step: loss and student gradients equal the naive path -------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layout", ["packed", "tuple"])
def test_step_gradients_equal_naive(tok, tuples, arch, layout):
    examples = examples_for(tuples, tok, layout)
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model(arch, len(tok), "sdpa")
    out = check_step_matches_naive(model, batch, examples, layout, 1e-9, mode="sampled")
    assert out.counts["student_tokens"] == int(batch["attention_mask" if layout == "packed"
                                                     else "student_attention_mask"].sum())
    assert set(out.stats) >= {"mean_advantage", "frac_positive_advantage", "mean_divergence"}


@pytest.mark.parametrize("strategy", ["masked", "loop", "full"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_step_strategies_and_attention(tok, tuples, strategy, attn):
    examples = examples_for(tuples, tok, "packed", max_length=160)  # windowed conversations
    assert len(examples) > len({e.conversation_id for e in examples}), "expected several windows"
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("qwen2_sliding", len(tok), attn)
    check_step_matches_naive(model, batch, examples, "packed", TOL[attn], step_kwargs={"strategy": strategy},
                             mode="full", alpha=0.5)


def test_step_float32(tok, tuples):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok), dtype=torch.float32)
    check_step_matches_naive(model, batch, examples, "packed", 1e-4, mode="sampled")


@pytest.mark.parametrize("arch,attn", [("qwen3", "sdpa"), ("gemma3", "eager"), ("llama", "eager")])
def test_gradient_checkpointing_matches(tok, tuples, arch, attn):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model(arch, len(tok), attn)
    # transformers >= 5.24 renamed it; 5.17 (the GPU image) has only the old name
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    out = check_step_matches_naive(model, batch, examples, "packed", TOL[attn], mode="sampled")
    # no cache under checkpointing, yet the student's keys/values were recorded and reused
    assert out.counts["teacher_tokens_saved"] == int(batch["teacher_prefix_offsets"].sum())
    assert model.config._attn_implementation == attn  # restored after the student pass


def test_ema_teacher(tok, tuples):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok))
    ema = EMATeacher(model, rate=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    check_step_matches_naive(model, batch, examples, "packed", 1e-9, teacher_model=ema.module,
                             step_kwargs={"teacher": "ema", "teacher_model": ema}, mode="full", alpha=0.0)
    before = next(ema.module.parameters()).clone()
    ema.update(model)
    after, current = next(ema.module.parameters()), next(model.parameters())
    assert torch.allclose(after, before + 0.5 * (current - before))


def test_base_teacher_with_peft_adapter(tok, tuples):
    peft = pytest.importorskip("peft")
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    base = make_model("llama", len(tok))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    check_step_matches_naive(model, batch, examples, "packed", 1e-9, teacher_ctx=model.disable_adapter,
                             step_kwargs={"teacher": "base"}, mode="sampled")
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)


# ---- fallbacks and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("why", ["dropout", "recurrent"])
def test_no_reusable_prefix_falls_back_to_a_full_teacher_with_a_warning(tok, tuples, caplog, monkeypatch, why):
    import hsd.forward

    monkeypatch.setattr(hsd.forward, "_warned", set())
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok))
    if why == "dropout":
        model.config.attention_dropout = 0.1
        model.train()
    else:  # a hybrid model: one layer keeps a recurrent state, not keys/values per position
        model.config.layer_types = ["full_attention", "linear_attention"]
    with caplog.at_level(logging.WARNING, logger="hsd"):
        hs = hindsight_hidden_states(model, batch, strategy="masked")
        hindsight_hidden_states(model, batch, strategy="masked")
    assert hs.counts["teacher_strategy"] == "full" and hs.counts["teacher_tokens_saved"] == 0
    assert caplog.text.count("full teacher forward") == 1
    assert ("dropout" if why == "dropout" else "reusable") in caplog.text
    if why == "recurrent":  # the full teacher is still the right one
        model.config.layer_types = None
        assert rel(hs.teacher, hindsight_hidden_states(model, batch).teacher) <= 1e-9


def test_bad_arguments(tok, tuples):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok))
    with pytest.raises(ValueError, match="strategy"):
        hindsight_hidden_states(model, batch, strategy="bogus")
    with pytest.raises(ValueError, match="teacher"):
        hindsight_hidden_states(model, batch, teacher="frozen")
    with pytest.raises(ValueError, match="teacher_model"):
        hindsight_hidden_states(model, batch, teacher="ema")
    with pytest.raises(ValueError, match="peft"):
        hindsight_hidden_states(model, batch, teacher="base")
    with pytest.raises(ValueError, match="not a hindsight batch"):
        hindsight_hidden_states(model, {"input_ids": batch["input_ids"]})


def test_logit_softcapping_is_refused(tok, tuples):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    cfg = transformers.Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=30.0)
    model = transformers.Gemma2ForCausalLM(cfg)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hindsight_step(model, batch)


def test_student_tree_mask_rule():
    """Two rows: one plain, one with a student branch of 2 tokens attached after column 3."""
    batch = {
        "input_ids": torch.arange(14).reshape(2, 7), "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 3, 4], [0, 1, 2, 3, 4, 5, 6]]),
        "trunk_lengths": torch.tensor([5, 5]), "student_branch_batch_index": torch.tensor([0]),
        "student_branch_starts": torch.tensor([5]), "student_branch_ends": torch.tensor([7]),
        "student_branch_attach": torch.tensor([3]),
        "teacher_batch_index": torch.tensor([0, 1]), "teacher_prefix_offsets": torch.tensor([2, 3]),
        "teacher_suffix_ids": torch.ones(2, 2, dtype=torch.long),
        "teacher_suffix_attention_mask": torch.ones(2, 2, dtype=torch.long),
        **{k: torch.zeros(1, dtype=torch.long) for k in ("scored_tuple_index", "scored_batch_index",
                                                           "student_scored_positions",
                                                           "teacher_suffix_scored_indices", "target_ids")},
    }
    allowed = student_tree_allowed(TreeBatch.from_batch(batch))
    row0 = allowed[0].int().tolist()
    assert row0[4] == [1, 1, 1, 1, 1, 0, 0]  # trunk token: causal over the trunk
    assert row0[5] == [1, 1, 1, 0, 0, 1, 0]  # branch token: trunk before attach, then itself
    assert row0[6] == [1, 1, 1, 0, 0, 1, 1]
    row1 = allowed[1].int().tolist()
    assert row1[4] == [1, 1, 1, 1, 1, 0, 0] and row1[6] == [1, 0, 0, 0, 0, 0, 0]  # padding: key 0 only
    windowed = student_tree_allowed(TreeBatch.from_batch(batch), sliding_window=2)[0].int().tolist()
    assert windowed[5] == [0, 0, 1, 0, 0, 1, 0]  # position 3 sees positions 2..3


# ---- Qwen3-style templates: student branches in one tree-masked pass --------------------------


@pytest.fixture(scope="module")
def qwen3_tok():
    return tiny_chat_tokenizer("qwen3")


def qwen3_examples(tuples, tok, layout, max_length=None):
    kwargs = {"enable_thinking": False}
    if layout == "tuple":
        cfg = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs)
        return [e for t in tuples if (e := tokenize_tuple(t, tok, "offline", cfg)) is not None]
    cfg = LayoutConfig(history_messages=None, max_length=max_length, chat_template_kwargs=kwargs)
    return [e for g in group_by_conversation(tuples) for e in tokenize_conversation(g, tok, "offline", cfg)]


@pytest.mark.parametrize("arch", ["qwen3", "qwen2_sliding"])
@pytest.mark.parametrize("strategy", ["masked", "loop"])
def test_student_branches_match_per_tuple_forwards(qwen3_tok, tuples, arch, strategy):
    examples = qwen3_examples(tuples, qwen3_tok, "packed")
    assert sum(len(e.student_branches) for e in examples) > 0, "the Qwen3-style template must give branches"
    batch = HindsightCollator.from_tokenizer(qwen3_tok)(examples)
    model = make_model(arch, len(qwen3_tok))
    check_step_matches_naive(model, batch, examples, "packed", 1e-9, step_kwargs={"strategy": strategy},
                             mode="sampled")
    # the branched student contexts are the per-tuple layout's student sequences
    per_tuple = qwen3_examples(tuples, qwen3_tok, "tuple")
    contexts = [s for s, *_ in naive_sequences(examples, "packed")]
    assert contexts == [e.student_ids for e in per_tuple]


def test_student_branches_with_windows_and_checkpointing(qwen3_tok, tuples):
    examples = qwen3_examples(tuples, qwen3_tok, "packed", max_length=200)
    batch = HindsightCollator.from_tokenizer(qwen3_tok)(examples)
    model = make_model("qwen3", len(qwen3_tok))
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    check_step_matches_naive(model, batch, examples, "packed", 1e-9, mode="topk", topk=8)


# ---- FlexAttention: the same rule as a BlockMask -----------------------------------------------


def test_block_mask_encodes_the_same_rule(tok, tuples):
    """CPU sibling of the GPU test below: the BlockMask's mask_mod is the dense rule, and blocks
    the rule fully masks are absent from it (FlexAttention skips them)."""
    from hsd.forward import _block_mask, _teacher_rows, teacher_branch_allowed

    tb = TreeBatch.from_batch(HindsightCollator.from_tokenizer(tok)(examples_for(tuples, tok, "packed")))
    rows = _teacher_rows(tb)
    allowed = teacher_branch_allowed(rows, tb.input_ids.shape[1])
    mask = _block_mask(allowed)
    b, q, k = (torch.arange(n) for n in allowed.shape)
    dense = mask.mask_mod(b[:, None, None], torch.zeros(()), q[None, :, None], k[None, None, :])
    assert torch.equal(dense, allowed)
    size = mask.BLOCK_SIZE
    kept = mask.to_dense()[:, 0].bool()  # [B, q blocks, kv blocks]
    padded = torch.zeros((allowed.shape[0], kept.shape[1] * size[0], kept.shape[2] * size[1]), dtype=torch.bool)
    padded[:, : allowed.shape[1], : allowed.shape[2]] = allowed
    any_allowed = padded.reshape(allowed.shape[0], kept.shape[1], size[0], kept.shape[2], size[1]).any(4).any(2)
    assert torch.equal(kept, any_allowed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention runs on CUDA (CPU: no backward, and "
                    "this torch's CPU inductor template fails to compile it); its rule is tested above")
def test_flex_attention_step_matches_sdpa(tok, tuples):
    examples = examples_for(tuples, tok, "packed")
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    flex = make_model("llama", len(tok), "flex_attention", dtype=torch.float32).cuda()
    sdpa = make_model("llama", len(tok), "sdpa", dtype=torch.float32).cuda()
    a = hindsight_hidden_states(flex, batch, strategy="masked")
    b = hindsight_hidden_states(sdpa, batch, strategy="masked")
    assert rel(a.teacher, b.teacher) <= 1e-4 and rel(a.student.detach(), b.student.detach()) <= 1e-4


@pytest.mark.parametrize("layout", ["packed", "tuple"])
def test_ema_teacher_counts(tok, tuples, layout):
    """The EMA teacher encodes each row's prefix once (up to its longest offset) and reuses it."""
    examples = examples_for(tuples, tok, layout)
    batch = HindsightCollator.from_tokenizer(tok)(examples)
    model = make_model("llama", len(tok))
    hs = hindsight_hidden_states(model, batch, teacher="ema", teacher_model=EMATeacher(model, 0.1))
    tb = TreeBatch.from_batch(batch)
    longest = [max(int(o) for o, r in zip(tb.teacher_prefix_offsets, tb.teacher_batch_index) if int(r) == row)
               for row in range(tb.input_ids.shape[0])]
    assert hs.counts["teacher_tokens_saved"] == int(tb.teacher_prefix_offsets.sum()) - sum(longest) >= 0
    assert hs.counts["teacher_tokens"] >= int(tb.suffix_lengths.sum()) + sum(longest)
