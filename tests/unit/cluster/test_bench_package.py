"""The bench as a package: each module imports alone, imports form no cycle, modules stay small, and the command's
flags are generated from the one options model (no default declared twice)."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.bench.load import LoadPlan
from cluster.bench.options import BenchOptions, build_parser, parse_options

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "cluster" / "bench"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__main__.py"}


def _imports(path: Path) -> set[str]:
    """The `cluster.bench` modules a file imports, at any depth of its code (lazy imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from cluster.bench import report` imports the submodule; `from x.y import name` the module x.y.
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found


def test_the_old_modules_are_gone() -> None:
    for name in ("bench.py", "bench_baselines.py", "bench_report.py"):
        assert not (ROOT / "cluster" / name).exists(), name


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_alone(module: str) -> None:
    # A fresh interpreter per module: nothing imported before it can hide a cycle or a missing import.
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_imports_form_no_cycle() -> None:
    graph = {module: _imports(path) - {module} for module, path in MODULES.items()}
    assert graph["cluster.bench.cli"] >= {"cluster.bench.options", "cluster.bench.run", "cluster.bench.report"}
    state: dict[str, str] = {}

    def visit(module: str, trail: tuple[str, ...]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join((*trail, module))}"
        state[module] = "open"
        for target in sorted(graph[module]):
            visit(target, (*trail, module))
        state[module] = "done"

    for module in sorted(graph):
        visit(module, ())


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines < MAX_LINES, f"{module} has {lines} lines; split it by concept"


def test_every_option_is_one_generated_flag() -> None:
    parser = build_parser()
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(flags) == set(BenchOptions.model_fields)
    for name, info in BenchOptions.model_fields.items():
        action = flags[name]
        assert "--" + name.replace("_", "-") in action.option_strings
        assert (info.description or "x") in (action.help or ""), name
        if not info.is_required():
            assert action.default is argparse.SUPPRESS, f"--{name} declares a default of its own"
    assert (
        "--no-ignore-eos" in flags["ignore_eos"].option_strings and "--no-progress" in flags["progress"].option_strings
    )
    assert flags["mode"].choices == ("chat", "completions", "embeddings")


def test_defaults_come_from_one_place() -> None:
    options = parse_options(["--url", "http://127.0.0.1:9", "--model", "m"])
    assert options == BenchOptions(url="http://127.0.0.1:9", model="m")
    assert options.load_plan() == LoadPlan()  # the plan's defaults are the command's defaults
    assert options.ignore_eos and options.progress and options.engine_cpus == "auto"


def test_list_options_parse_and_compile_into_the_plan() -> None:
    argv = ["--start-modelfleet", "c.yaml", "--model", "m", "--compare", "in-process,vllm-server"]
    options = parse_options([*argv, "--rate", "0.5,2", "--num-requests", "4,8", "--no-ignore-eos", "--max-tokens", "5"])
    assert options.compare == ("in-process", "vllm-server") and options.config_path == "c.yaml"
    plan = options.load_plan()
    assert plan.levels == (("rate", 0.5), ("rate", 2.0)) and plan.level_requests == (4, 8)
    assert plan.max_tokens == 5 and not plan.ignore_eos and plan.exact_tokens is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "m"], "nothing to measure"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--compare", "sglang"], "--compare"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--compare", "in-process"], "--compare needs --config"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "0"], "positive"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1,2", "--num-requests", "1,2,3"], "one per"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1", "--rate", "2"], "not allowed with"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--mode", "embeddings", "--vllm-bench"], "generation"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--max-tokens", "many"], "--max-tokens"),
        (["--url", "http://127.0.0.1:9", "--model", "m", "--ingress", "haproxy"], "give --start-modelfleet"),
        (["--start-modelfleet", "c.yaml", "--model", "m", "--ingress", "nginx"], "invalid choice"),
    ],
)
def test_bad_command_lines_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_options(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_modelfleet_command_has_the_same_flags() -> None:
    from cluster.cli import build_parser as modelfleet_parser

    parser = modelfleet_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["bench"]
    assert {a.dest for a in bench._actions} == {a.dest for a in build_parser()._actions}


def test_ingress_replaces_the_configs() -> None:
    from cluster.bench.run import with_ingress
    from deployments.config import ServingConfig

    config = ServingConfig.model_validate({"models": [{"id": "e", "task": "generate", "engine": "echo"}]})
    assert config.router.ingress == "python"
    assert with_ingress(config, "haproxy").router.ingress == "haproxy"
    assert with_ingress(config, None) is config
    options = parse_options(["--start-modelfleet", "c.yaml", "--model", "m", "--ingress", "haproxy"])
    assert options.ingress == "haproxy"
    assert parse_options(["--start-modelfleet", "c.yaml", "--model", "m"]).ingress is None
