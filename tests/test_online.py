"""Online learning (hsd.online) on tiny random models: steps change the adapter and nothing
else, the anchor is KL(reference ‖ student) exactly, the gate, rollbacks, undo, save/load, and
bad input skipped and counted."""

import copy

import pytest
import torch

import hsd
from hsd.data import ChatTemplateError, DataError, tokenize_tuple
from hsd.data.testing import tiny_chat_tokenizer
from hsd.online import (OnlineConfig, OnlineDistiller, TeacherHealth, is_neutral_followup, run_online,
                        user_directory)
from helpers import tiny_qwen2 as tiny_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = [{"role": "user", "content": "write a python function please"}]
REPLY = "the answer is a list of code"


def small(**overrides):
    """Tiny LoRA and a large learning rate, so that a few steps visibly move the adapter."""
    base = dict(lora_r=4, lora_alpha=8, lr=1e-2, max_new_tokens=6, seed=0)
    return {**base, **overrides}


def lora_state(d):
    return {n: p.detach().clone() for n, p in d.trainable.items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def perturbed_lora(tok, dtype=torch.float64, target=("q_proj", "v_proj", "down_proj")):
    """A peft model whose adapter is not the identity (so the reference differs from the student)."""
    model = peft.get_peft_model(tiny_model(tok, dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target),
                                                                        init_lora_weights=False))
    return model


# ---- item 1: the loop, the adapter, persistence ------------------------------------------------


def test_run_online_changes_the_adapter_and_leaves_base_weights_bit_identical(tok):
    model = tiny_model(tok)
    base = {id(p): p.detach().clone() for p in model.parameters()}
    d = OnlineDistiller(model, tok, OnlineConfig(**small()))
    before = lora_state(d)
    followups = iter(["shorter please", None, "wrong, explain again", "give an example"])
    run = run_online(d, ["write code", "tell a story", "explain python", "make a list"],
                     lambda messages, reply: next(followups), learn_truncated=True, progress=False)
    assert run.counts["no_followup"] == 1 and run.steps == 3 and d.step_count == 3
    assert [r["learned"] for r in run.records] == [True, False, True, True]
    assert all(r["stats"]["scored_tokens"] > 0 for r in run.records if r["learned"])
    after = lora_state(d)
    assert all("lora_" in n for n in after)
    assert not same(before, after), "three steps must move the adapter"
    for p in d.model.parameters():  # every non-adapter parameter is an original tensor, unchanged
        if not p.requires_grad:
            assert id(p) in base and torch.equal(p, base[id(p)])
    assert sum(1 for p in d.model.parameters() if not p.requires_grad) == len(base)


def test_learn_returns_token_signals_and_respond_samples(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small()))
    response = d.respond(PROMPT, return_details=True)
    assert len(response.ids) <= 6 and isinstance(response.text, str)
    result = d.learn(PROMPT, REPLY, "shorter please")
    info = result.interactions[0]
    assert result.stepped and info["learned"] and info["weight"] == 1.0
    n = result.stats["scored_tokens"]
    assert len(info["tokens"]) == len(info["advantage"]) == n and info["tokens"][-1] == "<|im_end|>"
    a = torch.tensor(info["teacher_logp"]) - torch.tensor(info["student_logp"])
    assert torch.allclose(torch.tensor(info["advantage"]), a, atol=1e-5)
    for name in ("teacher_entropy", "student_entropy", "repeated_token_rate", "kl_to_reference", "grad_norm"):
        assert name in result.stats
    assert result.stats["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)  # fresh LoRA: B = 0


def test_learn_batch_is_one_step_over_several_interactions(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small()))
    result = d.learn_batch([(PROMPT, REPLY, "shorter please"), (PROMPT, "a story", "wrong")])
    assert result.stats["learned"] == 2 and d.step_count == 1


def test_save_and_load_per_user_are_bit_exact(tok, tmp_path):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small()))
    initial = lora_state(d)
    d.learn(PROMPT, REPLY, "shorter please")
    alice = lora_state(d)
    path = d.save_user(tmp_path, "alice@example.com")
    assert path == user_directory(tmp_path, "alice@example.com") and (path / "adapter_model.safetensors").is_file()
    assert user_directory(tmp_path, "a/b") != user_directory(tmp_path, "a_b")
    d.learn(PROMPT, REPLY, "longer please")
    assert not same(alice, lora_state(d))
    assert d.load_user(tmp_path, "bob") is False and same(initial, lora_state(d)) and d.step_count == 0
    assert d.load_user(tmp_path, "alice@example.com") is True
    assert same(alice, lora_state(d)) and d.step_count == 1
    # the optimiser state came back too: the next step equals one from an uninterrupted run
    d.learn(PROMPT, REPLY, "longer please")
    twin = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small()))
    twin.learn(PROMPT, REPLY, "shorter please")
    twin.learn(PROMPT, REPLY, "longer please")
    assert same(lora_state(twin), lora_state(d))


def test_a_failed_save_leaves_the_previous_one(tok, tmp_path, monkeypatch):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small()))
    d.save(tmp_path / "u")
    saved = lora_state(d)
    d.learn(PROMPT, REPLY, "shorter please")
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        d.save(tmp_path / "u")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]  # no temporary left behind
    monkeypatch.undo()
    d.load(tmp_path / "u")
    assert same(saved, lora_state(d))


def test_full_fine_tuning_is_allowed(tok):
    model = tiny_model(tok)
    d = OnlineDistiller(model, tok, OnlineConfig(**small(adapter="full", anchor=0.5, lr=1e-3)))
    assert d.reference is not None and len(d.trainable) == len(list(model.parameters()))
    before = lora_state(d)
    result = d.learn(PROMPT, REPLY, "shorter please")
    assert result.stepped and "anchor_loss" in result.stats and not same(before, lora_state(d))
    d.reset()
    assert same(before, lora_state(d)) and d.step_count == 0


# ---- item 2: anchor, gate, teacher health -------------------------------------------------------


def naive_loss(model, tok, cfg, interaction, anchor):
    """Per-sequence losses from plain full forwards and the float64 reference definition."""
    messages, reply, followup = interaction
    t = hsd.data.InteractionTuple(x=messages, y=reply, o=followup, conversation_id="c", turn_index=0,
                                  message_index=len(messages))
    e = tokenize_tuple(t, tok, cfg.template, cfg.layout())
    student = model(input_ids=torch.tensor([e.student_ids])).logits[0, e.student_scored_positions]
    with torch.no_grad():
        teacher = model(input_ids=torch.tensor([e.teacher_ids])).logits[0, e.teacher_scored_positions]
        with model.disable_adapter():
            reference = model(input_ids=torch.tensor([e.student_ids])).logits[0, e.student_scored_positions]
    targets = torch.tensor(e.target_ids)
    loss = hsd.hindsight_loss(student, teacher, targets, mode=cfg.loss_mode, alpha=cfg.alpha,
                              center=cfg.center and cfg.loss_mode == "sampled", backend="reference")
    kl = hsd.hindsight_loss(student, reference, targets, mode="full", alpha=0.0, backend="reference")
    return loss + anchor * kl, kl


@pytest.mark.parametrize("mode", ["sampled", "full"])
def test_anchor_is_kl_from_the_adapter_disabled_model(tok, mode):
    model = perturbed_lora(tok)
    cfg = OnlineConfig(**small(anchor=0.7, loss_mode=mode))
    d = OnlineDistiller(model, tok, cfg)
    interaction = (PROMPT, REPLY, "shorter please")
    total, stats = d.loss([interaction])
    total.backward()
    grads = {n: p.grad.clone() for n, p in d.trainable.items()}
    d.optimizer.zero_grad(set_to_none=True)
    expected, kl = naive_loss(model, tok, cfg, interaction, 0.7)
    expected.backward()
    assert kl.item() > 1e-4, "the perturbed adapter must differ from its base"
    # float64 weights; transformers' RMSNorm computes in float32, hence ~1e-7 relative
    assert stats["anchor_loss"] == pytest.approx(kl.item(), rel=1e-6)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for n, p in d.trainable.items():
        assert torch.allclose(grads[n], p.grad, rtol=1e-5, atol=1e-9), n


def test_anchor_pulls_the_student_back_to_the_reference(tok):
    kls = {}
    for anchor in (0.0, 5.0):
        d = OnlineDistiller(perturbed_lora(tok, torch.float32), tok,
                            OnlineConfig(**small(anchor=anchor, loss_mode="full", lr=3e-3)))
        for _ in range(5):
            d.learn(PROMPT, REPLY, "shorter please")
        kls[anchor] = d.learn(PROMPT, REPLY, "shorter please").stats["kl_to_reference"]
    assert kls[5.0] < 0.5 * kls[0.0]


def test_neutral_rule():
    assert is_neutral_followup("Thanks!") and is_neutral_followup("ok great, thank you 👍")
    assert not is_neutral_followup("thanks, but make it shorter") and not is_neutral_followup("wrong")


def test_gate_skips_or_downweights_neutral_followups(tok):
    interactions = [(PROMPT, REPLY, "thanks!"), (PROMPT, "a story", "make it shorter")]
    model = tiny_model(tok)
    losses = {}
    for gate in ("all", "downweight_neutral"):
        d = OnlineDistiller(copy.deepcopy(model), tok, OnlineConfig(**small(gate=gate, neutral_weight=0.25)))
        losses[gate] = d.loss(interactions[:1])[0].item(), d.loss(interactions[1:])[0].item(), d.loss(interactions)[0].item()
    neutral, informative, _ = losses["all"]
    # float32 losses of order 1e-5 (A_t is a difference of log-probs): batch shapes change the rounding
    assert losses["downweight_neutral"][0] == pytest.approx(0.25 * neutral, rel=1e-3)
    assert losses["downweight_neutral"][2] == pytest.approx((0.25 * neutral + informative) / 2, rel=1e-3)

    d = OnlineDistiller(copy.deepcopy(model), tok, OnlineConfig(**small(gate="skip_neutral")))
    before = lora_state(d)
    result = d.learn_batch(interactions[:1])
    assert not result.stepped and result.skips == {"gated_neutral": 1} and same(before, lora_state(d))
    assert d.learn_batch(interactions).stats["learned"] == 1

    seen = []
    d = OnlineDistiller(copy.deepcopy(model), tok, OnlineConfig(**small(
        gate=lambda m, y, o: seen.append(o) or ("story" not in y))))
    result = d.learn_batch(interactions)
    assert seen == ["thanks!", "make it shorter"] and result.skips == {"gated_neutral": 1}
    assert [r["learned"] for r in result.interactions] == [True, False]
    d = OnlineDistiller(copy.deepcopy(model), tok, OnlineConfig(**small(gate=lambda m, y, o: "yes")))
    with pytest.raises(TypeError, match="bool or a weight"):
        d.learn(PROMPT, REPLY, "shorter")


def test_health_check_rolls_back_to_the_last_good_state(tok):
    checks = []

    def check(distiller, stats):
        checks.append(stats["step"])
        return distiller.step_count != 2  # the second step is "bad"

    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small(health_check=check)))
    d.learn(PROMPT, REPLY, "shorter please")
    good = lora_state(d), copy.deepcopy(d.optimizer.state_dict())
    result = d.learn(PROMPT, REPLY, "longer please")
    assert checks == [1, 2] and result.stats["rolled_back"] and result.stats["health"] is False
    assert same(good[0], lora_state(d)) and d.step_count == 1 and d.counts["rollbacks"] == 1
    state = d.optimizer.state_dict()["state"]
    assert all(torch.equal(state[k]["exp_avg"], good[1]["state"][k]["exp_avg"]) for k in state)


def test_teacher_health_thresholds_trigger_a_rollback(tok):
    d = OnlineDistiller(perturbed_lora(tok, torch.float32), tok,
                        OnlineConfig(**small(health_check=TeacherHealth(max_kl_to_reference=1e-9))))
    before = lora_state(d)
    result = d.learn(PROMPT, REPLY, "shorter please")
    assert result.stats["kl_to_reference"] > 1e-9 and result.stats["rolled_back"]
    assert same(before, lora_state(d))
    d = OnlineDistiller(tiny_model(tok), tok,
                        OnlineConfig(**small(health_check=TeacherHealth(max_repeated_token_rate=0.5))))
    assert not d.learn(PROMPT, REPLY, "shorter please").stats["rolled_back"]


def test_undo_reverts_the_last_step_bit_exactly(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small(undo_depth=1)))
    d.learn(PROMPT, REPLY, "shorter please")
    state, optimizer = lora_state(d), copy.deepcopy(d.optimizer.state_dict())
    d.learn(PROMPT, REPLY, "longer please")
    assert d.undo() and same(state, lora_state(d)) and d.step_count == 1
    now = d.optimizer.state_dict()["state"]
    assert all(torch.equal(now[k]["exp_avg_sq"], optimizer["state"][k]["exp_avg_sq"]) for k in now)
    assert not d.undo()  # depth 1


# ---- item 5: bad input ---------------------------------------------------------------------------


def test_bad_interactions_are_skipped_and_counted_never_stepped(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small(max_response_tokens=4)))
    before = lora_state(d)
    result = d.learn_batch([(PROMPT, REPLY, "  \n\t "), (PROMPT, REPLY, "shorter"), (PROMPT, "   ", "shorter")])
    assert result.skips == {"empty_followup": 1, "response_over_budget": 1, "empty_response": 1}
    assert not result.stepped and same(before, lora_state(d)) and d.counts["empty_followup"] == 1
    with pytest.raises(DataError, match="end with a user message"):
        d.learn([{"role": "assistant", "content": "hi"}], REPLY, "shorter")


def test_a_raising_user_or_gate_is_a_counted_skip(tok):
    def boom(*args):
        raise RuntimeError("simulator offline")

    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small(gate=boom)))
    assert d.learn(PROMPT, REPLY, "shorter").skips == {"gate_error": 1}
    run = run_online(d, ["a", "b"], boom, progress=False, learn_truncated=True)
    assert run.counts["user_error"] == 2 and run.steps == 0
    with pytest.raises(RuntimeError, match="simulator offline"):
        run_online(d, ["a"], boom, progress=False, learn_truncated=True, on_user_error="raise")


def test_a_model_without_chat_template_is_a_clear_error(tok):
    plain = tiny_chat_tokenizer("chatml", with_template=False)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        OnlineDistiller(tiny_model(tok), plain, OnlineConfig(**small()))


def test_config_errors():
    with pytest.raises(ValueError, match="loss_mode"):
        OnlineConfig(loss_mode="reverse")
    with pytest.raises(ValueError, match="gate"):
        OnlineConfig(gate="sometimes")
    with pytest.raises(ValueError, match="needs adapter='lora'"):
        OnlineConfig(adapter="full", teacher="base")
    assert OnlineConfig.stable().loss_mode == "full" and OnlineConfig.stable().anchor == 0.2


def test_readme_online_snippet_runs(tok, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    section = readme.read_text().split("## Online learning", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    stable = OnlineConfig.stable.__func__  # short replies keep the test fast
    monkeypatch.setattr(OnlineConfig, "stable", classmethod(lambda cls, **kw: stable(cls, **{"max_new_tokens": 8, **kw})))
    scope = {"model": tiny_model(tok), "tokenizer": tok, "prompts": ["write code", "tell a story"]}
    exec(compile(code, "README online learning", "exec"), scope)
    assert scope["result"].stepped and (tmp_path / "adapters").is_dir()
    assert scope["run"].counts["interactions"] == 2


def test_batched_sampling_and_batched_steps(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(**small(temperature=0.0, max_new_tokens=5)))
    conversations = [[{"role": "user", "content": "hi"}], PROMPT + [{"role": "assistant", "content": "ok"},
                                                                    {"role": "user", "content": "more please"}]]
    batched = d.respond_batch(conversations)  # left-padded: must equal one conversation at a time
    assert [r.ids for r in batched] == [d.respond(c, return_details=True).ids for c in conversations]
    run = run_online(d, ["write code", "tell a story", "explain it", "help"], lambda m, y: "shorter",
                     batch_size=2, progress=False, learn_truncated=True)
    assert run.steps == 2 and d.step_count == 2 and run.counts["learned"] == 4
