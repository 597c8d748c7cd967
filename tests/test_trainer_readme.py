"""The README's Training section runs as written: the HSDTrainer snippet, and the `hsd train`
YAML file and command lines (with a tiny local model and data in place of the hub names)."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hsd import cli, train_cli  # noqa: E402
from hsd.data.testing import synthetic_wildchat_rows, tiny_chat_tokenizer  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def section():
    return README.read_text().split("## Training (HSDTrainer and `hsd train`)", 1)[1].split("\n## ", 1)[0]


def block(lang):
    return re.search(rf"```{lang}\n(.*?)```", section(), re.S).group(1)


def test_trainer_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block("python"), "README training", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 4
    assert (tmp_path / "hsd-out" / "checkpoint-4" / "model.safetensors").exists()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all(torch.isfinite(torch.tensor(h["mean_advantage"])) for h in logged)


def test_train_yaml_and_commands(tmp_path, monkeypatch):
    config = tmp_path / "train.yaml"
    config.write_text(block("yaml"))
    # (bf16 off: this machine may have no bf16 device; the file's other values are checked as written)
    model_args, data_args, args = train_cli.parse_train_args([str(config), "--bf16", "false"])
    assert (model_args.model_name_or_path, data_args.dataset_name) == ("Qwen/Qwen3-4B", "microsoft/WildFeedback")
    assert (args.layout, args.max_tokens_per_batch, args.learning_rate, args.filter_preset) == \
        ("packed", 16384, 2e-6, "paper")
    # every command line of the README parses as an `hsd` command
    commands = [line.split("#")[0].strip() for line in block("bash").splitlines() if line.strip()]
    assert len(commands) == 5
    parser = cli.build_parser()
    for command in commands:
        words = shlex.split(command)
        words = words[words.index("hsd") + 1:]
        assert parser.parse_args(words).command == "train"

    # and the file trains, with the hub names replaced by a tiny local model and data
    tok = tiny_chat_tokenizer("chatml")
    model_dir = tmp_path / "model"
    tok.save_pretrained(model_dir)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).save_pretrained(model_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_wildchat_rows(12, seed=1, min_turns=2)))
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["train", str(config), "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
                   "--filter_preset", "none", "--max_steps", "2", "--save_steps", "2", "--use_cpu", "true",
                   "--bf16", "false", "--disable_tqdm", "true"])
    assert rc == 0
    assert (tmp_path / "out" / "qwen3-4b-hsd" / "checkpoint-2" / "trainer_state.json").exists()
