"""Statistics of a benchmark run: one request's outcome (`Sample`) and the summary of a load level."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Sample", "percentile", "summarize", "token_mismatches"]


@dataclass
class Sample:
    """One request's outcome. `start` is seconds since the run began; the other times since the request began."""

    start: float
    e2e: float = 0.0
    ttft: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request completed without an error."""
        return self.error is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default).

    Raises:
        ValueError: `values` is empty or `q` is outside 0-100.
    """
    if not values or not 0 <= q <= 100:
        raise ValueError("percentile needs at least one value and 0 <= q <= 100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _distribution(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
    }


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """Throughput and latency of one run.

    Wall time runs from the first request sent to the last one finished (errors included). Rates count
    completed requests and their output tokens; latency distributions (seconds) cover completed requests.
    """
    done = [s for s in samples if s.ok]
    wall = max(s.start + s.e2e for s in samples) - min(s.start for s in samples) if samples else 0.0
    tokens = sum(s.output_tokens for s in done)
    return {
        "requests": len(samples),
        "completed": len(done),
        "errors": dict(sorted(Counter(str(s.error) for s in samples if not s.ok).items())),
        "wall_s": wall,
        "requests_per_s": len(done) / wall if wall > 0 else 0.0,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "mean_output_tokens": tokens / len(done) if done else 0.0,
        "ttft_s": _distribution([s.ttft for s in done if s.ttft is not None]),
        "tpot_s": _distribution([t for s in done if (t := s.tpot) is not None]),
        "e2e_s": _distribution([s.e2e for s in done]),
    }


def token_mismatches(samples: Sequence[dict[str, Any]], expected: int) -> dict[int, int]:
    """Completed requests whose completion token count is not `expected`, counted by the count they returned.

    Used with `ignore_eos`: every request must then yield exactly `max_tokens` tokens, or the systems compared
    did different work. `samples` are the JSON rows of `LoadResult.to_dict()` (errors are not counted).
    """
    counts = Counter(int(row["output_tokens"]) for row in samples if row.get("error") is None)
    return {tokens: n for tokens, n in sorted(counts.items()) if tokens != expected}
