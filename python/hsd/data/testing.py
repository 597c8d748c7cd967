"""Tiny in-process tokenizers and synthetic WildChat-schema rows, for tests and examples.

No network: a byte-level BPE is trained in milliseconds on a small word list and wrapped in a
``PreTrainedTokenizerFast`` with one of the chat templates below, written in the style of the
models they are named after (the same markers, whitespace, role rules and last-turn quirks):

- ``"chatml"``: Qwen2.5 / ChatML.
- ``"llama3"``: Llama-3 (BOS, header markers, trimmed content).
- ``"llama31"``: Llama-3.1, with its default system block (knowledge and today's date) that is
  rendered even when the conversation has no system message.
- ``"mistral"``: Mistral-instruct v0.3 (``[INST] ... [/INST]``, a reply rendered as
  ``' ' + content + eos``, alternating roles enforced, the system prompt before the last user
  message only).
- ``"llama2"``: Llama-2-chat (``' ' + reply + ' ' + eos``, BOS before every user turn).
- ``"gemma"``: Gemma (``model`` role, ``<end_of_turn>`` closes turns while eos is ``<eos>``,
  no system role).
- ``"phi3"``: Phi-3 (``<|end|>`` closes turns while eos is ``<|endoftext|>``, which the template
  appends after a conversation).
- ``"qwen3"``: Qwen3 (a reply after the last user message gets a ``<think>`` block, earlier
  replies do not; reasoning is stripped from history; ``enable_thinking=False`` puts the empty
  think block in the generation prompt).
"""

from __future__ import annotations

import random

__all__ = ["CHAT_TEMPLATES", "tiny_chat_tokenizer", "synthetic_wildchat_rows", "synthetic_tuple_groups",
           "synthetic_conversation", "WORDS"]

_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA31 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for m in loop_messages %}{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}{%- endfor %}"
    "{{- bos_token }}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\n\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported, with the exception of an "
    "initial optional system message!') }}{%- endif %}"
    "{%- endfor %}"
)
_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
_GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
_PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
_QWEN3 = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

#: Jinja chat templates by style name, and each style's (bos, eos) tokens.
CHAT_TEMPLATES = {
    "chatml": (_CHATML, None, "<|im_end|>"),
    "llama3": (_LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "llama31": (_LLAMA31, "<|begin_of_text|>", "<|eot_id|>"),
    "mistral": (_MISTRAL, "<s>", "</s>"),
    "llama2": (_LLAMA2, "<s>", "</s>"),
    "gemma": (_GEMMA, "<bos>", "<eos>"),
    "phi3": (_PHI3, None, "<|endoftext|>"),
    "qwen3": (_QWEN3, None, "<|im_end|>"),
}

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|pad|>", "<s>", "</s>", "[INST]", "[/INST]", "<bos>", "<eos>",
            "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
#: Added but not special (as in Qwen3): message text may hold them and they stay one token.
_ADDED = ["<think>", "</think>"]

#: The vocabulary of the synthetic conversations.
WORDS = (
    "the a an is are was be to of and in that it for on with as you I this not but what can do how why "
    "please write explain code story poem list again shorter longer better wrong thanks great more "
    "example python function error fix answer question make give tell about help"
).split()


def tiny_chat_tokenizer(style: str = "chatml", pad: str | None = "<|pad|>", with_template: bool = True,
                        vocab_size: int = 400, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer (``vocab_size`` ids) with the ``style`` chat template.

    ``pad=None`` leaves the pad token unset; ``pad="eos"`` makes pad equal to eos.
    ``with_template=False`` gives a tokenizer without a chat template. ``corpus``: extra
    training text (e.g. synthetic conversations, for realistic token counts in benchmarks).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .templates import HINDSIGHT_PRESETS

    if style not in CHAT_TEMPLATES:
        raise ValueError(f"unknown chat template style {style!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    template, bos, eos = CHAT_TEMPLATES[style]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [" ".join(WORDS), *HINDSIGHT_PRESETS.values(), "user assistant system model\n\n"] * 4
    bpe.train_from_iterator(text + list(corpus or []), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=bos,
        eos_token=eos,
        pad_token=eos if pad == "eos" else pad,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.add_tokens(_ADDED)
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


def synthetic_tuple_groups(n: int, seed: int = 0, min_turns: int = 1, max_turns: int = 4) -> list[list]:
    """The interaction tuples of :func:`synthetic_wildchat_rows`, read as a WildChat file is
    (readers, tuple extraction) and grouped by conversation."""
    from .readers import read_conversations
    from .tuples import extract_tuples, group_by_conversation

    rows = synthetic_wildchat_rows(n, seed=seed, min_turns=min_turns, max_turns=max_turns)
    return list(group_by_conversation(extract_tuples(read_conversations(rows))))


def synthetic_conversation(turns: int, seed: int = 0, user_words=(10, 60), assistant_words=(40, 200),
                           conversation_id: str = "long") -> list[dict]:
    """One conversation of ``turns`` user/assistant exchanges with realistic message lengths
    (users write a sentence or a paragraph, assistants several paragraphs)."""
    rng = random.Random(seed)
    messages = []
    for _ in range(turns):
        for role, (low, high) in (("user", user_words), ("assistant", assistant_words)):
            sentences, n = [], rng.randint(low, high)
            while n > 0:
                k = min(n, rng.randint(5, 18))
                sentences.append(_sentence(rng, k, k))
                n -= k
            messages.append({"role": role, "content": " ".join(sentences)})
    return messages
