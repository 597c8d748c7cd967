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
    """

    records_read: int = 0
    conversations_kept: int = 0
    tuples_kept: int = 0
    examples_built: int = 0
    skipped_records: Counter = field(default_factory=Counter)
    dropped_conversations: Counter = field(default_factory=Counter)
    dropped_tuples: Counter = field(default_factory=Counter)
    adjusted: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        """A JSON-ready view of every count."""
        return {
            "records_read": self.records_read,
            "conversations_kept": self.conversations_kept,
            "tuples_kept": self.tuples_kept,
            "examples_built": self.examples_built,
            "skipped_records": dict(self.skipped_records),
            "dropped_conversations": dict(self.dropped_conversations),
            "dropped_tuples": dict(self.dropped_tuples),
            "adjusted": dict(self.adjusted),
        }

    def summary(self) -> str:
        """A short multi-line table for logs and the ``hsd data`` command."""
        lines = [
            f"records read        {self.records_read}",
            f"conversations kept  {self.conversations_kept}",
            f"tuples kept         {self.tuples_kept}",
            f"examples built      {self.examples_built}",
        ]
        for title, counts in (
            ("skipped records", self.skipped_records),
            ("dropped conversations", self.dropped_conversations),
            ("dropped tuples", self.dropped_tuples),
            ("adjusted (kept)", self.adjusted),
        ):
            for reason, n in sorted(counts.items()):
                lines.append(f"{title}: {reason:<28} {n}")
        return "\n".join(lines)

    def log(self, level: int = logging.INFO) -> None:
        """Write :meth:`summary` to the ``hsd.data`` logger."""
        logger.log(level, "data report\n%s", self.summary())
