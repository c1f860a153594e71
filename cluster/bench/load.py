"""The load driver: what load a run applies (`LoadPlan`) and how it applies it to any request function
(closed loop at a concurrency, or open loop with Poisson arrivals), warm-up first.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from tqdm import tqdm

from cluster.bench.stats import Sample, summarize

__all__ = [
    "DEFAULT_PROMPT",
    "MODES",
    "Level",
    "LoadPlan",
    "LoadResult",
    "Mode",
    "RequestCall",
    "arrival_times",
    "level_label",
    "measure_load",
]

Mode = Literal["chat", "completions", "embeddings"]
MODES: tuple[Mode, ...] = ("chat", "completions", "embeddings")
Level = tuple[str, float]  # ("concurrency", 4) closed loop, or ("rate", 2.0) open loop (requests/s)
RequestCall = Callable[[int, Sample, float], Awaitable[None]]

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Use 500 words."


@dataclass
class LoadResult:
    """One load level's samples and their summary (see `summarize`)."""

    label: str
    samples: list[Sample]
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: label, summary, and every sample with its TPOT."""
        rows = [{**asdict(s), "tpot": s.tpot} for s in self.samples]
        return {"label": self.label, "summary": self.summary, "samples": rows}


@dataclass(frozen=True)
class LoadPlan:
    """The same load for every system compared: one run per level, each after a few uncounted warm-up requests.

    Its defaults are the bench's defaults: `cluster.bench.options` reads them from here.
    """

    levels: tuple[Level, ...] = (("concurrency", 1.0),)
    mode: Mode = "chat"
    num_requests: int | None = 32
    duration_s: float | None = 600.0
    prompts: tuple[str, ...] = (DEFAULT_PROMPT,)
    max_tokens: int = 64
    ignore_eos: bool = True
    temperature: float = 0.0
    request_timeout_s: float = 300.0
    warmup: int = 2
    seed: int = 0
    level_requests: tuple[int, ...] = ()  # requests of each level in turn, in place of num_requests

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LoadPlan:
        """Rebuild a plan from `asdict(plan)` (as passed to the in-process subprocess)."""
        levels = tuple((str(kind), float(value)) for kind, value in raw["levels"])
        extra = {"levels": levels, "prompts": tuple(raw["prompts"]), "level_requests": tuple(raw["level_requests"])}
        return cls(**{**raw, **extra})

    @property
    def exact_tokens(self) -> int | None:
        """The completion tokens every request must return: `max_tokens` when ignore_eos is on for a generation
        mode, else None (a request may stop early)."""
        return self.max_tokens if self.ignore_eos and self.mode != "embeddings" else None

    def request_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `run_load` that shape each request."""
        return {
            "mode": self.mode,
            "prompt": self.prompts,
            "max_tokens": self.max_tokens,
            "ignore_eos": self.ignore_eos,
            "temperature": self.temperature,
        }

    def load_kwargs(self, level: Level) -> dict[str, Any]:
        """Keyword arguments of `run_load` / `measure_load` for one level."""
        kind, value = level
        return {
            "concurrency": int(value) if kind == "concurrency" else None,
            "rate": value if kind == "rate" else None,
            "num_requests": self.requests_at(level),
            "duration_s": self.duration_s,
            "request_timeout_s": self.request_timeout_s,
            "warmup": self.warmup,
            "seed": self.seed,
        }

    def requests_at(self, level: Level) -> int | None:
        """How many measured requests one level sends."""
        return self.level_requests[self.levels.index(level)] if self.level_requests else self.num_requests


def level_label(level: Level) -> str:
    """'c=4' for a concurrency level, 'r=2' for a rate level."""
    kind, value = level
    return f"{'c' if kind == 'concurrency' else 'r'}={value:g}"


def arrival_times(rate: float, seed: int) -> Callable[[], float]:
    """Poisson arrivals: a function returning the next send time (seconds from the start), seeded."""
    rng = random.Random(seed)
    now = 0.0

    def next_time() -> float:
        nonlocal now
        now += rng.expovariate(rate)
        return now

    return next_time


async def measure_load(
    call: RequestCall,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    request_timeout_s: float = 300.0,
    warmup: int = 0,
    seed: int = 0,
    progress: bool = True,
    label: str | None = None,
) -> LoadResult:
    """Run `warmup` uncounted requests, then the measured load, with any request function.

    Closed loop keeps `concurrency` requests in flight (default 1); open loop sends at Poisson arrival times
    (`rate` per second, `seed`ed). Sending stops after `num_requests` or `duration_s`, whichever comes first;
    each request is cut off after `request_timeout_s` (error "timeout"). `call(index, sample, begin)` sends
    request `index` and fills `sample.ttft` (seconds since `begin`), `sample.output_tokens` and, on failure,
    `sample.error`.

    Raises:
        ValueError: both concurrency and rate, a non-positive one, or neither bound.
    """
    if concurrency is not None and rate is not None:
        raise ValueError("give either concurrency (closed loop) or rate (open loop), not both")
    if (concurrency is not None and concurrency < 1) or (rate is not None and rate <= 0):
        raise ValueError("concurrency must be >= 1 and rate > 0")
    if num_requests is None and duration_s is None:
        raise ValueError("bound the run: give num_requests, duration_s or both")
    level: Level = ("rate", rate) if rate is not None else ("concurrency", float(concurrency or 1))

    async def drive(count: int | None, level: Level, bar: tqdm[Any] | None) -> list[Sample]:
        t0 = time.perf_counter()
        stop_at = t0 + duration_s if duration_s is not None else math.inf
        samples: list[Sample] = []

        async def one(index: int) -> None:
            begin = time.perf_counter()
            sample = Sample(start=begin - t0)
            try:
                async with asyncio.timeout(request_timeout_s):
                    await call(index, sample, begin)
            except TimeoutError:
                sample.error = "timeout"
            sample.e2e = time.perf_counter() - begin
            samples.append(sample)
            if bar is not None:
                bar.update()

        def more(index: int) -> bool:
            return (count is None or index < count) and time.perf_counter() < stop_at

        counter = itertools.count()
        if level[0] == "concurrency":

            async def worker() -> None:
                while more(index := next(counter)):
                    await one(index)

            await asyncio.gather(*(worker() for _ in range(int(level[1]))))
        else:
            next_time, tasks = arrival_times(level[1], seed), []
            while more(index := next(counter)) and (send_at := t0 + next_time()) < stop_at:
                await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(index)))
            await asyncio.gather(*tasks)
        return sorted(samples, key=lambda s: s.start)

    if warmup:
        await drive(warmup, ("concurrency", float(min(warmup, concurrency or warmup))), None)
    label = label or level_label(level)
    with tqdm(total=num_requests, desc=label, unit="req", file=sys.stderr, disable=not progress) as bar:
        samples = await drive(num_requests, level, bar)
    return LoadResult(label=label, samples=samples, summary=summarize(samples))
