"""HSDTrainer: the shared-prefix step inside transformers.Trainer, on tiny models."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hsd  # noqa: E402
from hsd.data.testing import synthetic_wildchat_rows  # noqa: E402
from hsd.trainer import (EMA_WEIGHTS_NAME, HSDConfig, HSDTrainer, TokenBudgetBatchSampler,  # noqa: E402
                         build_examples)
from helpers import tiny_qwen2  # noqa: E402


def tiny_model(tok, dtype=torch.float32, seed=0):
    # Trained by HSDTrainer: built in train mode, with room for 1024 positions.
    return tiny_qwen2(tok, dtype, seed, max_position_embeddings=1024).train()


def config(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    logging_steps=1, save_strategy="no", learning_rate=1e-3, max_grad_norm=0.0,
                    lr_scheduler_type="constant", dataloader_num_workers=0)
    settings.update(overrides)
    return HSDConfig(**settings)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def rel(a, b):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


ROWS = synthetic_wildchat_rows(6, seed=3, min_turns=2, max_turns=4, words=(2, 8))


@pytest.mark.parametrize("layout,normalization", [("packed", "seq_mean"), ("tuple", "seq_mean"),
                                                  ("packed", "token_mean")])
def test_gradient_accumulation_gives_the_update_of_one_batch(tmp_path, tok, layout, normalization):
    """The same global batch as 1 micro-batch (GA=1) or as 3 (GA=3) gives the same SGD update.
    SGD, not Adam: Adam's first step is nearly the sign of the gradient and would hide a wrong
    scale."""
    n = len(build_examples(ROWS, tok, config(tmp_path, layout=layout)))
    deltas = []
    for ga, bs in ((1, n), (3, -(-n // 3))):
        model = tiny_model(tok, torch.float64)
        before = params(model)
        args = config(tmp_path, layout=layout, normalization=normalization, per_device_train_batch_size=bs,
                      gradient_accumulation_steps=ga, max_steps=1, optim="sgd", learning_rate=1.0)
        trainer = HSDTrainer(model, args, train_dataset=ROWS, processing_class=tok)
        assert len(trainer.get_train_dataloader()) == (1 if ga == 1 else 3)
        trainer.train()
        deltas.append({k: p.detach() - before[k] for k, p in model.named_parameters()})
    for name in deltas[0]:
        assert rel(deltas[1][name], deltas[0][name]) <= 1e-9, name


def test_the_accumulation_test_can_fail(tok, tmp_path):
    """Averaging per-micro-batch means (the Trainer's default scaling) differs from the window
    mean when micro-batches hold different numbers of sequences: the test above would see it."""
    examples = build_examples(ROWS, tok, config(tmp_path)).examples
    collate = hsd.data.HindsightCollator.from_tokenizer(tok)
    model = tiny_model(tok, torch.float64)
    whole = hsd.hindsight_step(model, collate(examples)).loss
    parts = [examples[:1], examples[1:]]
    naive = sum(hsd.hindsight_step(model, collate(p)).loss for p in parts) / len(parts)
    assert rel(naive, whole) > 1e-3


def test_float32_parameters_match_to_1e6(tmp_path, tok):
    finals = []
    for ga, bs in ((1, 6), (2, 3)):
        model = tiny_model(tok)
        args = config(tmp_path, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                      layout="tuple", optim="sgd", learning_rate=1.0)
        HSDTrainer(model, args, train_dataset=ROWS, processing_class=tok).train()
        finals.append(params(model))
    # relative over the whole parameter vector: zero-initialised biases are all update after one
    # step, and a float32 gradient summed in another order differs there by a few ulps (the
    # float64 test above compares every update tensor to 1e-9)
    a = torch.cat([p.flatten() for p in finals[1].values()])
    b = torch.cat([p.flatten() for p in finals[0].values()])
    assert float((a - b).norm() / b.norm()) <= 1e-6


def test_metrics_are_logged(tmp_path, tok):
    rows = synthetic_wildchat_rows(60, seed=5, min_turns=1, max_turns=4, words=(2, 6))
    args = config(tmp_path, max_tokens_per_batch=768, num_train_epochs=1, logging_steps=3)
    trainer = HSDTrainer(tiny_model(tok), args, train_dataset=rows, processing_class=tok)
    steps = len(trainer.get_train_dataloader())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps // 3
    for entry in logs:
        for key in ("loss", "mean_advantage", "frac_positive_advantage", "mean_divergence", "tokens_per_second",
                    "teacher_tokens_saved", "padding_fraction", "scored_tokens"):
            assert key in entry and math.isfinite(entry[key]), key
        assert 0.0 <= entry["frac_positive_advantage"] <= 1.0
        assert entry["teacher_tokens_saved"] > 0 and entry["tokens_per_second"] > 0
        assert entry["padding_fraction"] < 0.10  # length grouping under a token budget
    assert trainer._train_batch_sampler().padding_fraction < 0.10


def test_token_budget_sampler():
    lengths = [100, 7, 50, 98, 51, 8, 99, 49, 30]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=200, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        computed = len(b) * max(lengths[i] for i in b)
        assert computed <= 200 or len(b) == 1
        assert sum(lengths[i] for i in b) >= 0.9 * computed  # no batch pads more than 10%
    assert sampler.padding_fraction < 0.1
    sampler.set_epoch(1)
    assert sorted(map(tuple, sampler)) == sorted(map(tuple, batches))  # same batches, new order
    assert list(TokenBudgetBatchSampler(lengths, max_tokens=200, seed=1)) == batches  # seeded
    # an example over the budget is a batch of its own
    assert [0] in list(TokenBudgetBatchSampler([300, 10], max_tokens=100))


@pytest.mark.parametrize("kind", ["full", "lora_base", "lora_live", "ema"])
def test_teachers_and_fine_tuning_modes_train(tmp_path, tok, kind):
    model = tiny_model(tok)
    settings = {}
    if kind.startswith("lora"):
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        settings["teacher"] = "base" if kind == "lora_base" else "live"
    if kind == "ema":
        settings.update(teacher="ema", ema_rate=0.5)
    before = params(model)
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=3, save_strategy="steps", save_steps=2,
                  **settings)
    trainer = HSDTrainer(model, args, train_dataset=ROWS, processing_class=tok)
    if kind == "ema":
        ema_before = params(trainer.ema_teacher.module)
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if kind.startswith("lora"):
        assert changed and all("lora" in n for n in changed)
    else:
        assert len(changed) == len(before)
    if kind == "ema":
        ema_after = params(trainer.ema_teacher.module)
        assert any(not torch.equal(ema_after[n], ema_before[n]) for n in ema_after)
        assert (tmp_path / "out" / "checkpoint-2" / EMA_WEIGHTS_NAME).exists()


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="loss_mode"):
        config(tmp_path, loss_mode="kl")
    with pytest.raises(ValueError, match="alpha"):
        config(tmp_path, loss_mode="full", alpha=1.5)
    with pytest.raises(ValueError, match="followup"):
        config(tmp_path, hindsight_template="no field here")
    with pytest.raises(ValueError, match="topk"):
        config(tmp_path, loss_mode="topk")
    with pytest.raises(ValueError, match="teacher"):
        config(tmp_path, teacher="frozen")
    assert config(tmp_path).remove_unused_columns is False


def test_paper_offline_preset(tmp_path):
    args = HSDConfig.paper_offline(str(tmp_path), bf16=False, use_cpu=True)
    assert (args.learning_rate, args.lr_scheduler_type.value, args.num_train_epochs) == (2e-6, "cosine", 2)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32
    assert (args.loss_mode, args.ignore_first_k, args.teacher, args.layout, args.filter_preset) == \
        ("sampled", 2, "live", "tuple", "paper")
    assert args.layout_config().max_prompt_tokens == 2048
    assert getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing


def test_bf16_mixed_precision_runs_the_step_under_autocast(tmp_path, tok, monkeypatch):
    import hsd.trainer

    seen = []
    step = hsd.trainer.hindsight_step

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return step(*args, **kwargs)

    monkeypatch.setattr(hsd.trainer, "hindsight_step", spy)
    args = config(tmp_path, bf16=True, max_steps=1, per_device_train_batch_size=3)
    trainer = HSDTrainer(tiny_model(tok), args, train_dataset=ROWS, processing_class=tok)
    trainer.train()
    assert seen == [True] and math.isfinite(trainer.state.log_history[0]["loss"])


def test_ema_teacher_resumes_exactly(tmp_path, tok):
    def run(out, max_steps, resume=None):
        args = config(tmp_path, output_dir=str(out), teacher="ema", ema_rate=0.5, max_steps=max_steps,
                      per_device_train_batch_size=2, save_strategy="steps", save_steps=2)
        trainer = HSDTrainer(tiny_model(tok), args, train_dataset=ROWS, processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 3)
    run(tmp_path / "part", 2)
    resumed = run(tmp_path / "part", 3, resume=True)
    for mine, theirs in ((resumed.model, full.model), (resumed.ema_teacher.module, full.ema_teacher.module)):
        a, b = params(mine), params(theirs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in resumed.state.log_history if "loss" in h] == \
        [h["loss"] for h in full.state.log_history if "loss" in h]


def test_evaluate_reports_the_hindsight_loss(tmp_path, tok):
    model = tiny_model(tok)
    args = config(tmp_path, per_device_eval_batch_size=64, layout="tuple")  # one eval batch
    trainer = HSDTrainer(model, args, train_dataset=ROWS, eval_dataset=ROWS[:3], processing_class=tok)
    metrics = trainer.evaluate()
    collate = hsd.data.HindsightCollator.from_tokenizer(tok)
    with torch.no_grad():
        expected = hsd.hindsight_step(model, collate(trainer.eval_dataset.examples)).loss
    assert metrics["eval_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_sources_an_hf_dataset_of_message_lists(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    conversations = [[{"role": m["role"], "content": m["content"]} for m in row["conversation"]] for row in ROWS]
    dataset = datasets.Dataset.from_dict({"messages": conversations})
    args = config(tmp_path)
    from_dataset = build_examples(dataset, tok, args)
    from_rows = build_examples(ROWS, tok, args)
    assert [e.input_ids for e in from_dataset.examples] == [e.input_ids for e in from_rows.examples]
    path = tmp_path / "rows.jsonl"  # a local file, as `hsd train` reads it
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert [e.input_ids for e in build_examples(str(path), tok, args).examples] == \
        [e.input_ids for e in from_rows.examples]
    with pytest.raises(ValueError, match="no training examples"):
        build_examples([], tok, args)
