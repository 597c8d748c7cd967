"""`hsd chat` driven through stdin on a tiny local model: learning steps, /undo (bit-exact),
/reset, per-user adapters saved on exit and loaded at start."""

import io
import json
import sys

import pytest
import torch

from hsd.cli import main
from hsd.online import OnlineConfig, OnlineDistiller, user_directory
from hsd.online_cli import chat_loop
from helpers import save_tiny_qwen2, tiny_qwen2 as tiny_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-chat-model"), tok)


def state(d):
    return {n: p.detach().clone() for n, p in d.trainable.items()}


def test_chat_loop_learns_undoes_bit_exactly_and_resets(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(lora_r=4, lora_alpha=8, lr=1e-2, max_new_tokens=5,
                                                           undo_depth=4, seed=0))
    initial = state(d)
    out = io.StringIO()
    counts = chat_loop(d, ["write code\n", "shorter please\n", "explain it\n"], out, learn_truncated=True)
    assert counts == {"turns": 3, "steps": 2, "undone": 0, "resets": 0, "skipped": 0} and d.step_count == 2
    after_one = d._history[-1].trainable  # the state before step 2 = after step 1
    text = out.getvalue()
    assert text.count("assistant> ") == 3 and "[learned: step 1 ·" in text and "[learned: step 2 ·" in text
    assert "mean A_t" in text and "[  up:" in text and "[down:" in text
    out = io.StringIO()
    chat_loop(d, ["/undo", "/undo", "/undo", "/help"], out)
    assert "[undone: back to step 1]" in out.getvalue() and "[nothing to undo]" in out.getvalue()
    assert d.step_count == 0
    assert all(torch.equal(initial[n], v) for n, v in state(d).items())
    assert not all(torch.equal(initial[n], after_one[n]) for n in initial)  # step 1 had moved it
    out = io.StringIO()
    chat_loop(d, ["hi", "more please", "/reset", "/new", "thanks"], out, learn_truncated=True)
    assert "[adapter dropped" in out.getvalue() and d.step_count == 0
    assert all(torch.equal(initial[n], v) for n, v in state(d).items())


def test_a_truncated_reply_is_not_learned_by_default(tok):
    d = OnlineDistiller(tiny_model(tok), tok, OnlineConfig(lora_r=4, lora_alpha=8, max_new_tokens=3, seed=0))
    out = io.StringIO()
    counts = chat_loop(d, ["write code", "shorter"], out)
    assert counts["steps"] == 0 and counts["skipped"] == 1 and "hit --max-new-tokens" in out.getvalue()


def run_chat(monkeypatch, capsys, model_dir, adapters, user, lines):
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))
    code = main(["chat", "--model", str(model_dir), "--user", user, "--adapter-dir", str(adapters), "--seed", "0",
                 "--max-new-tokens", "5", "--lora-r", "4", "--lora-alpha", "8", "--lr", "1e-2", "--learn-truncated"])
    assert code == 0
    return capsys.readouterr().out


def saved(adapters, user):
    directory = user_directory(adapters, user)
    meta = json.loads((directory / "hsd_online.json").read_text())
    return safetensors.load_file(str(directory / "trainable.safetensors")), meta["step"]


def test_hsd_chat_command_per_user_adapters_and_undo(monkeypatch, capsys, model_dir, tmp_path):
    out = run_chat(monkeypatch, capsys, model_dir, tmp_path, "carol", ["write code", "shorter please", "/quit"])
    assert "[learned: step 1" in out and "saved 'carol'" in out
    carol, step = saved(tmp_path, "carol")
    assert step == 1
    out = run_chat(monkeypatch, capsys, model_dir, tmp_path, "carol", ["/undo"])  # EOF ends the chat too
    assert "loaded 'carol''s adapter: step 1" in out and "[nothing to undo]" in out

    out = run_chat(monkeypatch, capsys, model_dir, tmp_path, "alice", ["write code", "shorter please", "/undo"])
    assert "[learned: step 1" in out and "[undone: back to step 0]" in out
    run_chat(monkeypatch, capsys, model_dir, tmp_path, "bob", ["write code"])  # no follow-up: no step
    alice, alice_step = saved(tmp_path, "alice")
    bob, bob_step = saved(tmp_path, "bob")
    assert alice_step == bob_step == 0
    assert all(torch.equal(alice[n], bob[n]) for n in bob), "/undo must restore the weights bit-exactly"
    assert not all(torch.equal(carol[n], bob[n]) for n in bob)


def test_hsd_chat_reports_a_missing_model(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--model", str(tmp_path / "nowhere")]) == 2
    assert "hsd: error" in capsys.readouterr().err
