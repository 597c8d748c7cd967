"""Hindsight templates: how the follow-up o enters the teacher's context (METHOD.md §2)."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

from .records import USER, DataError

__all__ = [
    "HINDSIGHT_PRESETS",
    "HindsightTemplate",
    "TeacherContextBuilder",
    "append_to_last_user",
    "append_to_system",
]

#: The authors' two blocks, appended to the content of x's last user message.
HINDSIGHT_PRESETS: dict[str, str] = {
    # WildChat / WildFeedback (offline) runs.
    "offline": (
        "\n\n[HINDSIGHT CONTEXT]\nThe following is a user response to your previous, insufficient attempt. "
        "Improve your response to the user prompt.\nFuture User Message: {followup}"
    ),
    # Paper Table 1 and the online / live runs.
    "online": (
        "\n\n=== HINDSIGHT CONTEXT ===\n[The following is a future user message. "
        "Use this to guide your answer to the user prompt.]\n{followup}"
    ),
}

#: ``builder(x, block) -> teacher messages``; must not modify ``x``.
TeacherContextBuilder = Callable[[list[dict[str, str]], str], list[dict[str, str]]]


def append_to_last_user(x: list[dict[str, str]], block: str) -> list[dict[str, str]]:
    """Default builder: a copy of x whose last user message has ``block`` appended (the paper)."""
    for i in range(len(x) - 1, -1, -1):
        if x[i]["role"] == USER:
            return x[:i] + [{**x[i], "content": x[i]["content"] + block}] + x[i + 1 :]
    raise DataError("the history x has no user message to append the hindsight block to")


def append_to_system(x: list[dict[str, str]], block: str) -> list[dict[str, str]]:
    """Alternative builder: put the block in the system message (added if x has none).

    The shared prefix then ends inside the system prompt, so less of x is shared; it exists to
    show that the layouts find the prefix on ids whatever the builder does.
    """
    if x and x[0]["role"] == "system":
        return [{**x[0], "content": x[0]["content"] + block}] + x[1:]
    return [{"role": "system", "content": block.lstrip()}] + list(x)


def _check_format(block: str) -> None:
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(block) if name is not None]
    except ValueError as e:
        raise ValueError(f"invalid hindsight template {block!r}: {e} (write literal braces as {{{{ }}}})") from None
    if "followup" not in fields:
        raise ValueError(f"hindsight template {block!r} must contain the field {{followup}}")
    unknown = sorted(set(fields) - {"followup"})
    if unknown:
        raise ValueError(f"hindsight template {block!r} has unknown field(s) {unknown}; only {{followup}} is filled")


@dataclass(frozen=True)
class HindsightTemplate:
    """A hindsight block (a format string with ``{followup}``) and a teacher-context builder.

    Build one from a preset (``HindsightTemplate.preset("offline")``), from your own format
    string (``HindsightTemplate("\\n\\nLater the user said: {followup}")``), and swap the builder
    to change where the block goes.
    """

    block: str
    builder: TeacherContextBuilder = append_to_last_user
    name: str = "custom"

    def __post_init__(self):
        _check_format(self.block)

    @classmethod
    def preset(cls, name: str, builder: TeacherContextBuilder = append_to_last_user) -> "HindsightTemplate":
        """``"offline"`` or ``"online"``: the authors' blocks, verbatim."""
        if name not in HINDSIGHT_PRESETS:
            raise ValueError(f"unknown hindsight preset {name!r}; expected one of {sorted(HINDSIGHT_PRESETS)}")
        return cls(HINDSIGHT_PRESETS[name], builder, name)

    @classmethod
    def resolve(cls, template: "HindsightTemplate | str") -> "HindsightTemplate":
        """Accept a template, a preset name, or a format string containing ``{followup}``."""
        if isinstance(template, HindsightTemplate):
            return template
        if template in HINDSIGHT_PRESETS:
            return cls.preset(template)
        return cls(template)

    def render(self, followup: str) -> str:
        """The block with the follow-up filled in."""
        return self.block.format(followup=followup)

    def teacher_messages(self, x: list[dict[str, str]], followup: str) -> list[dict[str, str]]:
        """The teacher's history: ``builder(x, render(followup))``."""
        return self.builder(x, self.render(followup))
