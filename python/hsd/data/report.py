"""Counting what the pipeline reads, keeps and drops, by reason."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["DataReport"]

logger = logging.getLogger("hsd.data")


@dataclass
class DataReport:
    """Counts shared by the readers, the tuple extractor and the tokenisers.

    Pass one instance through the pipeline (``report=`` on each function); every skipped record,
    dropped conversation and dropped tuple is counted under a short reason name, and
    ``adjusted`` counts changes that kept the item (e.g. ``collapsed_same_role``).

    Attributes:
        skipped_records: records skipped under ``on_error="skip"``, by reason (``invalid_json``,
            ``invalid_utf8``, ``invalid_record``, ``template_error``, ...).
        skipped_locations: for each skip reason, where the first :attr:`max_locations` skipped
            records were (``"chats.jsonl line 7"``, ``"conversation 'abc' turn 2"``), so a user
            can go and look; bounded so that a badly broken source cannot grow it without limit.
        student_tokens: student-side tokens the layouts produced (per-tuple: the student
            sequences; packed: every window's ``input_ids``, branches included).
        conversation_tokens: tokens of the conversations those examples came from, each counted
            once (the cost a single pass over every conversation would have).
        records_with_special_tokens: records whose message text contained the string of a special
            token (e.g. ``"<|im_end|>"``); the text is encoded as text, never as the marker.
    """

    records_read: int = 0
    conversations_kept: int = 0
    tuples_kept: int = 0
    examples_built: int = 0
    skipped_records: Counter = field(default_factory=Counter)
    dropped_conversations: Counter = field(default_factory=Counter)
    dropped_tuples: Counter = field(default_factory=Counter)
    adjusted: Counter = field(default_factory=Counter)
    skipped_locations: dict = field(default_factory=dict)
    student_tokens: int = 0
    conversation_tokens: int = 0
    records_with_special_tokens: int = 0
    max_locations: int = 20

    @property
    def student_token_ratio(self) -> float | None:
        """Student tokens / conversation tokens (1.0: every conversation token is run once by
        the student; the per-tuple layout repeats history, so it is larger); None before any."""
        return self.student_tokens / self.conversation_tokens if self.conversation_tokens else None

    def skip(self, reason: str, where: str, message: str | None = None) -> None:
        """Count one skipped record under ``reason`` and remember ``where`` it was.

        Logs ``message`` (default: ``where``) as a warning for the first :attr:`max_locations`
        skips and at debug level after that, so every bad record is named without a broken
        source flooding the log.
        """
        self.skipped_records[reason] += 1
        places = self.skipped_locations.setdefault(reason, [])
        if len(places) < self.max_locations:
            places.append(where)
        skipped = sum(self.skipped_records.values())
        logger.log(logging.WARNING if skipped <= self.max_locations else logging.DEBUG,
                   "skipping %s", message or where)
        if skipped == self.max_locations:
            logger.warning("further skipped records are logged at debug level (see DataReport.skipped_locations)")

    def as_dict(self) -> dict:
        """A JSON-ready view of every count."""
        return {
            "records_read": self.records_read,
            "conversations_kept": self.conversations_kept,
            "tuples_kept": self.tuples_kept,
            "examples_built": self.examples_built,
            "skipped_records": dict(self.skipped_records),
            "skipped_locations": {reason: list(places) for reason, places in self.skipped_locations.items()},
            "dropped_conversations": dict(self.dropped_conversations),
            "dropped_tuples": dict(self.dropped_tuples),
            "adjusted": dict(self.adjusted),
            "student_tokens": self.student_tokens,
            "conversation_tokens": self.conversation_tokens,
            "student_token_ratio": self.student_token_ratio,
            "records_with_special_tokens": self.records_with_special_tokens,
        }

    def summary(self) -> str:
        """A short multi-line table for logs and the ``hsd data`` command."""
        lines = [
            f"records read        {self.records_read}",
            f"conversations kept  {self.conversations_kept}",
            f"tuples kept         {self.tuples_kept}",
            f"examples built      {self.examples_built}",
        ]
        if self.conversation_tokens:
            lines.append(f"student tokens      {self.student_tokens} "
                         f"({self.student_token_ratio:.2f}x the {self.conversation_tokens} conversation tokens)")
        if self.records_with_special_tokens:
            lines.append(f"records with special-token text  {self.records_with_special_tokens}")
        for title, counts in (
            ("skipped records", self.skipped_records),
            ("dropped conversations", self.dropped_conversations),
            ("dropped tuples", self.dropped_tuples),
            ("adjusted (kept)", self.adjusted),
        ):
            for reason, n in sorted(counts.items()):
                line = f"{title}: {reason:<28} {n}"
                places = self.skipped_locations.get(reason) if counts is self.skipped_records else None
                if places:
                    line += f"  ({', '.join(places[:3])}{', ...' if n > 3 else ''})"
                lines.append(line)
        return "\n".join(lines)

    def log(self, level: int = logging.INFO) -> None:
        """Write :meth:`summary` to the ``hsd.data`` logger."""
        logger.log(level, "data report\n%s", self.summary())
