"""Chat-template rendering and the one tokenisation rule every layout shares.

The rule: render messages with the tokenizer's chat template, then tokenise the text in
segments cut at the start and end of every assistant reply, so a reply's tokens are always
``encode(reply)`` wherever it appears (as the scored y, or as history in a later turn) and
its end-of-turn token follows it. Reply spans are located from the template itself: the text
of ``messages[:j]`` with a generation prompt must be a prefix of the full rendering, and the
reply must follow it (after any markup the template adds, such as Qwen3's empty think block),
closed by the end-of-turn token. A template that renders a message differently depending on
what follows fails that check with :class:`ChatTemplateError` instead of producing ids that
silently disagree between layouts.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from .records import ASSISTANT, DataError

__all__ = ["ChatRenderer", "ChatTemplateError", "EncodedText", "common_prefix_len"]


class ChatTemplateError(DataError):
    """The tokenizer's chat template is missing or renders a conversation inconsistently."""


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two sequences (token ids or strings)."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class EncodedText:
    """Token ids of a rendered text plus the token index of each assistant reply span."""

    ids: list[int]
    reply_token_spans: list[tuple[int, int]]  # [start, end) in ids, one per located reply


_RENDERERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class ChatRenderer:
    """Render and tokenise conversations with one tokenizer's chat template.

    Args:
        tokenizer: any Hugging Face tokenizer with a ``chat_template``.
        chat_template_kwargs: extra variables for the template (e.g. ``{"enable_thinking": False}``).
        end_of_turn_token: the token that closes an assistant reply and is scored after y;
            defaults to ``tokenizer.eos_token``.
    """

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None, end_of_turn_token: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template to a Jinja "
                "template (or load the instruct model's tokenizer)"
            )
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.end_of_turn_token = end_of_turn_token or tokenizer.eos_token
        if not self.end_of_turn_token:
            raise ChatTemplateError("the tokenizer has no eos_token; pass end_of_turn_token=")
        eot_ids = self.encode(self.end_of_turn_token)
        if len(eot_ids) != 1:
            raise ChatTemplateError(
                f"end-of-turn token {self.end_of_turn_token!r} encodes to {len(eot_ids)} ids; it must be one token"
            )
        self.end_of_turn_id = eot_ids[0]
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            before, reply = self.locate_reply(probe[:1], "Hello", "the probe conversation")
        except ChatTemplateError as e:
            raise ChatTemplateError(
                f"{e}. The chat template must close an assistant reply with the end-of-turn token "
                f"{self.end_of_turn_token!r}; pass end_of_turn_token= if it uses another one"
            ) from None
        text = before + reply + self.end_of_turn_token
        cut = self.encode_with_cuts(text, [(len(before), len(before) + len(reply))]).ids
        if self.decode(cut) != self.decode(self.encode(text)):
            # SentencePiece-style prefix spaces would silently insert a space before every reply.
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} changes the text when a reply is tokenised on its own "
                f"({self.decode(cut)!r} instead of {self.decode(self.encode(text))!r}); it adds a prefix "
                "space at the start of each encode call. Load it without one (e.g. add_prefix_space=False)"
            )

    @classmethod
    def for_tokenizer(cls, tokenizer, chat_template_kwargs: dict | None = None, end_of_turn_token: str | None = None):
        """A cached renderer per (tokenizer, options): the constructor's checks run once."""
        if isinstance(tokenizer, ChatRenderer):
            return tokenizer
        key = (tuple(sorted((chat_template_kwargs or {}).items())), end_of_turn_token)
        per_tokenizer = _RENDERERS.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = cls(tokenizer, chat_template_kwargs, end_of_turn_token)
        return per_tokenizer[key]

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        """The template's text for ``messages``; template errors name ``where``."""
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
            )
        except Exception as e:  # Jinja raise_exception, missing variables, ...
            raise ChatTemplateError(f"{where}: the chat template failed to render: {e}") from e

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; the template already wrote any BOS, so none is added."""
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens kept and no space clean-up (inverse of render)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def locate_reply(self, history: list[dict], reply: str, where: str) -> tuple[str, str]:
        """Render ``history + [assistant reply]``; return (text before the reply, reply as rendered).

        The text before the reply is the generation prompt plus any markup the template puts
        between it and the content; the reply as rendered may be stripped by the template.
        """
        full = self.render(history + [{"role": ASSISTANT, "content": reply}], False, where)
        prompt = self.render(history, True, where)
        if not full.startswith(prompt):
            raise ChatTemplateError(
                f"{where}: the chat template renders the history differently once a reply follows "
                f"(generation prompt {prompt[-40:]!r} is not a prefix of the rendered reply)"
            )
        for candidate in dict.fromkeys((reply, reply.strip(), reply.lstrip(), reply.rstrip())):
            start = full.find(candidate + self.end_of_turn_token, len(prompt))
            if start >= 0:
                return full[:start], candidate
        raise ChatTemplateError(
            f"{where}: the rendered text does not contain the reply followed by {self.end_of_turn_token!r}"
        )

    def reply_spans(self, messages: list[dict], text: str, where: str, strict: bool) -> list[tuple[int, int] | None]:
        """Character span of every assistant message of ``messages`` inside ``text``.

        ``text`` must be a rendering that starts with ``messages``. With ``strict``, a reply the
        template renders differently as history than as the last reply raises
        :class:`ChatTemplateError`; otherwise its span is ``None`` (no cut there).
        """
        spans: list[tuple[int, int] | None] = []
        for j, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            try:
                before, reply = self.locate_reply(messages[:j], message["content"], f"{where}, message {j}")
            except ChatTemplateError:
                if strict:
                    raise
                spans.append(None)
                continue
            if text.startswith(before + reply + self.end_of_turn_token):
                spans.append((len(before), len(before) + len(reply)))
            elif strict:
                raise ChatTemplateError(
                    f"{where}, message {j}: the chat template renders this assistant message differently "
                    "inside the conversation than as the last reply (e.g. a think block added only to the "
                    "last turn); the packed layout cannot share one sequence, use the per-tuple layout"
                )
            else:
                spans.append(None)
        return spans

    def encode_with_cuts(self, text: str, spans: list[tuple[int, int]]) -> EncodedText:
        """Tokenise ``text`` cut at every span boundary; return ids and each span's token range."""
        cuts = sorted({0, len(text), *(c for span in spans for c in span)})
        token_at: dict[int, int] = {}
        ids: list[int] = []
        for a, b in zip(cuts, cuts[1:]):
            token_at[a] = len(ids)
            ids.extend(self.encode(text[a:b]))
        token_at[len(text)] = len(ids)
        return EncodedText(ids, [(token_at[a], token_at[b]) for a, b in spans])
