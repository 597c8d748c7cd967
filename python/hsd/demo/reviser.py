"""The demo's model: a word-level tokenizer and a tiny Llama that can revise in context.

The base model is pretrained (seeded, about a minute on 2 CPU cores) on a mix that gives it the
abilities hindsight self-distillation relies on, and no preference of its own:

* a request answered in a random style (the base's prior; greedy first tries then settle on a few
  favourite styles, leaving the others at 0%);
* a request, a reply, a complaint naming another style, and the reply revised into that style;
* a style preference stated inside the user message, in several wrappers, hsd's "online"
  hindsight block among them (what the self-teacher sees), and neutral follow-ups in the block,
  which leave the reply at the prior.

:func:`load_or_build_reviser` caches the result (safetensors weights and the tokenizer) under
``~/.cache/hsd/demo`` (``HSD_CACHE`` overrides), keyed by the recipe, so later runs skip it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import world as W

__all__ = ["ReviserRecipe", "build_tokenizer", "build_model", "pretrain", "load_or_build_reviser",
           "conversation_ids", "default_cache_dir"]

logger = logging.getLogger("hsd")

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL = ("<|pad|>", "<unk>", "<|im_start|>", "<|im_end|>")
_ROLES = ("user", "assistant", "system")


@dataclass(frozen=True)
class ReviserRecipe:
    """How the base model is built: architecture, pretraining mix and optimisation (seeded)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_layers: int = 2
    num_heads: int = 4
    steps: int = 500
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 30
    # the mix: shares of plain answers, revisions after a complaint, stated preferences
    # (in a wrapper or in the hindsight block), neutral follow-ups in the block
    mix: tuple = (("plain", 0.25), ("revision", 0.25), ("stated", 0.4), ("neutral_block", 0.1))
    seed: int = 0

    def key(self) -> str:
        """A short hash of the recipe and of the code that builds the model (the world and this
        module, the torch and transformers versions): the cache key."""
        import inspect
        import sys

        import transformers

        source = inspect.getsource(W) + inspect.getsource(sys.modules[__name__])
        blob = json.dumps([dataclasses.asdict(self), source, torch.__version__.split("+")[0],
                           transformers.__version__], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer():
    """The word-level tokenizer over :func:`hsd.demo.world.vocabulary` with a ChatML template
    (a ``PreTrainedTokenizerFast``; ``<|im_end|>`` ends a turn and is the eos token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in W.vocabulary() if w not in _ROLES]
    vocab = {token: i for i, token in enumerate((*_SPECIAL, *_ROLES, *words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+|[^\w\s]+, the world's own split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", unk_token="<unk>",
                                        eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"],
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(tokenizer, recipe: ReviserRecipe):
    """A randomly initialised ``LlamaForCausalLM`` of the recipe's size (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=recipe.hidden_size,
                         intermediate_size=recipe.intermediate_size, num_hidden_layers=recipe.num_layers,
                         num_attention_heads=recipe.num_heads, num_key_value_heads=recipe.num_heads,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def conversation_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of ``messages`` as the ChatML template renders them, and the training labels
    (assistant contents and their end-of-turn token; -100 elsewhere). Built from per-message
    encodings, which equals tokenising the rendered text (the pre-tokenizer drops the
    template's newlines; checked in the tests), and is fast."""
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids, labels = [], []
    for m in messages:
        head = [start, tokenizer.convert_tokens_to_ids(m["role"])]
        body = tokenizer.encode(m["content"], add_special_tokens=False) + [end]
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, labels


def _sample_conversation(world: W.World, rng: random.Random, kind: str, block: str) -> list[dict]:
    request = world.request(rng=rng)
    items = request.answer_items(rng)
    style = rng.choice(W.STYLES)
    if kind == "plain":
        return [{"role": "user", "content": request.text}, {"role": "assistant", "content": W.render(items, style)}]
    if kind == "revision":
        other = rng.choice([s for s in W.STYLES if s != style])
        return [{"role": "user", "content": request.text},
                {"role": "assistant", "content": W.render(items, style)},
                {"role": "user", "content": W.complaint(other, rng)},
                {"role": "assistant", "content": W.render(request.answer_items(rng), other)}]
    if kind == "stated":
        if rng.random() < 0.4:  # the hindsight block is one of the ways a preference is stated
            text = request.text + block.format(followup=W.complaint(style, rng))
        else:
            text = W.preference_request(request.text, style, rng)
        return [{"role": "user", "content": text}, {"role": "assistant", "content": W.render(items, style)}]
    if kind == "neutral_block":
        text = request.text + block.format(followup=rng.choice(W.NEUTRAL_FOLLOWUPS))
        return [{"role": "user", "content": text}, {"role": "assistant", "content": W.render(items, style)}]
    raise ValueError(f"unknown pretraining kind {kind!r}")


def pretraining_batch(tokenizer, world: W.World, rng: random.Random, recipe: ReviserRecipe, block: str):
    """One right-padded batch of ``recipe.batch_size`` conversations drawn from the mix."""
    kinds, shares = zip(*recipe.mix)
    rows = [conversation_ids(tokenizer, _sample_conversation(world, rng, kind, block))
            for kind in rng.choices(kinds, weights=shares, k=recipe.batch_size)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, lab) in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    return ids, labels, mask


def pretrain(model, tokenizer, recipe: ReviserRecipe, progress: bool = True) -> list[float]:
    """Train ``model`` on the pretraining mix (AdamW, warm-up then cosine); returns the losses."""
    from tqdm.auto import tqdm

    from ..data.templates import HINDSIGHT_PRESETS

    block = HINDSIGHT_PRESETS["online"]
    rng = random.Random(recipe.seed)
    world = W.World(recipe.seed)
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)

    def schedule(step):
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    losses = []
    bar = tqdm(range(recipe.steps), desc="pretraining the base reviser", unit="step", disable=not progress)
    for _ in bar:
        ids, labels, mask = pretraining_batch(tokenizer, world, rng, recipe, block)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


@contextlib.contextmanager
def quiet_weights_io():
    """No transformers progress bar for loading or saving this 2 MB model."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def default_cache_dir() -> Path:
    """``$HSD_CACHE/demo`` or ``~/.cache/hsd/demo``."""
    root = os.environ.get("HSD_CACHE") or Path.home() / ".cache" / "hsd"
    return Path(root) / "demo"


def load_or_build_reviser(recipe: ReviserRecipe | None = None, cache_dir: str | os.PathLike | None = None,
                          use_cache: bool = True, progress: bool = True):
    """The pretrained base reviser and its tokenizer: from the cache when this recipe was built
    before, else pretrained now and cached (atomically). Returns ``(model, tokenizer, info)``,
    ``info`` holding the cache path, whether it was cached, the pretraining time and final loss."""
    from transformers import LlamaForCausalLM

    from ..checkpoint import atomic_directory

    recipe = recipe or ReviserRecipe()
    tokenizer = build_tokenizer()
    path = Path(cache_dir or default_cache_dir()) / f"reviser-{recipe.key()}"
    if use_cache and (path / "hsd_reviser.json").is_file():
        with quiet_weights_io():
            model = LlamaForCausalLM.from_pretrained(path).eval()
        info = json.loads((path / "hsd_reviser.json").read_text())
        logger.info("hsd demo: base reviser loaded from %s", path)
        return model, tokenizer, {**info, "path": str(path), "cached": True}
    model = build_model(tokenizer, recipe)
    start = time.perf_counter()
    losses = pretrain(model, tokenizer, recipe, progress=progress)
    info = {"recipe": dataclasses.asdict(recipe), "pretrain_seconds": round(time.perf_counter() - start, 1),
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "parameters": sum(p.numel() for p in model.parameters())}
    if use_cache:
        with atomic_directory(path, overwrite=True) as tmp, quiet_weights_io():
            model.save_pretrained(tmp)  # safetensors
            (tmp / "hsd_reviser.json").write_text(json.dumps(info, indent=1))
    return model, tokenizer, {**info, "path": str(path) if use_cache else None, "cached": False}
