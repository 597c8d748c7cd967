"""Tiny in-process tokenizers and synthetic WildChat-schema rows, for tests and examples.

No network: a byte-level BPE is trained in milliseconds on a small word list and wrapped in a
``PreTrainedTokenizerFast`` with one of three chat templates: ``"chatml"`` (Qwen2.5 style),
``"llama3"`` (different turn markers, a BOS token and trimmed content) and ``"qwen3"`` (the last
assistant reply gets an empty think block that earlier replies do not, which the packed layout
must reject).
"""

from __future__ import annotations

import random

__all__ = ["CHAT_TEMPLATES", "tiny_chat_tokenizer", "synthetic_wildchat_rows", "WORDS"]

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.index0 > ns.last_query %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

#: Jinja chat templates by style name, and each style's (bos, eos) tokens.
CHAT_TEMPLATES = {
    "chatml": (_CHATML, None, "<|im_end|>"),
    "llama3": (_LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "qwen3": (_QWEN3, None, "<|im_end|>"),
}

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]

#: The vocabulary of the synthetic conversations.
WORDS = (
    "the a an is are was be to of and in that it for on with as you I this not but what can do how why "
    "please write explain code story poem list again shorter longer better wrong thanks great more "
    "example python function error fix answer question make give tell about help"
).split()


def tiny_chat_tokenizer(style: str = "chatml", pad: str | None = "<|pad|>", with_template: bool = True):
    """A byte-level BPE tokenizer (a few hundred ids) with the ``style`` chat template.

    ``pad=None`` leaves the pad token unset; ``pad="eos"`` makes pad equal to eos.
    ``with_template=False`` gives a tokenizer without a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .templates import HINDSIGHT_PRESETS

    template, bos, eos = CHAT_TEMPLATES[style]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = [" ".join(WORDS), *HINDSIGHT_PRESETS.values(), "user assistant system\n\n"] * 4
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos if pad == "eos" else pad,
        clean_up_tokenization_spaces=False,
    )
    if with_template:
        tokenizer.chat_template = template
    return tokenizer


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def synthetic_wildchat_rows(n: int, seed: int = 0, min_turns: int = 1, max_turns: int = 4, words=(3, 12)) -> list[dict]:
    """``n`` rows in the WildChat-1M schema (``conversation_hash``, ``conversation``, ...)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = rng.randint(min_turns, max_turns)
        conversation = []
        for turn in range(turns):
            for role in ("user", "assistant"):
                conversation.append({
                    "role": role, "content": _sentence(rng, *words), "language": "English",
                    "toxic": False, "redacted": False, "turn_identifier": 1000 * i + turn,
                })
        rows.append({
            "conversation_hash": f"hash{i:05d}", "model": "gpt-4-0314", "conversation": conversation,
            "turn": turns, "language": "English" if i % 7 else "French", "toxic": False, "redacted": False,
            "hashed_ip": f"ip{i % 13}", "country": "Switzerland", "state": None,
        })
    return rows
