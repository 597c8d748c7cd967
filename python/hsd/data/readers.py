"""Readers: hub datasets, local jsonl / json / parquet files, or in-memory rows -> conversations.

Everything streams: a reader holds one row (one parquet batch) at a time, so a 1M-conversation
file is read in bounded memory (a ``.json`` list is the exception: it is parsed whole).

Local files: UTF-8 (with or without a byte order mark); UTF-16 and UTF-32 files are recognised
from their byte order mark or their zero bytes and decoded (JSON allows them). A ``.json`` file
that holds one JSON object per line (JSON Lines) is read as ``.jsonl``, as ``datasets`` does.

Bad-input policy: ``on_error="raise"`` (default) stops at the first bad record with a
:class:`~hsd.data.records.RecordError` naming the file line or row index and the problem;
``on_error="skip"`` logs a warning, counts the record in ``report.skipped_records`` under
``invalid_utf8``, ``invalid_json``, ``invalid_text`` (a lone surrogate), ``invalid_record`` or
``unreadable_file`` (a corrupt parquet file, an unparsable ``.json`` file: the rest of that file
is lost), keeps its location in ``report.skipped_locations``, and goes on.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .records import Conversation, RecordError, convert_record, detect_format, FORMATS
from .report import DataReport

__all__ = ["read_conversations", "read_rows", "LOCAL_SUFFIXES"]

logger = logging.getLogger("hsd.data")

#: File suffixes read directly (without going through ``datasets``).
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")

_PARQUET_BATCH_ROWS = 256


def _sniff_encoding(head: bytes) -> str:
    """The encoding of a JSON file from its first bytes (RFC 4627 §3): a byte order mark, else
    the pattern of zero bytes around the first (ASCII) character."""
    for bom, name in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                      (codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return name
    if len(head) >= 4:
        if head[:3] == b"\0\0\0":
            return "utf-32-be"
        if head[1:4] == b"\0\0\0":
            return "utf-32-le"
    if len(head) >= 2:
        if head[0] == 0:
            return "utf-16-be"
        if head[1] == 0:
            return "utf-16-le"
    return "utf-8"


def _encoding_of(path: Path) -> str:
    with open(path, "rb") as f:
        encoding = _sniff_encoding(f.read(4))
    if encoding not in ("utf-8", "utf-8-sig"):
        logger.info("%s: reading as %s", path, encoding)
    return encoding


def _parse_line(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RecordError(f"{where}: invalid JSON ({e.msg} at column {e.colno})", "invalid_json")


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    encoding = _encoding_of(path)
    if encoding not in ("utf-8", "utf-8-sig"):
        yield from _wide_jsonl_rows(path, encoding)
        return
    with open(path, "rb") as f:
        # UTF-8 is decoded line by line so that one bad byte costs one record, not the file.
        for line_number, raw in enumerate(f, start=1):
            where = f"{path} line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                yield where, RecordError(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})", "invalid_utf8")
                continue
            if text.strip():
                yield where, _parse_line(text, where)


def _wide_jsonl_rows(path: Path, encoding: str) -> Iterator[tuple[str, Any]]:
    """UTF-16/32 JSON Lines: decoded as a text stream (a decoding error ends the file)."""
    with open(path, encoding=encoding, newline="") as f:
        line_number = 0
        lines = iter(f)
        while True:
            try:
                text = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as e:
                where = f"{path} line {line_number + 1}"
                yield where, RecordError(f"{where}: invalid {encoding} ({e.reason}); the rest of the file is not read",
                                         "unreadable_file")
                return
            line_number += 1
            if text.strip():
                where = f"{path} line {line_number}"
                yield where, _parse_line(text, where)


def _looks_like_json_lines(path: Path, encoding: str) -> bool:
    """Whether a ``.json`` file holds one JSON object per line: its first non-blank line is a
    whole JSON object and more content follows."""
    with open(path, encoding=encoding, errors="replace") as f:
        first = ""
        for line in f:
            if line.strip():
                first = line
                break
        try:
            opened = json.loads(first)
        except json.JSONDecodeError:
            return False
        return isinstance(opened, dict) and any(line.strip() for line in f)


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    encoding = _encoding_of(path)
    if _looks_like_json_lines(path, encoding):
        logger.info("%s holds one JSON object per line: reading it as JSON Lines", path)
        yield from _jsonl_rows(path)
        return
    try:
        data = json.loads(path.read_bytes().decode(encoding))
    except UnicodeDecodeError as e:
        yield str(path), RecordError(f"{path}: invalid {encoding.upper()} ({e.reason} at byte {e.start})", "unreadable_file")
        return
    except json.JSONDecodeError as e:
        yield str(path), RecordError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})", "unreadable_file")
        return
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        yield str(path), RecordError(
            f"{path}: a .json file must hold a list of records, {{'data': [...]}}, or one JSON object per line "
            f"(JSON Lines); it holds one {type(data).__name__}", "unreadable_file")
        return
    for i, row in enumerate(data):
        yield f"{path} item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row_number = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield f"{path} row {row_number}", row
                row_number += 1
    except (pa.ArrowException, OSError) as e:
        # pyarrow's messages ("Parquet magic bytes not found in footer") do not name the file.
        at = f" after row {row_number - 1}" if row_number else ""
        yield str(path), RecordError(f"{path}: not a readable parquet file{at} ({e})", "unreadable_file")


def _local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this directory")
        return files
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected one of {LOCAL_SUFFIXES}")
    return [path]


def read_rows(
    source: str | os.PathLike | Iterable[Mapping],
    split: str = "train",
    streaming: bool = True,
    config_name: str | None = None,
    data_files: Any = None,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` pairs from any supported source, without interpreting rows.

    ``source`` is a local file or directory (jsonl / json / parquet), a hub dataset name or a
    ``datasets`` builder name such as ``"json"`` with ``data_files`` (read through
    ``datasets.load_dataset(..., streaming=streaming)``), or any iterable of mappings (a
    ``datasets.Dataset``, a list). A row or file that could not be parsed is yielded as a
    :class:`RecordError` instance (with its ``reason``) in place of the row.
    """
    if not isinstance(source, (str, os.PathLike)):
        for i, row in enumerate(source):
            yield f"row {i}", row
        return
    path = Path(source)
    # A name that can only be a path is never looked up on the hub (whose error would mislead).
    looks_local = path.suffix in LOCAL_SUFFIXES or str(source).startswith(("/", "./", "../", "~"))
    if data_files is None and not path.exists() and looks_local:
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.exists() and data_files is None:
        readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows}
        for file in _local_files(path):
            yield from readers[file.suffix](file)
        return
    import datasets

    dataset = datasets.load_dataset(
        str(source), config_name, split=split, streaming=streaming, data_files=data_files
    )
    for i, row in enumerate(dataset):
        yield f"{source}[{split}] row {i}", row


def read_conversations(
    source: str | os.PathLike | Iterable[Mapping],
    format: str | None = None,
    split: str = "train",
    streaming: bool = True,
    *,
    config_name: str | None = None,
    data_files: Any = None,
    on_error: str = "raise",
    limit: int | None = None,
    report: DataReport | None = None,
) -> Iterator[Conversation]:
    """Stream :class:`Conversation` records from a hub dataset, local file(s) or rows.

    Args:
        source: a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a directory of them; a hub
            name (``"microsoft/WildFeedback"``, ``"allenai/WildChat-1M"``) or a ``datasets``
            builder (``"json"``, ``"parquet"`` with ``data_files``); or an iterable of mappings.
        format: one of ``FORMATS`` (``"wildchat"``, ``"wildfeedback"``, ``"lmsys"``,
            ``"sharegpt"``, ``"messages"``, ``"tuples"``); detected from the first row if None.
        split, streaming, config_name, data_files: passed to ``datasets.load_dataset``.
        on_error: ``"raise"`` or ``"skip"`` (count in ``report.skipped_records`` and go on).
        limit: stop after this many conversations (>= 0; None reads everything).
        report: a :class:`DataReport` to count into.

    A source that holds no records at all logs a warning (an empty file is more often a
    mistake than an intent).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    report = report if report is not None else DataReport()
    return _read_conversations(source, format, split, streaming, config_name, data_files, on_error, limit, report)


def _read_conversations(source, format, split, streaming, config_name, data_files, on_error, limit, report):
    # A generator behind read_conversations, so that argument errors raise at the call.
    yielded = 0
    index = -1
    for location, row in read_rows(source, split, streaming, config_name, data_files):
        if limit is not None and yielded >= limit:
            return
        index += 1
        report.records_read += 1
        try:
            if isinstance(row, RecordError):
                raise row
            if format is None and isinstance(row, Mapping):
                format = detect_format(row)
                logger.info("detected format %r from %s", format, location)
            conversation = convert_record(row, index, format or "messages")
        except RecordError as e:
            message = str(e) if str(e).startswith(location) else f"{location}: {e}"
            if on_error == "raise":
                raise RecordError(message, e.reason) from None
            report.skip(e.reason, location, message)
            continue
        yielded += 1
        yield conversation
    if index < 0 and limit != 0:
        logger.warning("%s: the input holds no records", source if isinstance(source, (str, os.PathLike)) else "rows")
