"""The demo's world: list requests, six answer styles, a user with a style preference, judges.

Everything is rule-based and word-level, so that a 0.5M-parameter model can learn it in a minute
and a judge can score every reply exactly:

* a **request** asks for 2-4 items of a category ("name three fruits") or to spell a word
  ("spell moon"); several phrasings per kind, and held-out phrasings used only for evaluation;
* an **answer** lists the items in one of six mutually exclusive **styles** (comma-separated, a
  numbered list, bullets, CAPS, one sentence, a fixed sign-off), each recognised by its own rule;
* a **user** has a hidden style preference: a reply in another style gets a complaint naming the
  preferred style ("please use bullets"), a reply in that style a neutral follow-up ("thanks");
* the **style judge** says which style a reply is in (or none); the **strict judge** also checks
  the items: the right count, distinct, all from the category (or the word's letters in order).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = [
    "STYLES",
    "CATEGORIES",
    "SPELL_WORDS",
    "Request",
    "World",
    "render",
    "judge_style",
    "judge_strict",
    "complaint",
    "preference_request",
]

#: The six answer styles, in a fixed order (their index is used by reports).
STYLES = ("comma", "numbered", "bullets", "caps", "sentence", "signoff")

CATEGORIES = {
    "fruits": "apple pear plum grape lemon mango peach cherry".split(),
    "colors": "red blue green yellow purple pink brown black".split(),
    "animals": "cat dog horse cow sheep goat mouse tiger".split(),
    "tools": "hammer saw drill wrench knife rope ladder shovel".split(),
    "drinks": "tea coffee milk juice water soda wine beer".split(),
}
#: Words a "spell" request may name (their letters are the items).
SPELL_WORDS = "sun moon star tree book fish bird rain snow lamp door ship".split()
COUNTS = {2: "two", 3: "three", 4: "four"}

_SENTENCE_OPEN = ("my", "answer", "is")
_SIGNOFF = ("hope", "this", "helps", "!")

#: Request phrasings seen in pretraining and online ...
LIST_PHRASINGS = ("name {n} {cat}", "list {n} {cat}", "give me {n} {cat}", "tell me {n} {cat}",
                  "what are {n} {cat} ?")
SPELL_PHRASINGS = ("spell {word}", "how do you spell {word} ?", "spell the word {word}")
#: ... and phrasings used only for evaluation (unseen templates).
HELDOUT_LIST_PHRASINGS = ("i need {n} {cat}", "can you name {n} {cat} for me ?")
HELDOUT_SPELL_PHRASINGS = ("can you spell {word} for me ?", "i need {word} spelled")

#: Complaints naming a style, several phrasings each (what a user with that preference says).
COMPLAINTS = {
    "comma": ("please separate them with commas", "use commas please", "i want them with commas"),
    "numbered": ("please use a numbered list", "number them please", "i want a numbered list"),
    "bullets": ("please use bullets", "bullet points please", "i want bullet points"),
    "caps": ("please write in caps", "caps please", "i want capital letters"),
    "sentence": ("please answer in a sentence", "write a full sentence please", "i want one sentence"),
    "signoff": ("please end with hope this helps", "add a sign off please", "i want a sign off"),
}
#: Follow-ups that say nothing about the reply (the built-in gate of hsd.online skips them).
NEUTRAL_FOLLOWUPS = ("thanks", "great thanks", "ok", "perfect", "cool thank you", "nice")
#: How a preference may be stated inside a user message ({request}, {pref}); the hindsight block
#: (hsd's "online" preset) is a further wrapper, added where the template is known.
PREFERENCE_WRAPPERS = ("{request} . {pref}", "{request} ( {pref} )", "{pref} . {request}")


@dataclass(frozen=True)
class Request:
    """One user request: ``text`` (the user message), ``kind`` ("list" or "spell"), the
    ``category`` or ``word``, and ``count`` (items wanted)."""

    text: str
    kind: str
    count: int
    category: str | None = None
    word: str | None = None

    def answer_items(self, rng: random.Random) -> list[str]:
        """A correct item list: distinct category members in the category's order (which a
        two-layer model learns far more easily than "distinct"), or the word's letters."""
        if self.kind == "spell":
            return list(self.word)
        members = CATEGORIES[self.category]
        return sorted(rng.sample(members, self.count), key=members.index)


def render(items: list[str], style: str) -> str:
    """``items`` written in ``style`` (word-level text: tokens separated by single spaces)."""
    if style == "comma":
        return " , ".join(items)
    if style == "numbered":
        return " ".join(f"{i} . {item}" for i, item in enumerate(items, 1))
    if style == "bullets":
        return " ".join(f"* {item}" for item in items)
    if style == "caps":
        return " ".join(item.upper() for item in items)
    if style == "sentence":
        return " ".join(_SENTENCE_OPEN) + " " + " and ".join(items) + " ."
    if style == "signoff":
        return " ".join(items) + " " + " ".join(_SIGNOFF)
    raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")


def _is_item(token: str) -> bool:
    return token.isalpha() and token.islower()


def parse(reply: str) -> tuple[str | None, list[str]]:
    """The style of ``reply`` and its items (lower-case), or ``(None, [])`` when it follows no
    style's rule. The rules are mutually exclusive: at most one style matches."""
    t = reply.split()
    if not t:
        return None, []
    if len(t) % 2 == 1 and all(_is_item(w) for w in t[0::2]) and all(w == "," for w in t[1::2]) and len(t) > 1:
        return "comma", t[0::2]
    if len(t) % 3 == 0 and all(t[i] == str(i // 3 + 1) and t[i + 1] == "." and _is_item(t[i + 2])
                               for i in range(0, len(t), 3)):
        return "numbered", t[2::3]
    if len(t) % 2 == 0 and all(w == "*" for w in t[0::2]) and all(_is_item(w) for w in t[1::2]):
        return "bullets", t[1::2]
    if all(w.isalpha() and w.isupper() for w in t):
        return "caps", [w.lower() for w in t]
    n = len(_SENTENCE_OPEN)
    if (len(t) >= n + 2 and tuple(t[:n]) == _SENTENCE_OPEN and t[-1] == "." and len(t[n:-1]) % 2 == 1
            and all(_is_item(w) for w in t[n:-1:2]) and all(w == "and" for w in t[n + 1:-1:2])):
        return "sentence", t[n:-1:2]
    m = len(_SIGNOFF)
    if len(t) > m and tuple(t[-m:]) == _SIGNOFF and all(_is_item(w) for w in t[:-m]):
        return "signoff", t[:-m]
    return None, []


def judge_style(reply: str) -> str | None:
    """Which style ``reply`` is written in (None: none of them)."""
    return parse(reply)[0]


def judge_strict(reply: str, request: Request, style: str) -> bool:
    """``reply`` is in ``style`` and has the right items: ``request.count`` distinct members of
    the category, or the word's letters in order."""
    found, items = parse(reply)
    if found != style:
        return False
    if request.kind == "spell":
        return items == list(request.word)
    return len(items) == request.count and len(set(items)) == len(items) and \
        all(item in CATEGORIES[request.category] for item in items)


def complaint(style: str, rng: random.Random) -> str:
    """A follow-up asking for ``style``."""
    return rng.choice(COMPLAINTS[style])


def preference_request(request: str, style: str, rng: random.Random) -> str:
    """``request`` with the preference for ``style`` stated in the same message (the in-context
    oracle's prompt)."""
    return rng.choice(PREFERENCE_WRAPPERS).format(request=request, pref=complaint(style, rng))


class World:
    """Request generators and simulated users over the fixed vocabulary, seeded."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def request(self, heldout: bool = False, rng: random.Random | None = None) -> Request:
        """A random request; ``heldout`` draws from the evaluation-only phrasings."""
        rng = rng or self.rng
        if rng.random() < 0.2:
            word = rng.choice(SPELL_WORDS)
            phrasing = rng.choice(HELDOUT_SPELL_PHRASINGS if heldout else SPELL_PHRASINGS)
            return Request(phrasing.format(word=word), "spell", len(word), word=word)
        n, cat = rng.choice(tuple(COUNTS)), rng.choice(tuple(CATEGORIES))
        phrasing = rng.choice(HELDOUT_LIST_PHRASINGS if heldout else LIST_PHRASINGS)
        return Request(phrasing.format(n=COUNTS[n], cat=cat), "list", n, category=cat)

    def heldout_requests(self, n: int, seed: int) -> list[Request]:
        """``n`` evaluation requests from the held-out phrasings (same list for a given seed)."""
        rng = random.Random(seed)
        return [self.request(heldout=True, rng=rng) for _ in range(n)]

    def user(self, preference: str, seed: int = 0):
        """A simulated user with a hidden ``preference``: ``user(messages, reply) -> follow-up``
        (the callable :func:`hsd.online.run_online` takes). A reply in the preferred style gets
        a neutral follow-up; any other reply a complaint naming the preference."""
        if preference not in STYLES:
            raise ValueError(f"unknown style {preference!r}; expected one of {STYLES}")
        rng = random.Random(seed)

        def followup(messages, reply: str) -> str:
            if judge_style(reply) == preference:
                return rng.choice(NEUTRAL_FOLLOWUPS)
            return complaint(preference, rng)

        return followup


def vocabulary() -> list[str]:
    """Every word the world and hsd's "online" hindsight block use (the demo tokenizer's vocab)."""
    from ..data.templates import HINDSIGHT_PRESETS

    words: set[str] = set()
    texts = [*LIST_PHRASINGS, *SPELL_PHRASINGS, *HELDOUT_LIST_PHRASINGS, *HELDOUT_SPELL_PHRASINGS,
             *NEUTRAL_FOLLOWUPS, *PREFERENCE_WRAPPERS, *(c for cs in COMPLAINTS.values() for c in cs),
             " ".join(_SENTENCE_OPEN + _SIGNOFF), "* , . and", HINDSIGHT_PRESETS["online"]]
    items = [w for ws in CATEGORIES.values() for w in ws] + list(CATEGORIES) + list(COUNTS.values())
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    for text in texts:
        words.update(_pretokenize(re.sub(r"\{\w+\}", " ", text)))  # without the {placeholders}
    words.update(items + letters + SPELL_WORDS + [str(i) for i in range(1, 10)])
    words.update(w.upper() for w in items + letters)
    return sorted(words)


def _pretokenize(text: str) -> list[str]:
    """The word-level tokenizer's split (runs of word characters, runs of other non-space)."""
    return re.findall(r"\w+|[^\w\s]+", text)
