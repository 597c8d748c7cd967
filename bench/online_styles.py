"""Online preference flip on a tiny in-context reviser, through hsd.online (CPU, minutes).

METHOD.md §7 reports, from a throw-away prototype, which online settings let hindsight
self-distillation move a policy already peaked on one answer style. This script re-runs that
kind of experiment with the library itself:

1. A tiny Qwen2 (2 layers, hidden 64) is fine-tuned for a few seconds so that it answers a plain
   prompt in style A with probability ~0.95, and, when the last user message carries the
   "online" hindsight block asking for style S, in style S: the in-context ability the
   self-teacher relies on. Neutral follow-ups ("thanks") in the block leave it at its prior.
2. A simulated user wants style B: a reply in another style gets "please write a <B> instead",
   a reply in style B gets "thanks" (a neutral follow-up).
3. :func:`hsd.online.run_online` runs ``--interactions`` interactions per setting and seed; we
   record the policy's probability of style B on held-out plain prompts (the preference) and the
   teacher's in-context accuracy (does the model, shown a request for S, put most mass on S?).

    python bench/online_styles.py --seeds 3 --interactions 60

Measured (2 CPU cores, seeds 0 and 1, ``--pretrain-steps 250 --interactions 40``; P(B) on
held-out prompts at the end / share of B replies in the last quarter / teacher in-context
accuracy at the end; all start at P(B) 0.017-0.018 and accuracy 1.00):

    paper                 0.050 / 0.30 / 0.42     0.027 / 0.30 / 1.00
    sampled+anchor+gate   0.860 / 0.90 / 0.75     0.068 / 0.30 / 0.92
    full                  0.000 / 0.00 / 0.33     0.033 / 0.00 / 0.75
    full+gate             0.686 / 0.90 / 0.75     0.828 / 1.00 / 0.75
    stable                0.702 / 0.90 / 0.75     0.856 / 1.00 / 0.75
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from hsd.data.templates import HINDSIGHT_PRESETS
from hsd.data.testing import tiny_chat_tokenizer
from hsd.online import OnlineConfig, OnlineDistiller, run_online

STYLES = {"code": "python code function example", "poem": "a poem about the story", "list": "list more list more",
          "story": "tell a story about it"}
A, B = "code", "poem"
PROMPTS = ["write something", "help me", "give an answer", "make it", "tell me about this", "explain this",
           "write more", "can you help", "what is this", "give an example"]
HELD_OUT = ["please help", "write an answer", "explain it"]


def request(style: str) -> str:
    return f"please write a {style} instead"


def sft_batch(tok, rng, n, prior_a):
    """Reply-only LM targets: plain prompts (style A with prob prior_a) and hindsight prompts."""
    rows = []
    for _ in range(n):
        prompt = rng.choice(PROMPTS)
        kind = rng.random()
        if kind < 0.5:
            style = A if rng.random() < prior_a else rng.choice([s for s in STYLES if s != A])
            user = prompt
        elif kind < 0.9:
            style = rng.choice(list(STYLES))
            user = prompt + HINDSIGHT_PRESETS["online"].format(followup=request(style))
        else:  # a neutral follow-up in the block: keep the prior
            style = A
            user = prompt + HINDSIGHT_PRESETS["online"].format(followup=rng.choice(["thanks", "ok great", "thank you"]))
        messages = [{"role": "user", "content": user}]
        head = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        head = list(head["input_ids"] if hasattr(head, "keys") else head)
        full = head + tok(STYLES[style], add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        rows.append((full, len(head)))
    width = max(len(r) for r, _ in rows)
    ids = torch.full((n, width), tok.pad_token_id)
    labels = torch.full((n, width), -100)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (r, h) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, h : len(r)] = torch.tensor(r[h:])
        mask[i, : len(r)] = 1
    return ids, mask, labels


def pretrain(tok, seed, steps, prior_a):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = transformers.Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        ids, mask, labels = sft_batch(tok, rng, 32, prior_a)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@torch.no_grad()
def style_probs(model, tok, user_text):
    """P(reply = each style's text | user_text), normalised over nothing (the rest is junk)."""
    messages = [{"role": "user", "content": user_text}]
    head = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    head = list(head["input_ids"] if hasattr(head, "keys") else head)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    out = {}
    for style, text in STYLES.items():
        reply = tok(text, add_special_tokens=False)["input_ids"] + [eot]
        ids = torch.tensor([head + reply])
        logp = model(input_ids=ids).logits[0, len(head) - 1 : -1].log_softmax(-1)
        out[style] = float(logp.gather(1, torch.tensor(reply)[:, None]).sum().exp())
    return out


def measure(model, tok):
    pref = statistics.mean(style_probs(model, tok, p)[B] for p in HELD_OUT)
    hits = []
    for p in HELD_OUT:
        for s in STYLES:
            probs = style_probs(model, tok, p + HINDSIGHT_PRESETS["online"].format(followup=request(s)))
            hits.append(max(probs, key=probs.get) == s)
    return pref, sum(hits) / len(hits)


SETTINGS = {
    "paper": dict(),
    "sampled+anchor+gate": dict(anchor=0.2, gate="skip_neutral"),
    "full": dict(loss_mode="full", alpha=0.0),
    "full+gate": dict(loss_mode="full", alpha=0.0, gate="skip_neutral"),
    "stable": "stable",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--interactions", type=int, default=60)
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--prior", type=float, default=0.95, help="P(style A) on plain prompts after pre-training")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--pretrain-only", action="store_true", help="pre-train (and cache) the models, report, stop")
    p.add_argument("--json", default=None)
    p.add_argument("--cache", default=None, help="directory keeping the pre-trained models between runs")
    args = p.parse_args(argv)
    logging.getLogger("hsd").setLevel(logging.ERROR)
    tok = tiny_chat_tokenizer("chatml", corpus=list(STYLES.values()) + PROMPTS)
    results = {name: [] for name in args.settings}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        t0 = time.time()
        cached = Path(args.cache) / f"styles-seed{seed}-{args.pretrain_steps}-{args.prior}" if args.cache else None
        if cached is not None and cached.exists():
            import transformers

            base = transformers.Qwen2ForCausalLM.from_pretrained(cached).eval()
        else:
            base = pretrain(tok, seed, args.pretrain_steps, args.prior)
            if cached is not None:
                base.save_pretrained(cached)
        start = measure(base, tok)
        print(f"seed {seed}: pre-trained in {time.time() - t0:.0f}s; P(B)={start[0]:.3f}, in-context "
              f"accuracy {start[1]:.2f}", file=sys.stderr)
        if args.pretrain_only:
            continue
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for name in args.settings:
            base.load_state_dict(state)
            common = dict(lora_r=16, lora_alpha=32, lr=args.lr, max_new_tokens=24, seed=seed, monitor=True)
            cfg = OnlineConfig.stable(**common) if SETTINGS[name] == "stable" else OnlineConfig(**{**common, **SETTINGS[name]})
            model = type(base)(base.config)
            model.load_state_dict(state)
            d = OnlineDistiller(model.eval(), tok, cfg)
            rng = random.Random(seed)
            prompts = [rng.choice(PROMPTS) for _ in range(args.interactions)]

            def user(messages, reply):
                return "thanks" if reply.strip() == STYLES[B] else request(B)

            t0 = time.time()
            run = run_online(d, prompts, user, progress=False)
            pref, icl = measure(d.model, tok)
            hits = [r["response"].strip() == STYLES[B] for r in run.records]
            last = hits[-max(1, len(hits) // 4):]
            results[name].append({"seed": seed, "p_B_start": start[0], "p_B_end": pref, "icl_start": start[1],
                                  "icl_end": icl, "B_rate_last_quarter": sum(last) / len(last),
                                  "steps": run.steps, "seconds": time.time() - t0})
            r = results[name][-1]
            print(f"  {name:<20} P(B) {start[0]:.3f} -> {pref:.3f}   in-context {start[1]:.2f} -> {icl:.2f}   "
                  f"B replies (last quarter) {r['B_rate_last_quarter']:.2f}   {run.steps} steps, "
                  f"{r['seconds']:.1f}s", file=sys.stderr)
    if args.pretrain_only:
        return
    print(f"| setting | P(B) end (mean over {args.seeds} seeds) | B replies, last quarter | teacher in-context acc. end |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        mean = lambda k: statistics.mean(r[k] for r in rows)  # noqa: E731
        print(f"| {name} | {mean('p_B_end'):.3f} | {mean('B_rate_last_quarter'):.2f} | {mean('icl_end'):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
