"""A batch job's progress, as the job prints it to its log and as `batch status` reads it back from there.

The log is the one channel a job client can read on any cluster (through the job API), so no file is shared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Progress", "last_progress"]

_TAG = "[modelfleet-batch]"
_LINE = re.compile(r"^\[modelfleet-batch\] progress (\d+)/(\d+) lines \((\d+) failed\)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Progress:
    """Output lines written so far, input lines in all, and how many of those written report a failure."""

    done: int
    total: int
    failed: int

    def line(self) -> str:
        """The log line the job prints (and `last_progress` parses)."""
        return f"{_TAG} progress {self.done}/{self.total} lines ({self.failed} failed)"

    def __str__(self) -> str:
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.done}/{self.total} lines{share}, {self.failed} failed"


def last_progress(log: str) -> Progress | None:
    """The last progress line of a job's log, or None before the job counted its input."""
    matches = _LINE.findall(log)
    if not matches:
        return None
    done, total, failed = (int(g) for g in matches[-1])
    return Progress(done=done, total=total, failed=failed)
