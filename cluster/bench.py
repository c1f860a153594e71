"""Load generation against an OpenAI-compatible server on loopback, and the side-by-side comparison command.

python -m cluster.bench --start-modelfleet CONFIG --model ID --compare vllm-server,in-process --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import math
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx
from tqdm import tqdm

__all__ = [
    "DEFAULT_PROMPT",
    "MODES",
    "Level",
    "LoadPlan",
    "LoadResult",
    "Mode",
    "Sample",
    "StreamReader",
    "arrival_times",
    "check_loopback",
    "main",
    "measure_load",
    "percentile",
    "run_load",
    "sse_data",
    "summarize",
]

Mode = Literal["chat", "completions", "embeddings"]
MODES: tuple[Mode, ...] = ("chat", "completions", "embeddings")
Level = tuple[str, float]  # ("concurrency", 4) closed loop, or ("rate", 2.0) open loop (requests/s)
RequestCall = Callable[[int, "Sample", float], Awaitable[None]]

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Use 500 words."
BASELINES = ("vllm-server", "in-process")
TARGET = "modelfleet"


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
    """The same load for every system compared: one run per level, each after a few uncounted warm-up requests."""

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
            "num_requests": self.level_requests[self.levels.index(level)] if self.level_requests else self.num_requests,
            "duration_s": self.duration_s,
            "request_timeout_s": self.request_timeout_s,
            "warmup": self.warmup,
            "seed": self.seed,
        }


def level_label(level: Level) -> str:
    """'c=4' for a concurrency level, 'r=2' for a rate level."""
    kind, value = level
    return f"{'c' if kind == 'concurrency' else 'r'}={value:g}"


# -- statistics ----------------------------------------------------------------------------------------


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


# -- driving load ----------------------------------------------------------------------------------------


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


# -- HTTP ------------------------------------------------------------------------------------------------


def check_loopback(base_url: str) -> None:
    """Refuse any target that is not this machine: load tests may only hit loopback addresses.

    Raises:
        ValueError: the URL's host is not localhost or a loopback IP (127.0.0.0/8, ::1).
    """
    host = httpx.URL(base_url).host
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"refusing to send load to {host!r}: only loopback targets (127.0.0.1, localhost, ::1) allowed")


def sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line; None for any other line (blank, comment, event name)."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


class StreamReader:
    """Reads one streamed OpenAI response: time of the first non-empty content, content chunks, usage, errors."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.ttft: float | None = None
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.error: str | None = None
        self.done = False

    @property
    def output_tokens(self) -> int:
        """Completion tokens from the usage chunk; without one, the number of content chunks."""
        return self.usage_tokens if self.usage_tokens is not None else self.chunks

    def feed(self, data: str, elapsed: float) -> None:
        """Take one `data:` payload that arrived `elapsed` seconds after the request was sent.

        Raises:
            ValueError: the payload is neither `[DONE]` nor JSON.
        """
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"] if isinstance(event["error"], dict) else {}
            self.error = f"stream:{error.get('type') or 'error'}"
            return
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
        for choice in event.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if self.mode == "chat" else choice.get("text")
            if text:
                self.chunks += 1
                if self.ttft is None:
                    self.ttft = elapsed


def _failure(exc: httpx.HTTPError) -> str:
    return "timeout" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__


async def _stream_one(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], mode: Mode, sample: Sample, begin: float
) -> None:
    reader = StreamReader(mode)
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                sample.error = str(response.status_code)
                return
            async for line in response.aiter_lines():
                data = sse_data(line)
                if data is not None:
                    reader.feed(data, time.perf_counter() - begin)
                if reader.done or reader.error:
                    break
    except httpx.HTTPError as exc:
        sample.error = _failure(exc)
        return
    except ValueError:
        sample.error = "bad_stream"
        return
    sample.ttft, sample.output_tokens = reader.ttft, reader.output_tokens
    sample.error = reader.error or (None if reader.done else "incomplete_stream")


async def _embed_one(client: httpx.AsyncClient, body: dict[str, Any], sample: Sample) -> None:
    try:
        response = await client.post("/v1/embeddings", json=body)
    except httpx.HTTPError as exc:
        sample.error = _failure(exc)
        return
    if response.status_code != 200:
        sample.error = str(response.status_code)
        return
    try:
        data = response.json()["data"]
    except (ValueError, KeyError, TypeError):
        sample.error = "bad_response"
        return
    if len(data) != len(body["input"]) or not all(item.get("embedding") for item in data):
        sample.error = "bad_response"


async def run_load(
    base_url: str,
    model: str,
    *,
    mode: Mode = "chat",
    concurrency: int | None = None,
    rate: float | None = None,
    num_requests: int | None = None,
    duration_s: float | None = None,
    prompt: str | Sequence[str] = DEFAULT_PROMPT,
    max_tokens: int = 64,
    ignore_eos: bool = True,
    temperature: float = 0.0,
    request_timeout_s: float = 300.0,
    warmup: int = 0,
    seed: int = 0,
    progress: bool = True,
    label: str | None = None,
) -> LoadResult:
    """Stream chat or completion requests (or send embedding requests) at a loopback server and measure each one.

    Closed loop with `concurrency` requests in flight (default 1), or open loop with Poisson arrivals at
    `rate` requests/s. Sending stops after `num_requests` or `duration_s`; each request is cut off after
    `request_timeout_s`. Request i uses `prompt[i % len(prompt)]` for a list. `ignore_eos` is sent as an
    extra body field (vLLM honours it; servers that ignore unknown fields may stop early: output tokens are
    read from the usage chunk). An `embeddings` request embeds one prompt; it has no TTFT or output tokens.

    Returns:
        The samples and their summary (`summarize`).

    Raises:
        ValueError: a non-loopback `base_url`, or bad load bounds (see `measure_load`).
    """
    check_loopback(base_url)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    base = base_url.rstrip("/").removesuffix("/v1")
    path = "/v1/chat/completions" if mode == "chat" else "/v1/completions"
    common: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        common["ignore_eos"] = True

    def body(index: int) -> dict[str, Any]:
        text = prompts[index % len(prompts)]
        if mode == "embeddings":
            return {"model": model, "input": [text]}
        return (
            {**common, "messages": [{"role": "user", "content": text}]}
            if mode == "chat"
            else {**common, "prompt": text}
        )

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=(concurrency or 64) + 8)
    # trust_env=False: a proxy from the environment must never carry loopback load elsewhere.
    async with httpx.AsyncClient(base_url=base, timeout=request_timeout_s, limits=limits, trust_env=False) as client:

        async def call(index: int, sample: Sample, begin: float) -> None:
            if mode == "embeddings":
                await _embed_one(client, body(index), sample)
            else:
                await _stream_one(client, path, body(index), mode, sample, begin)

        return await measure_load(
            call,
            concurrency=concurrency,
            rate=rate,
            num_requests=num_requests,
            duration_s=duration_s,
            request_timeout_s=request_timeout_s,
            warmup=warmup,
            seed=seed,
            progress=progress,
            label=label,
        )


# -- command line ----------------------------------------------------------------------------------------


class _Stop(BaseException):
    """Raised by SIGTERM in the main thread: unwinds through every `finally` that stops a system."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _levels(args: argparse.Namespace) -> tuple[Level, ...]:
    kind, text = ("rate", args.rate) if args.rate else ("concurrency", args.concurrency)
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{kind} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values) or (kind == "concurrency" and any(v != int(v) for v in values)):
        raise ValueError(f"--{kind} needs positive {'integers' if kind == 'concurrency' else 'numbers'}")
    return tuple((kind, v) for v in values)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m cluster.bench` (and `modelfleet bench`)."""
    p = argparse.ArgumentParser(
        prog="modelfleet bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = p.add_mutually_exclusive_group()
    target.add_argument(
        "--url",
        help="a running modelfleet (or any OpenAI-compatible) server on loopback; with --compare it shares the "
        "CPU with the baselines while they run: prefer --start-modelfleet",
    )
    target.add_argument(
        "--start-modelfleet",
        metavar="CONFIG",
        help="start a local modelfleet cluster serving CONFIG's --model (only), measure, stop it",
    )
    p.add_argument("--model", required=True, help="model id (the `model` field sent; the ModelSpec id in --config)")
    p.add_argument("--config", help="config holding the ModelSpec the baselines run (default: --start-modelfleet)")
    p.add_argument("--compare", default="", help=f"baselines run first, comma-separated: {','.join(BASELINES)}")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", default="1", help="closed-loop levels, e.g. 1,32 (default 1)")
    loop.add_argument("--rate", help="open-loop levels in requests/s (Poisson arrivals), e.g. 0.5,2")
    p.add_argument(
        "--num-requests", default="32", help="requests per level (default 32), or one count per level: 24,96"
    )
    p.add_argument("--duration", type=float, default=600.0, help="stop sending after this many seconds per level")
    p.add_argument("--mode", choices=MODES, default="chat", help="chat/completions stream; embeddings embed the prompt")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of every request")
    prompt.add_argument("--prompt-file", type=Path, help="one prompt per non-empty line, used in turn")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send ignore_eos (sent by default; vLLM honours it, modelfleet ignores it)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--request-timeout", type=float, default=300.0, help="hard deadline per request (s)")
    p.add_argument("--warmup", type=int, default=2, help="uncounted requests before each level")
    p.add_argument("--seed", type=int, default=0, help="seed of the open-loop arrivals")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds a system may take to answer")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the --start-modelfleet Ray head")
    p.add_argument(
        "--engine-cpus",
        default="auto",
        metavar="auto|off|LIST",
        help="cores kept for engines, as `modelfleet up --engine-cpus` (default auto); the load generator runs on "
        "the other cores in every run",
    )
    p.add_argument("--log-dir", type=Path, help="where server logs go (default: a new temp folder)")
    p.add_argument("--out-json", type=Path)
    p.add_argument("--out-png", type=Path, help="bar charts of output tok/s and TTFT p50 (needs matplotlib)")
    p.add_argument("--out-md", type=Path, help="append (or replace) a markdown section in this file")
    p.add_argument("--md-title", default="Serving overhead: modelfleet vs. baselines")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _plan(args: argparse.Namespace) -> LoadPlan:
    prompts = (args.prompt,)
    if args.prompt_file:
        prompts = tuple(line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip())
        if not prompts:
            raise ValueError(f"{args.prompt_file} holds no prompt")
    levels = _levels(args)
    counts = tuple(int(n) for n in str(args.num_requests).split(",") if n.strip())
    if not counts or min(counts) < 1 or len(counts) not in (1, len(levels)):
        raise ValueError(f"--num-requests: give one count >= 1, or one per level ({len(levels)})")
    return LoadPlan(
        levels=levels,
        mode=args.mode,
        num_requests=counts[0],
        level_requests=counts if len(counts) > 1 else (),
        duration_s=args.duration,
        prompts=prompts,
        max_tokens=args.max_tokens,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        warmup=args.warmup,
        seed=args.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: baselines first, then the target; print the table and write the outputs."""
    from cluster import bench_baselines as systems
    from cluster import bench_report as report
    from deployments.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    compare = [name.strip() for name in args.compare.split(",") if name.strip()]
    unknown = sorted(set(compare) - set(BASELINES))
    if unknown:
        parser.error(f"unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)}")
    config_path = args.config or args.start_modelfleet
    if (compare or args.start_modelfleet) and not config_path:
        parser.error("--compare needs --config (the model's spec) or --start-modelfleet")
    if not (compare or args.url or args.start_modelfleet):
        parser.error("nothing to measure: give --url, --start-modelfleet and/or --compare")
    try:
        plan = _plan(args)
        if args.url:
            check_loopback(args.url)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="mf-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    # Both, explicitly: a process started in the background begins with SIGINT ignored, and ray.init
    # replaces the TERM handler (modelfleet_cluster puts this one back).
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = systems.run_all(
            compare,
            plan,
            model=args.model,
            config_path=config_path,
            url=args.url,
            start_modelfleet=args.start_modelfleet,
            ready_timeout_s=args.ready_timeout,
            num_cpus=args.num_cpus,
            log_dir=log_dir,
            progress=args.progress,
            engine_cpus=args.engine_cpus,
        )
    except (systems.BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop) as stop:
        print(f"interrupted ({stop}): every system this run started was stopped", file=sys.stderr)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results["command"] = shlex.join(["python", "-m", "cluster.bench", *argv])
    results["plan"] = {**asdict(replace(plan, prompts=plan.prompts[:3])), "num_prompts": len(plan.prompts)}
    results["machine"] = report.machine_info()
    print(report.markdown_table(results["systems"], plan.mode))
    print(f"\nlogs: {log_dir}")
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2) + "\n")
    if args.out_png:
        report.write_png(results, args.out_png)
    if args.out_md:
        report.write_markdown_section(args.out_md, args.md_title, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
