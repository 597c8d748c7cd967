"""Online learning from follow-ups: the model answers, the user replies, one hindsight step.

The paper's personalisation loop (METHOD.md §4): sample y from the current policy
(temperature 1), obtain the user's follow-up o, and take one optimiser step of hindsight
self-distillation on (x, y, o). :class:`OnlineDistiller` holds the model (a LoRA adapter by
default, so one base model serves many users' adapters), its optimiser and the safety nets;
:func:`run_online` drives it over prompts with any ``user(messages, response) -> followup``.

Every step goes through :func:`hsd.forward.hindsight_hidden_states` (the shared-prefix pass)
and :func:`hsd.fused_hindsight_loss` (the fused kernels), as offline training does.

Stability options (METHOD.md §7, measured beyond the paper; see :meth:`OnlineConfig.stable`):

* ``loss_mode``: ``"sampled"`` (the paper's estimator), ``"full"`` or ``"topk"``. The sampled
  estimator cannot move a policy that is already peaked on another answer (the wanted tokens
  are never sampled); forward KL to the teacher's full distribution can.
* ``anchor``: coefficient c of c·KL(reference ‖ student) on the reply tokens, the reference
  being the adapter-disabled model (LoRA) or a frozen copy of the initial weights (full
  fine-tuning). Without it the self-teacher degrades with the student.
* ``gate``: which follow-ups to learn from: all (the paper), or skip / down-weight neutral ones
  ("thanks"), by a built-in rule or a callable. Neutral follow-ups push already-right replies
  away.
* teacher-health monitoring: per step, teacher and student entropy on y, the repeated-token
  rate of y, KL to the reference; ``health_check(distiller, stats) -> bool`` every
  ``health_every`` steps rolls the adapter (and optimiser) back to its last good state when it
  fails.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .checkpoint import atomic_directory
from .data import (ChatRenderer, DataError, DataReport, HindsightCollator, InteractionTuple, LayoutConfig,
                   tokenize_tuple)
from .data.render import ChatTemplateError
from .forward import EMATeacher, TreeBatch, _ModelView, _student_mask, hindsight_hidden_states
from .loss import fused_hindsight_loss
from .step import lm_head_of

__all__ = [
    "OnlineConfig",
    "OnlineDistiller",
    "LearnResult",
    "Response",
    "OnlineRun",
    "TeacherHealth",
    "run_online",
    "is_neutral_followup",
    "reference_hidden_states",
    "user_directory",
    "chat_prompt_ids",
    "generate_replies",
]

logger = logging.getLogger("hsd")

LOSS_MODES = ("sampled", "full", "topk")
GATES = ("all", "skip_neutral", "downweight_neutral")
_FORMAT_VERSION = 1
_RECENT = 1000  # steps of stats kept for health checks
_STATE_FILE = "hsd_online.json"
_WEIGHTS_FILE = "trainable.safetensors"
_OPTIMIZER_FILE = "optimizer.pt"

#: Follow-ups made only of these words (and punctuation/emoji) carry no information about the
#: reply: the built-in neutral rule of the gate.
NEUTRAL_WORDS = frozenset(
    "thanks thank you thx ty cheers ok okay k great cool nice perfect awesome good got it sounds "
    "alright fine sure yes yep yeah bye goodbye much so very lot appreciated appreciate love wonderful "
    "excellent amazing super brilliant noted understood".split()
)


def is_neutral_followup(followup: str, max_words: int = 8) -> bool:
    """The built-in gate rule: a short follow-up of acknowledgement words only ("thanks!",
    "ok great", "perfect, thank you 👍") says nothing about how the reply should change."""
    words = re.findall(r"[a-z']+", followup.lower())
    return len(words) <= max_words and all(w.strip("'") in NEUTRAL_WORDS for w in words)


# ---- configuration --------------------------------------------------------------------------


@dataclass
class OnlineConfig:
    """Settings of :class:`OnlineDistiller`. The defaults are the paper's live trainer
    (METHOD.md §4); :meth:`stable` is what the online evidence of METHOD.md §7 supports.

    Generation: ``temperature`` (1.0: on-policy samples, as the paper), ``top_p``, ``top_k``
    (0: off), ``max_new_tokens``, ``generation_kwargs`` (passed to ``model.generate``).

    Layout: ``template`` (hindsight block: ``"online"``, ``"offline"`` or a format string with
    ``{followup}``), ``history_messages`` (x keeps its last k messages; the paper: 5),
    ``max_prompt_tokens``, ``max_followup_tokens``, ``max_response_tokens`` (an interaction
    over a budget is skipped and counted, never cut), ``ignore_first_k`` (unscored first reply
    tokens; 0 online: every sampled token is on-policy), ``chat_template_kwargs``.

    Training: ``adapter`` ``"lora"`` (peft; ``lora_r``, ``lora_alpha``, ``lora_dropout``,
    ``lora_target_modules``: the authors' r=64, alpha=128 on attention and MLP projections) or
    ``"full"`` fine-tuning; ``lr`` (1e-5), ``weight_decay``, ``max_grad_norm`` (1.0; None: no
    clipping); ``teacher`` ``"live"`` (the paper), ``"ema"`` (``ema_rate``) or ``"base"``;
    ``strategy`` (see :func:`hsd.forward.hindsight_hidden_states`).

    Loss: ``loss_mode`` (``"sampled"``, ``"full"``, ``"topk"``), ``alpha`` (full/topk: 0 forward
    KL(teacher‖student), 1 reverse KL), ``topk``, ``center`` (per-sequence mean-centred A_t,
    sampled mode; the authors' live trainer), ``signal_clip``, ``loss_options`` (any other
    :func:`hsd.fused_hindsight_loss` option).

    Stability: ``anchor`` (c of c·KL(reference‖student) on the reply tokens; 0 = the paper),
    ``gate`` (``"all"``, ``"skip_neutral"``, ``"downweight_neutral"`` with
    ``neutral_weight``, or a callable ``(messages, response, followup) -> bool | float`` in
    [0, 1]: False/0 skips, a fraction down-weights), ``monitor`` (per-step teacher-health
    statistics), ``monitor_reference`` (also KL to the reference when no anchor computes it:
    one more no-grad forward), ``health_check`` (``(distiller, stats) -> bool``, run every
    ``health_every`` steps; a failure rolls back to the last state that passed), ``undo_depth``
    (steps :meth:`OnlineDistiller.undo` can revert; each keeps a copy of the trainable weights
    and optimiser state).
    """

    # generation
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    generation_kwargs: dict = field(default_factory=dict)
    # layout
    template: str = "online"
    history_messages: int | None = 5
    max_prompt_tokens: int | None = None
    max_followup_tokens: int | None = 512
    max_response_tokens: int | None = 2048
    ignore_first_k: int = 0
    chat_template_kwargs: dict = field(default_factory=dict)
    end_of_turn_token: str | None = None
    # training
    adapter: str = "lora"
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.0
    lora_target_modules: Any = "all-linear"
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    teacher: str = "live"
    ema_rate: float = 0.05
    strategy: str = "auto"
    # loss
    loss_mode: str = "sampled"
    alpha: float = 0.0
    topk: int | None = 64
    center: bool = True
    signal_clip: float | None = None
    loss_options: dict = field(default_factory=dict)
    # stability
    anchor: float = 0.0
    gate: Any = "all"
    neutral_weight: float = 0.25
    monitor: bool = True
    monitor_reference: bool = True
    health_check: Callable | None = None
    health_every: int = 1
    undo_depth: int = 0
    seed: int | None = None

    def __post_init__(self):
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        if self.adapter not in ("lora", "full"):
            raise ValueError(f"adapter must be 'lora' or 'full', got {self.adapter!r}")
        if self.teacher not in ("live", "ema", "base"):
            raise ValueError(f"teacher must be 'live', 'ema' or 'base', got {self.teacher!r}")
        if self.teacher == "base" and self.adapter != "lora":
            raise ValueError("teacher='base' is the adapter-disabled model: it needs adapter='lora'")
        if not (isinstance(self.gate, str) and self.gate in GATES) and not callable(self.gate):
            raise ValueError(f"gate must be one of {GATES} or a callable (messages, response, followup) -> weight, "
                             f"got {self.gate!r}")
        for name in ("anchor", "lr", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.neutral_weight <= 1.0:
            raise ValueError(f"neutral_weight must be in [0, 1], got {self.neutral_weight}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.health_every < 1 or self.undo_depth < 0:
            raise ValueError("health_every must be >= 1 and undo_depth >= 0")
        if self.health_check is not None and not callable(self.health_check):
            raise ValueError("health_check must be a callable (distiller, stats) -> bool")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    @classmethod
    def paper(cls, **overrides) -> "OnlineConfig":
        """The authors' live trainer: sampled estimator, mean-centred A_t, LoRA r=64 alpha=128,
        lr 1e-5, grad-norm 1.0, learn from every follow-up, no anchor (the default)."""
        return cls(**overrides)

    @classmethod
    def stable(cls, **overrides) -> "OnlineConfig":
        """What the online evidence supports (METHOD.md §7): forward KL(teacher‖student) over
        the full vocabulary (flips an already peaked policy, which the sampled estimator cannot),
        0.2·KL(base‖student) anchor (keeps the self-teacher healthy), neutral follow-ups
        skipped (they pushed already-right replies away)."""
        base = dict(loss_mode="full", alpha=0.0, anchor=0.2, gate="skip_neutral")
        return cls(**{**base, **overrides})

    def layout(self) -> LayoutConfig:
        return LayoutConfig(history_messages=self.history_messages, max_prompt_tokens=self.max_prompt_tokens,
                            max_followup_tokens=self.max_followup_tokens,
                            max_response_tokens=self.max_response_tokens, ignore_first_k=self.ignore_first_k,
                            chat_template_kwargs=dict(self.chat_template_kwargs),
                            end_of_turn_token=self.end_of_turn_token)

    def summary(self) -> dict:
        """The JSON-serialisable settings (callables by name), saved with an adapter."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if callable(value):
                value = getattr(value, "__qualname__", type(value).__name__)
            elif isinstance(value, (set, tuple)):
                value = list(value)
            out[f.name] = value
        return out


# ---- results --------------------------------------------------------------------------------


@dataclass
class Response:
    """A sampled reply: its text, its token ids, and whether it ended with the end-of-turn
    token (``finished``) or ran into ``max_new_tokens``."""

    text: str
    ids: list[int]
    finished: bool


@dataclass
class LearnResult:
    """What one call of :meth:`OnlineDistiller.learn_batch` did.

    ``stats``: ``step`` (optimiser steps so far), ``learned`` / ``skipped`` (interactions),
    ``loss``, ``distill_loss``, ``anchor_loss``, ``mean_advantage``,
    ``frac_positive_advantage``, ``mean_divergence``, ``scored_tokens``, ``grad_norm``,
    teacher-health figures (``teacher_entropy``, ``student_entropy``, ``repeated_token_rate``,
    ``kl_to_reference``), ``health`` (the check's verdict or None) and ``rolled_back``.
    ``interactions``: one dict per input, ``learned``, ``skip_reason``, ``weight`` and, when
    learned, the per-token ``tokens``, ``advantage``, ``student_logp``, ``teacher_logp``,
    ``divergence``. ``skips``: skipped interactions by reason.
    """

    stats: dict
    interactions: list[dict]
    skips: Counter = field(default_factory=Counter)

    @property
    def stepped(self) -> bool:
        return self.stats.get("learned", 0) > 0


@dataclass
class _Prepared:
    batch: dict
    examples: list
    weights: list[float]
    rows: list[int]  # input index of each example


@dataclass
class _Snapshot:
    trainable: dict
    optimizer: dict
    step: int
    ema: dict | None


# ---- the reference pass and statistics ------------------------------------------------------


@torch.no_grad()
def reference_hidden_states(model: nn.Module, batch: dict, reference: nn.Module | None = None) -> torch.Tensor:
    """Final hidden states of the reference model at the student's scored positions [N, H].

    The reference is ``model`` with its peft adapter disabled (``reference=None``) or a separate
    frozen model. It runs the student rows (the same tree mask as the student pass), without
    grad; row n is the state that predicts ``batch["target_ids"][n]``.
    """
    target = reference if reference is not None else model
    view = _ModelView(target)
    device = view.decoder.get_input_embeddings().weight.device
    tb = TreeBatch.from_batch(batch, device)
    if reference is None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("the adapter-disabled reference needs a peft model; pass reference= for full fine-tuning")
        context = model.disable_adapter()
    else:
        context = nullcontext()
    with context:
        hidden, _ = view.run(tb.input_ids, tb.position_ids, _student_mask(view, tb))
    return hidden[tb.scored_batch_index, tb.student_scored_positions]


@torch.no_grad()
def _entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Entropy of softmax(hidden @ weight.T + bias) per row, in row chunks (~64 MiB of logits)."""
    chunk = max(1, (1 << 24) // max(1, weight.shape[0]))
    out = []
    for start in range(0, hidden.shape[0], chunk):
        logits = hidden[start : start + chunk].float() @ weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        logp = torch.log_softmax(logits, -1)
        out.append(-(logp.exp() * logp).sum(-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def repeated_token_rate(ids: Sequence[int]) -> float:
    """Fraction of tokens equal to the token just before them ("the the the" collapse)."""
    if len(ids) < 2:
        return 0.0
    return sum(a == b for a, b in zip(ids[1:], ids[:-1])) / (len(ids) - 1)


def _per_sequence_mean(values: torch.Tensor, seq: torch.Tensor, num: int) -> torch.Tensor:
    total = torch.zeros(num, dtype=torch.float64, device=values.device).index_add_(0, seq, values.double())
    count = torch.zeros(num, dtype=torch.float64, device=values.device).index_add_(
        0, seq, torch.ones_like(values, dtype=torch.float64))
    return total / count.clamp_min(1)


# ---- per-user directories ------------------------------------------------------------------


def user_directory(root: str | os.PathLike, user: str) -> Path:
    """Where ``user``'s adapter lives under ``root``: a readable, filesystem-safe name plus a
    hash of the exact key (two keys never share a directory)."""
    if not isinstance(user, str) or not user:
        raise ValueError(f"a user key must be a non-empty string, got {user!r}")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", user).strip("._")[:48] or "user"
    return Path(root) / f"{safe}-{hashlib.sha256(user.encode()).hexdigest()[:10]}"


# ---- the distiller ---------------------------------------------------------------------------


class OnlineDistiller:
    """One model learning online from follow-ups (see the module docstring).

    Args:
        model: a Hugging Face causal LM (or a peft model, whose adapter is then trained).
            With ``adapter="lora"`` a plain model is wrapped with a fresh LoRA adapter (its base
            weights are frozen and stay bit-identical).
        tokenizer: its tokenizer, with a chat template (a clear error otherwise).
        config: an :class:`OnlineConfig` (default: the paper's live trainer).

    Example::

        distiller = OnlineDistiller(model, tokenizer, OnlineConfig.stable())
        reply = distiller.respond([{"role": "user", "content": "Summarise: ..."}])
        result = distiller.learn(messages, reply, "Shorter, please.")
        distiller.save_user("adapters", "alice")
    """

    def __init__(self, model: nn.Module, tokenizer, config: OnlineConfig | None = None):
        self.config = config = config or OnlineConfig()
        self.tokenizer = tokenizer
        # no chat template -> ChatTemplateError here, before any sampling
        self.renderer = ChatRenderer.for_tokenizer(tokenizer, config.chat_template_kwargs, config.end_of_turn_token)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.model = self._wrap(model)
        self.model.eval()  # dropout off: the teacher reuses the student's keys/values exactly
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("the model has no trainable parameter (a peft model with a frozen adapter?)")
        self.reference = None
        if config.adapter == "full" and (config.anchor > 0 or (config.monitor and config.monitor_reference)):
            # full fine-tuning keeps a frozen copy of the initial weights as the reference
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ema = EMATeacher(self.model, config.ema_rate) if config.teacher == "ema" else None
        self.collator = HindsightCollator.from_tokenizer(tokenizer)
        self.optimizer = self._new_optimizer()
        self.step_count = 0
        self.counts: Counter = Counter()  # skips by reason, steps, rollbacks, over the lifetime
        if self.reference is not None and self.ema is None:
            # the frozen reference holds the initial weights already: no second full copy
            ref = dict(self.reference.named_parameters())
            self._initial = _Snapshot({n: ref[n] for n in self.trainable}, copy.deepcopy(self.optimizer.state_dict()),
                                      0, None)
        else:
            self._initial = self._snapshot()
        self._last_good = self._initial
        self._history: list[_Snapshot] = []
        self._recent: list[dict] = []
        self._good_recent = 0

    # -- set-up --
    def _wrap(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        if cfg.adapter == "full":
            if hasattr(model, "disable_adapter"):
                raise ValueError("adapter='full' got a peft model; pass the base model (or use adapter='lora')")
            model.requires_grad_(True)
            return model
        if hasattr(model, "disable_adapter"):  # already a peft model: train its adapter
            return model
        try:
            import peft
        except ImportError as e:
            raise ImportError("adapter='lora' needs peft (pip install peft), or use adapter='full'") from e
        lora = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                               target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
        with warnings.catch_warnings():
            # peft 0.21 reads a property transformers 5 deprecated: noise for every chat start
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return peft.get_peft_model(model, lora)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(self.trainable.values()), lr=self.config.lr,
                                 weight_decay=self.config.weight_decay)

    @property
    def device(self) -> torch.device:
        return next(iter(self.trainable.values())).device

    # -- sampling --
    def _prompt_ids(self, messages: list[dict]) -> list[int]:
        _check_messages(messages)
        return chat_prompt_ids(self.tokenizer, messages, self.config.chat_template_kwargs)

    def respond_batch(self, conversations: Sequence[list[dict]]) -> list[Response]:
        """Sample one reply per conversation from the current policy (left-padded batch)."""
        cfg = self.config
        prompts = [self._prompt_ids(m) for m in conversations]
        stop = [self.renderer.end_of_turn_id]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in stop:
            stop.append(self.tokenizer.eos_token_id)
        sample = cfg.temperature > 0
        kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample)
        if sample:
            kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
        kwargs.update(cfg.generation_kwargs)
        return generate_replies(self.model, self.tokenizer, prompts, stop, self.collator.pad_token_id, **kwargs)

    def respond(self, messages: list[dict], return_details: bool = False):
        """Sample a reply to ``messages`` (temperature ``config.temperature``); the text, or a
        :class:`Response` with its ids and whether it finished within ``max_new_tokens``."""
        response = self.respond_batch([messages])[0]
        return response if return_details else response.text

    # -- learning --
    def learn(self, messages: list[dict], response: str, followup: str) -> LearnResult:
        """One hindsight step on one interaction (x = ``messages``, y = ``response``,
        o = ``followup``); see :meth:`learn_batch`."""
        return self.learn_batch([(messages, response, followup)])

    def _gate_weight(self, messages, response, followup) -> float:
        gate = self.config.gate
        if not callable(gate):
            if gate == "all" or not is_neutral_followup(followup):
                return 1.0
            return 0.0 if gate == "skip_neutral" else self.config.neutral_weight
        try:
            value = gate(messages, response, followup)
        except Exception as e:  # a user's gate must not end a long run: counted and logged
            raise _GateError(f"{type(e).__name__}: {e}") from e
        if isinstance(value, bool):
            return 1.0 if value else 0.0
        if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            # a wrong return type is a programming error, not a bad interaction
            raise TypeError(f"the gate must return a bool or a weight in [0, 1], got {value!r}")
        return float(value)

    def _prepare(self, interactions, records: list[dict], skips: Counter) -> _Prepared | None:
        layout = self.config.layout()
        examples, weights, rows = [], [], []
        for i, item in enumerate(interactions):
            record = records[i]

            def skip(reason, detail=None):
                record.update(learned=False, skip_reason=reason)
                skips[reason] += 1
                if detail:
                    logger.warning("hsd online: skipped an interaction (%s): %s", reason, detail)

            try:
                messages, response, followup = item
            except (TypeError, ValueError):
                raise TypeError(f"interaction {i} must be (messages, response, followup), got {item!r}") from None
            if not isinstance(response, str) or not isinstance(followup, str):
                raise TypeError(f"interaction {i}: response and followup must be strings")
            _check_messages(messages)
            if not followup.strip():
                skip("empty_followup")
                continue
            if not response.strip():
                skip("empty_response")
                continue
            try:
                weight = self._gate_weight(messages, response, followup)
            except _GateError as e:
                skip("gate_error", str(e))
                continue
            record["weight"] = weight
            if weight == 0.0:
                skip("gated_neutral")
                continue
            t = InteractionTuple(x=list(messages), y=response, o=followup, conversation_id="online",
                                 turn_index=0, message_index=len(messages))
            report = DataReport()
            try:
                example = tokenize_tuple(t, self.renderer, self.config.template, layout, report)
            except ChatTemplateError as e:
                skip("template_error", str(e))
                continue
            if example is None:
                reason = next(iter(report.dropped_tuples), "dropped")
                skip(reason)
                continue
            if not example.target_ids:
                skip("no_scored_tokens")
                continue
            if example.prefix_len < 1:  # the teacher must continue a shared prefix (hsd.forward)
                skip("no_shared_prefix", "the student and teacher renderings share no first token")
                continue
            examples.append(example)
            weights.append(weight)
            rows.append(i)
        if not examples:
            return None
        return _Prepared(self.collator(examples), examples, weights, rows)

    def _loss(self, prepared: _Prepared, monitor: bool) -> tuple[torch.Tensor, dict, dict]:
        """Total loss (distillation + anchor), scalar stats and per-token info."""
        cfg = self.config
        teacher_model = self.ema if cfg.teacher == "ema" else None
        hs = hindsight_hidden_states(self.model, prepared.batch, teacher=cfg.teacher, teacher_model=teacher_model,
                                     strategy=cfg.strategy)
        weight, bias = lm_head_of(self.model)
        t_weight = t_bias = None
        if teacher_model is not None:
            t_weight, t_bias = lm_head_of(teacher_model.module)
            t_weight = t_weight.detach()
            t_bias = t_bias.detach() if t_bias is not None else None
        seq = hs.seq_ids
        num = len(prepared.examples)
        targets = hs.target_ids.to(weight.device)
        # Per-sequence token mean, then mean over sequences (the paper's reduction), each
        # sequence scaled by its gate weight: expressed as per-token weights under "sum"
        # ("seq_mean" would normalise a per-sequence weight away).
        counts = torch.bincount(seq, minlength=num).clamp_min(1).to(torch.float64)
        gate = torch.tensor(prepared.weights, dtype=torch.float64, device=seq.device)
        token_w = (gate[seq] / (counts[seq] * num)).to(torch.float32)
        options = dict(mode=cfg.loss_mode, alpha=cfg.alpha, center=cfg.center and cfg.loss_mode == "sampled",
                       signal_clip=cfg.signal_clip)
        if cfg.loss_mode == "topk":
            options["topk"] = cfg.topk
        options.update(cfg.loss_options)
        options.update(reduction="sum", weights=token_w, seq_ids=seq, return_stats=True)
        distill, info = fused_hindsight_loss(hs.student, hs.teacher, weight, targets, bias=bias,
                                             teacher_weight=t_weight, teacher_bias=t_bias, **options)
        total = distill
        stats = {"distill_loss": float(distill.detach())}
        ref_hidden = None
        need_reference = cfg.anchor > 0 or (monitor and cfg.monitor_reference and
                                            (cfg.adapter == "lora" or self.reference is not None))
        if need_reference:
            ref_hidden = reference_hidden_states(self.model, prepared.batch, self.reference)
            ref_weight, ref_bias = (weight.detach(), None if bias is None else bias.detach())
            if self.reference is not None:
                ref_weight, ref_bias = lm_head_of(self.reference)
            plain_w = (1.0 / (counts[seq] * num)).to(torch.float32)
            kl_options = dict(mode="full", alpha=0.0, reduction="sum", weights=plain_w, seq_ids=seq)
            if cfg.anchor > 0:
                # KL(reference ‖ student): forward KL with the reference in the teacher's seat
                anchor = fused_hindsight_loss(hs.student, ref_hidden.to(hs.student.dtype), weight, targets, bias=bias,
                                              teacher_weight=ref_weight.detach(),
                                              teacher_bias=None if ref_bias is None else ref_bias.detach(),
                                              **kl_options)
                total = total + cfg.anchor * anchor
                stats["anchor_loss"] = float(anchor.detach())
                stats["kl_to_reference"] = stats["anchor_loss"]
            else:
                with torch.no_grad():
                    kl = fused_hindsight_loss(hs.student.detach(), ref_hidden.to(hs.student.dtype), weight.detach(),
                                              targets, bias=None if bias is None else bias.detach(),
                                              teacher_weight=ref_weight.detach(),
                                              teacher_bias=None if ref_bias is None else ref_bias.detach(),
                                              **kl_options)
                stats["kl_to_reference"] = float(kl)
        stats["loss"] = float(total.detach())
        mask = info["mask"]
        adv = info["advantage"][mask].float()
        stats.update(
            mean_advantage=float(adv.mean()) if adv.numel() else 0.0,
            frac_positive_advantage=float((adv > 0).float().mean()) if adv.numel() else 0.0,
            mean_divergence=float(info["divergence"][mask].float().mean()) if adv.numel() else 0.0,
            scored_tokens=int(mask.sum()),
        )
        if monitor:
            t_head = (t_weight, t_bias) if t_weight is not None else (weight.detach(), bias)
            stats["student_entropy"] = float(_per_sequence_mean(
                _entropy(hs.student.detach(), weight.detach(), bias), seq, num).mean())
            stats["teacher_entropy"] = float(_per_sequence_mean(_entropy(hs.teacher, *t_head), seq, num).mean())
            stats["repeated_token_rate"] = sum(repeated_token_rate(e.response_ids) for e in prepared.examples) / num
        info = {**info, "seq": seq, "targets": targets}
        return total, stats, info

    def loss(self, interactions: Iterable) -> tuple[torch.Tensor | None, dict]:
        """The training loss of ``interactions`` (with its graph) and its stats, without a step;
        None when every interaction is skipped."""
        interactions = list(interactions)
        records = [{"learned": False, "skip_reason": None, "weight": None} for _ in interactions]
        prepared = self._prepare(interactions, records, Counter())
        if prepared is None:
            return None, {}
        total, stats, _ = self._loss(prepared, monitor=False)
        return total, stats

    def learn_batch(self, interactions: Iterable) -> LearnResult:
        """One optimiser step on a batch of ``(messages, response, followup)`` interactions.

        Skipped, counted and never stepped on: a follow-up of only whitespace
        (``empty_followup``), an empty reply (``empty_response``), one the gate marks neutral
        (``gated_neutral``) or whose gate raised (``gate_error``), one over a token budget
        (``response_over_budget``, ``prompt_over_budget``, ``followup_over_budget``) or that
        the chat template cannot render (``template_error``, ``no_shared_prefix``). A non-finite loss or gradient
        takes no step (``non_finite``).
        """
        cfg = self.config
        interactions = list(interactions)
        records = [{"learned": False, "skip_reason": None, "weight": None} for _ in interactions]
        skips: Counter = Counter()
        stats: dict = {"learned": 0, "skipped": 0, "rolled_back": False, "health": None}
        prepared = self._prepare(interactions, records, skips)
        if prepared is not None:
            before = self._snapshot() if cfg.undo_depth > 0 else None
            total, step_stats, info = self._loss(prepared, monitor=cfg.monitor)
            stats.update(step_stats)
            self.optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(total):
                for i in prepared.rows:
                    records[i].update(learned=False, skip_reason="non_finite")
                skips["non_finite"] += len(prepared.rows)
                logger.warning("hsd online: non-finite loss %s; no step taken", stats.get("loss"))
            else:
                total.backward()
                params = list(self.trainable.values())
                if cfg.max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                else:
                    norm = torch.linalg.vector_norm(
                        torch.stack([p.grad.float().norm() for p in params if p.grad is not None]))
                stats["grad_norm"] = float(norm)
                if not math.isfinite(stats["grad_norm"]):
                    skips["non_finite"] += len(prepared.rows)
                    for i in prepared.rows:
                        records[i].update(learned=False, skip_reason="non_finite")
                    logger.warning("hsd online: non-finite gradient; no step taken")
                else:
                    self.optimizer.step()
                    if self.ema is not None:
                        self.ema.update(self.model)
                    self.step_count += 1
                    self.counts["steps"] += 1
                    if before is not None:
                        self._history = (self._history + [before])[-cfg.undo_depth:]
                    self._fill_records(prepared, info, records)
                    stats["learned"] = len(prepared.rows)
            self.optimizer.zero_grad(set_to_none=True)
        stats["skipped"] = sum(skips.values())
        stats["step"] = self.step_count
        self.counts.update(skips)
        if stats["learned"]:
            self._recent.append(stats)
            if len(self._recent) > _RECENT:
                drop = len(self._recent) - _RECENT
                del self._recent[:drop]
                self._good_recent = max(0, self._good_recent - drop)
            self._health(stats)
        return LearnResult(stats, records, skips)

    def _fill_records(self, prepared: _Prepared, info: dict, records: list[dict]) -> None:
        seq = info["seq"]
        for k, i in enumerate(prepared.rows):
            sel = seq == k
            ids = info["targets"][sel].tolist()
            records[i].update(
                learned=True,
                tokens=[self.tokenizer.decode([t]) for t in ids],
                token_ids=ids,
                **{name: info[name][sel].float().tolist()
                   for name in ("advantage", "student_logp", "teacher_logp", "divergence")},
            )

    # -- teacher health, undo, reset --
    def _health(self, stats: dict) -> None:
        cfg = self.config
        if cfg.health_check is None or self.step_count % cfg.health_every:
            return
        try:
            ok = cfg.health_check(self, stats)
        except Exception as e:
            raise RuntimeError(f"health_check raised {type(e).__name__}: {e}") from e
        if not isinstance(ok, (bool, int)) and ok is not None:
            raise TypeError(f"health_check must return a bool, got {ok!r}")
        stats["health"] = bool(ok)
        if ok:
            self._last_good = self._snapshot()
            self._good_recent = len(self._recent)
            return
        self._restore(self._last_good)
        del self._recent[self._good_recent:]  # the rolled-back steps no longer count in a window
        self._history = []  # undo cannot reach past a rollback
        self.counts["rollbacks"] += 1
        stats["rolled_back"] = True
        stats["step"] = self.step_count
        logger.warning("hsd online: the health check failed; rolled back to step %d", self.step_count)

    @property
    def recent_stats(self) -> list[dict]:
        """Stats of the steps taken so far (most recent last); health checks may read them."""
        return self._recent

    def _snapshot(self) -> _Snapshot:
        with torch.no_grad():
            trainable = {n: p.detach().clone() for n, p in self.trainable.items()}
            ema = None
            if self.ema is not None:
                shadow = dict(self.ema.module.named_parameters())
                ema = {n: shadow[n].detach().clone() for n in self.trainable if n in shadow}
        return _Snapshot(trainable, copy.deepcopy(self.optimizer.state_dict()), self.step_count, ema)

    def _restore(self, snap: _Snapshot) -> None:
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(snap.trainable[n])
            if snap.ema is not None:
                shadow = dict(self.ema.module.named_parameters())
                for n, value in snap.ema.items():
                    shadow[n].copy_(value)
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        self.step_count = snap.step

    def undo(self) -> bool:
        """Revert the last step bit-exactly (weights, optimiser state, step count); False when
        there is nothing to undo (``undo_depth`` steps are kept)."""
        if not self._history:
            return False
        self._restore(self._history.pop())
        return True

    def reset(self) -> None:
        """Drop what was learned: the adapter (or weights) and optimiser back to their initial
        state."""
        self._restore(self._initial)
        self._last_good = self._initial
        self._history = []
        self._recent, self._good_recent = [], 0

    # -- persistence --
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trainable weights, optimiser state and step count to the directory ``path``
        atomically (a crash leaves the previous save intact). A LoRA adapter is also written in
        peft's format (``adapter_model.safetensors``, ``adapter_config.json``)."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_directory(path, overwrite=True) as tmp:
            tensors = {n: p.detach().to("cpu").contiguous().clone() for n, p in self.trainable.items()}
            save_file(tensors, str(tmp / _WEIGHTS_FILE))
            torch.save(self.optimizer.state_dict(), tmp / _OPTIMIZER_FILE)
            if self.config.adapter == "lora" and hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(str(tmp))
            state = {"format": _FORMAT_VERSION, "adapter": self.config.adapter, "step": self.step_count,
                     "counts": dict(self.counts), "trainable": {n: list(p.shape) for n, p in self.trainable.items()},
                     "config": self.config.summary()}
            (tmp / _STATE_FILE).write_text(json.dumps(state, indent=1, default=str))
        return path

    def load(self, path: str | os.PathLike) -> None:
        """Restore a :meth:`save` (same base model and adapter settings, checked by name and
        shape); clears the undo history and makes it the last good state."""
        from safetensors.torch import load_file

        path = Path(path)
        state_file = path / _STATE_FILE
        if not state_file.is_file():
            raise FileNotFoundError(f"{path} holds no hsd online save ({_STATE_FILE} missing)")
        state = json.loads(state_file.read_text())
        if state.get("format") != _FORMAT_VERSION or state.get("adapter") != self.config.adapter:
            raise ValueError(f"{path}: saved with format {state.get('format')} / adapter {state.get('adapter')!r}, "
                             f"this distiller uses format {_FORMAT_VERSION} / adapter {self.config.adapter!r}")
        tensors = load_file(str(path / _WEIGHTS_FILE))
        missing = sorted(set(self.trainable) - set(tensors))
        extra = sorted(set(tensors) - set(self.trainable))
        if missing or extra:
            raise ValueError(f"{path}: the saved weights do not match this model's trainable parameters "
                             f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved with other adapter settings?")
        for n, p in self.trainable.items():
            if tensors[n].shape != p.shape:
                raise ValueError(f"{path}: {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(tensors[n].to(p.device, p.dtype))
        optimizer_state = torch.load(path / _OPTIMIZER_FILE, map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(optimizer_state)
        self.step_count = int(state.get("step", 0))
        self._history = []
        self._recent, self._good_recent = [], 0
        self._last_good = self._snapshot()

    def save_user(self, root: str | os.PathLike, user: str) -> Path:
        """:meth:`save` into ``user``'s directory under ``root`` (see :func:`user_directory`)."""
        return self.save(user_directory(root, user))

    def load_user(self, root: str | os.PathLike, user: str) -> bool:
        """Switch to ``user``'s adapter under ``root``: loaded when saved before (True), else
        reset to a fresh adapter (False). One base model thus serves every user."""
        directory = user_directory(root, user)
        if (directory / _STATE_FILE).is_file():
            self.load(directory)
            return True
        self.reset()
        return False


def chat_prompt_ids(tokenizer, messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids of ``messages`` rendered by the tokenizer's chat template with the generation
    prompt (what a reply is sampled after)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **(chat_template_kwargs or {}))
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers may return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


@torch.no_grad()
def generate_replies(model: nn.Module, tokenizer, prompts: Sequence[list[int]], stop_ids: Sequence[int],
                     pad_token_id: int, **generate_kwargs) -> list[Response]:
    """One reply per prompt (token ids) from ``model.generate`` over a left-padded batch, each
    cut at its first token of ``stop_ids``; ``generate_kwargs`` (``max_new_tokens``,
    ``do_sample``, ...) go to ``generate``."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    device = next(model.parameters()).device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), eos_token_id=list(stop_ids),
                         pad_token_id=pad_token_id, **generate_kwargs)
    responses = []
    for row in out[:, width:].tolist():
        finished = False
        reply = []
        for token in row:
            if token in stop_ids:
                finished = True
                break
            reply.append(token)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        responses.append(Response(text, reply, finished))
    return responses


class _GateError(Exception):
    """A user gate raised (the interaction is skipped and counted)."""


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}")
    if messages[-1]["role"] != "user":
        raise DataError("messages must end with a user message (the prompt the reply answers)")


# ---- teacher health ---------------------------------------------------------------------------


@dataclass
class TeacherHealth:
    """A ready ``health_check``: fails when the mean of the last ``window`` steps' statistics
    crosses a threshold (None: not checked). ``max_kl_to_reference`` catches a student running
    away from the base model, ``max_repeated_token_rate`` a reply collapsing into repetition,
    ``max_teacher_entropy`` / ``min_teacher_entropy`` a self-teacher turning to noise or to
    a point mass."""

    max_kl_to_reference: float | None = None
    max_repeated_token_rate: float | None = None
    max_teacher_entropy: float | None = None
    min_teacher_entropy: float | None = None
    window: int = 1

    def __call__(self, distiller: OnlineDistiller, stats: dict) -> bool:
        recent = distiller.recent_stats[-self.window:] or [stats]

        def mean(name):
            values = [s[name] for s in recent if s.get(name) is not None]
            return sum(values) / len(values) if values else None

        checks = [("kl_to_reference", self.max_kl_to_reference, 1), ("repeated_token_rate", self.max_repeated_token_rate, 1),
                  ("teacher_entropy", self.max_teacher_entropy, 1), ("teacher_entropy", self.min_teacher_entropy, -1)]
        for name, limit, sign in checks:
            value = mean(name)
            if limit is not None and value is not None and sign * (value - limit) > 0:
                logger.info("hsd online: %s = %.4g crossed its limit %.4g", name, value, limit)
                return False
        return True


# ---- the loop ---------------------------------------------------------------------------------


@dataclass
class OnlineRun:
    """What :func:`run_online` did: one record per prompt (``index``, ``messages``, ``response``,
    ``followup``, ``response_tokens``, ``learned``, ``skip_reason``, and the step's stats) and
    the skips by reason (``no_followup``, ``user_error``, ``response_truncated``, plus those of
    :meth:`OnlineDistiller.learn_batch`)."""

    records: list[dict]
    counts: Counter

    @property
    def steps(self) -> int:
        return self.counts.get("steps", 0)


def run_online(distiller: OnlineDistiller, prompts: Iterable, user: Callable, *, batch_size: int = 1,
               progress: bool = True, on_user_error: str = "skip", learn_truncated: bool = False) -> OnlineRun:
    """Answer each prompt, ask ``user(messages, response)`` for a follow-up, learn.

    ``prompts``: strings (one user message each) or message lists ending with a user turn.
    ``user``: any callable (a rule-based simulator, an LLM judge, a person) returning the
    follow-up text, or None for no follow-up (nothing to learn). A user that raises is skipped
    and counted (``on_user_error="skip"``) or re-raised (``"raise"``). Every ``batch_size``
    interactions make one optimiser step (the paper: one per follow-up). A reply that ran into
    ``max_new_tokens`` is not learned from unless ``learn_truncated`` (it would teach the model
    to stop mid-sentence). Shows a tqdm progress bar with the running loss and advantage.
    """
    if on_user_error not in ("skip", "raise"):
        raise ValueError(f"on_user_error must be 'skip' or 'raise', got {on_user_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from tqdm.auto import tqdm

    prompts = list(prompts)
    records: list[dict] = []
    counts: Counter = Counter()
    bar = tqdm(total=len(prompts), disable=not progress, desc="online", unit="interaction")
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p)
                     for p in prompts[start : start + batch_size]]
            responses = distiller.respond_batch(chunk)
            pending, pending_records, pending_responses = [], [], []
            for offset, (messages, response) in enumerate(zip(chunk, responses)):
                record = {"index": start + offset, "messages": messages, "response": response.text,
                          "response_tokens": len(response.ids), "followup": None, "learned": False,
                          "skip_reason": None}
                records.append(record)
                if not response.finished and not learn_truncated:
                    record["skip_reason"] = "response_truncated"
                    counts["response_truncated"] += 1
                    continue
                try:
                    followup = user(messages, response.text)
                except Exception as e:
                    if on_user_error == "raise":
                        raise
                    record["skip_reason"] = "user_error"
                    counts["user_error"] += 1
                    logger.warning("hsd online: the user callable raised %s: %s (interaction skipped)",
                                   type(e).__name__, e)
                    continue
                if followup is None:
                    record["skip_reason"] = "no_followup"
                    counts["no_followup"] += 1
                    continue
                if not isinstance(followup, str):
                    raise TypeError(f"the user callable must return a string or None, got {type(followup).__name__}")
                record["followup"] = followup
                pending.append((messages, response.text, followup))
                pending_records.append(record)
                pending_responses.append(response)
            if pending:
                result = distiller.learn_batch(pending)
                counts.update(result.skips)
                if result.stepped:
                    counts["steps"] += 1
                if result.stats.get("rolled_back"):
                    counts["rollbacks"] += 1
                for record, detail, response in zip(pending_records, result.interactions, pending_responses):
                    if detail.get("token_ids") is not None and distiller.config.ignore_first_k == 0:
                        # the step scores the reply re-tokenised from its text; say when that
                        # differs from the sampled ids (then it is slightly off-policy)
                        record["reply_ids_match"] = detail["token_ids"][:-1] == response.ids
                        counts["reply_retokenized"] += not record["reply_ids_match"]
                    record.update(learned=detail["learned"], skip_reason=detail["skip_reason"],
                                  weight=detail.get("weight"), stats=result.stats,
                                  mean_advantage=(sum(detail["advantage"]) / len(detail["advantage"])
                                                  if detail.get("advantage") else None))
                bar.set_postfix(loss=f"{result.stats.get('loss', float('nan')):.3g}",
                                adv=f"{result.stats.get('mean_advantage', float('nan')):+.3f}",
                                skipped=sum(v for k, v in counts.items() if k not in ("steps", "rollbacks")))
            bar.update(len(chunk))
    finally:
        bar.close()
    counts["interactions"] = len(prompts)
    counts["learned"] = sum(1 for r in records if r["learned"])
    return OnlineRun(records, counts)
