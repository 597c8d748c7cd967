"""The shared-prefix pass: from a Hugging Face model and a collated batch to hidden states.

This module knows models, caches and attention masks, never the loss formula
(:mod:`hsd.step` puts the two together). Given a batch from
:class:`hsd.data.HindsightCollator` (either layout) it returns, for every scored response
token, the student's final hidden state (with grad) and the teacher's (no grad):

* **Student pass:** one forward with grad per row over the trunk (the model's own causal
  mask), then the layout's student branches (templates such as Qwen3's that render the last
  reply differently) over the trunk's keys/values; under gradient checkpointing or
  FlexAttention, trunk and branches in one tree-masked pass. Its keys and values are kept
  (detached) for the teacher.
* **Teacher pass:** every teacher branch (hindsight block, end of the user turn, assistant
  header, y, end-of-turn) computes only its own tokens, attending to the student's keys and
  values up to its prefix offset, with position ids continuing from that offset.

Every mask comes from two functions, :func:`student_tree_allowed` and
:func:`teacher_branch_allowed`, so exactness is argued once for every strategy:

``"masked"``
    all teacher branches of a row concatenated in one forward over the student cache, with a
    4D mask (sdpa and eager; eager gets an additive float mask, a bool mask is silently wrong
    there).
``"loop"``
    one forward per teacher branch over the cache cropped to its offset (flash-attention
    kernels, which would misread the branch positions as packed sequences, run this way).
``"full"``
    no reuse: each teacher sequence is encoded from scratch (models whose layers keep no
    reusable key/value range, or with dropout active, where the student's keys and values
    are noisy; chosen automatically with one warning).

Teacher kinds: ``"live"`` (the current weights: reuses the student's own keys and values, as
the paper), ``"base"`` (a peft adapter disabled) and ``"ema"`` (a shadow model, see
:class:`EMATeacher`). The last two compute the teacher prefix once per row with the teacher's
weights and share it between all its branches (one no-grad forward unit per prefix token).
Gradient checkpointing turns transformers' cache off; the student's keys and values are then
recorded by an attention function wrapping the model's own (registered through
``AttentionInterface`` for the student forward only), so reuse costs nothing extra there either.
"""

from __future__ import annotations

import copy
import inspect
import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "TreeBatch",
    "HiddenStates",
    "EMATeacher",
    "hindsight_hidden_states",
    "student_tree_allowed",
    "teacher_branch_allowed",
    "STRATEGIES",
    "TEACHERS",
]

logger = logging.getLogger("hsd")

STRATEGIES = ("auto", "masked", "loop", "full")
TEACHERS = ("live", "ema", "base")
# Attention layer kinds whose keys/values at a position depend only on the tokens up to it.
_REUSABLE_LAYERS = {"full_attention", "sliding_attention"}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


# ---- the batch as a token tree --------------------------------------------------------------


@dataclass
class TreeBatch:
    """Either collated layout seen as rows of a token tree plus teacher branches.

    The per-tuple layout is the special case of one teacher branch per row and no student
    branches. All tensors are on one device; ``[S]`` is the number of student branches,
    ``[T]`` of teacher branches (tuples), ``[N]`` of scored tokens.
    """

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L] 1 = real token
    position_ids: torch.Tensor  # [B, L]
    trunk_lengths: torch.Tensor  # [B]
    branch_batch_index: torch.Tensor  # [S]
    branch_starts: torch.Tensor  # [S]
    branch_ends: torch.Tensor  # [S]
    branch_attach: torch.Tensor  # [S]
    teacher_batch_index: torch.Tensor  # [T]
    teacher_prefix_offsets: torch.Tensor  # [T]
    teacher_suffix_ids: torch.Tensor  # [T, Q]
    teacher_suffix_mask: torch.Tensor  # [T, Q]
    scored_tuple_index: torch.Tensor  # [N]
    scored_batch_index: torch.Tensor  # [N]
    student_scored_positions: torch.Tensor  # [N] columns of the student rows
    teacher_suffix_scored_indices: torch.Tensor  # [N] columns of the teacher suffixes
    target_ids: torch.Tensor  # [N]

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device | None = None) -> "TreeBatch":
        """Normalise a collated batch of either layout (moving it to ``device``)."""

        def get(name):
            if name not in batch:
                raise KeyError(f"the batch has no {name!r}; build it with hsd.data.HindsightCollator")
            value = batch[name]
            return value.to(device) if device is not None else value

        if "student_input_ids" in batch:  # per-tuple layout
            ids = get("student_input_ids")
            b = ids.shape[0]
            mask = get("student_attention_mask")
            empty = torch.zeros(0, dtype=torch.long, device=ids.device)
            fields = dict(
                input_ids=ids, attention_mask=mask, position_ids=get("student_position_ids"),
                trunk_lengths=mask.sum(1), branch_batch_index=empty, branch_starts=empty,
                branch_ends=empty, branch_attach=empty,
                teacher_batch_index=torch.arange(b, device=ids.device),
                teacher_prefix_offsets=get("teacher_prefix_lens"),
            )
        elif "input_ids" in batch and "teacher_prefix_offsets" in batch:  # packed layout
            ids = get("input_ids")
            mask = get("attention_mask")
            empty = torch.zeros(0, dtype=torch.long, device=ids.device)
            opt = lambda name, default: get(name) if name in batch else default  # noqa: E731
            fields = dict(
                input_ids=ids, attention_mask=mask, position_ids=get("position_ids"),
                trunk_lengths=opt("trunk_lengths", mask.sum(1)),
                branch_batch_index=opt("student_branch_batch_index", empty),
                branch_starts=opt("student_branch_starts", empty),
                branch_ends=opt("student_branch_ends", empty),
                branch_attach=opt("student_branch_attach", empty),
                teacher_batch_index=get("teacher_batch_index"),
                teacher_prefix_offsets=get("teacher_prefix_offsets"),
            )
        else:
            raise ValueError("not a hindsight batch: expected the per-tuple (student_input_ids, ...) or "
                             "packed (input_ids, teacher_prefix_offsets, ...) fields of HindsightCollator")
        tb = cls(
            **fields,
            teacher_suffix_ids=get("teacher_suffix_ids"),
            teacher_suffix_mask=get("teacher_suffix_attention_mask"),
            scored_tuple_index=get("scored_tuple_index"),
            scored_batch_index=get("scored_batch_index"),
            student_scored_positions=get("student_scored_positions"),
            teacher_suffix_scored_indices=get("teacher_suffix_scored_indices"),
            target_ids=get("target_ids"),
        )
        tb.validate()
        return tb

    @property
    def has_student_branches(self) -> bool:
        return self.branch_starts.numel() > 0

    @property
    def suffix_lengths(self) -> torch.Tensor:
        return self.teacher_suffix_mask.sum(1)

    def validate(self) -> None:
        """Cheap structural checks: a malformed batch fails here, not deep inside a model."""
        b, length = self.input_ids.shape
        if self.attention_mask.shape != (b, length) or self.position_ids.shape != (b, length):
            raise ValueError("input_ids, attention_mask and position_ids must have one shape [B, L]")
        t = self.teacher_batch_index.shape[0]
        if self.teacher_suffix_ids.shape[0] != t or self.teacher_prefix_offsets.shape[0] != t:
            raise ValueError("teacher_batch_index, teacher_prefix_offsets and teacher_suffix_ids disagree on "
                             "the number of teacher branches")
        if t and bool((self.teacher_prefix_offsets < 1).any()):
            raise ValueError("every teacher prefix offset must be >= 1 (a teacher branch continues a prefix)")
        if t and bool((self.teacher_prefix_offsets > self.trunk_lengths[self.teacher_batch_index]).any()):
            raise ValueError("a teacher prefix offset reaches past its row's trunk")


@dataclass
class HiddenStates:
    """Final hidden states at the scored tokens, and what computing them cost.

    ``student`` [N, H] carries the graph back to the model; ``teacher`` [N, H] has none.
    ``counts``: ``student_tokens`` (tokens of the student pass), ``teacher_tokens`` (tokens the
    teacher computed), ``teacher_tokens_saved`` (prefix tokens the teacher reused instead of
    recomputing), ``teacher_strategy``.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    target_ids: torch.Tensor
    seq_ids: torch.Tensor
    counts: dict = field(default_factory=dict)


# ---- masks: the one place that says who attends to whom -------------------------------------


def _segments(tb: TreeBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: its student branch (-1 = trunk) and the trunk length it may see."""
    b, length = tb.input_ids.shape
    device = tb.input_ids.device
    seg = torch.full((b, length), -1, dtype=torch.long, device=device)
    limit = torch.full((b, length), length, dtype=torch.long, device=device)
    cols = torch.arange(length, device=device)
    for s in range(tb.branch_starts.numel()):  # branches are few: a short loop
        row = int(tb.branch_batch_index[s])
        inside = (cols >= tb.branch_starts[s]) & (cols < tb.branch_ends[s])
        seg[row, inside] = s
        limit[row, inside] = tb.branch_attach[s]
    return seg, limit


def student_tree_allowed(tb: TreeBatch, sliding_window: int | None = None) -> torch.Tensor:
    """[B, L, L] bool, True where student query q may attend key k.

    A trunk token attends trunk tokens up to itself; a branch token attends the trunk before
    its attach point and its own branch up to itself; padding attends nothing real (it gets
    key 0 only, so no row is fully blocked). ``sliding_window`` W adds ``pos_q - pos_k < W``
    on position ids (the tree's positions, not columns).
    """
    length = tb.input_ids.shape[1]
    cols = torch.arange(length, device=tb.input_ids.device)
    seg, limit = _segments(tb)
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]
    causal = cols[None, :, None] >= cols[None, None, :]
    k_trunk = k_seg == -1
    allowed = torch.where(
        q_seg == -1,
        k_trunk & causal,
        (k_trunk & (cols[None, None, :] < limit[:, :, None])) | ((q_seg == k_seg) & causal),
    )
    real = tb.attention_mask.bool()
    allowed &= real[:, None, :] & real[:, :, None]
    if sliding_window is not None:
        pos = tb.position_ids
        allowed &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    allowed[:, :, 0] |= ~real  # padded queries: one harmless key, never a fully masked row
    return allowed


@dataclass
class _TeacherRows:
    """Teacher branches concatenated per student row (the ``masked`` strategy's queries)."""

    ids: torch.Tensor  # [B, Qr]
    positions: torch.Tensor  # [B, Qr]
    branch: torch.Tensor  # [B, Qr] teacher branch index, -1 = padding
    offsets: torch.Tensor  # [B, Qr] the prefix offset of each token's branch
    column_base: torch.Tensor  # [T] where each branch starts in its row


def _teacher_rows(tb: TreeBatch) -> _TeacherRows:
    b = tb.input_ids.shape[0]
    device = tb.input_ids.device
    lengths = tb.suffix_lengths.tolist()
    rows = tb.teacher_batch_index.tolist()
    offsets = tb.teacher_prefix_offsets.tolist()
    fill = [0] * b
    base = []
    for row, n in zip(rows, lengths):
        base.append(fill[row])
        fill[row] += n
    width = max(max(fill), 1)
    ids = torch.zeros((b, width), dtype=torch.long, device=device)
    positions = torch.zeros((b, width), dtype=torch.long, device=device)
    branch = torch.full((b, width), -1, dtype=torch.long, device=device)
    offs = torch.zeros((b, width), dtype=torch.long, device=device)
    for t, (row, n, start, off) in enumerate(zip(rows, lengths, base, offsets)):
        ids[row, start : start + n] = tb.teacher_suffix_ids[t, :n]
        positions[row, start : start + n] = torch.arange(off, off + n, device=device)
        branch[row, start : start + n] = t
        offs[row, start : start + n] = off
    for row in range(b):  # padding keeps increasing positions
        positions[row, fill[row] :] = torch.arange(width - fill[row], device=device) + (positions[row, fill[row] - 1] + 1 if fill[row] else 0)
    return _TeacherRows(ids, positions, branch, offs, torch.tensor(base, dtype=torch.long, device=device))


def teacher_branch_allowed(rows: _TeacherRows, cache_length: int, sliding_window: int | None = None) -> torch.Tensor:
    """[B, Qr, cache_length + Qr] bool for the concatenated teacher branches of each row.

    A teacher token attends the cached student keys before its branch's prefix offset and its
    own branch's tokens up to itself; padding gets key 0 only.
    """
    device = rows.ids.device
    width = rows.ids.shape[1]
    cache_cols = torch.arange(cache_length, device=device)
    q_cols = torch.arange(width, device=device)
    to_cache = cache_cols[None, None, :] < rows.offsets[:, :, None]
    same = rows.branch[:, :, None] == rows.branch[:, None, :]
    to_new = same & (q_cols[None, :, None] >= q_cols[None, None, :])
    real = rows.branch >= 0
    if sliding_window is not None:
        pos = rows.positions
        to_cache &= (pos[:, :, None] - cache_cols[None, None, :]) < sliding_window
        to_new &= (pos[:, :, None] - pos[:, None, :]) < sliding_window
    allowed = torch.cat([to_cache, to_new], dim=2) & real[:, :, None]
    allowed[:, :, 0] |= ~real
    return allowed


# ---- model plumbing -------------------------------------------------------------------------


class _ModelView:
    """What the pass needs to know about a causal LM: its decoder, cache keyword, masks."""

    def __init__(self, model: nn.Module):
        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
        if decoder is None or decoder is base:
            raise TypeError(f"{type(base).__name__} has no decoder stack (get_decoder()); hsd.forward needs a "
                            "Hugging Face *ForCausalLM model")
        self.decoder = decoder
        self.config = base.config.get_text_config(decoder=True) if hasattr(base.config, "get_text_config") else base.config
        params = inspect.signature(decoder.forward).parameters
        # transformers >= 5.18 names it `cache`, earlier versions `past_key_values`
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.attn = getattr(self.config, "_attn_implementation", None) or "eager"
        layer_types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if layer_types is not None and "sliding_attention" in layer_types:
            self.mask_kind = "dict"  # per-kind masks (Qwen2/3, Gemma2/3)
        elif window is not None and layer_types is None:
            self.mask_kind = "sliding"  # every layer windowed (Mistral)
        else:
            self.mask_kind = "full"
        self.window = window if self.mask_kind != "full" else None
        self.layer_types = layer_types

    @property
    def reusable(self) -> bool:
        """Whether each layer's keys/values at a position can be reused by a longer sequence."""
        if self.layer_types is not None and any(t not in _REUSABLE_LAYERS for t in self.layer_types):
            return False
        return not self.dropout_active

    @property
    def dropout_active(self) -> bool:
        if not self.model.training:
            return False
        if any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.decoder.modules()):
            return True
        return any(float(getattr(self.config, k, 0.0) or 0.0) > 0 for k in ("attention_dropout", "hidden_dropout"))

    @property
    def gradient_checkpointing(self) -> bool:
        return bool(getattr(self.decoder, "gradient_checkpointing", False)) and self.model.training

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    def format_mask(self, allowed_fn):
        """The model's mask argument from ``allowed_fn(sliding_window) -> [B, Q, K]`` bool."""

        def fmt(allowed):
            if self.attn == "flex_attention":
                return _block_mask(allowed)
            allowed = allowed[:, None]
            if self.attn == "sdpa":
                return allowed
            # eager (and other kernels that add the mask to the scores) need an additive mask
            zero = torch.zeros((), dtype=self.dtype, device=allowed.device)
            return torch.where(allowed, zero, torch.finfo(self.dtype).min)

        if self.mask_kind == "dict":
            return {"full_attention": fmt(allowed_fn(None)), "sliding_attention": fmt(allowed_fn(self.window))}
        return fmt(allowed_fn(self.window))

    def new_cache(self, layers=None):
        from transformers import DynamicCache

        # a plain DynamicCache (not built from the config) keeps every position of sliding layers
        return DynamicCache() if layers is None else DynamicCache(layers)

    def run(self, input_ids, position_ids, mask, cache=None, use_cache=False):
        kwargs = {self.cache_kw: cache} if cache is not None else {}
        out = self.decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                           use_cache=use_cache, **kwargs)
        # read by key: the deprecated attribute name would warn on newer transformers
        cache = next((out[key] for key in ("cache", "past_key_values") if key in out.keys()), None)
        return out.last_hidden_state, cache


def _block_mask(allowed: torch.Tensor):
    """A FlexAttention BlockMask of the same rule: fully masked blocks are skipped, not computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, q_len, kv_len = allowed.shape

    def mask_mod(b, h, q, k):
        return allowed[b, q, k]

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=allowed.device)


def _detached_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"unsupported cache type {type(cache).__name__}: expected a transformers DynamicCache")
    return [(layer.keys.detach(), layer.values.detach()) for layer in layers]


# ---- teachers -------------------------------------------------------------------------------


class EMATeacher(nn.Module):
    """An exponential moving average of a model's weights, used as the teacher (kind ``"ema"``).

    ``rate`` r: after each optimiser step call :meth:`update`; the shadow moves ``r`` of the way
    to the current weights (SDPO/TRL use 0.01 to 0.05). The shadow is frozen and in eval mode.
    """

    def __init__(self, model: nn.Module, rate: float = 0.05):
        super().__init__()
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"EMA rate must be in (0, 1], got {rate}")
        self.rate = rate
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for shadow, current in zip(self.module.parameters(), model.parameters()):
            shadow.lerp_(current.detach().to(shadow.dtype), self.rate)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@contextmanager
def _checkpointing_off(*decoders):
    """No-grad passes need no checkpointing, and transformers < 5.18 would drop their cache."""
    flagged = [m for d in decoders for m in d.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def _teacher_context(model, teacher: str):
    if teacher == "base":
        disable = getattr(model, "disable_adapter", None)
        if disable is None:
            raise ValueError("teacher='base' needs a peft model (the teacher is the model with its adapter disabled)")
        return disable()
    return nullcontext()


# ---- the pass -------------------------------------------------------------------------------


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _choose_strategy(view: _ModelView, requested: str) -> str:
    if requested not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {requested!r}")
    if not view.reusable:
        reason = "dropout is active" if view.dropout_active else "its layers keep no reusable key/value range"
        _warn_once(f"full:{type(view.model).__name__}:{reason}",
                   f"hsd: the teacher cannot reuse the student's prefix for this model ({reason}); "
                   "running a full teacher forward per tuple instead")
        return "full"
    flash = view.attn.startswith("flash") or view.attn.startswith("paged")
    # sdpa and eager take a dense 4D mask, flex_attention a BlockMask built from the same rule
    if requested == "masked" and flash:
        raise ValueError(f"strategy='masked' needs an explicit 4D mask, which {view.attn} cannot take; "
                         "use 'loop' or 'auto'")
    if requested != "auto":
        return requested
    if flash or view.attn not in ("sdpa", "eager", "flex_attention"):
        return "loop"
    if _distributed():
        return "masked"  # one teacher forward per rank: FSDP gathers parameters collectively per forward
    if view.attn != "flex_attention" and view.decoder.get_input_embeddings().weight.device.type == "cpu":
        # measured (bench/bench_step.py): a dense mask over concatenated branches computes about
        # twice the needed pairs, and on CPU one forward per branch is faster
        return "loop"
    return "masked"


def _student_mask(view: _ModelView, tb: TreeBatch, own: bool = False):
    if own or tb.has_student_branches or view.mask_kind != "full":
        # our own mask for trees and for sliding layers (transformers' eager sliding mask turns
        # right-padded rows into NaN)
        return view.format_mask(lambda w: student_tree_allowed(tb, w))
    return tb.attention_mask  # plain right-padded causal rows: the model's own (fast) mask


# Gradient checkpointing drops the cache (a replayed layer would update it twice), so the
# student's keys/values are recorded by an attention function wrapping the model's own: it
# stores each layer's (post-RoPE, pre-GQA-repeat) keys/values once, during the forward only.
_CAPTURE_NAME = "hsd_capture"
_capture: dict = {"store": None, "inner": None}


def _capturing_attention(module, query, key, value, attention_mask, **kwargs):
    store, inner = _capture["store"], _capture["inner"]
    if store is not None and module.layer_idx not in store:
        store[module.layer_idx] = (key.detach(), value.detach())
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if inner == "eager" or inner not in ALL_ATTENTION_FUNCTIONS:
        # the model's own eager function (some add soft-capping or sinks to it)
        fn = inspect.getmodule(type(module)).eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    from transformers import AttentionInterface

    if _CAPTURE_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_CAPTURE_NAME, _capturing_attention)


def _student_pass_capturing(view: _ModelView, tb: TreeBatch):
    """The student pass under gradient checkpointing, recording its keys/values as it goes."""
    _register_capture()
    config, store = view.decoder.config, {}
    original = config._attn_implementation
    mask = _student_mask(view, tb, own=True)  # a ready 4D mask: no mask function is looked up by name
    _capture.update(store=store, inner=original)
    config._attn_implementation = _CAPTURE_NAME
    try:
        hidden, _ = view.run(tb.input_ids, tb.position_ids, mask)
    finally:
        config._attn_implementation = original
        _capture.update(store=None, inner=None)
    if len(store) != len(view.decoder.layers):
        raise RuntimeError(f"recorded keys/values of {len(store)} of {len(view.decoder.layers)} layers; this model's "
                           "attention does not go through transformers' AttentionInterface")
    return hidden, [store[i] for i in sorted(store)]


def _columns(tb: TreeBatch, width: int, attention_mask: torch.Tensor | None = None) -> TreeBatch:
    """The rows' first ``width`` columns, without student branches (``attention_mask``: the
    cut rows' mask, default the batch's own)."""
    empty = tb.branch_starts.new_zeros(0)
    return TreeBatch(**{**tb.__dict__, "input_ids": tb.input_ids[:, :width], "position_ids": tb.position_ids[:, :width],
                        "attention_mask": tb.attention_mask[:, :width] if attention_mask is None else attention_mask,
                        "branch_batch_index": empty, "branch_starts": empty, "branch_ends": empty,
                        "branch_attach": empty})


def _trunk_only(tb: TreeBatch) -> TreeBatch:
    """The rows cut to their trunks (branch columns become padding)."""
    width = int(tb.trunk_lengths.max())
    cols = torch.arange(width, device=tb.input_ids.device)
    return _columns(tb, width, tb.attention_mask[:, :width] * (cols[None] < tb.trunk_lengths[:, None]))


def _student_pass_split(view: _ModelView, tb: TreeBatch, keep_cache: bool):
    """A tree with student branches as trunk + branches: the trunk keeps the model's own causal
    mask (a dense tree mask would leave sdpa's causal kernels), then each branch runs over the
    trunk's keys/values (with grad) cropped to its attach point. Same rule, same numbers."""
    trunk = _trunk_only(tb)
    hidden, cache = view.run(trunk.input_ids, trunk.position_ids, _student_mask(view, trunk),
                             cache=view.new_cache(), use_cache=True)
    layers = [(layer.keys, layer.values) for layer in cache.layers]  # graph kept: branches backprop into it
    hidden = torch.nn.functional.pad(hidden, (0, 0, 0, tb.input_ids.shape[1] - hidden.shape[1]))
    # the branch table read once (one device sync, not four per branch); the branches' hidden
    # states written into the padded trunk in one index_put (not one copy of it per branch)
    table = zip(tb.branch_batch_index.tolist(), tb.branch_starts.tolist(), tb.branch_ends.tolist(),
                tb.branch_attach.tolist())
    rows, cols, parts = [], [], []
    for row, start, end, attach in table:
        ids, positions = tb.input_ids[row : row + 1, start:end], tb.position_ids[row : row + 1, start:end]
        sub = _TeacherRows(ids, positions, torch.zeros_like(ids), torch.full_like(ids, attach), None)
        mask = view.format_mask(lambda w: teacher_branch_allowed(sub, attach, w))
        cropped = view.new_cache([(k[row : row + 1, :, :attach], v[row : row + 1, :, :attach]) for k, v in layers])
        branch_hidden, _ = view.run(ids, positions, mask, cache=cropped, use_cache=True)
        cols.append(torch.arange(start, end, device=ids.device))
        rows.append(torch.full_like(cols[-1], row))
        parts.append(branch_hidden[0])
    if parts:
        hidden = hidden.index_put((torch.cat(rows), torch.cat(cols)), torch.cat(parts))
    return hidden, ([(k.detach(), v.detach()) for k, v in layers] if keep_cache else None)


def _student_pass(view: _ModelView, tb: TreeBatch, keep_cache: bool):
    """Student hidden states [B, L, H] (with grad) and, when asked, its detached keys/values."""
    if keep_cache and view.gradient_checkpointing:
        return _student_pass_capturing(view, tb)
    # (not under torch.distributed: the branch count differs per rank, FSDP needs equal forwards)
    if tb.has_student_branches and not view.gradient_checkpointing and view.attn in ("sdpa", "eager") \
            and not _distributed():
        return _student_pass_split(view, tb, keep_cache)
    mask = _student_mask(view, tb)
    hidden, cache = view.run(tb.input_ids, tb.position_ids, mask,
                             cache=view.new_cache() if keep_cache else None, use_cache=keep_cache)
    return hidden, (_detached_layers(cache) if keep_cache else None)


@torch.no_grad()
def _prefill(view: _ModelView, tb: TreeBatch):
    """The teacher's own prefix keys/values (no grad), once per row, up to the longest offset."""
    sub = _columns(tb, int(tb.teacher_prefix_offsets.max()))  # branches lie past every offset
    _, cache = view.run(sub.input_ids, sub.position_ids, _student_mask(view, sub), cache=view.new_cache(),
                        use_cache=True)
    return _detached_layers(cache), int(sub.attention_mask.sum())


@torch.no_grad()
def _teacher_masked(view: _ModelView, tb: TreeBatch, layers) -> torch.Tensor:
    rows = _teacher_rows(tb)
    cache_length = layers[0][0].shape[2]
    mask = view.format_mask(lambda w: teacher_branch_allowed(rows, cache_length, w))
    hidden, _ = view.run(rows.ids, rows.positions, mask, cache=view.new_cache(layers), use_cache=True)
    tuple_index = tb.scored_tuple_index
    return hidden[tb.teacher_batch_index[tuple_index], rows.column_base[tuple_index] + tb.teacher_suffix_scored_indices]


@torch.no_grad()
def _teacher_loop(view: _ModelView, tb: TreeBatch, layers) -> torch.Tensor:
    flash = view.attn.startswith("flash")
    out = []
    for t in range(tb.teacher_batch_index.numel()):
        row, off, n = int(tb.teacher_batch_index[t]), int(tb.teacher_prefix_offsets[t]), int(tb.suffix_lengths[t])
        cropped = [(k[row : row + 1, :, :off], v[row : row + 1, :, :off]) for k, v in layers]
        ids = tb.teacher_suffix_ids[t : t + 1, :n]
        positions = torch.arange(off, off + n, device=ids.device)[None]
        if flash:
            mask = None  # flash kernels align the causal mask to the cache's end themselves
        else:
            sub = _TeacherRows(ids, positions, torch.zeros_like(ids), torch.full_like(ids, off), None)
            mask = view.format_mask(lambda w: teacher_branch_allowed(sub, off, w))
        hidden, _ = view.run(ids, positions, mask, cache=view.new_cache(cropped), use_cache=True)
        out.append(hidden[0])
    width = max(h.shape[0] for h in out)
    padded = out[0].new_zeros((len(out), width, out[0].shape[-1]))
    for t, h in enumerate(out):
        padded[t, : h.shape[0]] = h
    return padded[tb.scored_tuple_index, tb.teacher_suffix_scored_indices]


@torch.no_grad()
def _teacher_full(view: _ModelView, tb: TreeBatch) -> tuple[torch.Tensor, int]:
    """No reuse: each teacher sequence (prefix + suffix) encoded from scratch, right-padded."""
    offsets, lengths = tb.teacher_prefix_offsets.tolist(), tb.suffix_lengths.tolist()
    seqs = []
    for t, (off, n) in enumerate(zip(offsets, lengths)):
        prefix = _prefix_ids(tb, int(tb.teacher_batch_index[t]), off)
        seqs.append(torch.cat([prefix, tb.teacher_suffix_ids[t, :n]]))
    width = max(s.numel() for s in seqs)
    ids = tb.input_ids.new_zeros((len(seqs), width))
    mask = torch.zeros_like(ids)
    for t, s in enumerate(seqs):
        ids[t, : s.numel()] = s
        mask[t, : s.numel()] = 1
    positions = torch.arange(width, device=ids.device)[None].expand_as(ids)
    hidden, _ = view.run(ids, positions, mask)
    offsets_t = tb.teacher_prefix_offsets[tb.scored_tuple_index]
    return hidden[tb.scored_tuple_index, offsets_t + tb.teacher_suffix_scored_indices], int(mask.sum())


def _prefix_ids(tb: TreeBatch, row: int, offset: int) -> torch.Tensor:
    # the teacher prefix lies in the trunk, whose columns are positions 0..offset-1
    return tb.input_ids[row, :offset]


def hindsight_hidden_states(
    model: nn.Module,
    batch: dict,
    *,
    teacher: str = "live",
    teacher_model: nn.Module | None = None,
    strategy: str = "auto",
) -> HiddenStates:
    """Student (with grad) and teacher (no grad) final hidden states at the scored tokens.

    Args:
        model: a Hugging Face causal LM (``*ForCausalLM``, or a peft model wrapping one).
        batch: a dict from :class:`hsd.data.HindsightCollator` (per-tuple or packed layout).
        teacher: ``"live"`` (current weights, prefix reused; the paper), ``"ema"`` (pass
            ``teacher_model``, e.g. :class:`EMATeacher`) or ``"base"`` (peft adapter disabled).
        teacher_model: the EMA teacher's model (kind ``"ema"`` only).
        strategy: ``"auto"``, ``"masked"``, ``"loop"`` or ``"full"`` (see the module docstring).

    Returns:
        :class:`HiddenStates` with ``seq_ids`` = the tuple of each scored token.
    """
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    if (teacher == "ema") != (teacher_model is not None):
        raise ValueError("teacher='ema' needs teacher_model (and only it takes one)")
    if isinstance(teacher_model, EMATeacher):
        teacher_model = teacher_model.module
    view = _ModelView(model)
    device = view.decoder.get_input_embeddings().weight.device
    tb = TreeBatch.from_batch(batch, device)
    teacher_view = _ModelView(teacher_model) if teacher_model is not None else view
    chosen = _choose_strategy(teacher_view if teacher != "live" else view, strategy)

    reuse_student = teacher == "live" and chosen != "full"
    student_hidden, layers = _student_pass(view, tb, keep_cache=reuse_student)
    student = student_hidden[tb.scored_batch_index, tb.student_scored_positions]

    teacher_tokens = int(tb.suffix_lengths.sum())
    prefix_tokens = int(tb.teacher_prefix_offsets.sum())
    with _teacher_context(model, teacher), _checkpointing_off(view.decoder, teacher_view.decoder):
        if chosen == "full":
            teacher_hidden, teacher_tokens = _teacher_full(teacher_view, tb)
            saved = 0
        else:
            prefill_tokens = needed_prefix = 0
            if layers is None:  # ema/base teacher: its own prefix, once per row, without grad
                layers, prefill_tokens = _prefill(teacher_view, tb)
                # what the branches need once per row (its longest offset), the rest is reused
                longest = torch.zeros_like(tb.trunk_lengths).scatter_reduce(
                    0, tb.teacher_batch_index, tb.teacher_prefix_offsets, "amax")
                needed_prefix = int(longest.sum())
            run = _teacher_masked if chosen == "masked" else _teacher_loop
            teacher_hidden = run(teacher_view, tb, layers)
            teacher_tokens += prefill_tokens
            saved = prefix_tokens - needed_prefix
    counts = {
        "student_tokens": int(tb.attention_mask.sum()),
        "teacher_tokens": teacher_tokens,
        "teacher_tokens_saved": saved,
        "scored_tokens": int(tb.target_ids.numel()),
        "tuples": int(tb.teacher_batch_index.numel()),
        "teacher_strategy": chosen,
    }
    return HiddenStates(student, teacher_hidden.to(student.dtype), tb.target_ids, tb.scored_tuple_index, counts)
