"""One training step of hindsight distillation, four ways, side by side on the same conversations.

Rows (each a full step: forward, loss and backward; gradients freed between steps):

  naive           the paper's path: per tuple a separate student forward+backward over the
                  per-tuple layout (5 history messages), a separate full teacher forward under
                  no_grad, materialised [tokens, vocab] logits for both, ``hsd.hindsight_loss``
                  on the logits (default backend)
  hsd-tuple       ``hsd.hindsight_step`` on the collated per-tuple layout (5 history messages):
                  each tuple's teacher reuses its student's prefix keys/values
  hsd-packed-S    ``hsd.hindsight_step`` on the packed layout (history unlimited), teacher
                  strategy S (``masked``, ``loop``, ``auto``; one row each)
  sft             plain fine-tuning for scale: cross-entropy on the same replies (y and its
                  end-of-turn token), one forward+backward over the conversation as the template
                  renders it (the packed layout's trunk), through the model's own ``labels`` loss

Conversations: ``--rounds`` user/assistant exchanges (1 to 8) and a final follow-up, so
``--rounds`` tuples each; users write 60-300 tokens, assistants 150-600 (drawn per message with a
fixed seed), from hsd's synthetic word list, tokenised by an in-process byte-level BPE with a
ChatML or a Qwen3-style chat template (``--template``; the Qwen3-style one renders the last reply
with an empty think block: non-thinking mode, ``enable_thinking=False``, and the packed layout
scores earlier replies in student branches).

Models (random weights, Qwen2 architecture, tied embeddings): ``--config tiny`` = hidden 256,
4 layers, 4 heads (2 KV heads), MLP 1376, vocab 32,000 (the tokenizer's ids stay small);
``--config qwen2.5-0.5b`` = Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads,
MLP 4864, vocab 151,936).

Reported per row: median wall time of ``--steps`` timed steps after ``--warmup`` warm-up steps,
interleaved round-robin (rotating the order each round) so machine noise hits every row alike;
tokens computed by the student and by the teacher; a FLOP estimate (below); the step's peak
memory; the loss (naive and hsd-tuple compute the same loss; the packed rows condition on the
whole history and differ); ratios to the naive row. Times are wall clock and this process's CPU
time (``--clock`` picks the one the targets are judged on); the targets also give the median of
the per-round ratios, which cancels slow drifts of a shared machine's load. ``--breakdown`` also times the phases
(student forward, teacher forward, loss forward, backward) by wrapping hsd's internal pass
functions, with device synchronisation at each boundary.

FLOP estimate, per side: 2 * (decoder layer parameters) * tokens + 2 * H * V * (rows whose
logits are computed) + 4 * layers * (heads * head_dim) * (attended query-key pairs that the
attention rule allows), times 3 for the student (forward + backward) and 1 for the teacher.
The naive path computes logits for every token of both sequences; hsd only at the scored rows.
The pairs count what the layout needs; a dense masked kernel may compute more.

Peak memory: each row runs in its own worker process (``--isolate process``, the default;
forked before any tensor work on a CPU, spawned for CUDA), so one row's allocator caches never
hide another's peak. CPU: VmHWM (reset through ``/proc/self/clear_refs`` before the row's first
step) minus the RSS at that moment, the model and data loaded and no step run yet; it includes
the gradients (freed between steps). CUDA: per step, ``max_memory_allocated`` minus
``memory_allocated`` at its start. ``--isolate none`` runs every row in this process on one
shared model (faster to start, used by ``--smoke``; its CPU memory column is not meaningful: a
row reuses memory that malloc kept from an earlier row).

On a shared CPU, ``--threads 1`` keeps OpenMP from spinning against other processes (with two
threads on an oversubscribed 2-core machine every row ran about ten times slower).

    python bench/bench_step.py                                  # tiny, CPU, ChatML, 5 rounds
    python bench/bench_step.py --template qwen3 --json /tmp/step_qwen3.json
    python bench/bench_step.py --config qwen2.5-0.5b --device cuda --dtype bf16 --steps 5
    python bench/bench_step.py --smoke --json /tmp/smoke.json    # 1 round, 1 step, tiny lengths
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

import hsd
import hsd.forward
from hsd.data import (Conversation, HindsightCollator, LayoutConfig, conversation_tuples, tokenize_conversation,
                      tokenize_tuple)
from hsd.data.testing import WORDS, synthetic_conversation, tiny_chat_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: --clock: which median the ratios of the targets use (both are always reported).
CLOCKS = {"wall": "time_s", "cpu": "cpu_s"}

#: Qwen2-architecture shapes (random weights). Qwen2.5-0.5B: its config.json; tiny: its MLP ratio.
CONFIGS = {
    "tiny": dict(hidden_size=256, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True, rope_theta=1e6,
                 max_position_embeddings=32768, rms_norm_eps=1e-6),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                         max_position_embeddings=32768, rms_norm_eps=1e-6),
}

#: The Qwen3-style template needs non-thinking mode for the student's last reply (METHOD.md §2).
TEMPLATE_KWARGS = {"chatml": {}, "qwen3": {"enable_thinking": False}}

#: "Done when" of the shared-prefix step: packed time / naive time at most this, per template.
TARGET_VS_NAIVE = {"chatml": 0.35, "qwen3": 0.45}

HISTORY_MESSAGES = 5  # the paper's per-tuple history


# ---------------------------------------------------------------- conversations
def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 18))).capitalize() + "."


def synth_message(rng: random.Random, tok, n_tokens: int) -> str:
    """Sentences of the synthetic word list: as many as fit in ``n_tokens`` tokens (as the
    tokenizer counts the text alone; the template adds its markers), and at least one."""
    text = ""
    while True:
        candidate = f"{text} {_sentence(rng)}".strip()
        if text and len(tok.encode(candidate, add_special_tokens=False)) > n_tokens:
            return text
        text = candidate


def synth_conversation(tok, rounds: int, seed: int, user: tuple[int, int], assistant: tuple[int, int]) -> list[dict]:
    """``rounds`` user/assistant exchanges and a final user follow-up: ``rounds`` tuples."""
    rng = random.Random(seed)
    messages = []
    for _ in range(rounds):
        messages.append({"role": "user", "content": synth_message(rng, tok, rng.randint(*user))})
        messages.append({"role": "assistant", "content": synth_message(rng, tok, rng.randint(*assistant))})
    messages.append({"role": "user", "content": synth_message(rng, tok, rng.randint(*user))})
    return messages


def build_tokenizer(template: str):
    # trained on realistic text so that a word is about one token (as in bench/bench_data.py)
    corpus = [m["content"] for seed in range(3) for m in synthetic_conversation(20, seed=100 + seed)]
    return tiny_chat_tokenizer(template, vocab_size=2000, corpus=corpus)


def _sft_labels(example) -> tuple[list[int], list[int]]:
    """The trunk of a packed example and labels on its replies (y and end-of-turn), -100 elsewhere.

    A branched reply (rendered differently as the last turn) also appears in the trunk, as
    history, right after its branch's attach point; its tokens are looked up there.
    """
    ids = example.input_ids[: example.trunk_len]
    labels = [-100] * len(ids)
    for t in example.tuples:
        reply = example.input_ids[t.response_start : t.response_end]
        branch = example.branch_of(t.response_start)
        start = t.response_start
        if branch is not None:
            start = next((s for s in range(branch.attach, len(ids) - len(reply) + 1)
                          if ids[s : s + len(reply)] == reply), None)
            if start is None:
                raise RuntimeError(f"reply of turn {t.turn_index} not found in the trunk")
        labels[start : start + len(reply)] = reply
    return ids, labels


class Data:
    """The conversations in every layout the rows need (deterministic from the arguments)."""

    def __init__(self, args):
        self.tok = build_tokenizer(args.template)
        kwargs = TEMPLATE_KWARGS[args.template]
        tuple_cfg = LayoutConfig(history_messages=HISTORY_MESSAGES, chat_template_kwargs=kwargs)
        packed_cfg = LayoutConfig(history_messages=None, chat_template_kwargs=kwargs)
        self.tuples, self.tuple_examples, self.packed_examples = [], [], []
        self.conversation_tokens = 0
        for c in range(args.conversations):
            messages = synth_conversation(self.tok, args.rounds, args.seed + c, args.user_tokens, args.assistant_tokens)
            tuples = conversation_tuples(Conversation(messages, id=f"bench{c}"))
            if len(tuples) != args.rounds:
                raise RuntimeError(f"conversation {c}: {len(tuples)} tuples for {args.rounds} rounds "
                                   "(a filter dropped some)")
            examples = [tokenize_tuple(t, self.tok, "offline", tuple_cfg) for t in tuples]
            packed = tokenize_conversation(tuples, self.tok, "offline", packed_cfg)
            if any(e is None for e in examples) or len(packed) != 1 or len(packed[0].tuples) != len(tuples):
                raise RuntimeError(f"conversation {c}: a layout dropped tuples or windowed the conversation")
            self.tuples += tuples
            self.tuple_examples += examples
            self.packed_examples += packed
            self.conversation_tokens += packed[0].trunk_len
        collate = HindsightCollator.from_tokenizer(self.tok)
        self.tuple_batch = collate(self.tuple_examples)
        self.packed_batch = collate(self.packed_examples)
        self.pad_id = collate.pad_token_id
        self.sft_rows = [_sft_labels(e) for e in self.packed_examples]

    def describe(self) -> dict:
        return {
            "conversations": len(self.packed_examples),
            "tuples": len(self.tuple_examples),
            "conversation_tokens": self.conversation_tokens,
            "student_branches": sum(len(e.student_branches) for e in self.packed_examples),
            "scored_tokens": sum(len(e.target_ids) for e in self.tuple_examples),
            "per_tuple_student_lengths": [len(e.student_ids) for e in self.tuple_examples],
            "per_tuple_teacher_lengths": [len(e.teacher_ids) for e in self.tuple_examples],
            "reply_lengths": [len(e.response_ids) for e in self.tuple_examples],
        }


# ---------------------------------------------------------------- model and work counts
def build_model(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(args.device)
    cfg = Qwen2Config(**CONFIGS[args.config], attn_implementation=args.attn)
    torch.manual_seed(args.seed)
    with device:  # initialise on the device: the 0.5B shape would be slow to build on a CPU
        model = Qwen2ForCausalLM(cfg)
    return model.to(DTYPES[args.dtype]).train()


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _branch_pairs(offset: int, n: int) -> int:
    """Pairs of a branch of n tokens attending ``offset`` prefix tokens and itself causally."""
    return n * offset + _causal_pairs(n)


def work_counts(data: Data, kind: str) -> dict:
    """Tokens, logit rows and attended pairs computed by each side (what the FLOP estimate uses)."""
    scored = sum(len(e.target_ids) for e in data.tuple_examples)
    if kind == "naive":
        s = [len(e.student_ids) for e in data.tuple_examples]
        t = [len(e.teacher_ids) for e in data.tuple_examples]
        return dict(student_tokens=sum(s), teacher_tokens=sum(t), student_logit_rows=sum(s),
                    teacher_logit_rows=sum(t), student_pairs=sum(map(_causal_pairs, s)),
                    teacher_pairs=sum(map(_causal_pairs, t)), teacher_tokens_saved=0)
    if kind == "hsd-tuple":
        ex = data.tuple_examples
        return dict(student_tokens=sum(len(e.student_ids) for e in ex),
                    teacher_tokens=sum(len(e.teacher_suffix_ids) for e in ex),
                    student_logit_rows=scored, teacher_logit_rows=scored,
                    student_pairs=sum(_causal_pairs(len(e.student_ids)) for e in ex),
                    teacher_pairs=sum(_branch_pairs(e.prefix_len, len(e.teacher_suffix_ids)) for e in ex),
                    teacher_tokens_saved=sum(e.prefix_len for e in ex))
    if kind == "hsd-packed":
        ex = data.packed_examples
        tuples = [t for e in ex for t in e.tuples]
        return dict(student_tokens=sum(len(e.input_ids) for e in ex),
                    teacher_tokens=sum(len(t.teacher_suffix_ids) for t in tuples),
                    student_logit_rows=scored, teacher_logit_rows=scored,
                    student_pairs=sum(_causal_pairs(e.trunk_len) + sum(_branch_pairs(b.attach, b.end - b.start)
                                                                       for b in e.student_branches) for e in ex),
                    teacher_pairs=sum(_branch_pairs(t.prefix_offset, len(t.teacher_suffix_ids)) for t in tuples),
                    teacher_tokens_saved=sum(t.prefix_offset for t in tuples))
    if kind == "sft":
        n = [len(ids) for ids, _ in data.sft_rows]
        return dict(student_tokens=sum(n), teacher_tokens=0, student_logit_rows=sum(n), teacher_logit_rows=0,
                    student_pairs=sum(map(_causal_pairs, n)), teacher_pairs=0, teacher_tokens_saved=0)
    raise ValueError(kind)


def flop_estimate(model, work: dict) -> float:
    cfg = model.config
    layer_params = sum(p.numel() for p in model.model.layers.parameters())
    head = cfg.vocab_size * cfg.hidden_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim

    def forward(side):
        return (2 * layer_params * work[f"{side}_tokens"] + 2 * head * work[f"{side}_logit_rows"]
                + attn * work[f"{side}_pairs"])

    return 3 * forward("student") + forward("teacher")


# ---------------------------------------------------------------- timing and memory
def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class StepMemory:
    """Peak memory of the steps of one row, bytes: ``peak`` and ``extra`` = peak - baseline.

    CUDA: per step, ``max_memory_allocated`` over ``memory_allocated`` at its start (the caching
    allocator's counters are exact). CPU: the baseline is the RSS before the row's first step
    (its model and data loaded, no step run yet), when VmHWM is reset through
    ``/proc/self/clear_refs``; the peak is VmHWM after each step, so it covers every step so far.
    Measuring each step from its own start instead would under-count: malloc keeps memory freed
    by the previous step mapped, and the next step reuses it without raising the RSS.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline: int | None = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.baseline is None:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.baseline = _proc_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.extra = self.peak - self.start
        else:
            self.peak = _proc_kib("VmHWM") * 1024
            self.extra = self.peak - self.baseline


class Phases:
    """Wall and CPU time per phase of a step (only with --breakdown; synchronises the device)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.times, self.cpu_times = device, enabled, {}, {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self.sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
            self.cpu_times[name] = self.cpu_times.get(name, 0.0) + time.process_time() - cpu_start


_PHASES: Phases | None = None  # the phases of the step in progress (one step at a time per process)


def _instrument_hsd_forward() -> None:
    """Wrap hsd.forward's pass functions so a step's phases are timed (benchmark-only; a
    function a future hsd renames is simply not timed on its own)."""
    for attr, phase in (("_student_pass", "student_forward"), ("_prefill", "teacher_forward"),
                        ("_teacher_masked", "teacher_forward"), ("_teacher_loop", "teacher_forward"),
                        ("_teacher_full", "teacher_forward")):
        fn = getattr(hsd.forward, attr, None)
        if fn is None or getattr(fn, "_bench_wrapped", False):
            continue

        def wrapped(*a, _fn=fn, _phase=phase, **k):
            if _PHASES is None:
                return _fn(*a, **k)
            with _PHASES(_phase):
                return _fn(*a, **k)

        wrapped._bench_wrapped = True
        setattr(hsd.forward, attr, wrapped)


class TimedLoss(hsd.HindsightLoss):
    """The step's loss module, its forward timed as the ``loss_forward`` phase."""

    def forward(self, *a, **k):
        if _PHASES is None:
            return super().forward(*a, **k)
        with _PHASES("loss_forward"):
            return super().forward(*a, **k)


# ---------------------------------------------------------------- the rows
def row_names(args) -> list[str]:
    return ["naive", "hsd-tuple", *[f"hsd-packed-{s}" for s in args.strategy], "sft"]


class Row:
    """One row's step on the shared data and model."""

    def __init__(self, name: str, data: Data, model, args):
        self.name, self.data, self.model, self.args = name, data, model, args
        self.device = torch.device(args.device)
        self.loss_options = {"mode": args.mode}
        to = lambda batch: {k: v.to(self.device) for k, v in batch.items()}  # noqa: E731
        if name == "naive":
            self.kind = "naive"
            self.sequences = []
            for e in data.tuple_examples:
                as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
                self.sequences.append((as_tensor([e.student_ids]), as_tensor(e.student_scored_positions),
                                       as_tensor([e.teacher_ids]), as_tensor(e.teacher_scored_positions),
                                       as_tensor(e.target_ids)))
        elif name == "hsd-tuple":
            self.kind, self.batch, self.strategy = "hsd-tuple", to(data.tuple_batch), "auto"
        elif name.startswith("hsd-packed-"):
            self.kind, self.batch, self.strategy = "hsd-packed", to(data.packed_batch), name.removeprefix("hsd-packed-")
        elif name == "sft":
            self.kind = "sft"
            width = max(len(ids) for ids, _ in data.sft_rows)
            ids = torch.full((len(data.sft_rows), width), data.pad_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for r, (row_ids, row_labels) in enumerate(data.sft_rows):
                ids[r, : len(row_ids)] = torch.tensor(row_ids)
                labels[r, : len(row_labels)] = torch.tensor(row_labels)
                mask[r, : len(row_ids)] = 1
            self.sft = {"input_ids": ids.to(self.device), "labels": labels.to(self.device),
                        "attention_mask": mask.to(self.device)}
        else:
            raise ValueError(f"unknown row {name!r}")
        self.loss_fn = TimedLoss(**self.loss_options)
        self.work = work_counts(data, self.kind)
        self.flops = flop_estimate(model, self.work)
        self.counts: dict = {}
        self.memory = StepMemory(self.device)

    def _naive(self, phases: Phases) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        n = len(self.sequences)
        for s_ids, s_pos, t_ids, t_pos, targets in self.sequences:
            with phases("student_forward"):
                s_logits = self.model(input_ids=s_ids).logits[0]  # [tokens, V], materialised
            with phases("teacher_forward"), torch.no_grad():
                t_logits = self.model(input_ids=t_ids).logits[0]
            with phases("loss_forward"):
                # per-sequence mean, then the mean over tuples (the hsd steps' seq_mean)
                loss = hsd.hindsight_loss(s_logits[s_pos], t_logits[t_pos], targets, **self.loss_options) / n
            with phases("backward"):
                loss.backward()
            total += loss.detach()
            del s_logits, t_logits, loss
        return total

    def _hsd(self, phases: Phases) -> torch.Tensor:
        out = hsd.hindsight_step(self.model, self.batch, self.loss_fn, strategy=self.strategy)
        with phases("backward"):
            out.loss.backward()
        self.counts = out.counts
        return out.loss.detach()

    def _sft(self, phases: Phases) -> torch.Tensor:
        with phases("forward"):
            out = self.model(**self.sft)  # the model's own shifted cross-entropy on the labels
        with phases("backward"):
            out.loss.backward()
        return out.loss.detach()

    def step(self) -> dict:
        global _PHASES
        self.model.zero_grad(set_to_none=True)
        phases = Phases(self.device, self.args.breakdown)
        run = {"naive": self._naive, "hsd-tuple": self._hsd, "hsd-packed": self._hsd, "sft": self._sft}[self.kind]
        with self.memory as mem:
            _PHASES = phases
            try:
                phases.sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = run(phases)
                phases.sync()
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            finally:
                _PHASES = None
        return {"time_s": elapsed, "cpu_s": cpu, "peak_bytes": mem.peak, "step_bytes": mem.extra,
                "loss": float(loss), "phases": phases.times, "cpu_phases": phases.cpu_times}

    def info(self) -> dict:
        return {"work": self.work, "flops": self.flops}


class Setup:
    """Data and model of one process (a worker, or this process with --isolate none)."""

    def __init__(self, args):
        torch.set_grad_enabled(True)
        if args.threads:
            torch.set_num_threads(args.threads)
        _instrument_hsd_forward()
        self.data = Data(args)
        self.model = build_model(args)
        self.args = args

    def row(self, name: str) -> Row:
        return Row(name, self.data, self.model, self.args)


# ---------------------------------------------------------------- orchestration
def _worker(conn, name: str, args) -> None:
    try:
        setup = Setup(args)
        row = setup.row(name)
        conn.send(("ok", {**row.info(), "data": setup.data.describe(), "model": model_info(setup.model)}))
        while conn.recv() == "step":
            conn.send(("ok", row.step()))
    except BaseException:  # noqa: BLE001 - report every failure to the parent, then exit
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class ProcessRow:
    """A row in its own forked process (clean peak memory), driven step by step."""

    def __init__(self, ctx, name: str, args):
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, name, args), daemon=True)
        self.proc.start()
        child.close()

    def _recv(self):
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"row {self.name}: its worker exited (code {self.proc.exitcode})") from None
        if status != "ok":
            raise RuntimeError(f"row {self.name} failed in its worker:\n{payload}")
        return payload

    def info(self) -> dict:
        return self._recv()

    def step(self) -> dict:
        self.conn.send("step")
        return self._recv()

    def close(self) -> None:
        try:
            self.conn.send("quit")
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


class LocalRow:
    def __init__(self, setup: Setup, name: str):
        self.name, self.setup, self.row = name, setup, setup.row(name)

    def info(self) -> dict:
        return {**self.row.info(), "data": self.setup.data.describe(), "model": model_info(self.setup.model)}

    def step(self) -> dict:
        return self.row.step()

    def close(self) -> None:
        pass


def model_info(model) -> dict:
    cfg = model.config
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layer_parameters": sum(p.numel() for p in model.model.layers.parameters()),
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "tie_word_embeddings": cfg.tie_word_embeddings, "attn_implementation": cfg._attn_implementation}


def run(args) -> dict:
    names = row_names(args)
    if args.isolate == "process":
        # CPU: fork before any tensor work in this process (no OpenMP pool to inherit yet), so
        # the workers skip the imports; CUDA: spawn, since a library imported here may already
        # have touched the driver, which a forked child cannot use
        method = args.start_method or ("spawn" if torch.device(args.device).type == "cuda" else "fork")
        ctx = mp.get_context(method)
        rows = {name: ProcessRow(ctx, name, args) for name in names}
    else:
        setup = Setup(args)
        rows = {name: LocalRow(setup, name) for name in names}
    try:
        infos = {name: row.info() for name, row in rows.items()}
        first = infos[names[0]]
        for name, info in infos.items():  # every worker built the same conversations
            if info["data"] != first["data"]:
                raise RuntimeError(f"row {name} built different data from row {names[0]}")
        for _ in range(args.warmup):
            for row in rows.values():
                row.step()
        results = {name: [] for name in names}
        for r in range(args.steps):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate: no row always first
            for name in order:
                results[name].append(rows[name].step())
                if args.verbose:
                    print(f"  round {r} {name}: {results[name][-1]['time_s'] * 1e3:.1f} ms", file=sys.stderr,
                          flush=True)
    finally:
        for row in rows.values():
            row.close()
    return summarise(args, names, infos, results)


def summarise(args, names, infos, results) -> dict:
    rows = {}
    for name in names:
        steps = results[name]
        rows[name] = {
            "time_s": statistics.median(s["time_s"] for s in steps),
            "times_s": [s["time_s"] for s in steps],
            "cpu_s": statistics.median(s["cpu_s"] for s in steps),
            "cpu_times_s": [s["cpu_s"] for s in steps],
            # noise only ever adds time: the fastest step is a second estimate on a shared machine
            "min_time_s": min(s["time_s"] for s in steps),
            "min_cpu_s": min(s["cpu_s"] for s in steps),
            "peak_bytes": max(s["peak_bytes"] for s in steps),
            "step_bytes": max(s["step_bytes"] for s in steps),
            "loss": steps[-1]["loss"],
            "flops": infos[name]["flops"],
            **infos[name]["work"],
            "phases_s": _median_phases(steps, "phases", "time_s"),
            "cpu_phases_s": _median_phases(steps, "cpu_phases", "cpu_s"),
            "steps_phases_s": [s["phases"] for s in steps],
        }
    base = rows["naive"]
    for row in rows.values():
        row["time_vs_naive"] = row["time_s"] / base["time_s"]
        row["cpu_vs_naive"] = row["cpu_s"] / base["cpu_s"] if base["cpu_s"] > 0 else None
        row["flops_vs_naive"] = row["flops"] / base["flops"]
        row["step_bytes_vs_naive"] = row["step_bytes"] / base["step_bytes"] if base["step_bytes"] > 0 else None
        row["tokens_vs_naive"] = ((row["student_tokens"] + row["teacher_tokens"])
                                  / (base["student_tokens"] + base["teacher_tokens"]))
    packed = [n for n in names if n.startswith("hsd-packed-")]
    limit = TARGET_VS_NAIVE[args.template]

    def paired(name: str, other: str, key: str) -> float:
        # the median over rounds of the ratio within a round: slow drifts of the machine's load
        # cancel (every row runs once per round)
        field = {"time_s": "times_s", "cpu_s": "cpu_times_s"}[key]
        return statistics.median(a / b for a, b in zip(rows[name][field], rows[other][field]) if b > 0)

    def targets_by(key: str) -> dict:
        best = min(packed, key=lambda n: rows[n][key])
        return {
            "best_packed_row": best,
            "packed_vs_naive": rows[best][key] / rows["naive"][key],
            "packed_vs_naive_limit": limit,
            "packed_vs_sft": rows[best][key] / rows["sft"][key],
            "packed_vs_naive_paired": paired(best, "naive", key),
            "packed_vs_sft_paired": paired(best, "sft", key),
            "met_vs_naive": rows[best][key] <= limit * rows["naive"][key],
            "met_vs_sft": rows[best][key] <= rows["sft"][key],
            "per_row": {n: {"vs_naive": rows[n][key] / rows["naive"][key], "vs_sft": rows[n][key] / rows["sft"][key]}
                        for n in packed},
        }

    targets = {"clock": args.clock, **targets_by(CLOCKS[args.clock]),
               "by_clock": {clock: targets_by(key) for clock, key in CLOCKS.items()}}
    first = infos[names[0]]
    return {
        "benchmark": "bench_step",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "args": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                 for k, v in vars(args).items()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__, "hsd": hsd.__version__,
                        "machine": platform.machine(), "cpus": os.cpu_count(),
                        "torch_threads": args.threads or torch.get_num_threads(),
                        "device_name": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                                        else platform.processor() or platform.machine())},
        "model": first["model"],
        "data": first["data"],
        "rows": rows,
        "targets": targets,
    }


def _median_phases(steps: list[dict], field: str, total: str) -> dict:
    phases = {key: statistics.median(s[field].get(key, 0.0) for s in steps)
              for key in sorted({k for s in steps for k in s[field]})}
    if phases:  # what no phase covers (batch plumbing, gathers, statistics), step by step
        phases["other"] = statistics.median(s[total] - sum(s[field].values()) for s in steps)
    return phases


def print_table(report: dict) -> None:
    d, m, a = report["data"], report["model"], report["args"]
    print(f"bench_step: config={a['config']} ({m['parameters'] / 1e6:.1f}M params, {m['num_hidden_layers']} layers, "
          f"hidden {m['hidden_size']}, vocab {m['vocab_size']}, {m['attn_implementation']}) device={a['device']} "
          f"dtype={a['dtype']} template={a['template']} mode={a['mode']}")
    print(f"data: {d['conversations']} conversation(s), {d['tuples']} tuples, {d['conversation_tokens']} conversation "
          f"tokens, {d['student_branches']} student branches, {d['scored_tokens']} scored tokens; per-tuple student "
          f"lengths {d['per_tuple_student_lengths']}")
    print(f"median of {a['steps']} steps after {a['warmup']} warm-up, interleaved; isolate={a['isolate']}")
    header = (f"{'row':<18} {'wall ms':>9} {'x naive':>7} {'cpu ms':>9} {'x naive':>7} {'student tok':>11} "
              f"{'teacher tok':>11} {'tok x':>6} {'GFLOP':>8} {'flop x':>6} {'step MiB':>9} {'mem x':>6} {'loss':>10}")
    print(header)
    print("-" * len(header))
    for name, r in report["rows"].items():
        mem_x = f"{r['step_bytes_vs_naive']:.2f}" if r["step_bytes_vs_naive"] is not None else "-"
        cpu_x = f"{r['cpu_vs_naive']:.3f}" if r["cpu_vs_naive"] is not None else "-"
        print(f"{name:<18} {r['time_s'] * 1e3:>9.1f} {r['time_vs_naive']:>7.3f} {r['cpu_s'] * 1e3:>9.1f} {cpu_x:>7} "
              f"{r['student_tokens']:>11} {r['teacher_tokens']:>11} {r['tokens_vs_naive']:>6.2f} "
              f"{r['flops'] / 1e9:>8.2f} {r['flops_vs_naive']:>6.3f} {r['step_bytes'] / 2**20:>9.1f} {mem_x:>6} "
              f"{r['loss']:>10.5f}")
    clock = report["targets"]["clock"]
    field = "phases_s" if clock == "wall" else "cpu_phases_s"
    if any(r[field] for r in report["rows"].values()):
        keys = ["student_forward", "teacher_forward", "loss_forward", "forward", "backward", "other"]
        print(f"\nphases, median {clock} ms: {'row':<8} " + " ".join(f"{k:>15}" for k in keys))
        for name, r in report["rows"].items():
            ph = r[field]
            print(f"{name:<35} " + " ".join(f"{ph[k] * 1e3:>15.1f}" if k in ph else f"{'-':>15}" for k in keys))
    print()
    for name, t in report["targets"]["by_clock"].items():
        print(f"target ({name} time{', the --clock' if name == clock else ''}): {t['best_packed_row']} = "
              f"{t['packed_vs_naive']:.3f}x naive (limit {t['packed_vs_naive_limit']}: "
              f"{'met' if t['met_vs_naive'] else 'MISSED'}), {t['packed_vs_sft']:.3f}x sft (limit 1: "
              f"{'met' if t['met_vs_sft'] else 'MISSED'}); per-round ratios, median: "
              f"{t['packed_vs_naive_paired']:.3f}x naive, {t['packed_vs_sft_paired']:.3f}x sft")


def _token_range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH token counts, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    p.add_argument("--template", choices=sorted(TEMPLATE_KWARGS), default="chatml")
    p.add_argument("--rounds", type=int, default=None, help="user/assistant exchanges (= tuples), 1 to 8 (default 5)")
    p.add_argument("--conversations", type=int, default=1, help="conversations per batch")
    p.add_argument("--user-tokens", type=_token_range, default=(60, 300), metavar="LOW-HIGH")
    p.add_argument("--assistant-tokens", type=_token_range, default=(150, 600), metavar="LOW-HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", nargs="+", choices=["auto", "masked", "loop"], default=["masked", "loop"],
                   help="teacher strategies of the hsd-packed rows (one row each)")
    p.add_argument("--mode", default="sampled", choices=["sampled", "full"], help="hindsight loss mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa", help="attention implementation")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="time the targets are judged on: wall, or this process's CPU time (on a shared "
                        "CPU with --threads 1, CPU time is what other processes do not inflate)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--isolate", choices=["process", "none"], default=None,
                   help="one forked worker per row (default; clean peak memory) or all rows in this process")
    p.add_argument("--start-method", choices=["fork", "spawn"], default=None,
                   help="how workers start (default: fork on a CPU, spawn for CUDA)")
    p.add_argument("--breakdown", action="store_true", help="also time the phases of each step")
    p.add_argument("--smoke", action="store_true",
                   help="check the script: 1 round (unless --rounds), 1 step, tiny lengths, in this process "
                        "(unless --isolate)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--verbose", action="store_true", help="print each step's time to stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps, args.warmup = args.rounds or 1, 1, 1
        args.user_tokens, args.assistant_tokens = (8, 16), (12, 24)
        args.isolate = args.isolate or "none"
        args.breakdown = True
    args.isolate = args.isolate or "process"
    args.rounds = args.rounds or 5
    if not 1 <= args.rounds <= 8:
        p.error("--rounds must be 1 to 8")
    if args.steps < 1 or args.warmup < 0 or args.conversations < 1:
        p.error("--steps >= 1, --warmup >= 0 and --conversations >= 1")
    args.strategy = list(dict.fromkeys(args.strategy))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
