"""``hsd demo``: online hindsight self-distillation learns a hidden user preference, on a CPU.

The paper's personalisation experiment in miniature (METHOD.md §5): a tiny base model that can
revise in context (:mod:`hsd.demo.reviser`) talks to one simulated user whose style preference
it does not know (:mod:`hsd.demo.world`). After each reply the user's follow-up is the only
signal: one step of hindsight self-distillation per interaction, through
:class:`hsd.online.OnlineDistiller` and :func:`hsd.online.run_online`. Every ``eval_every``
interactions the current model answers held-out prompts greedily (its first try) and is judged
for the preferred style (and, strictly, the right items). Half-way the preference flips.

Arms, run in the same call (in worker processes, one thread each):

* ``hindsight``: the recipe of :meth:`hsd.online.OnlineConfig.stable` (forward KL to the
  teacher's full distribution, 0.2·KL(base ‖ student), neutral follow-ups skipped);
* ``sampled``: the paper's sampled estimator (:meth:`OnlineConfig.paper`) at the same learning
  rate;
* ``cross_user``: the hindsight recipe fed follow-ups written for a user with another
  preference (a null: it should stay at the base's compliance);
* ``sft``: supervised fine-tuning on the policy's own replies (no follow-up used).

The base model, and the base model with the preference stated in the prompt (the in-context
oracle), are the reference lines. The report (JSON), a plot (PNG) and a summary table are
written to the output directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import world as W
from .reviser import ReviserRecipe, load_or_build_reviser, quiet_weights_io

__all__ = ["DemoConfig", "run_demo", "ARMS", "evaluate", "choose_preferences", "check_targets", "format_summary"]

logger = logging.getLogger("hsd")

ARMS = ("hindsight", "sampled", "cross_user", "sft")
#: Arms that continue after the preference flip (the controls show the first preference only).
FLIP_ARMS = ("hindsight", "sampled")


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo` (the defaults are the documented run).

    ``interactions`` before the flip and ``flip_interactions`` after it (0: no flip);
    ``control_interactions`` for the cross-user and SFT arms (default: ``interactions``);
    ``eval_every`` interactions between evaluations on ``eval_prompts`` held-out prompts;
    ``lr`` (Adam) and ``anchor`` of the hindsight recipe, ``online_options`` (other
    :class:`hsd.online.OnlineConfig` fields of the hindsight and cross-user arms);
    ``learn_truncated``: learn from replies that ran into ``max_new_tokens`` (here three times
    the longest right answer, so only a runaway reply does; the user's complaint about it is
    what teaches the model to stop again); ``workers`` processes for the arms (1: in this
    process); ``recipe``: the base model's pretraining recipe (its seed is ``seed``).
    """

    seed: int = 0
    interactions: int = 200
    flip_interactions: int = 200
    control_interactions: int | None = None
    eval_every: int = 25
    eval_prompts: int = 60
    arms: tuple = ARMS
    lr: float = 1e-4
    anchor: float = 0.2
    max_new_tokens: int = 24
    workers: int = 2
    learn_truncated: bool = True
    online_options: dict = field(default_factory=dict)
    recipe: ReviserRecipe = field(default_factory=ReviserRecipe)

    def __post_init__(self):
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or "hindsight" not in self.arms:
            raise ValueError(f"arms must include 'hindsight' and be among {ARMS}, got {self.arms}")
        if self.interactions < 1 or self.flip_interactions < 0 or self.eval_every < 1 or self.eval_prompts < 1:
            raise ValueError("interactions, eval_every and eval_prompts must be >= 1, flip_interactions >= 0")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.recipe.seed != self.seed:
            self.recipe = dataclasses.replace(self.recipe, seed=self.seed)


# ---- evaluation -------------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread():
    """One torch thread inside: a 0.5M-parameter model's small matrix products run faster on one
    thread than on several (and much faster when the cores are shared), and the arms run side by
    side in worker processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def greedy_replies(model, tokenizer, texts: list[str], max_new_tokens: int = 24) -> list[str]:
    """First tries: one greedy reply per single-message prompt."""
    from ..online import chat_prompt_ids, generate_replies

    prompts = [chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    was_training = model.training
    model.eval()
    replies = generate_replies(model, tokenizer, prompts, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                               max_new_tokens=max_new_tokens, do_sample=False)
    model.train(was_training)
    return [r.text for r in replies]


def evaluate(model, tokenizer, requests: list, style: str, prompt_of=None, max_new_tokens: int = 24) -> dict:
    """Greedy first-try compliance with ``style`` on ``requests``: ``style`` (share in that
    style), ``strict`` (style and the right items) and ``styles`` (share of each style).
    ``prompt_of(request) -> text`` changes the prompt (the oracle states the preference)."""
    texts = [prompt_of(r) if prompt_of else r.text for r in requests]
    replies = greedy_replies(model, tokenizer, texts, max_new_tokens)
    found = [W.judge_style(r) for r in replies]
    n = len(replies)
    return {"style": sum(f == style for f in found) / n,
            "strict": sum(W.judge_strict(r, q, style) for r, q in zip(replies, requests)) / n,
            "styles": {s: round(c / n, 4) for s, c in Counter(f or "none" for f in found).items()},
            "example": {"prompt": texts[0], "reply": replies[0]}}


def choose_preferences(base_styles: dict, rng: random.Random) -> tuple[str, str]:
    """The hidden preference and the one it flips to: the base's least-used styles (its greedy
    first tries never or rarely use them), ties broken at random."""
    order = sorted(W.STYLES, key=lambda s: (base_styles.get(s, 0.0), rng.random()))
    return order[0], order[1]


def cross_user_style(preferences: tuple[str, str]) -> str:
    """The style the cross-user control's user wants: neither of the judged preferences, so
    its follow-ups are real complaints that say nothing about the hidden preference."""
    return next(s for s in reversed(W.STYLES) if s not in preferences)


def _oracle_prompt(style: str, seed: int):
    rng = random.Random(seed)
    return lambda request: W.preference_request(request.text, style, rng)


def _teacher_prompt(style: str, seed: int):
    from ..data.templates import HINDSIGHT_PRESETS

    rng, block = random.Random(seed), HINDSIGHT_PRESETS["online"]
    return lambda request: request.text + block.format(followup=W.complaint(style, rng))


# ---- one arm ----------------------------------------------------------------------------------


def _sft_step(distiller, interactions) -> None:
    """Supervised fine-tuning on the policy's own replies (the SFT control): next-token loss on
    each reply given its prompt, one optimiser step."""
    from ..online import chat_prompt_ids

    tokenizer, model = distiller.tokenizer, distiller.model
    losses = []
    for messages, reply in interactions:
        prompt = chat_prompt_ids(tokenizer, messages)
        target = tokenizer.encode(reply, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        losses.append(model(input_ids=ids, labels=labels).loss)
    distiller.optimizer.zero_grad(set_to_none=True)
    torch.stack(losses).mean().backward()
    torch.nn.utils.clip_grad_norm_(list(distiller.trainable.values()), 1.0)
    distiller.optimizer.step()


def _run_arm(arm: str, config: DemoConfig, model_path: str, preferences: tuple[str, str], progress_queue=None) -> dict:
    """One arm from the base model: its interactions, evaluations and counts."""
    if progress_queue is not None:  # a worker process: its arm's log lines would interleave
        logging.getLogger("hsd").setLevel(logging.ERROR)
    with single_thread():
        return _arm(arm, config, model_path, preferences, progress_queue)


def _arm(arm: str, config: DemoConfig, model_path: str, preferences: tuple[str, str], progress_queue) -> dict:
    from transformers import LlamaForCausalLM

    from ..online import OnlineConfig, OnlineDistiller, run_online
    from .reviser import build_tokenizer

    start = time.perf_counter()
    seed = config.seed * 1000 + ARMS.index(arm)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    with quiet_weights_io():
        model = LlamaForCausalLM.from_pretrained(model_path).eval()
    common = dict(adapter="full", lr=config.lr, max_new_tokens=config.max_new_tokens, seed=seed,
                  monitor_reference=False)
    if arm in ("sampled", "sft"):  # sft only samples and steps: no anchor, no reference copy
        online = OnlineConfig.paper(**common)
    else:
        online = OnlineConfig.stable(anchor=config.anchor, **{**common, **config.online_options})
    distiller = OnlineDistiller(model, tokenizer, online)
    world = W.World(seed)
    heldout = world.heldout_requests(config.eval_prompts, seed=config.seed + 10_000)

    if arm in FLIP_ARMS and config.flip_interactions:
        phases = [(preferences[0], config.interactions), (preferences[1], config.flip_interactions)]
    else:
        phases = [(preferences[0], config.control_interactions or config.interactions)]
    curve, counts, done = [], Counter(), 0

    def record(style: str, phase: int):
        point = {"interactions": done, "phase": phase, "preference": style,
                 **{k: v for k, v in evaluate(distiller.model, tokenizer, heldout, style,
                                              max_new_tokens=config.max_new_tokens).items() if k != "example"}}
        if arm == "hindsight":  # the self-teacher's health: the model shown the complaint
            point["teacher"] = evaluate(distiller.model, tokenizer, heldout, style, _teacher_prompt(style, seed),
                                        config.max_new_tokens)["style"]
        curve.append(point)
        if progress_queue is not None:
            progress_queue.put((arm, done, point["style"]))

    for phase, (style, n) in enumerate(phases):
        user_style = style if arm != "cross_user" else cross_user_style(preferences)
        user = world.user(user_style, seed=seed + phase)
        record(style, phase)  # where the phase starts (after a flip: judged by the new preference)
        for first in range(0, n, config.eval_every):
            chunk = min(config.eval_every, n - first)
            prompts = [world.request().text for _ in range(chunk)]
            if arm == "sft":
                responses = distiller.respond_batch([[{"role": "user", "content": p}] for p in prompts])
                for p, r in zip(prompts, responses):
                    _sft_step(distiller, [([{"role": "user", "content": p}], r.text)])
                counts["learned"] += chunk
            else:
                run = run_online(distiller, prompts, user, progress=False, learn_truncated=config.learn_truncated)
                counts.update(run.counts)
            done += chunk
            record(style, phase)
    counts.pop("interactions", None)
    return {"arm": arm, "curve": curve, "counts": dict(counts), "seconds": round(time.perf_counter() - start, 1),
            "config": online.summary() if arm != "sft" else {"lr": config.lr, "optimizer": "AdamW"},
            "user_style": cross_user_style(preferences) if arm == "cross_user" else None}


# ---- the experiment ---------------------------------------------------------------------------


def run_demo(config: DemoConfig | None = None, output_dir: str | os.PathLike = "hsd-demo", cache_dir=None,
             use_cache: bool = True, progress: bool = True) -> dict:
    """Run the demo (see the module docstring); returns the report, also written to
    ``output_dir/report.json`` with ``output_dir/compliance.png``.

    With ``config.workers > 1`` the arms run in spawned worker processes: from a script, call
    this under ``if __name__ == "__main__":`` (as for any ``multiprocessing`` code)."""
    import tempfile

    config = config or DemoConfig()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, tokenizer, base_info = load_or_build_reviser(config.recipe, cache_dir, use_cache, progress)
    world = W.World(config.seed)
    heldout = world.heldout_requests(config.eval_prompts, seed=config.seed + 10_000)

    with single_thread():
        base = evaluate(model, tokenizer, heldout, W.STYLES[0], max_new_tokens=config.max_new_tokens)
        preferences = choose_preferences(base["styles"], random.Random(config.seed))
        reference = {}
        for style in preferences:
            reference[style] = {
                "base": evaluate(model, tokenizer, heldout, style, max_new_tokens=config.max_new_tokens),
                "oracle": evaluate(model, tokenizer, heldout, style, _oracle_prompt(style, config.seed),
                                   config.max_new_tokens),
                "teacher": evaluate(model, tokenizer, heldout, style, _teacher_prompt(style, config.seed),
                                    config.max_new_tokens)["style"],
            }
    logger.info("hsd demo: base first tries by style %s; hidden preference %s, then %s", base["styles"],
                *preferences)
    for style in preferences:
        if min(reference[style]["oracle"]["style"], reference[style]["teacher"]) < 0.8:
            # hindsight learning needs a model that follows a stated preference in context
            logger.warning("hsd demo: the base model follows a stated %s preference only %.0f%% of the time "
                           "(%.0f%% in the hindsight block): its self-teacher has little to teach; pretrain "
                           "longer (--pretrain-steps)", style, 100 * reference[style]["oracle"]["style"],
                           100 * reference[style]["teacher"])

    with tempfile.TemporaryDirectory(prefix="hsd-demo-") as tmp:
        model_path = base_info["path"] if base_info.get("path") else tmp
        if not base_info.get("path"):
            with quiet_weights_io():
                model.save_pretrained(tmp)
        total = sum((config.interactions + config.flip_interactions) if a in FLIP_ARMS and config.flip_interactions
                    else (config.control_interactions or config.interactions) for a in config.arms)
        results = _run_arms(config, model_path, preferences, total, progress)

    report = {
        "config": {**dataclasses.asdict(config), "recipe": dataclasses.asdict(config.recipe)},
        "base_model": {k: v for k, v in base_info.items() if k != "recipe"},
        "base_styles": base["styles"],
        "preferences": list(preferences),
        "reference": reference,
        "arms": {r["arm"]: r for r in results},
        "seconds": round(time.perf_counter() - start, 1),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": config.workers},
    }
    report["targets"] = check_targets(report)
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    try:
        plot(report, output_dir / "compliance.png")
        report["plot"] = str(output_dir / "compliance.png")
    except ImportError:
        logger.warning("hsd demo: matplotlib is not installed; no plot (pip install matplotlib)")
    return report


def _run_arms(config: DemoConfig, model_path: str, preferences, total: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="online interactions (all arms)", unit="interaction", disable=not progress)
    order = sorted(config.arms, key=lambda a: -(a in FLIP_ARMS))  # the long arms first
    try:
        if config.workers == 1:
            results = []
            for arm in order:
                results.append(_run_arm(arm, config, model_path, preferences))
                bar.update(results[-1]["curve"][-1]["interactions"])
            return sorted(results, key=lambda r: ARMS.index(r["arm"]))
        import concurrent.futures as cf
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after torch threads started is unsafe
        with ctx.Manager() as manager:
            queue = manager.Queue()
            with cf.ProcessPoolExecutor(max_workers=config.workers, mp_context=ctx) as pool:
                futures = [pool.submit(_run_arm, arm, config, model_path, preferences, queue) for arm in order]
                seen: dict = {}
                pending = set(futures)
                while pending:
                    finished, pending = cf.wait(pending, timeout=0.5)
                    while not queue.empty():
                        arm, done, compliance = queue.get()
                        bar.update(done - seen.get(arm, 0))
                        seen[arm] = done
                        bar.set_postfix({arm: f"{compliance:.0%}"})
                results = [f.result() for f in futures]
        return sorted(results, key=lambda r: ARMS.index(r["arm"]))
    finally:
        bar.close()


# ---- targets, summary, plot ---------------------------------------------------------------------


def _phase_points(arm: dict, phase: int) -> list[dict]:
    return [p for p in arm["curve"] if p["phase"] == phase]


def check_targets(report: dict) -> dict:
    """The demo's claims, each with its measured value and whether it holds: first-try
    compliance ≤ 20% before training; ≥ 90% (strict ≥ 85%) within the first phase, no more than
    5 points below the in-context oracle; ≥ 80% within the second phase after the flip; the
    cross-user control within 10 points of the base."""
    first, second = report["preferences"]
    ref = report["reference"]
    main = report["arms"]["hindsight"]
    phase0, phase1 = _phase_points(main, 0), _phase_points(main, 1)
    targets = {}
    start = phase0[0]["style"]
    targets["before_at_most_20pct"] = {"value": start, "met": start <= 0.20}
    reached = next((p for p in phase0 if p["style"] >= 0.90 and p["strict"] >= 0.85), None)
    best = max(phase0, key=lambda p: (p["style"], p["strict"]))
    targets["first_preference_90pct_strict_85pct"] = {
        "value": {"style": best["style"], "strict": best["strict"], "final_style": phase0[-1]["style"],
                  "final_strict": phase0[-1]["strict"]},
        "interactions": reached["interactions"] if reached else None, "met": reached is not None}
    oracle = ref[first]["oracle"]["style"]
    final = phase0[-1]["style"]
    targets["within_5pts_of_oracle"] = {"value": {"final": final, "oracle": oracle},
                                        "met": final >= oracle - 0.05}
    if phase1:
        flipped = next((p for p in phase1 if p["style"] >= 0.80), None)
        targets["after_flip_80pct"] = {"value": max(p["style"] for p in phase1), "final": phase1[-1]["style"],
                                       "interactions": None if flipped is None else
                                       flipped["interactions"] - phase0[-1]["interactions"],
                                       "met": flipped is not None}
    if "cross_user" in report["arms"]:
        control = report["arms"]["cross_user"]["curve"][-1]["style"]
        base = ref[first]["base"]["style"]
        targets["cross_user_within_10pts_of_base"] = {"value": {"control": control, "base": base},
                                                      "met": abs(control - base) <= 0.10}
    targets["all_met"] = all(t["met"] for t in targets.values())
    return targets


def _rounded(value):
    if isinstance(value, float):
        return round(value, 2)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def format_summary(report: dict) -> str:
    """The summary table printed by ``hsd demo``."""
    first, second = report["preferences"]
    ref = report["reference"]
    lines = [f"hidden preference: {first}, flipped to {second} (base first tries: "
             + ", ".join(f"{s} {v:.0%}" for s, v in sorted(report["base_styles"].items(), key=lambda kv: -kv[1]))
             + ")", ""]
    header = f"{'':28s}{'interactions':>13s}{'style':>8s}{'strict':>8s}{'teacher':>9s}"
    lines.append(header)
    for style, label in ((first, "1st"), (second, "2nd")):
        lines.append(f"{'base (' + label + ' pref.)':28s}{0:>13d}{ref[style]['base']['style']:>8.0%}"
                     f"{ref[style]['base']['strict']:>8.0%}{ref[style]['teacher']:>9.0%}")
        lines.append(f"{'in-context oracle (' + label + ')':28s}{'':>13s}{ref[style]['oracle']['style']:>8.0%}"
                     f"{ref[style]['oracle']['strict']:>8.0%}{'':>9s}")
    for name, arm in report["arms"].items():
        for phase, label in ((0, "1st"), (1, "2nd")):
            points = _phase_points(arm, phase)
            if not points:
                continue
            p = points[-1]
            teacher = f"{p['teacher']:>9.0%}" if "teacher" in p else f"{'':>9s}"
            lines.append(f"{name + ' (' + label + ' pref.)':28s}{p['interactions']:>13d}{p['style']:>8.0%}"
                         f"{p['strict']:>8.0%}{teacher}")
    lines.append("")
    for key, target in report["targets"].items():
        if key != "all_met":
            lines.append(f"  [{'x' if target['met'] else ' '}] {key}: {json.dumps(_rounded(target['value']))}"
                         + (f" at {target['interactions']} interactions" if target.get("interactions") else ""))
    lines.append(f"every target met: {report['targets']['all_met']}  ({report['seconds']:.0f} s)")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Compliance with the current preference against interactions, per arm, with the base and
    the in-context oracle (like the paper's personalisation figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first, second = report["preferences"]
    ref = report["reference"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"hindsight": "tab:blue", "sampled": "tab:orange", "cross_user": "tab:gray", "sft": "tab:green"}
    flip_at = None
    for name, arm in report["arms"].items():
        xs = [p["interactions"] for p in arm["curve"]]
        ax.plot(xs, [p["style"] for p in arm["curve"]], marker="o", ms=3, color=colors[name], label=name)
        if name in FLIP_ARMS:  # strict: the style and the right items (content damage shows here)
            ax.plot(xs, [p["strict"] for p in arm["curve"]], ls=":", color=colors[name], label=f"{name} (strict)")
        if name == "hindsight":
            ax.plot(xs, [p["teacher"] for p in arm["curve"]], lw=0.8, alpha=0.5, color="tab:purple",
                    label="self-teacher (hindsight)")
            second_phase = _phase_points(arm, 1)
            flip_at = _phase_points(arm, 0)[-1]["interactions"] if second_phase else None
    end = max(p["interactions"] for arm in report["arms"].values() for p in arm["curve"])
    for style, lo, hi in ((first, 0, flip_at or end), (second, flip_at, end)):
        if lo is None:
            continue
        ax.hlines(ref[style]["oracle"]["style"], lo, hi, colors="k", linestyles="--",
                  label="in-context oracle" if style == first else None)
        ax.hlines(ref[style]["base"]["style"], lo, hi, colors="k", linestyles=":",
                  label="base" if style == first else None)
    if flip_at:
        ax.axvline(flip_at, color="tab:red", alpha=0.4)
        ax.text(flip_at, 0.5, f" preference flips\n {first} → {second}", color="tab:red", fontsize=8)
    ax.set_xlabel("interactions (one hindsight step each)")
    ax.set_ylabel("first-try compliance (held-out prompts)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"hsd demo: learning a hidden preference from follow-ups (seed {report['config']['seed']})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
