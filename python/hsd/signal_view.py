"""What the hindsight signal does to one interaction (x, y, o), token by token.

:func:`compute_signal` runs the student (x, y) and the teacher (x with the follow-up o in its
hindsight block, y) through the shared-prefix pass and the fused loss without a gradient, and
returns per token of y: the student's and the teacher's log-probability of the token, the
advantage A_t = log p_teacher(y_t) - log p_student(y_t), and the divergence of the two full
next-token distributions (forward KL(teacher ‖ student) by default). :func:`render_html` and
:func:`render_png` colour y's tokens by both, and list the tokens where the follow-up changed the
model's mind most: what a training step on this interaction would push up and down.
"""

from __future__ import annotations

import html
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .data import DataError, DataReport, HindsightCollator, InteractionTuple, LayoutConfig, tokenize_tuple
from .forward import hindsight_hidden_states
from .loss import fused_hindsight_loss
from .step import lm_head_of

__all__ = ["TokenSignal", "compute_signal", "render_html", "render_png"]


@dataclass
class TokenSignal:
    """Per-token signal of one interaction (lists are aligned with ``tokens``, y's scored tokens
    including the end-of-turn token)."""

    x: list[dict]
    y: str
    o: str
    tokens: list[str]
    token_ids: list[int]
    student_logp: list[float]
    teacher_logp: list[float]
    advantage: list[float]
    divergence: list[float]
    divergence_name: str = "KL(teacher ‖ student)"

    def top(self, k: int = 10, by: str = "divergence") -> list[dict]:
        """The ``k`` tokens where student and teacher disagree most (by divergence, or by |A_t|)."""
        if by not in ("divergence", "advantage"):
            raise ValueError(f"by must be 'divergence' or 'advantage', got {by!r}")
        key = (lambda i: self.divergence[i]) if by == "divergence" else (lambda i: abs(self.advantage[i]))
        order = sorted(range(len(self.tokens)), key=key, reverse=True)[:k]
        return [{"index": i, "token": self.tokens[i], "advantage": self.advantage[i],
                 "divergence": self.divergence[i], "student_p": math.exp(self.student_logp[i]),
                 "teacher_p": math.exp(self.teacher_logp[i])} for i in order]

    def summary(self) -> dict:
        n = len(self.tokens)
        return {"tokens": n, "mean_advantage": sum(self.advantage) / n if n else 0.0,
                "frac_positive_advantage": sum(a > 0 for a in self.advantage) / n if n else 0.0,
                "mean_divergence": sum(self.divergence) / n if n else 0.0,
                "sum_advantage": sum(self.advantage)}

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}


@torch.no_grad()
def compute_signal(model, tokenizer, x: list[dict] | str, y: str, o: str, *, template: str = "online",
                   layout: LayoutConfig | None = None, alpha: float = 0.0) -> TokenSignal:
    """The per-token signal of (x, y, o) under ``model`` (see the module docstring).

    ``x``: the history (messages ending with a user turn) or one user message as a string.
    ``alpha``: the divergence shown (TRL convention: 0 KL(teacher ‖ student), 1 KL(student ‖
    teacher)). Every token of y is scored (``layout.ignore_first_k`` defaults to 0 here).
    """
    if isinstance(x, str):
        x = [{"role": "user", "content": x}]
    if not isinstance(y, str) or not y.strip():
        raise DataError("the reply y is empty")
    if not isinstance(o, str) or not o.strip():
        raise DataError("the follow-up o is empty (only whitespace): there is no signal to show")
    layout = layout or LayoutConfig(history_messages=None, ignore_first_k=0)
    report = DataReport()
    t = InteractionTuple(x=list(x), y=y, o=o, conversation_id="inspect", turn_index=0, message_index=len(x))
    example = tokenize_tuple(t, tokenizer, template, layout, report)
    if example is None:
        raise DataError(f"the interaction does not fit the layout's budgets ({dict(report.dropped_tuples)})")
    batch = HindsightCollator.from_tokenizer(tokenizer)([example])
    was_training = model.training
    model.eval()
    try:
        hs = hindsight_hidden_states(model, batch)
    finally:
        model.train(was_training)
    weight, bias = lm_head_of(model)
    _, info = fused_hindsight_loss(hs.student, hs.teacher, weight, hs.target_ids.to(weight.device), bias=bias,
                                   mode="full", alpha=alpha, reduction="sum", return_stats=True)
    ids = hs.target_ids.tolist()
    name = {0.0: "KL(teacher ‖ student)", 1.0: "KL(student ‖ teacher)"}.get(float(alpha), f"JSD(alpha={alpha})")
    return TokenSignal(
        x=list(x), y=y, o=o, tokens=[tokenizer.decode([i]) for i in ids], token_ids=ids,
        student_logp=info["student_logp"].float().tolist(), teacher_logp=info["teacher_logp"].float().tolist(),
        advantage=info["advantage"].float().tolist(), divergence=info["divergence"].float().tolist(),
        divergence_name=name,
    )


# ---- rendering ---------------------------------------------------------------------------------


def _visible(token: str) -> str:
    """A token as it reads in a label: whitespace made visible, control characters escaped."""
    out = token.replace("\n", "↵").replace("\t", "⇥")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out) or "∅"


def _advantage_colour(a: float, scale: float) -> str:
    t = min(1.0, abs(a) / scale) if scale > 0 else 0.0
    # green: the teacher (who saw the follow-up) likes the token more; red: less
    r, g, b = (1 - t * 0.75, 1 - t * 0.25, 1 - t * 0.75) if a > 0 else (1 - t * 0.15, 1 - t * 0.7, 1 - t * 0.7)
    return f"rgb({int(255 * r)},{int(255 * g)},{int(255 * b)})"


def _divergence_colour(d: float, scale: float) -> str:
    t = min(1.0, d / scale) if scale > 0 else 0.0
    return f"rgb(255,{int(255 * (1 - 0.45 * t))},{int(255 * (1 - 0.9 * t))})"


def _spans(signal: TokenSignal, colour, values, scale) -> str:
    parts = []
    for i, (token, value) in enumerate(zip(signal.tokens, values)):
        tip = (f"#{i} {token!r}  A_t={signal.advantage[i]:+.3f}  {signal.divergence_name}="
               f"{signal.divergence[i]:.3f}  p_student={math.exp(signal.student_logp[i]):.3f}  "
               f"p_teacher={math.exp(signal.teacher_logp[i]):.3f}")
        text = html.escape(token).replace("\n", "↵<br>")
        parts.append(f'<span class="t" style="background:{colour(value, scale)}" title="{html.escape(tip)}">'
                     f"{text or '∅'}</span>")
    return "".join(parts)


def render_html(signal: TokenSignal, top: int = 10) -> str:
    """A self-contained HTML page: y coloured by A_t and by divergence (hover a token for its
    numbers), the follow-up, the summary and the most-disagreeing tokens."""
    adv_scale = max((abs(a) for a in signal.advantage), default=0.0)
    div_scale = max(signal.divergence, default=0.0)
    s = signal.summary()
    rows = "".join(
        f"<tr><td>{r['index']}</td><td><code>{html.escape(_visible(r['token']))}</code></td>"
        f"<td>{r['advantage']:+.3g}</td><td>{r['divergence']:.3g}</td><td>{r['student_p']:.3f}</td>"
        f"<td>{r['teacher_p']:.3f}</td></tr>" for r in signal.top(top))
    last_user = next((m["content"] for m in reversed(signal.x) if m["role"] == "user"), "")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hsd inspect</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60em; margin: 2em auto; color: #222; }}
.y {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd;
      padding: .6em; }}
.t {{ padding: 1px 0; border-right: 1px solid rgba(0,0,0,.06); }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; border-bottom: 1px solid #eee; text-align: right; }}
.m {{ color: #666; }}
</style></head><body>
<h2>What the follow-up changes</h2>
<p class="m">prompt (last user message)</p><blockquote>{html.escape(last_user)}</blockquote>
<p class="m">follow-up o</p><blockquote>{html.escape(signal.o)}</blockquote>
<p>{s['tokens']} tokens · mean A<sub>t</sub> {s['mean_advantage']:+.4f} · {100 * s['frac_positive_advantage']:.0f}%
with A<sub>t</sub> &gt; 0 · mean {html.escape(signal.divergence_name)} {s['mean_divergence']:.4f}</p>
<h3>y coloured by A<sub>t</sub> = log p<sub>teacher</sub> − log p<sub>student</sub>
 <span class="m">(green: pushed up by a step, red: pushed down; max |A<sub>t</sub>| {adv_scale:.3f})</span></h3>
<div class="y">{_spans(signal, _advantage_colour, signal.advantage, adv_scale)}</div>
<h3>y coloured by {html.escape(signal.divergence_name)} <span class="m">(max {div_scale:.3f})</span></h3>
<div class="y">{_spans(signal, _divergence_colour, signal.divergence, div_scale)}</div>
<h3>Where the two disagree most</h3>
<table><tr><th>#</th><th>token</th><th>A<sub>t</sub></th><th>divergence</th><th>p student</th><th>p teacher</th></tr>
{rows}</table>
</body></html>
"""


def render_png(signal: TokenSignal, path: str | Path, top: int = 10, dpi: int = 110) -> Path:
    """A PNG: A_t and divergence per token of y (bars labelled with the tokens), and the
    most-disagreeing tokens. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("hsd inspect --png needs matplotlib (pip install matplotlib)") from e
    n = len(signal.tokens)
    positions = list(range(n))
    width = min(40.0, max(8.0, 0.22 * n))
    fig, (ax_a, ax_d, ax_t) = plt.subplots(3, 1, figsize=(width, 8.5), gridspec_kw={"height_ratios": [3, 3, 2]})
    adv_scale = max((abs(a) for a in signal.advantage), default=1.0) or 1.0
    ax_a.bar(positions, signal.advantage, color=["#2e9d4f" if a > 0 else "#c8443c" for a in signal.advantage])
    ax_a.axhline(0, color="#444", linewidth=0.6)
    ax_a.set_ylabel("A_t")
    ax_a.set_ylim(-1.1 * adv_scale, 1.1 * adv_scale)
    ax_a.set_title(f"A_t = log p_teacher - log p_student  (follow-up: {_visible(signal.o)[:80]!s})", fontsize=10)
    ax_d.bar(positions, signal.divergence, color="#e8892b")
    ax_d.set_ylabel(signal.divergence_name)
    step = max(1, n // 120)  # at most ~120 labels: long replies stay readable
    labels = [_visible(t)[:12] if i % step == 0 else "" for i, t in enumerate(signal.tokens)]
    for ax in (ax_a, ax_d):
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xticks(positions)
        ax.set_xticklabels(labels, rotation=90, fontsize=7, fontfamily="monospace")
    ax_t.axis("off")
    lines = ["most disagreeing tokens (by divergence):"] + [
        f"  #{r['index']:<4} {_visible(r['token'])[:24]:<24}  A_t {r['advantage']:+.3g}   div {r['divergence']:.3g}   "
        f"p_s {r['student_p']:.3f} -> p_t {r['teacher_p']:.3f}" for r in signal.top(top)]
    ax_t.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=8, fontfamily="monospace",
              transform=ax_t.transAxes)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
