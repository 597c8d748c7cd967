"""One conversation record, and the converters that map each source schema onto it.

Every reader in :mod:`hsd.data.readers` yields :class:`Conversation` objects built by the
``from_*`` converters below. A converter either returns a well-formed record or raises
:class:`RecordError` naming the record and the problem; it never returns something half-valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

__all__ = [
    "Conversation",
    "DataError",
    "RecordError",
    "FORMATS",
    "ROLE_ALIASES",
    "detect_format",
    "normalize_messages",
    "convert_record",
]

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

#: Role spellings seen in the supported schemas, mapped to the three roles hsd knows.
ROLE_ALIASES: dict[str, str] = {
    "user": USER,
    "human": USER,
    "assistant": ASSISTANT,
    "gpt": ASSISTANT,
    "chatgpt": ASSISTANT,
    "bard": ASSISTANT,
    "bing": ASSISTANT,
    "model": ASSISTANT,
    "system": SYSTEM,
}


class DataError(ValueError):
    """Base class of every error the data pipeline raises on bad input."""


class RecordError(DataError):
    """A source record cannot be turned into a conversation (missing field, bad type, ...).

    ``reason`` is the name it is counted under when records are skipped (``invalid_record``,
    ``invalid_text``, ``invalid_json``, ``invalid_utf8``, ``unreadable_file``).
    """

    def __init__(self, message: str, reason: str = "invalid_record"):
        super().__init__(message)
        self.reason = reason


# A UTF-16 surrogate code point on its own: JSON's "\ud800" escape decodes to one, and it cannot
# be encoded (tokenizers and UTF-8 output files reject it far from the record that held it).
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, where: str) -> None:
    """Raise :class:`RecordError` (reason ``invalid_text``) if ``text`` is not valid Unicode."""
    bad = _LONE_SURROGATE.search(text)
    if bad is not None:
        raise RecordError(
            f"{where}: holds a lone UTF-16 surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
            "(not valid Unicode; often a JSON \\u escape cut in half)",
            reason="invalid_text",
        )


@dataclass
class Conversation:
    """A logged conversation, normalised.

    Attributes:
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` in order.
        id: a stable identifier (the source's id or hash; else ``"<source>:<index>"``).
        source_model: the model that wrote the assistant turns, when the source says.
        language: the conversation's language as the source spells it (WildChat: ``"English"``).
        user_key: who the user is, for personalisation (WildChat: hashed IP; WildFeedback: user id).
        metadata: everything else worth keeping (toxic flag, turn count, source format, ...).
        response_indices: indices of the assistant messages that may yield tuples; ``None``
            means every assistant message that is followed by a user message. The paper's
            preprocessed tuple rows set it to the one logged completion.
    """

    messages: list[dict[str, str]]
    id: str
    source_model: str | None = None
    language: str | None = None
    user_key: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    response_indices: tuple[int, ...] | None = None

    def __post_init__(self):
        # Hand-built records fail here, naming the message, not later inside a tokenizer.
        if not isinstance(self.id, str):
            raise RecordError(f"Conversation.id must be a string, got {type(self.id).__name__}")
        check_text(self.id, "Conversation.id")
        where = f"conversation {self.id!r}"
        if not isinstance(self.messages, list):
            raise RecordError(f"{where}: messages must be a list, got {type(self.messages).__name__}")
        for i, m in enumerate(self.messages):
            if not isinstance(m, Mapping) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise RecordError(
                    f"{where}, message {i}: expected {{'role': 'system'|'user'|'assistant', 'content': str}}, got {m!r}"
                )
            check_text(m["content"], f"{where}, message {i}")
        for name in ("source_model", "language", "user_key"):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str):
                    raise RecordError(f"{where}: {name} must be a string or None, got {type(value).__name__}")
                check_text(value, f"{where}, {name}")


_ROLES = frozenset(ROLE_ALIASES.values())


def _record_name(index: int, record_id: Any = None) -> str:
    return f"record {index}" + (f" (id={record_id!r})" if record_id is not None else "")


def _content_text(content: Any, where: str) -> str:
    """Return message content as text; OpenAI-style lists of text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RecordError(f"{where}: content must be a string, got {type(content).__name__}")


def normalize_messages(
    raw: Any,
    where: str,
    role_key: str = "role",
    content_key: str = "content",
) -> list[dict[str, str]]:
    """Validate ``raw`` as a list of messages and map it to ``[{role, content}]``.

    Raises :class:`RecordError` naming ``where`` and the message index on a missing field, an
    unknown role or non-string content. Content is kept verbatim (no stripping).
    """
    if not isinstance(raw, (list, tuple)):
        raise RecordError(f"{where}: messages must be a list, got {type(raw).__name__}")
    messages = []
    for i, message in enumerate(raw):
        at = f"{where}, message {i}"
        if not isinstance(message, Mapping):
            raise RecordError(f"{at}: expected a mapping, got {type(message).__name__}")
        if role_key not in message or content_key not in message:
            missing = [k for k in (role_key, content_key) if k not in message]
            raise RecordError(f"{at}: missing field(s) {missing}")
        role = message[role_key]
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise RecordError(f"{at}: unknown role {role!r} (known: {sorted(ROLE_ALIASES)})")
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": _content_text(message[content_key], at)})
    return messages


def _require(row: Mapping, key: str, where: str) -> Any:
    if key not in row or row[key] is None:
        raise RecordError(f"{where}: missing field {key!r} (fields: {sorted(row)})")
    return row[key]


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _from_wildchat(row: Mapping, index: int, fmt: str) -> Conversation:
    # WildChat v1 (conversation_id), WildChat-1M / 4.8M (conversation_hash), WildFeedback
    # (WildChat schema plus user_id) and LMSYS-Chat-1M (conversation_id, no user) share this shape.
    record_id = row.get("conversation_hash", row.get("conversation_id", row.get("id")))
    where = _record_name(index, record_id)
    messages = normalize_messages(_require(row, "conversation", where), where)
    user_key = row.get("user_id") if fmt == "wildfeedback" else None
    if user_key is None and fmt != "lmsys":
        user_key = row.get("hashed_ip")
    metadata = {"format": fmt}
    for key in ("turn", "toxic", "redacted", "country", "state", "timestamp"):
        if row.get(key) is not None:
            metadata[key] = row[key] if key != "timestamp" else str(row[key])
    return Conversation(
        messages=messages,
        id=str(record_id) if record_id is not None else f"{fmt}:{index}",
        source_model=_str_or_none(row.get("model")),
        language=_str_or_none(row.get("language")),
        user_key=_str_or_none(user_key),
        metadata=metadata,
    )


def _from_message_list(row: Mapping, index: int, fmt: str) -> Conversation:
    """ShareGPT (``conversations: [{from, value}]``) and OpenAI (``messages: [{role, content}]``)."""
    list_key, role_key, content_key = (("conversations", "from", "value") if fmt == "sharegpt"
                                       else ("messages", "role", "content"))
    record_id = row.get("id")
    where = _record_name(index, record_id)
    raw = _require(row, list_key, where)
    messages = normalize_messages(raw, where, role_key=role_key, content_key=content_key)
    return Conversation(
        messages=messages,
        id=str(record_id) if record_id is not None else f"{fmt}:{index}",
        source_model=_str_or_none(row.get("model")),
        language=_str_or_none(row.get("language")),
        user_key=_str_or_none(row.get("user_id")),
        metadata={"format": fmt},
    )


def _from_tuple_row(row: Mapping, index: int, fmt: str) -> Conversation:
    """The authors' preprocessed rows: ``prompt`` (list), ``completion`` and ``user_response``."""
    record_id = row.get("id")
    where = _record_name(index, record_id)
    prompt = normalize_messages(_require(row, "prompt", where), where + " prompt", "from", "value")
    completion = normalize_messages([_require(row, "completion", where)], where + " completion", "from", "value")
    followup = normalize_messages([_require(row, "user_response", where)], where + " user_response", "from", "value")
    if completion[0]["role"] != ASSISTANT or followup[0]["role"] != USER:
        raise RecordError(f"{where}: completion must come from the assistant and user_response from the user")
    return Conversation(
        messages=prompt + completion + followup,
        id=str(record_id) if record_id is not None else f"{fmt}:{index}",
        source_model=_str_or_none(row.get("model")),
        language=_str_or_none(row.get("language")),
        user_key=_str_or_none(row.get("user_id")),
        metadata={"format": fmt, **({"turn_index": row["turn_index"]} if "turn_index" in row else {})},
        response_indices=(len(prompt),),
    )


_CONVERTERS: dict[str, Callable[[Mapping, int, str], Conversation]] = {
    "wildchat": _from_wildchat,
    "wildfeedback": _from_wildchat,
    "lmsys": _from_wildchat,
    "sharegpt": _from_message_list,
    "messages": _from_message_list,
    "tuples": _from_tuple_row,
}

#: Names accepted by ``read_conversations(format=...)``.
FORMATS: tuple[str, ...] = tuple(_CONVERTERS)


def detect_format(row: Mapping) -> str:
    """Guess the schema of one source row from its keys; raises :class:`RecordError` if none fits."""
    keys = set(row)
    if "conversation" in keys:
        if "user_id" in keys:
            return "wildfeedback"
        if keys & {"conversation_hash", "hashed_ip", "toxic"}:
            return "wildchat"
        return "lmsys"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion", "user_response"} <= keys:
        return "tuples"
    raise RecordError(f"cannot detect the format of a row with fields {sorted(keys)}; pass format= one of {FORMATS}")


def convert_record(row: Any, index: int, fmt: str) -> Conversation:
    """Convert one source row (a mapping) of format ``fmt`` into a :class:`Conversation`."""
    if fmt not in _CONVERTERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(row, Mapping):
        raise RecordError(f"{_record_name(index)}: expected an object, got {type(row).__name__}")
    return _CONVERTERS[fmt](row, index, fmt)
