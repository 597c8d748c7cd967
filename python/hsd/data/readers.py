"""Readers: hub datasets, local jsonl / json / parquet files, or in-memory rows -> conversations.

Everything streams: a reader holds one row (one parquet batch) at a time, so a 1M-conversation
file is read in bounded memory.

Bad-input policy: ``on_error="raise"`` (default) stops at the first bad record with a
:class:`~hsd.data.records.RecordError` naming the file line or row index and the problem;
``on_error="skip"`` logs a warning, counts the record in ``report.skipped_records`` under
``invalid_utf8``, ``invalid_json`` or ``invalid_record``, and goes on.
"""

from __future__ import annotations

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


class _BadLine(RecordError):
    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path} line {line_number}"
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a BOM may open the file
            except UnicodeDecodeError as e:
                yield where, _BadLine(f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})", "invalid_utf8")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _BadLine(f"{where}: invalid JSON ({e.msg} at column {e.colno})", "invalid_json")


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f"{path}: a .json file must hold a list of records (or {{'data': [...]}})")
    for i, row in enumerate(data):
        yield f"{path} item {i}", row


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for row in batch.to_pylist():
            yield f"{path} row {row_number}", row
            row_number += 1


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
    ``datasets.Dataset``, a list). A row that could not be parsed is yielded as a
    :class:`RecordError` instance in place of the row.
    """
    if not isinstance(source, (str, os.PathLike)):
        for i, row in enumerate(source):
            yield f"row {i}", row
        return
    path = Path(source)
    if data_files is None and not path.exists() and path.suffix in LOCAL_SUFFIXES:
        raise FileNotFoundError(f"{path}: no such file")
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
        limit: stop after this many conversations.
        report: a :class:`DataReport` to count into.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if format is not None and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    report = report if report is not None else DataReport()
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
                raise RecordError(message) from None
            report.skip(getattr(e, "reason", "invalid_record"), location, message)
            continue
        yielded += 1
        yield conversation
