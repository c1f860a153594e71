"""The options of `modelfleet bench`: one pydantic model (type, default and help of every option), from which the
command's argparse flags are generated, and which compiles into the `LoadPlan` every system is measured with.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.bench.client import check_loopback
from cluster.bench.load import Level, LoadPlan, Mode

__all__ = ["BASELINES", "TARGET", "Baseline", "BenchOptions", "add_arguments", "build_parser", "parse_options"]

Baseline = Literal["vllm-server", "in-process"]
RoutingPolicy = Literal["prefix", "pow2"]
BASELINES: tuple[str, ...] = get_args(Baseline)
TARGET = "modelfleet"
USAGE = (
    "python -m cluster.bench --start-modelfleet CONFIG --model ID --compare vllm-server,in-process --concurrency 1,32"
)
_PLAN = LoadPlan()  # the load's defaults live on the plan; the options read them from there
_LISTS = ("compare", "concurrency", "rate", "num_requests", "routing_compare")
# Options of --routing-compare only (refused without it).
_ROUTING_ONLY = ("replicas", "prefix_groups", "prefix_repeats", "prefix_tokens", "kv_cache_gb")
# Options --routing-compare sets itself (refused with it).
_NOT_WITH_ROUTING = ("url", "compare", "num_requests", "prompt", "prompt_file", "vllm_bench", "config")


def _cli(*, exclusive: str | None = None, metavar: str | None = None) -> dict[str, Any]:
    """`json_schema_extra` of a field: its argparse mutually-exclusive group and metavar (None: none)."""
    return {"cli": {"exclusive": exclusive, "metavar": metavar}}


class BenchOptions(BaseModel):
    """Everything one `modelfleet bench` run is told. Comma-separated text is accepted for the list options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        None,
        description="a running modelfleet (or any OpenAI-compatible) server on loopback; with --compare it shares "
        "the CPU with the baselines while they run: prefer --start-modelfleet",
        json_schema_extra=_cli(exclusive="target"),
    )
    start_modelfleet: str | None = Field(
        None,
        description="start a local modelfleet cluster serving CONFIG's --model (only), measure, stop it",
        json_schema_extra=_cli(exclusive="target", metavar="CONFIG"),
    )
    model: str = Field(description="model id (the `model` field sent; the ModelSpec id in --config)")
    config: str | None = Field(
        None, description="config holding the ModelSpec the baselines run (default: --start-modelfleet)"
    )
    compare: tuple[Baseline, ...] = Field(
        (),
        description=f"baselines run first, comma-separated: {','.join(BASELINES)}",
        json_schema_extra=_cli(metavar="LIST"),
    )
    concurrency: tuple[int, ...] = Field(
        (int(_PLAN.levels[0][1]),),
        description="closed-loop levels, e.g. 1,32",
        json_schema_extra=_cli(exclusive="loop", metavar="LIST"),
    )
    rate: tuple[float, ...] = Field(
        (),
        description="open-loop levels in requests/s (Poisson arrivals), e.g. 0.5,2",
        json_schema_extra=_cli(exclusive="loop", metavar="LIST"),
    )
    num_requests: tuple[int, ...] = Field(
        (_PLAN.num_requests or 1,),
        description="requests per level, or one count per level: 24,96",
        json_schema_extra=_cli(metavar="N[,N...]"),
    )
    duration: float = Field(_PLAN.duration_s or 600.0, description="stop sending after this many seconds per level")
    mode: Mode = Field(_PLAN.mode, description="chat/completions stream; embeddings embed the prompt")
    prompt: str = Field(
        _PLAN.prompts[0], description="the prompt of every request", json_schema_extra=_cli(exclusive="prompt")
    )
    prompt_file: Path | None = Field(
        None, description="one prompt per non-empty line, used in turn", json_schema_extra=_cli(exclusive="prompt")
    )
    max_tokens: int = Field(_PLAN.max_tokens, ge=1, description="completion tokens asked of every request")
    ignore_eos: bool = Field(
        _PLAN.ignore_eos,
        description="send ignore_eos to every system (the request field; SamplingConfig in-process), so every "
        "request yields exactly --max-tokens tokens; the bench checks that and fails on a mismatch",
    )
    temperature: float = Field(_PLAN.temperature, ge=0.0, description="sampling temperature of every request")
    request_timeout: float = Field(_PLAN.request_timeout_s, gt=0, description="hard deadline per request (s)")
    warmup: int = Field(_PLAN.warmup, ge=0, description="uncounted requests before each level")
    seed: int = Field(_PLAN.seed, description="seed of the open-loop arrivals")
    ready_timeout: float = Field(900.0, gt=0, description="seconds a system may take to answer")
    num_cpus: int = Field(8, ge=1, description="logical CPUs of the --start-modelfleet Ray head")
    engine_cpus: str = Field(
        "auto",
        description="cores kept for engines, as `modelfleet up --engine-cpus`; the load generator runs on the other "
        "cores in every run",
        json_schema_extra=_cli(metavar="auto|off|LIST"),
    )
    ingress: Literal["python", "haproxy"] | None = Field(
        None,
        description="what listens on the HTTP port of the --start-modelfleet cluster, as `modelfleet up --ingress` "
        "(default: the config's router.ingress)",
    )
    vllm_bench: bool = Field(
        False,
        description="cross-check: after our load client, measure every HTTP system again at each level with "
        "vLLM's own client (`vllm bench serve`, same prompts, max_tokens and ignore_eos); its numbers go "
        "beside ours (needs a model with a tokenizer)",
    )
    routing_compare: tuple[RoutingPolicy, ...] = Field(
        (),
        description="measure --start-modelfleet's --model under each routing policy in turn (e.g. prefix,pow2): one "
        "cluster, --replicas fresh replicas per policy (the app is deployed again), vLLM's prefix caching on, the "
        "shared-prefix workload (--prefix-*), vLLM's prefix-cache hit rate from its counters; ratios to pow2",
        json_schema_extra=_cli(metavar="LIST"),
    )
    replicas: int = Field(2, ge=1, description="--routing-compare: replicas of the model")
    prefix_groups: int = Field(
        24, ge=1, le=64, description="--routing-compare: groups of requests, each sharing a document of its own"
    )
    prefix_repeats: int = Field(
        4, ge=1, description="--routing-compare: requests per group, sent in interleaved rounds"
    )
    prefix_tokens: int = Field(
        1500, ge=16, description="--routing-compare: tokens of each group's shared document (the model's tokenizer)"
    )
    kv_cache_gb: float = Field(
        2.0, gt=0, description="--routing-compare: vLLM's CPU KV cache per replica, GiB (cpu_kvcache_space_gb)"
    )
    log_dir: Path | None = Field(None, description="where server logs go (default: a new temp folder)")
    out_json: Path | None = Field(None, description="write every sample and summary as JSON here")
    out_png: Path | None = Field(None, description="bar charts of output tok/s and TTFT p50 (needs matplotlib)")
    out_md: Path | None = Field(None, description="append (or replace) a markdown section in this file")
    md_title: str = Field(
        "Serving overhead: modelfleet vs. baselines", description="title of the markdown section (also its key)"
    )
    progress: bool = Field(True, description="progress bars on stderr")

    @field_validator(*_LISTS, mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("concurrency", "rate", "num_requests")
    @classmethod
    def _positive(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(v <= 0 for v in value):
            raise ValueError("takes positive comma-separated numbers")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> BenchOptions:
        if self.url and self.start_modelfleet:
            raise ValueError("give --url or --start-modelfleet, not both")
        if self.rate and "concurrency" in self.model_fields_set:
            raise ValueError("give --concurrency (closed loop) or --rate (open loop), not both")
        if not self.concurrency and not self.rate:
            raise ValueError("--concurrency needs at least one level")
        if (self.compare or self.start_modelfleet) and not self.config_path:
            raise ValueError("--compare needs --config (the model's spec) or --start-modelfleet")
        if not (self.compare or self.url or self.start_modelfleet):
            raise ValueError("nothing to measure: give --url, --start-modelfleet and/or --compare")
        if len(self.num_requests) not in (1, len(self.levels)):
            raise ValueError(f"--num-requests: give one count >= 1, or one per level ({len(self.levels)})")
        if self.vllm_bench and self.mode == "embeddings":
            raise ValueError("--vllm-bench measures generation: not with --mode embeddings")
        if self.url:
            check_loopback(self.url)
        if self.ingress is not None and not self.start_modelfleet:
            raise ValueError("--ingress sets up the --start-modelfleet cluster: give --start-modelfleet")
        self._check_routing_compare()
        return self

    def _check_routing_compare(self) -> None:
        given = self.model_fields_set
        if not self.routing_compare:
            stray = [f"--{name.replace('_', '-')}" for name in _ROUTING_ONLY if name in given]
            if stray:
                raise ValueError(f"{', '.join(stray)} apply to --routing-compare only")
            return
        if not self.start_modelfleet:
            raise ValueError("--routing-compare needs --start-modelfleet (it deploys the model once per policy)")
        clash = [f"--{name.replace('_', '-')}" for name in _NOT_WITH_ROUTING if name in given]
        if clash:
            raise ValueError(
                f"--routing-compare sends its own workload and measures one cluster: drop {', '.join(clash)}"
            )
        if len(set(self.routing_compare)) != len(self.routing_compare):
            raise ValueError("--routing-compare: name each policy once")
        if len(self.levels) != 1:
            raise ValueError("--routing-compare measures one level: give one --concurrency or --rate")
        if self.mode == "embeddings":
            raise ValueError("--routing-compare measures prefill: not with --mode embeddings")

    @property
    def config_path(self) -> str | None:
        """The config whose ModelSpec the baselines run: --config, else --start-modelfleet's."""
        return self.config or self.start_modelfleet

    @property
    def levels(self) -> tuple[Level, ...]:
        """The load levels: each --rate (open loop), else each --concurrency (closed loop)."""
        if self.rate:
            return tuple(("rate", float(v)) for v in self.rate)
        return tuple(("concurrency", float(v)) for v in self.concurrency)

    def load_plan(self) -> LoadPlan:
        """The load every system gets.

        Raises:
            ValueError: --prompt-file holds no prompt.
            OSError: --prompt-file cannot be read.
        """
        prompts: tuple[str, ...] = (self.prompt,)
        if self.prompt_file:
            prompts = tuple(line.strip() for line in self.prompt_file.read_text().splitlines() if line.strip())
            if not prompts:
                raise ValueError(f"{self.prompt_file} holds no prompt")
        counts = self.num_requests
        return LoadPlan(
            levels=self.levels,
            mode=self.mode,
            num_requests=counts[0],
            level_requests=counts if len(counts) > 1 else (),
            duration_s=self.duration,
            prompts=prompts,
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
            temperature=self.temperature,
            request_timeout_s=self.request_timeout,
            warmup=self.warmup,
            seed=self.seed,
        )


# -- argparse, generated ------------------------------------------------------------------------------------


def _default_text(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `BenchOptions` field: `--field-name`, help from its description, defaults left to the model
    (argparse only records what was given). Booleans get `--x/--no-x`; Literal fields get their choices."""
    groups: dict[str, Any] = {}
    for name, info in BenchOptions.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        cli = typing.cast(dict[str, Any], extra.get("cli") or {})
        exclusive = cli.get("exclusive")
        target: Any = parser
        if exclusive:
            if exclusive not in groups:
                groups[exclusive] = parser.add_mutually_exclusive_group()
            target = groups[exclusive]
        kwargs: dict[str, Any] = {"dest": name, "help": info.description or ""}
        if info.is_required():
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS
            if info.default not in (None, (), ""):
                kwargs["help"] += f" (default: {_default_text(info.default)})"
        annotation = info.annotation
        if get_origin(annotation) in (typing.Union, types.UnionType):  # `X | None`: the flag takes an X
            args = [arg for arg in get_args(annotation) if arg is not type(None)]
            annotation = args[0] if len(args) == 1 else annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if get_origin(annotation) is Literal:
                kwargs["choices"] = get_args(annotation)
            if cli.get("metavar"):
                kwargs["metavar"] = cli["metavar"]
        target.add_argument("--" + name.replace("_", "-"), **kwargs)


def build_parser(prog: str = "modelfleet bench", *, add_help: bool = True) -> argparse.ArgumentParser:
    """The parser of `python -m cluster.bench` and `modelfleet bench`, generated from `BenchOptions`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"Load generation against an OpenAI-compatible server on loopback, and the side-by-side "
        f"comparison with baselines.\n\n{USAGE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    add_arguments(parser)
    return parser


def _message(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"] if not isinstance(part, int))
    text = str(error["msg"]).removeprefix("Value error, ")
    return f"--{field.replace('_', '-')}: {text}" if field else text


def parse_options(argv: list[str], parser: argparse.ArgumentParser | None = None) -> BenchOptions:
    """Parse a command line into `BenchOptions`; a bad one exits with status 2 and the reason (argparse's way)."""
    parser = parser or build_parser()
    given = vars(parser.parse_args(argv))
    try:
        return BenchOptions(**given)
    except ValidationError as exc:
        parser.error("; ".join(_message(e) for e in exc.errors()))
