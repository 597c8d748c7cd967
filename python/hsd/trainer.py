"""Offline hindsight distillation with the Hugging Face ``Trainer``.

:class:`HSDConfig` is a ``transformers.TrainingArguments`` with hsd's fields (loss, teacher,
data layout, token budgets); :meth:`HSDConfig.paper_offline` is the paper's offline recipe
(METHOD.md §5). :class:`HSDTrainer` is a ``transformers.Trainer`` whose loss is the
shared-prefix step (:func:`hsd.hindsight_step`)::

    args = hsd.HSDConfig(output_dir="out", max_tokens_per_batch=16384, learning_rate=2e-6)
    trainer = hsd.HSDTrainer(model, args, train_dataset="microsoft/WildFeedback",
                             processing_class=tokenizer)
    trainer.train()

What it adds to the Trainer:

* **Data:** conversations in any form :mod:`hsd.data` reads (a hub name, a local file, an HF
  ``Dataset`` or list of rows, interaction tuples, or ready examples) are filtered and
  tokenised once, at construction, into the chosen layout; the Trainer's column removal is
  off (the batches carry hsd's own fields).
* **Batches by token budget:** :class:`TokenBudgetBatchSampler` sorts examples by length and
  fills each batch up to ``max_tokens_per_batch`` padded student tokens, so padding stays
  small; only the order of the batches is shuffled (per epoch, seeded).
* **Normalisation across gradient accumulation and ranks:** the step's loss is rescaled so
  that one optimiser step sees exactly the loss of the whole accumulation window on all
  ranks: per-sequence token mean then mean over every sequence of the window
  (``normalization="seq_mean"``, the paper) or the global token mean (``"token_mean"``).
  GA=k and k ranks give the update of one big batch (up to float rounding).
* **Teachers:** ``live`` (the paper), ``ema`` (an :class:`hsd.EMATeacher` updated after each
  optimiser step and saved with checkpoints) and ``base`` (a peft adapter disabled).
* **Metrics** through ``self.log``: mean A_t, fraction of A_t > 0, mean divergence, computed
  tokens per second, teacher tokens saved by prefix reuse, padding fraction.
* **Checkpoints** are published atomically (:func:`hsd.checkpoint.atomic_directory`): a
  ``checkpoint-N`` directory is complete or absent. A first SIGINT stops training after the
  current optimiser step and saves a checkpoint; a second one aborts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError as _e:  # pragma: no cover - transformers is a dependency of the train extra
    raise ImportError("hsd.trainer needs transformers (pip install 'hsd[train]')") from _e

from .checkpoint import TEMP_PREFIX, atomic_directory, remove_stale_temporaries
from .data import (ConversationExample, DataReport, FilterConfig, HindsightCollator, HindsightTemplate,
                   InteractionTuple, LayoutConfig, TupleExample, extract_tuples, iter_examples, read_conversations)
from .data.records import FORMATS
from .forward import STRATEGIES, TEACHERS, EMATeacher
from .loss import HindsightLoss
from .step import StepOutput, hindsight_step

__all__ = ["HSDConfig", "HSDTrainer", "HindsightExamples", "TokenBudgetBatchSampler", "build_examples",
           "step_through", "EMA_WEIGHTS_NAME"]

logger = logging.getLogger("hsd")

EMA_WEIGHTS_NAME = "ema_teacher.safetensors"
LOSS_MODES = ("sampled", "full", "topk")
NORMALIZATIONS = ("seq_mean", "token_mean")
LAYOUTS = ("packed", "tuple")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


@dataclass
class HSDConfig(TrainingArguments):
    """``TrainingArguments`` plus hindsight distillation's own settings.

    Every hsd field is checked in ``__post_init__`` (before any model loads): a bad value raises
    ``ValueError`` with a one-line reason. ``remove_unused_columns`` is forced off (hsd's
    batches carry their own fields).
    """

    # ---- loss
    loss_mode: str = field(default="sampled", metadata={
        "help": "'sampled' (the paper: -sg(A_t) log p(y_t)), 'full' (full-vocabulary divergence) or 'topk'"})
    alpha: float = field(default=1.0, metadata={
        "help": "full/topk divergence: 0 forward KL(teacher||student), 1 reverse KL, in between the JSD"})
    topk: int | None = field(default=None, metadata={"help": "support size of loss_mode='topk'"})
    topk_tail: bool = field(default=True, metadata={"help": "topk: add the tail bucket (else renormalise)"})
    temperature: float = field(default=1.0, metadata={"help": "divides student and teacher logits"})
    signal_clip: float | None = field(default=None, metadata={"help": "clamp A_t to +-c (sampled mode)"})
    center_advantage: bool = field(default=False, metadata={
        "help": "subtract each sequence's mean A_t (sampled mode; the authors' online trainer)"})
    normalization: str = field(default="seq_mean", metadata={
        "help": "'seq_mean': token mean per sequence, then mean over all sequences of the accumulation window "
                "and ranks (the paper); 'token_mean': one token mean over the window and ranks"})
    # ---- teacher
    teacher: str = field(default="live", metadata={
        "help": "'live' (current weights, prefix reused: the paper), 'ema' (moving average) or 'base' "
                "(peft adapter disabled)"})
    ema_rate: float = field(default=0.05, metadata={"help": "EMA teacher: fraction moved per optimiser step"})
    teacher_strategy: str = field(default="auto", metadata={
        "help": "teacher pass: 'auto', 'masked', 'loop' or 'full' (see hsd.forward)"})
    # ---- data
    hindsight_template: str = field(default="offline", metadata={
        "help": "'offline', 'online' or a format string containing {followup}"})
    layout: str = field(default="packed", metadata={
        "help": "'packed' (one student sequence per conversation window, every tuple scored in it) or "
                "'tuple' (one student and one teacher sequence per tuple, as the paper)"})
    history_messages: int | None = field(default=5, metadata={
        "help": "tuple layout: messages of history kept (None: all)"})
    max_length: int | None = field(default=None, metadata={
        "help": "packed layout: longest student sequence; longer conversations are windowed"})
    max_prompt_tokens: int | None = field(default=None, metadata={"help": "tuple layout: student prompt budget"})
    max_followup_tokens: int | None = field(default=None, metadata={"help": "budget of the rendered hindsight block"})
    max_response_tokens: int | None = field(default=None, metadata={"help": "budget of y plus end-of-turn"})
    ignore_first_k: int = field(default=2, metadata={"help": "first k response tokens not scored (paper: 2)"})
    chat_template_kwargs: str | None = field(default=None, metadata={
        "help": "JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}'"})
    filter_preset: str = field(default="none", metadata={
        "help": "'paper' (the authors' WildChat preprocessing) or 'none' (every well-formed conversation)"})
    dataset_format: str | None = field(default=None, metadata={
        "help": f"source schema, one of {', '.join(FORMATS)} (default: detected)"})
    data_on_error: str = field(default="raise", metadata={
        "help": "a record that cannot be read or tokenised: 'raise' or 'skip' (counted)"})
    # ---- batching
    max_tokens_per_batch: int | None = field(default=None, metadata={
        "help": "token budget of one micro-batch (rows x padded length of the student pass); examples are "
                "grouped by length. None: per_device_train_batch_size examples per batch, still grouped by length"})

    def __post_init__(self):
        self.remove_unused_columns = False  # hsd's batches carry their own fields
        if self.ddp_find_unused_parameters is None:
            # the student pass uses every trainable parameter; the Trainer would otherwise ask DDP
            # for an extra graph traversal per step
            self.ddp_find_unused_parameters = False
        self.validate_hsd()
        super().__post_init__()

    def validate_hsd(self) -> None:
        """Raise ``ValueError`` (one line) on a bad hsd setting; nothing is loaded."""
        _check_choice("loss_mode", self.loss_mode, LOSS_MODES)
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("teacher", self.teacher, TEACHERS)
        _check_choice("teacher_strategy", self.teacher_strategy, STRATEGIES)
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("filter_preset", self.filter_preset, ("paper", "none"))
        _check_choice("data_on_error", self.data_on_error, ("raise", "skip"))
        if self.dataset_format is not None:
            _check_choice("dataset_format", self.dataset_format, FORMATS)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1]; got {self.alpha}")
        if not 0.0 < self.ema_rate <= 1.0:
            raise ValueError(f"ema_rate must be in (0, 1]; got {self.ema_rate}")
        if self.loss_mode == "topk" and (self.topk is None or self.topk < 1):
            raise ValueError(f"loss_mode='topk' needs topk >= 1; got {self.topk}")
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be >= 1; got {self.max_tokens_per_batch}")
        HindsightTemplate.resolve(self.hindsight_template)  # a template without {followup} raises here
        self.layout_config()  # budgets >= 1, ignore_first_k >= 0
        self.loss_fn()  # temperature, signal clip, ... checked by the loss itself

    # ---- the objects the settings stand for

    def layout_config(self) -> LayoutConfig:
        kwargs = self.chat_template_kwargs
        if isinstance(kwargs, str):
            import json

            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError as e:
                raise ValueError(f"chat_template_kwargs is not valid JSON ({e.msg}): {kwargs!r}") from None
            if not isinstance(kwargs, dict):
                raise ValueError(f"chat_template_kwargs must be a JSON object; got {self.chat_template_kwargs!r}")
        return LayoutConfig(history_messages=self.history_messages, max_prompt_tokens=self.max_prompt_tokens,
                            max_followup_tokens=self.max_followup_tokens,
                            max_response_tokens=self.max_response_tokens, max_length=self.max_length,
                            ignore_first_k=self.ignore_first_k, chat_template_kwargs=kwargs or {})

    def filter_config(self) -> FilterConfig:
        return FilterConfig.preset(self.filter_preset)

    def loss_fn(self) -> HindsightLoss:
        options: dict[str, Any] = {"temperature": self.temperature}
        if self.loss_mode != "sampled":
            options["alpha"] = self.alpha
        if self.loss_mode == "topk":
            options.update(topk=self.topk, tail=self.topk_tail)
        if self.signal_clip is not None:
            options["signal_clip"] = self.signal_clip
        if self.center_advantage:
            options["center"] = True
        return HindsightLoss(self.loss_mode, **options)

    @classmethod
    def paper_offline(cls, output_dir: str, **overrides) -> "HSDConfig":
        """The paper's offline recipe (METHOD.md §5): full fine-tuning, lr 2e-6 cosine with 5%
        warm-up, 2 epochs, effective batch 32 tuples (4 x 8 accumulation steps on one device:
        divide the accumulation by the number of ranks), per-tuple layout with 5 history
        messages, 2048 prompt + 2048 completion tokens, the authors' filters, the sampled
        estimator with ignore_first_k=2, live teacher, per-sequence then batch mean, bf16 and
        gradient checkpointing. The authors used 8-bit AdamW: pass ``optim="adamw_bnb_8bit"``
        where bitsandbytes is installed (the default here is torch's AdamW)."""
        settings = dict(
            output_dir=output_dir, learning_rate=2e-6, lr_scheduler_type="cosine", warmup_steps=0.05,
            num_train_epochs=2, per_device_train_batch_size=4, gradient_accumulation_steps=8,
            bf16=True, max_grad_norm=1.0,
            loss_mode="sampled", ignore_first_k=2, teacher="live", normalization="seq_mean",
            layout="tuple", history_messages=5, max_prompt_tokens=2048, max_followup_tokens=512,
            max_response_tokens=2048, filter_preset="paper", hindsight_template="offline",
        )
        # transformers >= 5.24 renamed gradient checkpointing (5.17 has only the old name)
        names = {f.name for f in dataclasses.fields(cls)}
        settings["activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"] = True
        settings.update(overrides)
        return cls(**settings)


# ---- data -------------------------------------------------------------------------------------


class HindsightExamples(Dataset):
    """Tokenised examples of one layout, with their student lengths (for length grouping)."""

    def __init__(self, examples: Sequence[TupleExample | ConversationExample], report: DataReport | None = None):
        self.examples = list(examples)
        kinds = {type(e) for e in self.examples}
        if len(kinds) > 1:
            raise ValueError("examples of both layouts in one dataset; use one layout")
        self.report = report
        self.lengths = [_student_length(e) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int):
        return self.examples[index]


def _student_length(e) -> int:
    return len(e.input_ids) if isinstance(e, ConversationExample) else len(e.student_ids)


def build_examples(source, tokenizer, args: HSDConfig, report: DataReport | None = None) -> HindsightExamples:
    """Turn ``source`` into :class:`HindsightExamples` under ``args``' filters and layout.

    ``source``: a hub dataset name or local path (str / PathLike), an HF ``Dataset`` or any
    iterable of conversation rows (any schema :func:`hsd.data.read_conversations` reads), a
    sequence of :class:`hsd.data.InteractionTuple`, or ready examples (used as they are).
    """
    if isinstance(source, HindsightExamples):
        return source
    report = report if report is not None else DataReport()
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], (TupleExample, ConversationExample)):
        return HindsightExamples(source, report)
    if isinstance(source, (list, tuple)) and source and isinstance(source[0], InteractionTuple):
        tuples: Iterable[InteractionTuple] = source
    else:
        conversations = read_conversations(source, args.dataset_format, on_error=args.data_on_error, report=report)
        tuples = extract_tuples(conversations, args.filter_config(), report)
    examples = list(iter_examples(tuples, tokenizer, args.hindsight_template, args.layout_config(), args.layout,
                                  report, on_error=args.data_on_error))
    if not examples:
        raise ValueError(f"no training examples from the data ({report.records_read} records read, "
                         f"{report.tuples_kept} tuples kept); see the data report: hsd data inspect")
    logger.info("%d %s examples from %d records (%d tuples kept)", len(examples), args.layout,
                report.records_read, report.tuples_kept)
    return HindsightExamples(examples, report)


class TokenBudgetBatchSampler(Sampler):
    """Batches of similar length under a token budget; the batches are fixed, their order shuffled.

    Examples are sorted by length (longest first) and cut greedily into batches whose padded
    size ``rows x longest`` stays within ``max_tokens`` (and at most ``max_batch_size`` rows)
    and whose padding stays within ``max_padding`` of it (with a token budget). An example
    longer than the budget forms a batch of its own (with one warning). The batch order is a
    seeded permutation per epoch (:meth:`set_epoch`), so a resumed run sees the same batches in
    the same order.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int | None = None, max_batch_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, max_padding: float = 0.1):
        if max_tokens is None and max_batch_size is None:
            raise ValueError("give max_tokens, max_batch_size or both")
        if not 0.0 <= max_padding < 1.0:
            raise ValueError(f"max_padding must be in [0, 1); got {max_padding}")
        self.lengths = list(lengths)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        order = sorted(range(len(self.lengths)), key=lambda i: (-self.lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        real = too_long = 0
        for i in order:
            n = self.lengths[i]
            longest = self.lengths[current[0]] if current else n
            fits_tokens = max_tokens is None or (len(current) + 1) * longest <= max_tokens
            fits_rows = max_batch_size is None or len(current) < max_batch_size
            # a much shorter example starts a new batch rather than push this one's padding over
            # max_padding (sparse length distributions; dense ones fill every batch to the budget)
            fits_padding = max_tokens is None or real + n >= (1.0 - max_padding) * (len(current) + 1) * longest
            if current and not (fits_tokens and fits_rows and fits_padding):
                batches.append(current)
                current, real = [], 0
            if not current and max_tokens is not None and n > max_tokens:
                too_long += 1
            current.append(i)
            real += n
        if current:
            if drop_last and max_batch_size is not None and max_tokens is None and len(current) < max_batch_size:
                pass  # a short last batch is dropped like DataLoader(drop_last=True)
            else:
                batches.append(current)
        if too_long:
            logger.warning("%d example(s) are longer than max_tokens_per_batch=%s and form batches of their own",
                           too_long, max_tokens)
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.batches), generator=generator).tolist()
        else:
            order = range(len(self.batches))
        for b in order:
            yield list(self.batches[b])

    @property
    def padding_fraction(self) -> float:
        """Padded positions / computed positions of the student pass over one epoch."""
        computed = sum(len(b) * max(self.lengths[i] for i in b) for b in self.batches)
        real = sum(self.lengths[i] for b in self.batches for i in b)
        return 1.0 - real / computed if computed else 0.0


# ---- the trainer ------------------------------------------------------------------------------


def _student_padding(inputs: dict) -> tuple[int, int]:
    """(real, computed) tokens of the student pass of a collated batch."""
    mask = inputs.get("attention_mask", inputs.get("student_attention_mask"))
    return int(mask.sum()), int(mask.numel())


def _live_sequences(inputs: dict) -> int:
    """Tuples with at least one scored token (the ones a per-sequence mean averages over)."""
    index = inputs["scored_tuple_index"]
    return int(torch.unique(index).numel()) if index.numel() else 0


def _unwrap(model):
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP, DataParallel
        inner = inner.module
    return getattr(inner, "_orig_mod", inner)  # torch.compile


def step_through(model, batch: dict, loss_fn: HindsightLoss | None = None, *, module=None,
                 **step_kwargs) -> tuple[StepOutput, torch.Tensor]:
    """:func:`hsd.hindsight_step` run as ``model``'s forward, for wrapped models.

    Wrappers act in their forward: DDP prepares its gradient reducer there, FSDP2 unshards
    the root module's parameters (the LM head among them) there. The step itself calls the
    model's decoder and head directly, so it is run *as* the forward of ``module`` (the
    unwrapped model; found through ``.module`` by default): ``module.forward`` is the step for
    the duration of one ``model()`` call. Returns the step's output and the loss as the
    wrapper returned it (use this one for ``backward``).
    """
    module = module if module is not None else _unwrap(model)
    box: dict[str, StepOutput] = {}

    def forward(*_args, **_kwargs):
        box["out"] = hindsight_step(module, batch, loss_fn, **step_kwargs)
        return box["out"].loss

    own = module.__dict__.get("forward", None)  # accelerate's autocast wrapper is an instance attribute
    module.forward = forward
    try:
        loss = model()
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own
    return box["out"], loss


class _HSDCallback(TrainerCallback):
    """EMA update after each optimiser step; a requested stop (SIGINT) saves and ends training."""

    def __init__(self, trainer: "HSDTrainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.trainer.ema_teacher is not None:
            self.trainer.ema_teacher.update(self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped))

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.trainer._stop_requested
        if args.world_size > 1:  # every rank must stop at the same step, or the others hang
            flag = torch.tensor([1 if stop else 0], device=args.device)
            stop = bool(self.trainer.accelerator.reduce(flag, reduction="sum").item())
        if stop:
            self.trainer.interrupted = True
            control.should_save = True
            control.should_training_stop = True
            logger.warning("stopping at step %d after saving a checkpoint", state.global_step)
        return control


class HSDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is hindsight self-distillation.

    Args:
        model: a causal LM (``AutoModelForCausalLM``) or a peft model wrapping one (teacher
            ``base`` needs peft; ``live`` and ``ema`` work with LoRA and full fine-tuning).
        args: an :class:`HSDConfig`.
        train_dataset, eval_dataset: conversations in any form :func:`build_examples` takes.
        processing_class: the tokenizer (with a chat template); required unless the datasets
            are already tokenised examples and a ``data_collator`` is given.
        teacher_model: for ``teacher="ema"``, an :class:`hsd.EMATeacher` to use (default: one
            built from ``model`` with ``args.ema_rate``).
        Other keyword arguments go to ``transformers.Trainer``.

    After ``train()``, :attr:`interrupted` says whether a SIGINT stopped it (a checkpoint of
    the last completed step was saved).
    """

    def __init__(self, model=None, args: HSDConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, teacher_model: EMATeacher | None = None, **kwargs):
        if not isinstance(args, HSDConfig):
            raise TypeError(f"HSDTrainer needs an hsd.HSDConfig as args, got {type(args).__name__}")
        if model is None:
            raise ValueError("HSDTrainer needs a model (model_init is not supported)")
        if args.teacher == "base" and not hasattr(model, "disable_adapter"):
            raise ValueError("teacher='base' needs a peft model (the teacher is the model with its adapter disabled)")
        if teacher_model is not None and args.teacher != "ema":
            raise ValueError("teacher_model is only used with teacher='ema'")
        self.data_report = DataReport()
        if train_dataset is not None:
            train_dataset = build_examples(train_dataset, processing_class, args, self.data_report)
            if train_dataset.report is not None:  # ready examples keep the report they were built with
                self.data_report = train_dataset.report
        if eval_dataset is not None:
            eval_dataset = build_examples(eval_dataset, processing_class, args)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("HSDTrainer needs processing_class (the tokenizer) or a data_collator")
            data_collator = HindsightCollator.from_tokenizer(processing_class)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, data_collator=data_collator, **kwargs)
        # the loss below is already normalised over the accumulation window and the ranks
        self.loss_is_scaled_for_ga = True
        self.loss_fn = args.loss_fn()
        self.ema_teacher = None
        if args.teacher == "ema":
            self.ema_teacher = teacher_model if teacher_model is not None else EMATeacher(self.model, args.ema_rate)
            self.ema_teacher.to(self.args.device)
        self.interrupted = False
        self._stop_requested = False
        self._metrics: dict[str, float] = {}
        self._metrics_since = time.perf_counter()
        self.add_callback(_HSDCallback(self))

    # ---- data

    def _train_batch_sampler(self) -> TokenBudgetBatchSampler:
        args = self.args
        budget = args.max_tokens_per_batch
        return TokenBudgetBatchSampler(
            self.train_dataset.lengths, max_tokens=budget,
            max_batch_size=None if budget is not None else args.per_device_train_batch_size,
            shuffle=True, seed=args.data_seed if args.data_seed is not None else args.seed,
            drop_last=args.dataloader_drop_last)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("HSDTrainer: training requires a train_dataset")
        sampler = self._train_batch_sampler()
        logger.info("%d batches per epoch (all processes together), student padding %.1f%%", len(sampler),
                    100 * sampler.padding_fraction)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)
        return self.accelerator.prepare(loader)

    # ---- the loss

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        """The Trainer's micro-batches of one accumulation window, with hsd's own item counts
        (the Trainer counts only ``labels``, which hsd's batches do not have)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        return batch_samples, self._window_counts(batch_samples, self.args.device)

    def _window_counts(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        """Scored tokens and live sequences of the whole accumulation window, summed over ranks."""
        tokens = sum(int(b["target_ids"].numel()) for b in batch_samples)
        sequences = sum(_live_sequences(b) for b in batch_samples)
        counts = torch.tensor([tokens, sequences], dtype=torch.long, device=device)
        if self.args.world_size > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def _step(self, model, inputs: dict, **overrides) -> tuple[StepOutput, torch.Tensor]:
        teacher_model = self.ema_teacher if self.args.teacher == "ema" else None
        # accelerate's mixed precision wraps the model's own forward, which the step replaces:
        # enter its autocast here (a no-op without --bf16/--fp16)
        with self.accelerator.autocast():
            return step_through(model, inputs, self.loss_fn, module=self.accelerator.unwrap_model(model),
                                teacher=self.args.teacher, teacher_model=teacher_model,
                                strategy=self.args.teacher_strategy, **overrides)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The hindsight loss of one micro-batch, scaled so that the micro-batches of an
        accumulation window, on all ranks, sum to the window's loss (DDP averages gradients
        over ranks, hence the factor ``world_size``)."""
        window = num_items_in_batch
        if window is not None and self.args.normalization == "token_mean":
            out, loss = self._step(model, inputs, reduction="token_mean", num_items=window[0].to(torch.float64))
        else:
            out, loss = self._step(model, inputs, reduction=self.args.normalization)
            if window is not None:  # seq_mean over this micro-batch -> share of the window's mean
                loss = loss * (_live_sequences(inputs) / max(int(window[1]), 1))
        if window is not None:
            loss = loss * self.accelerator.num_processes
        elif model.training:  # no window counts (a custom loop around this method): the Trainer's scaling
            loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        if model.training:
            self._record(inputs, out)
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def floating_point_ops(self, inputs: dict) -> int:
        """~6 N per student token (forward + backward) + 2 N per teacher token (forward only)."""
        n = sum(p.numel() for p in self.model.parameters())
        student = int(inputs.get("attention_mask", inputs.get("student_attention_mask")).sum())
        teacher = int(inputs["teacher_suffix_attention_mask"].sum())
        return 6 * n * student + 2 * n * teacher

    # ---- metrics

    def _record(self, inputs: dict, out: StepOutput) -> None:
        m = self._metrics
        scored = out.stats.get("scored_tokens", 0)
        real, computed = _student_padding(inputs)
        add = {
            "scored_tokens": scored,
            "advantage_sum": out.stats["mean_advantage"] * scored,
            "positive_sum": out.stats["frac_positive_advantage"] * scored,
            "divergence_sum": out.stats["mean_divergence"] * scored,
            "computed_tokens": out.counts.get("student_tokens", 0) + out.counts.get("teacher_tokens", 0),
            "teacher_tokens_saved": out.counts.get("teacher_tokens_saved", 0),
            "real_tokens": real,
            "padded_tokens": computed,
        }
        for key, value in add.items():
            m[key] = m.get(key, 0.0) + float(value)

    def _pop_metrics(self) -> dict[str, float]:
        keys = ("scored_tokens", "advantage_sum", "positive_sum", "divergence_sum", "computed_tokens",
                "teacher_tokens_saved", "real_tokens", "padded_tokens")
        values = torch.tensor([self._metrics.get(k, 0.0) for k in keys], dtype=torch.float64)
        if self.args.world_size > 1:
            values = self.accelerator.reduce(values.to(self.args.device), reduction="sum").cpu()
        now = time.perf_counter()
        elapsed, self._metrics_since = now - self._metrics_since, now
        self._metrics = {}
        v = dict(zip(keys, values.tolist()))
        scored = max(v["scored_tokens"], 1.0)
        return {
            "mean_advantage": v["advantage_sum"] / scored,
            "frac_positive_advantage": v["positive_sum"] / scored,
            "mean_divergence": v["divergence_sum"] / scored,
            "tokens_per_second": v["computed_tokens"] / elapsed if elapsed > 0 else 0.0,
            "teacher_tokens_saved": v["teacher_tokens_saved"],
            "padding_fraction": 1.0 - v["real_tokens"] / v["padded_tokens"] if v["padded_tokens"] else 0.0,
            "scored_tokens": v["scored_tokens"],
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # the training logs (every logging_steps) carry "loss"; the final summary does not
        if "loss" in logs and "eval_loss" not in logs and self._metrics:
            logs = {**logs, **self._pop_metrics()}
        super().log(logs, start_time)

    # ---- checkpoints, EMA, interruption

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a hidden staging directory and published with
        one rename: ``checkpoint-N`` is complete or absent (the EMA teacher is saved with it)."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"checkpoint-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        stage = os.path.join(run_dir, f"{TEMP_PREFIX}stage-{name}")  # the same on every rank
        if self.args.should_save:
            shutil.rmtree(stage, ignore_errors=True)
            os.makedirs(stage)
        self.accelerator.wait_for_everyone()
        original = self._get_output_dir
        limit = self.args.save_total_limit
        self._get_output_dir = lambda trial=None: stage  # super() writes stage/checkpoint-N
        self.args.save_total_limit = None  # rotation runs below, in the real directory
        try:
            super()._save_checkpoint(model, trial)
            if self.ema_teacher is not None and self.args.should_save:
                from safetensors.torch import save_model

                save_model(self.ema_teacher.module, os.path.join(stage, name, EMA_WEIGHTS_NAME))
        finally:
            self._get_output_dir = original
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            with atomic_directory(final, overwrite=True) as tmp:
                os.rmdir(tmp)
                os.rename(os.path.join(stage, name), tmp)  # same file system: a rename, no copy
            shutil.rmtree(stage, ignore_errors=True)
            if self.state.best_model_checkpoint and self.state.best_model_checkpoint.startswith(stage):
                self.state.best_model_checkpoint = final
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _request_stop(self, signum, frame) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        logger.warning("interrupt received; finishing this step, saving a checkpoint, then stopping "
                       "(interrupt again to abort without saving)")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """``Trainer.train`` with stale staging directories removed, the EMA teacher restored
        from the checkpoint, and SIGINT turned into save-and-stop (main thread only)."""
        if self.args.should_save and os.path.isdir(self.args.output_dir):
            remove_stale_temporaries(self.args.output_dir)
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint-* directory in {self.args.output_dir} to resume from")
        if resume_from_checkpoint and self.ema_teacher is not None:
            path = os.path.join(resume_from_checkpoint, EMA_WEIGHTS_NAME)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: the checkpoint has no EMA teacher to resume teacher='ema' from")
            from safetensors.torch import load_model

            load_model(self.ema_teacher.module, path, device=str(self.args.device))
        self.interrupted = self._stop_requested = False
        self._metrics, self._metrics_since = {}, time.perf_counter()
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._request_stop) if main_thread else None
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
