"""``hsd demo``: the embedded personalisation experiment (see :mod:`hsd.demo`).

    hsd demo [--seeds 0 1 2] [--interactions 200] [--flip-interactions 200] [--output hsd-demo]

Pretrains (or loads from the cache) a 0.5M-parameter base model that can revise in context,
picks a hidden style preference among the styles its first tries never use, and lets it learn
from one simulated user's follow-ups, one hindsight step per interaction, then flips the
preference. Writes ``report.json`` and ``compliance.png`` per seed (``OUTPUT/seed-N`` when
several seeds run) and prints a summary table. Exit code 0 when the run completes (whether the
targets are met is part of the report), 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ._cli_common import non_negative_int, positive_int

logger = logging.getLogger("hsd")

ARM_NAMES = ("hindsight", "sampled", "cross_user", "sft")  # hsd.demo.ARMS, without importing torch


def add_demo_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="learn a hidden user preference from follow-ups (tiny model, CPU, ~3 min)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0], help="one run per seed (default: 0)")
    p.add_argument("--interactions", type=positive_int, default=200, help="interactions before the preference flips")
    p.add_argument("--flip-interactions", type=non_negative_int, default=200, help="interactions after the flip (0: no flip)")
    p.add_argument("--control-interactions", type=positive_int, default=None,
                   help="interactions of the cross-user and SFT controls (default: --interactions)")
    p.add_argument("--eval-every", type=positive_int, default=25, help="interactions between evaluations")
    p.add_argument("--eval-prompts", type=positive_int, default=60, help="held-out prompts per evaluation")
    p.add_argument("--arms", nargs="+", choices=ARM_NAMES, default=list(ARM_NAMES),
                   help="which arms to run (hindsight is always run)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of every arm")
    p.add_argument("--pretrain-steps", type=positive_int, default=None,
                   help="pretraining steps of the base model (default: the recipe's 500)")
    p.add_argument("--workers", type=positive_int, default=2, help="processes running the arms (1: this process)")
    p.add_argument("--output", default="hsd-demo", help="output directory (report.json, compliance.png)")
    p.add_argument("--cache-dir", default=None, help="base model cache (default: $HSD_CACHE/demo or ~/.cache/hsd/demo)")
    p.add_argument("--no-cache", action="store_true", help="pretrain the base model again, do not cache it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run_demo_command)


def run_demo_command(args) -> int:
    import dataclasses

    from .demo import DemoConfig, ReviserRecipe, format_summary, run_demo

    arms = tuple(dict.fromkeys(["hindsight", *args.arms]))
    output = Path(args.output)
    reports = []
    for seed in args.seeds:
        recipe = ReviserRecipe(seed=seed)
        if args.pretrain_steps:
            recipe = dataclasses.replace(recipe, steps=args.pretrain_steps, warmup=min(recipe.warmup, args.pretrain_steps))
        config = DemoConfig(seed=seed, interactions=args.interactions, flip_interactions=args.flip_interactions,
                            control_interactions=args.control_interactions, eval_every=args.eval_every,
                            eval_prompts=args.eval_prompts, arms=arms, lr=args.lr, workers=args.workers, recipe=recipe)
        directory = output / f"seed-{seed}" if len(args.seeds) > 1 else output
        report = run_demo(config, directory, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                          progress=not args.no_progress)
        print(f"\n== seed {seed}: {directory / 'report.json'}" + (f", {report['plot']}" if report.get("plot") else ""))
        print(format_summary(report))
        reports.append(report)
    if len(reports) > 1:
        met = [r["config"]["seed"] for r in reports if r["targets"]["all_met"]]
        summary = {"seeds": args.seeds, "seeds_meeting_every_target": met,
                   "targets": {r["config"]["seed"]: r["targets"] for r in reports},
                   "seconds": {r["config"]["seed"]: r["seconds"] for r in reports}}
        (output / "summary.json").write_text(json.dumps(summary, indent=1))
        print(f"\nseeds meeting every target: {len(met)} of {len(reports)} {met}  ({output / 'summary.json'})")
    return 0
