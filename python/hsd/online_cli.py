"""``hsd chat`` (learn from your follow-ups as you talk) and ``hsd inspect`` (see the signal).

    hsd chat --model NAME_OR_PATH [--user KEY] [--preset paper|stable] ...
    hsd inspect --model NAME_OR_PATH [SOURCE|-] [--row N] [--html out.html] [--png out.png]

``hsd chat``: every message you send after a reply is that reply's follow-up: one hindsight step
is taken on (conversation so far, reply, your message) before the model answers again (the
paper's live mode), and the step's per-token advantage summary is shown. Commands: ``/undo``
(revert the last step bit-exactly), ``/reset`` (drop the adapter: back to the base model),
``/new`` (a new conversation, the adapter kept), ``/save``, ``/help``, ``/quit``. With
``--user KEY`` the user's adapter is loaded at start and saved (atomically) on exit.

``hsd inspect``: one interaction (x, y, o) from a file (``--row`` picks the tuple; any format
``hsd data`` reads) or as JSON on stdin (``{"x": [...messages] or "prompt text", "y": "...",
"o": "..."}``, or a row of a supported format); prints the most-disagreeing tokens and writes
y coloured by A_t and by divergence to HTML and/or PNG.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterable, TextIO

from ._cli_common import json_object

logger = logging.getLogger("hsd")

HELP = ("commands: /undo (revert the last learning step), /reset (drop the adapter), /new (new conversation), "
        "/save (save the adapter now), /help, /quit")


# ---- shared loading -------------------------------------------------------------------------------


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model name or local path (AutoModelForCausalLM)")
    p.add_argument("--tokenizer", default=None, help="tokenizer name or path (default: --model)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--chat-template-kwargs", type=json_object, default={},
                   help="extra chat template variables, e.g. '{\"enable_thinking\": false}'")
    p.add_argument("--template", default="online", help="hindsight block: 'online', 'offline' or a format string")


def _load(args):
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    return model.eval(), tokenizer


# ---- hsd chat -----------------------------------------------------------------------------------


def advantage_summary(result, k: int = 3) -> str:
    """One line about a learning step: tokens, mean A_t, share pushed up, the most raised and
    lowered tokens (or why nothing was learned)."""
    info = result.interactions[0] if result.interactions else {}
    if not info.get("learned"):
        reason = info.get("skip_reason") or "skipped"
        return f"[not learned: {reason}]"
    adv, tokens = info["advantage"], info["tokens"]
    n = len(adv)
    order = sorted(range(n), key=lambda i: adv[i])
    show = lambda i: f"{tokens[i]!r}{adv[i]:+.2f}"  # noqa: E731
    up = " ".join(show(i) for i in reversed(order[-k:]) if adv[i] > 0)
    down = " ".join(show(i) for i in order[:k] if adv[i] < 0)
    s = result.stats
    extra = f" · anchor {s['anchor_loss']:.3g}" if "anchor_loss" in s else ""
    rolled = " · ROLLED BACK (health check failed)" if s.get("rolled_back") else ""
    return (f"[learned: step {s['step']} · {n} tokens · mean A_t {sum(adv) / n:+.3f} · "
            f"{100 * sum(a > 0 for a in adv) / n:.0f}% up · loss {s['loss']:.3g}{extra}{rolled}]\n"
            f"[  up: {up or '-'}]\n[down: {down or '-'}]")


def chat_loop(distiller, lines: Iterable[str], out: TextIO, *, system: str | None = None, save=None,
              prompt: str = "", learn_truncated: bool = False) -> dict:
    """The chat: read user lines, answer, learn from each follow-up (see the module docstring).

    A reply cut by ``max_new_tokens`` is not learned from unless ``learn_truncated`` (the step
    would teach the model to stop mid-sentence). ``save()`` is called by ``/save``; returns counts (``turns``, ``steps``, ``undone``,
    ``resets``, ``skipped``).
    """
    head = [{"role": "system", "content": system}] if system else []
    messages = list(head)
    last = None  # (history the reply answered, Response)
    counts = {"turns": 0, "steps": 0, "undone": 0, "resets": 0, "skipped": 0}

    def say(text=""):
        print(text, file=out, flush=True)

    say(f"hsd chat: each message after a reply is its follow-up and one learning step. {HELP}")
    if prompt:
        print(prompt, end="", file=out, flush=True)
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip().lower()
        if command.startswith("/"):
            if command in ("/quit", "/exit"):
                break
            if command == "/undo":
                if distiller.undo():
                    counts["undone"] += 1
                    say(f"[undone: back to step {distiller.step_count}]")
                else:
                    say("[nothing to undo]")
            elif command == "/reset":
                distiller.reset()
                counts["resets"] += 1
                say("[adapter dropped: back to the base model]")
            elif command == "/new":
                messages, last = list(head), None
                say("[new conversation]")
            elif command == "/save":
                say(f"[saved to {save()}]" if save else "[nothing to save: start with --user KEY]")
            else:
                say(HELP)
        elif text.strip():
            if last is not None:
                history, reply = last
                if not reply.finished and not learn_truncated:
                    counts["skipped"] += 1
                    say("[not learned: the reply hit --max-new-tokens before its end]")
                else:
                    result = distiller.learn(history, reply.text, text)
                    counts["steps"] += int(result.stepped)
                    counts["skipped"] += int(not result.stepped)
                    say(advantage_summary(result))
            messages.append({"role": "user", "content": text})
            reply = distiller.respond(messages, return_details=True)
            say(f"assistant> {reply.text}")
            last = (list(messages), reply)
            messages.append({"role": "assistant", "content": reply.text})
            counts["turns"] += 1
        if prompt:
            print(prompt, end="", file=out, flush=True)
    return counts


def _default_adapter_dir(model: str) -> Path:
    cache = Path(os.environ.get("HSD_HOME", Path.home() / ".cache" / "hsd"))
    return cache / "adapters" / (Path(model.rstrip("/")).name or "model")


def _chat(args) -> int:
    from .online import OnlineConfig, OnlineDistiller

    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    model, tokenizer = _load(args)
    preset = OnlineConfig.stable if args.preset == "stable" else OnlineConfig.paper
    overrides = {k: v for k, v in dict(
        loss_mode=args.loss_mode, anchor=args.anchor, gate=args.gate, lr=args.lr, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
    ).items() if v is not None}
    config = preset(adapter="full" if args.full_finetune else "lora", undo_depth=args.undo_depth,
                    template=args.template, chat_template_kwargs=args.chat_template_kwargs, seed=args.seed,
                    **overrides)
    distiller = OnlineDistiller(model, tokenizer, config)
    root = Path(args.adapter_dir) if args.adapter_dir else _default_adapter_dir(args.model)
    save = None
    if args.user:
        if distiller.load_user(root, args.user):
            print(f"[loaded {args.user!r}'s adapter: step {distiller.step_count}]", file=sys.stdout)
        save = lambda: distiller.save_user(root, args.user)  # noqa: E731
    interactive = sys.stdin.isatty()
    try:
        counts = chat_loop(distiller, sys.stdin, sys.stdout, system=args.system, save=save,
                           prompt="you> " if interactive else "", learn_truncated=args.learn_truncated)
    finally:
        if save is not None:
            print(f"[saved {args.user!r}'s adapter (step {distiller.step_count}) to {save()}]", file=sys.stdout)
    print(f"[{counts['turns']} replies, {counts['steps']} learning steps, {counts['undone']} undone, "
          f"{counts['skipped']} follow-ups not learned]", file=sys.stdout)
    return 0


# ---- hsd inspect --------------------------------------------------------------------------------


def _interaction_from_row(row) -> tuple:
    """(x, y, o) from a JSON object: {"x", "y", "o"} or a row of any format ``hsd data`` reads."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if {"y", "o"} <= row.keys():
        x = row.get("x", row.get("prompt"))
        if isinstance(x, str):
            x = [{"role": "user", "content": x}]
        if not isinstance(x, list):
            raise ValueError("'x' must be a list of {role, content} messages or a string")
        if not isinstance(row["y"], str) or not isinstance(row["o"], str):
            raise ValueError("'y' and 'o' must be strings")
        return x, row["y"], row["o"]
    tuples = _tuples([row])
    if not tuples:
        raise ValueError("the row holds no (x, y, o) tuple (no assistant reply followed by a user message)")
    return tuples[0].x, tuples[0].y, tuples[0].o


def _tuples(source, fmt=None):
    from .data import FilterConfig, extract_tuples, read_conversations

    return list(extract_tuples(read_conversations(source, format=fmt), FilterConfig()))


def _inspect(args) -> int:
    from .signal_view import compute_signal, render_html, render_png

    if args.source in (None, "-"):
        text = sys.stdin.read()
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"stdin is not a JSON object ({e.msg}); pass a file or "
                             '{"x": ..., "y": ..., "o": ...}') from None
        x, y, o = _interaction_from_row(row)
    else:
        path = Path(args.source)
        if not path.exists():
            raise FileNotFoundError(f"no such file: {path}")
        tuples = _tuples(str(path), args.format)
        if not 0 <= args.row < len(tuples):
            raise ValueError(f"--row {args.row} is out of range: {path} holds {len(tuples)} tuples")
        t = tuples[args.row]
        x, y, o = t.x, t.y, t.o
    model, tokenizer = _load(args)
    if args.adapter:
        import warnings

        import peft

        with warnings.catch_warnings():  # peft 0.21 reads a property transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = peft.PeftModel.from_pretrained(model, args.adapter).eval()
    from .data import LayoutConfig

    layout = LayoutConfig(history_messages=None, ignore_first_k=0, chat_template_kwargs=args.chat_template_kwargs)
    signal = compute_signal(model, tokenizer, x, y, o, template=args.template, layout=layout, alpha=args.alpha)
    s = signal.summary()
    if args.json:
        print(json.dumps({**signal.to_dict(), "top": signal.top(args.top)}, ensure_ascii=False))
    else:
        print(f"{s['tokens']} tokens of y · mean A_t {s['mean_advantage']:+.4f} · "
              f"{100 * s['frac_positive_advantage']:.0f}% with A_t > 0 · mean {signal.divergence_name} "
              f"{s['mean_divergence']:.4f}")
        print(f"{'#':>4}  {'token':<20} {'A_t':>8} {'diverg.':>8} {'p_stud':>7} {'p_teach':>7}")
        for r in signal.top(args.top):
            print(f"{r['index']:>4}  {r['token']!r:<20} {r['advantage']:>+8.3g} {r['divergence']:>8.3g} "
                  f"{r['student_p']:>7.3f} {r['teacher_p']:>7.3f}")
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(render_html(signal, args.top), encoding="utf-8")
        print(f"wrote {args.html}", file=sys.stderr)
    if args.png:
        render_png(signal, args.png, args.top)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


# ---- registration -------------------------------------------------------------------------------


def add_online_commands(subparsers) -> None:
    """``hsd chat`` and ``hsd inspect``."""
    chat = subparsers.add_parser("chat", help="chat with a model that learns from your follow-ups (one step each)")
    _add_model_arguments(chat)
    chat.add_argument("--user", default=None, help="user key: this user's adapter is loaded at start and saved on exit")
    chat.add_argument("--adapter-dir", default=None,
                      help="where per-user adapters live (default: $HSD_HOME or ~/.cache/hsd, /adapters/<model>)")
    chat.add_argument("--preset", choices=("paper", "stable"), default="paper",
                      help="paper: the authors' live trainer; stable: full forward KL, 0.2 anchor, neutral "
                           "follow-ups skipped (METHOD.md §7)")
    chat.add_argument("--loss-mode", choices=("sampled", "full", "topk"), default=None)
    chat.add_argument("--anchor", type=float, default=None, help="coefficient of KL(base ‖ student) on the reply")
    chat.add_argument("--gate", choices=("all", "skip_neutral", "downweight_neutral"), default=None)
    chat.add_argument("--lr", type=float, default=None)
    chat.add_argument("--lora-r", type=int, default=None)
    chat.add_argument("--lora-alpha", type=int, default=None)
    chat.add_argument("--full-finetune", action="store_true", help="train every weight instead of a LoRA adapter")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--max-new-tokens", type=int, default=None)
    chat.add_argument("--learn-truncated", action="store_true",
                      help="also learn from replies cut by --max-new-tokens (default: skipped)")
    chat.add_argument("--undo-depth", type=int, default=8, help="how many steps /undo can revert")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--seed", type=int, default=None)
    chat.set_defaults(handler=_chat)

    inspect = subparsers.add_parser("inspect", help="per-token signal of one (x, y, o): A_t and divergence, "
                                                    "to HTML and PNG")
    _add_model_arguments(inspect)
    inspect.add_argument("source", nargs="?", default=None,
                         help="a file of conversations or tuples (any format hsd data reads); '-' or absent: "
                              "one JSON object on stdin")
    inspect.add_argument("--format", default=None, help="the file's format (default: detected)")
    inspect.add_argument("--row", type=int, default=0, help="which tuple of the file (0-based)")
    inspect.add_argument("--adapter", default=None, help="a peft adapter directory to apply (e.g. a saved user)")
    inspect.add_argument("--alpha", type=float, default=0.0,
                         help="divergence shown: 0 KL(teacher ‖ student), 1 KL(student ‖ teacher)")
    inspect.add_argument("--top", type=int, default=10, help="how many most-disagreeing tokens to list")
    inspect.add_argument("--html", default=None, help="write the coloured reply to this HTML file")
    inspect.add_argument("--png", default=None, help="write the per-token plot to this PNG file")
    inspect.add_argument("--json", action="store_true", help="print the per-token signal as JSON")
    inspect.set_defaults(handler=_inspect)
