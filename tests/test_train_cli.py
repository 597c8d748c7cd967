"""`hsd train` end to end on a tiny local model and a local WildChat-format jsonl: YAML config,
progress bar, metrics, checkpoints, SIGINT, exact resume; bad configurations fail before any
weights load."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hsd import cli, train_cli  # noqa: E402
from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_cli")
    tok = tiny_chat_tokenizer("chatml")
    model_dir = base / "model"
    tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(model_dir)
    data = base / "wildchat.jsonl"
    with open(data, "w") as f:
        for row in synthetic_wildchat_rows(16, seed=2, min_turns=2, max_turns=4, words=(2, 8)):
            f.write(json.dumps(row) + "\n")
    return base, model_dir, data


def flags(model_dir, data, out, **extra):
    settings = {"model_name_or_path": model_dir, "dataset_name": data, "output_dir": out, "max_steps": 6,
                "save_steps": 2, "logging_steps": 1, "report_to": "none", "use_cpu": "true", "seed": 0,
                "learning_rate": 1e-3, "max_tokens_per_batch": 512, "dataloader_num_workers": 0}
    settings.update(extra)
    return [x for k, v in settings.items() for x in (f"--{k}", str(v))]


def losses(checkpoint):
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


class SigintAt(transformers.TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends


def test_train_interrupt_resume_is_exact(assets, tmp_path):
    base, model_dir, data = assets
    # 1. the uninterrupted run: `hsd train CONFIG.yaml` in its own process, with a progress bar
    config = tmp_path / "config.yaml"
    settings = dict(zip(*[iter(flags(model_dir, data, tmp_path / "full"))] * 2))
    config.write_text("".join(f"{k[2:]}: {v}\n" for k, v in settings.items()) + "disable_tqdm: false\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "python")}
    proc = subprocess.run([sys.executable, "-m", "hsd", "train", str(config)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6/6" in proc.stderr  # the Trainer's progress bar
    full = tmp_path / "full"
    assert (full / "model.safetensors").exists() and (full / "checkpoint-6" / "model.safetensors").exists()
    reference = losses(full / "checkpoint-6")
    assert [s for s, _ in reference] == [1, 2, 3, 4, 5, 6]
    for line in ("mean_advantage", "frac_positive_advantage", "teacher_tokens_saved", "padding_fraction",
                 "tokens_per_second"):
        assert line in proc.stdout + proc.stderr

    # 2. the same run, interrupted after step 3: it saves checkpoint-3 and exits with 130
    out = tmp_path / "resumed"
    rc = train_cli.run_train(flags(model_dir, data, out), callbacks=[SigintAt(3)])
    assert rc == 130
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-3"]  # complete ones only
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"):
        assert (out / "checkpoint-3" / name).exists(), name

    # 3. resumed from the last checkpoint: the same losses and the same weights, bit for bit
    assert cli.main(["train", *flags(model_dir, data, out, resume_from_checkpoint="true")]) == 0
    assert losses(out / "checkpoint-6") == reference
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_run(assets, tmp_path):
    base, model_dir, data = assets
    out = tmp_path / "lora"
    rc = cli.main(["train", *flags(model_dir, data, out, max_steps=2, save_steps=2, use_peft="true", lora_r=4,
                                   lora_alpha=8, lora_target_modules="q_proj,v_proj", teacher="base")])
    assert rc == 0 and (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("extra,message", [
    ({"loss_mode": "kl"}, "loss_mode must be one of"),
    ({"loss_mode": "full", "alpha": 1.5}, "alpha must be in [0, 1]"),
    ({"hindsight_template": "Later: no field"}, "must contain the field {followup}"),
    ({"dataset_name": "missing.jsonl"}, "no such dataset file"),
    ({"teacher": "base"}, "add --use_peft"),
    ({"model_name_or_path": "softcapped"}, "transforms its logits"),
    ({"tokenizer_name_or_path": "plain_tokenizer"}, "no chat template"),
    ({"model_name_or_path": "./no/such/model"}, "no such model directory"),
    ({"resume_from_checkpoint": "true"}, "no checkpoint-* directory"),
])
def test_bad_configs_fail_before_weights_load(assets, tmp_path, monkeypatch, capsys, extra, message):
    base, model_dir, data = assets
    if extra.get("model_name_or_path") == "softcapped":  # a configuration alone: no weights to load
        transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  final_logit_softcapping=30.0).save_pretrained(tmp_path / "softcapped")
        extra = {**extra, "model_name_or_path": tmp_path / "softcapped", "tokenizer_name_or_path": model_dir}
    if extra.get("tokenizer_name_or_path") == "plain_tokenizer":
        tiny_chat_tokenizer("chatml", with_template=False).save_pretrained(tmp_path / "plain")
        extra = {**extra, "tokenizer_name_or_path": tmp_path / "plain"}
    if extra.get("dataset_name") == "missing.jsonl":
        extra = {**extra, "dataset_name": tmp_path / "missing.jsonl"}

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(train_cli, "_load_model", no_weights)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    rc = cli.main(["train", *flags(model_dir, data, tmp_path / "out", **extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("hsd: error: ") and message in err[-1], err


def test_help_lists_hsd_and_trainer_flags(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--model_name_or_path", "--dataset_name", "--loss_mode", "--max_tokens_per_batch",
                 "--resume_from_checkpoint", "--gradient_accumulation_steps"):
        assert flag in text
