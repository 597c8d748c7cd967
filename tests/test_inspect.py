"""`hsd inspect`: the per-token signal of one (x, y, o) against plain forwards, and its HTML and
PNG renders written from stdin JSON and from a file row."""

import io
import json
import sys

import pytest
import torch

from hsd.cli import main
from hsd.data import InteractionTuple, LayoutConfig, tokenize_tuple
from hsd.signal_view import compute_signal, render_html, render_png
from helpers import save_tiny_qwen2, tiny_qwen2 as tiny_model

transformers = pytest.importorskip("transformers")

X = [{"role": "user", "content": "write a python function"}]
Y = "the answer is code\nwith an example"
O = "wrong, make it shorter"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    return save_tiny_qwen2(tmp_path_factory.mktemp("tiny-inspect-model"), tok)


def test_signal_matches_plain_forwards(tok):
    model = tiny_model(tok, torch.float64)
    signal = compute_signal(model, tok, X, Y, O)
    t = InteractionTuple(x=X, y=Y, o=O, conversation_id="c", turn_index=0, message_index=1)
    e = tokenize_tuple(t, tok, "online", LayoutConfig(history_messages=None, ignore_first_k=0))
    with torch.no_grad():
        s = model(input_ids=torch.tensor([e.student_ids])).logits[0, e.student_scored_positions].log_softmax(-1)
        q = model(input_ids=torch.tensor([e.teacher_ids])).logits[0, e.teacher_scored_positions].log_softmax(-1)
    ids = torch.tensor(e.target_ids)
    assert signal.token_ids == e.target_ids and signal.tokens[-1] == "<|im_end|>" and "\n" in signal.tokens
    s_lp, q_lp = s.gather(1, ids[:, None])[:, 0], q.gather(1, ids[:, None])[:, 0]
    assert torch.allclose(torch.tensor(signal.student_logp, dtype=torch.float64), s_lp, atol=1e-5)
    assert torch.allclose(torch.tensor(signal.teacher_logp, dtype=torch.float64), q_lp, atol=1e-5)
    assert torch.allclose(torch.tensor(signal.advantage, dtype=torch.float64), q_lp - s_lp, atol=1e-5)
    kl = (q.exp() * (q - s)).sum(-1)  # KL(teacher || student)
    assert torch.allclose(torch.tensor(signal.divergence, dtype=torch.float64), kl, atol=1e-6)
    top = signal.top(3)
    assert [r["divergence"] for r in top] == sorted(signal.divergence, reverse=True)[:3]


def test_renders_escape_tokens_and_list_the_disagreements(tok, tmp_path):
    signal = compute_signal(tiny_model(tok), tok, "say <b>hi</b> & bye", Y, "<script>no</script>")
    page = render_html(signal, top=4)
    assert "<script>no" not in page and "&lt;script&gt;no&lt;/script&gt;" in page
    assert page.count('class="t"') == 2 * len(signal.tokens) and page.count("<tr><td>") == 4
    png = render_png(signal, tmp_path / "sub" / "signal.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_command_from_stdin_json(monkeypatch, capsys, model_dir, tmp_path):
    row = {"x": X, "y": Y, "o": O}
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(row)))
    html, png = tmp_path / "out.html", tmp_path / "out.png"
    assert main(["inspect", "--model", str(model_dir), "--html", str(html), "--png", str(png), "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "mean A_t" in out and len(out.strip().splitlines()) == 2 + 5
    assert "wrong, make it shorter" in html.read_text() and png.stat().st_size > 5000
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_inspect_command_from_a_file_row(monkeypatch, capsys, model_dir, tmp_path):
    rows = [InteractionTuple(x=[{"role": "user", "content": f"question {i}"}], y=f"answer {i}", o=f"follow-up {i}",
                             conversation_id=str(i), turn_index=0, message_index=1).to_row() for i in range(3)]
    source = tmp_path / "tuples.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["inspect", "--model", str(model_dir), str(source), "--row", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["o"] == "follow-up 2" and result["y"] == "answer 2" and len(result["top"]) <= 10
    assert main(["inspect", "--model", str(model_dir), str(source), "--row", "3"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_inspect_refuses_an_empty_followup(monkeypatch, capsys, model_dir):
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"x": "hi", "y": "hello", "o": "  \n"})))
    assert main(["inspect", "--model", str(model_dir)]) == 2
    assert "only whitespace" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("not json"))
    assert main(["inspect", "--model", str(model_dir)]) == 2
    assert "not a JSON object" in capsys.readouterr().err


def test_inspect_with_a_saved_user_adapter(monkeypatch, capsys, model_dir, tmp_path, tok):
    pytest.importorskip("peft")
    from hsd.online import OnlineConfig, OnlineDistiller

    d = OnlineDistiller(transformers.AutoModelForCausalLM.from_pretrained(model_dir), tok,
                        OnlineConfig(lora_r=4, lora_alpha=8, lr=5e-2, seed=0))
    d.learn(X, Y, O)
    adapter = d.save_user(tmp_path, "alice")
    results = []
    for extra in ([], ["--adapter", str(adapter)]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"x": X, "y": Y, "o": O})))
        assert main(["inspect", "--model", str(model_dir), "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["token_ids"] == results[1]["token_ids"]
    assert results[0]["student_logp"] != results[1]["student_logp"]  # the adapter is applied
