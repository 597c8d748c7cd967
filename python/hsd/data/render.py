"""Chat-template rendering and the one tokenisation rule every layout shares.

The rule: render messages with the tokenizer's chat template, locate each message's content
in the rendered text, and tokenise the text in segments cut at the start and end of every
located content. Message contents are logged text: they are encoded with special tokens
split (a user who typed ``<|im_end|>`` wrote text, not a turn marker); the template's own
markup between them is encoded normally, so its markers stay special tokens.

An assistant reply's segment is the whole text between the end of its prompt (the
generation prompt, or the markup before the content) and its end-of-turn token, with any
whitespace the template adds around the content (Mistral's ``' ' + content``, Llama-2's
``' ' + content + ' '``): its ids are exactly what the tokenizer gives for the text the model
generates before the end-of-turn token. Markup that is not whitespace (Qwen3's empty think
block) stays prompt. Because every layout cuts at the same places, a reply's ids are the same
wherever it appears: as the scored y or as history in a later turn.

Caveat (documented, accepted): cutting at message boundaries can tokenise differently from
one whole-text encode where a content starts or ends with whitespace that BPE would merge
with the neighbouring markup (``' ' + reply`` is one segment here, so ``' the'`` stays one
token, but the newline before a ChatML reply is never merged into it). Student and teacher
sequences, packed and per-tuple, all follow this rule, so they agree with each other.

Locating contents: the conversation is also rendered with a unique sentinel string in place of
each content (private-use characters, cached per sequence of roles), which gives the template's
markup between contents and the order in which it places them (Mistral v0.3 writes the system
prompt inside the last user turn). The real text must then read markup, content, markup, ...:
each content as written or as the template trimmed it (``strip``/``lstrip``/``rstrip``, of
whitespace or of newlines). So a content is found where the template put it, even when the same
string also occurs in the markup before it (a user message that is literally ``user``, or
``a``, which ``<|im_start|>`` contains) or in another message. A content the template cuts
(Qwen3 strips reasoning from history) is the text up to the next markup, when that text is part
of the content, and is still encoded as text. Where the real text does not follow the sentinel
rendering (a template whose markup depends on the contents' text), contents are searched in
message order as a fallback (each search starts where the previous content ended), and one that
cannot be found is encoded as markup.
"""

from __future__ import annotations

import bisect
import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any

from .records import ASSISTANT, USER, DataError

__all__ = ["ChatRenderer", "ChatTemplateError", "Tokenized", "common_prefix_len"]

logger = logging.getLogger("hsd.data")


class ChatTemplateError(DataError):
    """The tokenizer's chat template is missing or renders a conversation inconsistently."""


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two sequences (token ids or strings).

    Binary search on slice equality: O(n log n) work done by C comparisons, not a Python loop
    per element (the packed layout calls this once per tuple on whole conversations).
    """
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low], a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


Span = tuple[int, int]


@dataclass
class Tokenized:
    """A rendered text, where its messages' contents are, and its ids under the shared rule.

    Attributes:
        text: the rendered text.
        messages: the messages it renders.
        spans: per message, the character span of its content (an assistant reply: the whole
            reply segment up to its end-of-turn token), or None when not located (empty).
        ids: the token ids.
        segments: ``(start, end, is_content)`` of every encoded segment (the text cut at the
            spans' ends), in text order.
        offsets: the token index where each segment starts.
    """

    text: str
    messages: list[dict]
    spans: list[Span | None]
    ids: list[int]
    segments: list[tuple[int, int, bool]]
    offsets: list[int]

    def token_index(self, char: int) -> int:
        """Token index of a cut point (a span boundary, 0 or ``len(text)``)."""
        if char == len(self.text):
            return len(self.ids)
        k = bisect.bisect_left(self.segments, (char,))
        if k == len(self.segments) or self.segments[k][0] != char:
            raise ValueError(f"character {char} is not a cut point")
        return self.offsets[k]

    def token_span(self, message: int) -> tuple[int, int]:
        """``[start, end)`` in ``ids`` of a located message's content."""
        a, b = self.spans[message]
        return self.token_index(a), self.token_index(b)


@dataclass(frozen=True)
class ReplyView:
    """``history + [reply]`` rendered as the last turn, cut after the reply's end-of-turn token."""

    text: str
    prompt_end: int  # where the generation prompt ends (the model starts generating here)
    spans: list  # the messages' spans in ``text`` (history, then the reply)


_RENDERERS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
_PROBE_USER, _PROBE_REPLY, _PROBE_NEXT = "Hi there", "Hello to you", "Thanks a lot"


class ChatRenderer:
    """Render and tokenise conversations with one tokenizer's chat template.

    Args:
        tokenizer: any Hugging Face tokenizer with a ``chat_template``.
        chat_template_kwargs: extra variables for the template (e.g. ``{"enable_thinking": False}``).
        end_of_turn_token: the token that closes an assistant reply and is scored after y. By
            default it is read from the template: a probe conversation is rendered and the
            special token that follows the reply is taken (``<|im_end|>``, ``<|eot_id|>``,
            Gemma's ``<end_of_turn>``, Phi-3's ``<|end|>``, Mistral's ``</s>``).
    """

    def __init__(self, tokenizer, chat_template_kwargs: dict | None = None, end_of_turn_token: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} has no chat template; set tokenizer.chat_template to a Jinja "
                "template (or load the instruct model's tokenizer)"
            )
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._segments: dict[tuple[str, bool], list[int]] = {}
        self._segment_tokens = 0
        self._max_segment_tokens = 1 << 18  # ~10 MB of ids: more than a long conversation
        self._fast = self._compiled_template()
        self._fast_checks = 16  # renders compared with apply_chat_template before trusting the direct path
        self._skeletons: dict[tuple, tuple[list[str], list[int]] | None] = {}
        self._fallback_logged = False
        self.history_lead = ""  # set from the probe below
        self.special_tokens = self._special_token_strings()
        probe = [{"role": USER, "content": _PROBE_USER}]
        prompt = self.render(probe, True, "the probe conversation")
        full = self.render(probe + [{"role": ASSISTANT, "content": _PROBE_REPLY}], False, "the probe conversation")
        self.end_of_turn_token = end_of_turn_token or self._detect_end_of_turn(prompt, full)
        eot_ids = self.encode(self.end_of_turn_token)
        if len(eot_ids) != 1:
            raise ChatTemplateError(
                f"end-of-turn token {self.end_of_turn_token!r} encodes to {len(eot_ids)} ids; it must be one token"
            )
        self.end_of_turn_id = eot_ids[0]
        try:
            view = self.reply_view(probe, _PROBE_REPLY, "the probe conversation")
        except ChatTemplateError as e:
            raise ChatTemplateError(
                f"{e}. The chat template must close an assistant reply with the end-of-turn token "
                f"{self.end_of_turn_token!r}; pass end_of_turn_token= if it uses another one"
            ) from None
        # How a reply is introduced when it is history (not the last turn): the whitespace the
        # template puts between the generation prompt and the content (Mistral: ' ').
        history = self.render(probe + [{"role": ASSISTANT, "content": _PROBE_REPLY},
                                       {"role": USER, "content": _PROBE_NEXT}], False, "the probe conversation")
        at = history.find(_PROBE_REPLY, len(prompt))
        if history.startswith(prompt) and at >= 0 and history[len(prompt) : at].isspace():
            self.history_lead = history[len(prompt) : at]
        #: Whether a reply renders differently as history than as the last turn (Qwen3's empty
        #: think block): the packed layout then scores replies in student branches.
        self.replies_branch = not history.startswith(view.text[: view.text.rindex(_PROBE_REPLY)])
        whole = self.encode(view.text)
        cut = self.tokenize(view.text, probe + [{"role": ASSISTANT, "content": _PROBE_REPLY}], spans=view.spans).ids
        if self.decode(cut) != self.decode(whole):
            # SentencePiece-style prefix spaces would silently insert a space before every reply.
            raise ChatTemplateError(
                f"{type(tokenizer).__name__} changes the text when a reply is tokenised on its own "
                f"({self.decode(cut)!r} instead of {self.decode(whole)!r}); it adds a prefix "
                "space at the start of each encode call. Load it without one (e.g. add_prefix_space=False)"
            )

    @classmethod
    def for_tokenizer(cls, tokenizer, chat_template_kwargs: dict | None = None, end_of_turn_token: str | None = None):
        """A cached renderer per (tokenizer, options): the constructor's checks run once."""
        if isinstance(tokenizer, ChatRenderer):
            return tokenizer
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise ValueError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
        key = (repr(sorted((chat_template_kwargs or {}).items())), end_of_turn_token, tokenizer.chat_template,
               tokenizer.eos_token)
        per_tokenizer = _RENDERERS.setdefault(tokenizer, {})
        if key not in per_tokenizer:
            per_tokenizer[key] = cls(tokenizer, chat_template_kwargs, end_of_turn_token)
        return per_tokenizer[key]

    # ---- template -------------------------------------------------------------------------

    def _special_token_strings(self) -> list[str]:
        """Strings of the special tokens (longest first): what message text must not turn into."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        strings = {t.content for t in decoder.values() if getattr(t, "special", False) and t.content}
        strings.update(s for s in getattr(self.tokenizer, "all_special_tokens", []) if s)
        return sorted(strings, key=len, reverse=True)

    def _added_token_strings(self) -> list[str]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        return sorted({t.content for t in decoder.values() if t.content}, key=len, reverse=True)

    def _detect_end_of_turn(self, prompt: str, full: str) -> str:
        """The special token right after the probe reply (after any whitespace), else eos."""
        eos = self.tokenizer.eos_token
        at = full.find(_PROBE_REPLY, len(prompt)) if full.startswith(prompt) else -1
        if at >= 0:
            rest = full[at + len(_PROBE_REPLY) :]
            rest = rest[len(rest) - len(rest.lstrip()) :]
            if eos and rest.startswith(eos):
                return eos
            for token in self.special_tokens + self._added_token_strings():
                if rest.startswith(token):
                    if token != eos:
                        logger.info("end-of-turn token read from the chat template: %r (eos is %r)", token, eos)
                    return token
        if not eos:
            raise ChatTemplateError(
                "no end-of-turn token: the chat template does not close a reply with a special token and the "
                "tokenizer has no eos_token; pass end_of_turn_token="
            )
        return eos

    def _compiled_template(self):
        """The tokenizer's compiled Jinja template, rendered directly (``apply_chat_template``
        spends most of its time converting plain role/content dicts, ~1 ms for a 20-message
        window, while the template itself takes ~50 us); None where unavailable. Its output is
        compared with ``apply_chat_template`` on the first renders (see :meth:`render`)."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            template = self.tokenizer.get_chat_template() if hasattr(self.tokenizer, "get_chat_template") else None
            if not isinstance(template, str):
                return None
            variables = {**dict(getattr(self.tokenizer, "special_tokens_map", {}) or {}), **self.chat_template_kwargs}
            return _compile_jinja_template(template), variables
        except Exception:  # an older or newer transformers: use apply_chat_template only
            return None

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        """The template's text for ``messages``; template errors name ``where``."""
        try:
            slow = None
            if self._fast is None or self._fast_checks > 0:
                slow = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.chat_template_kwargs
                )
            if self._fast is not None:
                compiled, variables = self._fast
                fast = compiled.render(messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                                       tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                                       **variables)
                if slow is None:
                    return fast
                self._fast_checks -= 1
                if fast != slow:
                    logger.debug("direct template rendering differs from apply_chat_template; not using it")
                    self._fast = None
            return slow
        except Exception as e:  # Jinja raise_exception, missing variables, role rules, ...
            if slow is not None and self._fast is not None:
                self._fast = None  # apply_chat_template rendered it: never trust the direct path again
                return slow
            raise ChatTemplateError(f"{where}: the chat template failed to render: {e}") from e

    def contains_special_text(self, text: str) -> bool:
        """Whether ``text`` holds the string of a special token (it is encoded as text)."""
        return any(token in text for token in self.special_tokens)

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; the template already wrote any BOS, so none is added."""
        if not text:
            return []
        if split_special_tokens:
            return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str], split_special_tokens: bool = False) -> list[list[int]]:
        """:meth:`encode` of each text, in one tokenizer call."""
        batch = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=split_special_tokens,
                               padding=False, truncation=False, return_attention_mask=False,
                               return_token_type_ids=False)
        return [list(ids) for ids in batch["input_ids"]]

    def clear_cache(self) -> None:
        """Forget the memoised segment ids (benchmarks time cold tokenisation with it)."""
        self._segments.clear()
        self._segment_tokens = 0

    def _encode_segments(self, segments: list[tuple[str, bool]]) -> None:
        """Memoise the ids of the segments not memoised yet, encoded in batches: one call for
        a whole conversation's contents instead of one per segment (the tokenizer's per-call
        overhead was about a third of the tokenisation time). The ids are those of
        :meth:`encode` (a batch encodes each text on its own; no padding, no truncation)."""
        if len(segments) < 4:
            return  # not worth a batch: encoded one by one when used
        for flag in (False, True):
            texts = list(dict.fromkeys(t for t, f in segments if f == flag and t and (t, f) not in self._segments))
            if len(texts) < 2:
                continue
            for text, ids in zip(texts, self.encode_batch(texts, flag)):
                self._memoise(text, flag, ids)

    def prefetch(self, contents: list[str]) -> None:
        """Encode message contents (special tokens split) into the segment cache in one batch."""
        self._encode_segments([(text, True) for text in contents])

    def _memoise(self, text: str, split_special_tokens: bool, ids: list[int]) -> None:
        if self._segment_tokens + len(ids) > self._max_segment_tokens:
            self._segments.clear()  # bounded: conversations stream through
            self._segment_tokens = 0
        self._segments[(text, split_special_tokens)] = ids
        self._segment_tokens += len(ids)

    def _encode_segment(self, text: str, split_special_tokens: bool) -> list[int]:
        """:meth:`encode` memoised: under the cut rule a segment's ids depend on its text alone,
        and the same contents recur in every window, student view and teacher view of a
        conversation (and in consecutive tuples' histories), so each is encoded once."""
        key = (text, split_special_tokens)
        ids = self._segments.get(key)
        if ids is None:
            ids = self.encode(text, split_special_tokens)
            self._memoise(text, split_special_tokens, ids)
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens kept and no space clean-up (inverse of render)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- locating contents ----------------------------------------------------------------

    def locate(self, messages: list[dict], text: str, prompt_end: int | None = None) -> list[Span | None]:
        """The span of every message's content in ``text`` (a rendering of ``messages``,
        possibly cut after its last reply's end-of-turn token); None where a content is
        empty or not rendered. A reply's span runs up to its end-of-turn token (when only
        whitespace lies between) and includes the whitespace the template writes before it.

        ``prompt_end``: the last message is the reply being generated after a generation
        prompt ending there; its span starts there when only whitespace lies between.
        """
        located = self._locate_by_sentinels(messages, text)
        if located is None:
            if not self._fallback_logged:
                self._fallback_logged = True
                logger.debug("the chat template's markup depends on message text; contents are searched in order")
            return self._locate_in_order(messages, text, prompt_end)
        spans, markup_start = located
        eot = self.end_of_turn_token
        lead = self.history_lead
        last = len(messages) - 1
        for m, span in enumerate(spans):
            if span is None or messages[m]["role"] != ASSISTANT:
                continue
            start, end = span
            after = end
            while after < len(text) and text[after].isspace():
                after += 1
            if text.startswith(eot, after):
                end = after
            if m == last and prompt_end is not None:
                if prompt_end <= start and text[prompt_end:start].isspace():
                    start = prompt_end
            elif lead and start - len(lead) >= markup_start[m] and text.startswith(lead, start - len(lead)):
                start -= len(lead)  # the template's whitespace before a reply belongs to it
            spans[m] = (start, end)
        return spans

    #: Sentinel delimiters: private-use characters no chat template writes (the first pair
    #: that no content contains is used).
    _MARKERS = (("\ue000", "\ue001"), ("\U000f0000", "\U000f0001"), ("\U00100000", "\U00100001"))

    def _skeleton(self, roles: tuple, marker: tuple[str, str]) -> tuple[list[str], list[int]] | None:
        """The template's markup for a conversation with these roles: ``pieces`` and ``order``
        such that the rendering reads ``pieces[0] + content(order[0]) + pieces[1] + ...``,
        from one rendering with a sentinel per content (cached: it depends on the roles only).
        None when that rendering fails or renders a content more than once."""
        key = (roles, marker)
        if key in self._skeletons:
            return self._skeletons[key]
        open_, close = marker
        messages = [{"role": role, "content": f"{open_}{i}{close}"} for i, role in enumerate(roles)]
        skeleton = None
        try:
            text = self.render(messages, False, "the sentinel conversation")
        except ChatTemplateError:
            text = None
        if text is not None:
            pieces, order, pos = [], [], 0
            for match in re.finditer(re.escape(open_) + r"(\d+)" + re.escape(close), text):
                pieces.append(text[pos : match.start()])
                order.append(int(match.group(1)))
                pos = match.end()
            pieces.append(text[pos:])
            if len(set(order)) == len(order) and all(i < len(roles) for i in order):
                skeleton = (pieces, order)
        if len(self._skeletons) >= 4096:
            self._skeletons.clear()
        self._skeletons[key] = skeleton
        return skeleton

    @staticmethod
    def _variants(content: str) -> list[str]:
        """How a template may write a content: as is, else trimmed (the most common first)."""
        return list(dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip(),
                                   content.strip("\n"), content.lstrip("\n"), content.rstrip("\n"))))

    def _locate_by_sentinels(self, messages: list[dict], text: str) -> tuple[list[Span | None], list[int]] | None:
        """Content spans read off the template's skeleton (see :meth:`_skeleton`), and where
        the markup before each content starts; None when ``text`` does not follow the
        skeleton (the caller falls back to searching in order)."""
        contents = [m["content"] for m in messages]
        marker = next((mk for mk in self._MARKERS if not any(mk[0] in c for c in contents)), None)
        if marker is None:
            return None
        skeleton = self._skeleton(tuple(m["role"] for m in messages), marker)
        if skeleton is None:
            return None
        pieces, order = skeleton
        spans: list[Span | None] = [None] * len(messages)
        markup_start = [0] * len(messages)
        n, pos = len(text), 0

        def ends_within(piece: str, at: int) -> bool:  # the text was cut inside this markup
            return n - at < len(piece) and piece.startswith(text[at:])

        for i, k in enumerate(order):
            piece, following = pieces[i], pieces[i + 1]
            if not text.startswith(piece, pos):
                return (spans, markup_start) if ends_within(piece, pos) else None
            markup_start[k] = pos
            pos += len(piece)
            if pos == n:
                return spans, markup_start  # cut right before this content (it lies beyond the text)
            content, end = contents[k], None
            after = pos + len(content)
            if text.startswith(content, pos) and (text.startswith(following, after) or ends_within(following, after)):
                end = after  # as written: the common case, no trimmed copies made
            else:
                for variant in self._variants(content)[1:]:
                    after = pos + len(variant)
                    if text.startswith(variant, pos) and (text.startswith(following, after) or ends_within(following, after)):
                        end = after
                        break
            if end is None:
                # Cut by the template (reasoning stripped from history, say): the content is the
                # text up to the markup that follows, which must be part of the message's text
                # (else the markup itself depends on the text: search in order instead).
                at = text.find(following, pos) if following else -1
                if at < 0 or (text[pos:at].strip() and text[pos:at] not in content):
                    return None
                end = at
            if text[pos:end].strip():
                spans[k] = (pos, end)
            pos = end
        tail = pieces[-1]
        if not (n - pos == len(tail) and text.startswith(tail, pos)) and not ends_within(tail, pos):
            return None
        return spans, markup_start

    def _find(self, text: str, content: str, pos: int, reply: bool) -> Span | None:
        """Earliest occurrence at or after ``pos`` of ``content`` as the template may have
        trimmed it; a reply must be followed (after whitespace) by the end-of-turn token and
        its span runs up to that token (the in-order fallback)."""
        best = None
        eot = self.end_of_turn_token
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if not candidate or not candidate.strip():
                continue
            at = text.find(candidate, pos)
            tries = 0
            while at >= 0:
                end = at + len(candidate)
                if reply:
                    close = text.find(eot, end)
                    if close >= 0 and (close == end or text[end:close].isspace()):
                        end = close
                    else:
                        tries += 1
                        at = text.find(candidate, at + 1) if tries < 8 else -1
                        continue
                if best is None or at < best[0] or (at == best[0] and end > best[1]):
                    best = (at, end)
                break
        return best

    def _locate_in_order(self, messages: list[dict], text: str, prompt_end: int | None) -> list[Span | None]:
        """Fallback: each content searched from where the previous one ended."""
        spans: list[Span | None] = []
        pos = 0
        for m, message in enumerate(messages):
            reply = message["role"] == ASSISTANT
            last = m == len(messages) - 1 and prompt_end is not None
            span = self._find(text, message["content"], prompt_end if last else pos, reply)
            if span is not None and reply:
                start, end = span
                if last and text[prompt_end:start].isspace():
                    start = prompt_end
                elif not last and self.history_lead:
                    lead = self.history_lead
                    if start - len(lead) >= pos and text[start - len(lead) : start] == lead:
                        start -= len(lead)
                span = (start, end)
            spans.append(span)
            if span is not None:
                pos = span[1]
        return spans

    def tokenize(self, text: str, messages: list[dict], prompt_end: int | None = None,
                 spans: list[Span | None] | None = None) -> Tokenized:
        """``text`` (a rendering of ``messages``) tokenised under the shared rule; ``spans``
        when already located."""
        if spans is None:
            spans = self.locate(messages, text, prompt_end)
        return self._tokenize_from(text, messages, spans, self._segments_of(text, spans), [], [])

    @staticmethod
    def _segments_of(text: str, spans: list[Span | None]) -> list[tuple[int, int, bool]]:
        """The encoded segments: text cut at every content's start and end."""
        located = sorted(s for s in spans if s is not None)
        segments, pos = [], 0
        for a, b in located:  # spans never overlap
            if a > pos:
                segments.append((pos, a, False))
            if b > a:
                segments.append((a, b, True))
            pos = b
        if pos < len(text):
            segments.append((pos, len(text), False))
        return segments

    def _tokenize_from(self, text, messages, spans, segments, ids, offsets) -> Tokenized:
        """Encode ``segments[len(offsets):]`` after ``ids`` (the ids of the segments before)."""
        ids = list(ids)
        offsets = list(offsets)
        pending = [(text[a:b], is_content) for a, b, is_content in segments[len(offsets) :]]
        self._encode_segments(pending)
        for segment, is_content in pending:
            offsets.append(len(ids))
            ids.extend(self._encode_segment(segment, is_content))
        return Tokenized(text, list(messages), spans, ids, segments, offsets)

    def extend(self, base: Tokenized, text: str, messages: list[dict], prompt_end: int | None = None,
               spans: list[Span | None] | None = None) -> Tokenized:
        """``tokenize(text, messages)``, reusing ``base``'s ids where both texts agree.

        Segments (same place, same extent, same kind) that lie in the text both share keep
        their ids; only the rest of ``text`` is encoded. The result is exactly what
        :meth:`tokenize` gives: under the cut rule a segment's ids depend on its text alone.
        """
        if spans is None:
            spans = self.locate(messages, text, prompt_end)
        segments = self._segments_of(text, spans)
        shared = common_prefix_len(base.text, text)
        # The leading segments both have, then only those inside the shared text.
        kept = common_prefix_len(segments, base.segments)
        kept = min(kept, bisect.bisect_right(segments, (shared, len(text) + 1), hi=kept))
        while kept and segments[kept - 1][1] > shared:
            kept -= 1
        head = base.offsets[kept] if kept < len(base.offsets) else len(base.ids)
        return self._tokenize_from(text, messages, spans, segments, base.ids[:head], base.offsets[:kept])

    # ---- replies ----------------------------------------------------------------------------

    def reply_view(self, history: list[dict], reply: str, where: str) -> ReplyView:
        """Render ``history + [assistant reply]`` as the last turn and check the template.

        The generation prompt (``history`` with ``add_generation_prompt``) must be a prefix of
        the rendering, and the reply must follow it, closed by the end-of-turn token.
        """
        full = self.render(history + [{"role": ASSISTANT, "content": reply}], False, where)
        prompt = self.render(history, True, where)
        if not full.startswith(prompt):
            at = common_prefix_len(full, prompt)
            raise ChatTemplateError(
                f"{where}: the chat template renders the history differently once a reply follows: the "
                f"generation prompt is not a prefix of the rendered reply (they differ at character {at}: "
                f"{prompt[at:at + 30]!r} vs {full[at:at + 30]!r}); e.g. a system message the template only "
                "renders before a final user turn"
            )
        messages = history + [{"role": ASSISTANT, "content": reply}]
        spans = self.locate(messages, full, len(prompt))
        span = spans[-1]
        if span is None or span[0] < len(prompt) or not full.startswith(self.end_of_turn_token, span[1]):
            tail = full[len(prompt) : len(prompt) + 60]
            if not reply.strip():
                raise ChatTemplateError(f"{where}: the reply is empty")
            raise ChatTemplateError(
                f"{where}: the rendered text does not contain the reply followed by the end-of-turn token "
                f"{self.end_of_turn_token!r} (after the generation prompt it reads {tail!r})"
            )
        cut = span[1] + len(self.end_of_turn_token)
        return ReplyView(full[:cut], len(prompt), [s if s is None or s[1] <= cut else None for s in spans])
