"""The systems `cluster.bench` compares (vLLM's own OpenAI server, the engine in-process, a local modelfleet
cluster), each started, measured and stopped in turn; and the comparison table, plot and markdown report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cluster.bench import TARGET, LoadPlan, Sample, level_label, measure_load, run_load
from deployments import cpus
from deployments.config import ServingConfig, load_config
from deployments.plan import RAY_ENV, EnginePlan, compile_plan, plan_engine
from models.spec import ModelSpec

__all__ = [
    "BenchError",
    "Started",
    "SystemResult",
    "modelfleet_cluster",
    "run_all",
    "run_in_process",
    "tree_memory",
    "vllm_server",
    "vllm_server_command",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_GIB = 1 << 30
_SETTLE_S = 3.0  # after the first answer, before idle memory is read
_STOP_TIMEOUT_S = 20.0
# No hub, no usage reports: the children of a benchmark never leave the machine.
_CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# Every core this process may use, read before `run_all` pins it: baselines start on all of them, as they would
# be run by hand.
_ALL_CPUS = cpus.usable_cpus()


class BenchError(RuntimeError):
    """Raised when a system cannot be started, never answers in time, or fails while it is measured."""


@dataclass
class Started:
    """A running system that answers: where, how long it took to answer first, and its idle memory."""

    base_url: str
    time_to_ready_s: float | None = None
    idle_memory: dict[str, float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class SystemResult:
    """One system's numbers: time to its first real answer, idle memory, and one summary per load level."""

    name: str
    time_to_ready_s: float | None = None
    idle_memory: dict[str, float] | None = None
    levels: dict[str, dict[str, Any]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# -- processes and memory ----------------------------------------------------------------------------------


def tree_memory(pid: int, *, include_root: bool = True) -> dict[str, float]:
    """RSS and PSS (GiB) summed over a process and all its descendants, and how many processes there are."""
    import psutil

    root = psutil.Process(pid)
    procs = ([root] if include_root else []) + root.children(recursive=True)
    rss = pss = 0.0
    count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        count += 1
    return {"rss_gib": rss / _GIB, "pss_gib": pss / _GIB, "processes": count}


def _shm_files(pid: int) -> set[str]:
    """The /dev/shm files a process tree maps (vLLM leaves some behind when it is killed)."""
    import psutil

    paths: set[str] = set()
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return paths
    for proc in procs:
        try:
            paths.update(m.path for m in proc.memory_maps() if m.path.startswith("/dev/shm/"))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return paths


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after a grace period, and reap it all."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # started with start_new_session: its pid is its group id
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=_STOP_TIMEOUT_S)
            _, alive = psutil.wait_procs(tree, timeout=_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            continue
        if not alive:
            break
    for leftover in psutil.wait_procs(tree, timeout=0)[1]:  # moved to another group: kill by pid
        leftover.kill()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _spawn(
    cmd: list[str], log: Path, *, env: dict[str, str] | None = None, stderr_to_log: bool = True
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd,
            cwd=PROJECT_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT if stderr_to_log else None,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **_CHILD_ENV, **(env or {})},
            start_new_session=True,
            preexec_fn=_unpin,  # one affinity call, no locks
        )


def _unpin() -> None:
    try:
        os.sched_setaffinity(0, _ALL_CPUS)
    except (AttributeError, OSError):
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_answer(
    base_url: str, model: str, *, timeout_s: float, exited: Callable[[], str | None], task: str = "generate"
) -> None:
    """Poll a real completion (max_tokens=1), or embedding for an `embed` model, until the server answers 200:
    readiness means an answer.

    Raises:
        BenchError: the server exited (`exited()` returns why) or did not answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    path, body = "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    if task == "embed":
        path, body = "/v1/embeddings", {"model": model, "input": "Hello"}
    last = "no answer"
    with httpx.Client(base_url=base_url, timeout=60.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            reason = exited()
            if reason:
                raise BenchError(reason)
            try:
                response = client.post(path, json=body)
                if response.status_code == 200:
                    return
                last = f"{response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(1.0)
    raise BenchError(f"{base_url} gave no real answer in {timeout_s:.0f} s (last: {last})")


# -- vLLM's own OpenAI server ------------------------------------------------------------------------------


def vllm_server_command(
    spec: ModelSpec, model_dir: Path, port: int, *, engine_cpus: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line (and extra environment) of vLLM's OpenAI server with the engine arguments the deployment
    plan gives the same spec on the same cores (`deployments.plan`): every AsyncEngineArgs keyword becomes its
    `--flag`. A spec of another engine is served with vLLM's defaults as modelfleet sets them (its
    `engine_kwargs` mean nothing to vLLM). `--generation-config vllm` keeps the model folder's sampling defaults
    out, as our engine does.
    """
    vllm_spec = spec if spec.engine == "vllm" else spec.model_copy(update={"engine": "vllm", "engine_kwargs": {}})
    engine = plan_engine(vllm_spec, engine_cpus=engine_cpus)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]  # the plan names the model (`served_model_name`)
    cmd += ["--generation-config", "vllm", "--disable-uvicorn-access-log"]
    for key, value in engine.kwargs.items():
        if key in ("model", "tokenizer"):
            continue  # the source, resolved to `model_dir`
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is False:
            cmd.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, list | tuple):
            cmd += [flag, *map(str, value)]
        else:
            cmd += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    return cmd, dict(engine.env)


@contextmanager
def vllm_server(
    spec: ModelSpec, *, ready_timeout_s: float, log_dir: Path, engine_cpus: str | None = None
) -> Iterator[Started]:
    """Run vLLM's OpenAI server on a free loopback port until the block ends; always stopped, even on Ctrl-C.

    Raises:
        BenchError: the model is not one vLLM serves, or the server exited or gave no real answer in time.
    """
    from cluster.local import free_port
    from models.registry import resolve_source

    if spec.engine == "echo" or spec.task != "generate":
        raise BenchError(f"vLLM's server cannot serve model '{spec.id}' (engine {spec.engine}, task {spec.task})")
    try:
        model_dir = resolve_source(str(spec.source))
    except (ValueError, ImportError, TimeoutError) as exc:
        raise BenchError(f"cannot resolve the source of model '{spec.id}': {exc}") from exc
    port = free_port()
    cmd, env = vllm_server_command(spec, model_dir, port, engine_cpus=engine_cpus)
    log = log_dir / "vllm-server.log"
    started = time.perf_counter()
    proc = _spawn(cmd, log, env=env)
    shm: set[str] = set()
    try:
        base = f"http://127.0.0.1:{port}"

        def exited() -> str | None:
            code = proc.poll()
            return None if code is None else f"vLLM's server exited with code {code}:\n{_tail(log)}"

        wait_answer(base, spec.id, timeout_s=ready_timeout_s, exited=exited)
        ready = time.perf_counter() - started
        time.sleep(_SETTLE_S)
        info = {"command": shlex.join(cmd), "env": env, "log": str(log), "pid": proc.pid}
        yield Started(base, time_to_ready_s=ready, idle_memory=tree_memory(proc.pid), info=info)
    finally:
        shm = _shm_files(proc.pid)
        _stop(proc)
        for path in sorted(shm):  # only files this server's processes mapped
            Path(path).unlink(missing_ok=True)


# -- the engine in-process (in a subprocess of its own) ----------------------------------------------------


def run_in_process(
    spec: ModelSpec,
    plan: LoadPlan,
    *,
    ready_timeout_s: float,
    log_dir: Path,
    progress: bool,
    engine_cpus: str | None = None,
) -> SystemResult:
    """Run the spec's engine with no HTTP in a fresh Python process (so it is gone when this returns).

    The child times start to first answer (from its own process start), reads its idle memory, and drives
    `engine.generate` with the same plan; TTFT is the first chunk with text.

    Raises:
        BenchError: the child failed or ran out of time.
    """
    job, out, log = log_dir / "in-process-job.json", log_dir / "in-process-result.json", log_dir / "in-process.log"
    engine = plan_engine(spec, engine_cpus=engine_cpus)  # as the deployment plan starts it in a replica
    job.write_text(
        json.dumps(
            {
                "spec": spec.model_dump(mode="json"),
                "engine": engine.model_dump(mode="json"),
                "plan": asdict(plan),
                "progress": progress,
            }
        )
    )
    out.unlink(missing_ok=True)
    per_level = (plan.duration_s or 3600.0) + 2 * plan.request_timeout_s
    budget = ready_timeout_s + len(plan.levels) * per_level
    # stderr stays on the terminal for the progress bar; vLLM logs to stdout, which goes to the log.
    proc = _spawn(
        [sys.executable, "-m", "cluster.bench_baselines", "in-process", str(job), str(out)], log, stderr_to_log=False
    )
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the in-process baseline ran past {budget:.0f} s; see {log}") from None
    finally:
        _stop(proc)
    if code != 0 or not out.exists():
        raise BenchError(f"the in-process baseline failed (exit {code}):\n{_tail(log)}")
    result = SystemResult(**json.loads(out.read_text()))
    result.info["log"] = str(log)
    return result


async def _in_process_child(job: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from deployments.engines import resolve
    from deployments.engines.protocol import ChatMessage, EmbedRequest, Engine, GenerateRequest, SamplingConfig
    from deployments.errors import ServingError

    spec, plan = ModelSpec.model_validate(job["spec"]), LoadPlan.from_dict(job["plan"])
    sampling = SamplingConfig(max_tokens=plan.max_tokens, temperature=plan.temperature)

    def request(index: int, label: str) -> GenerateRequest:
        text = plan.prompts[index % len(plan.prompts)]
        if plan.mode == "chat":
            return GenerateRequest(
                request_id=f"{label}-{index}", messages=(ChatMessage(role="user", content=text),), sampling=sampling
            )
        return GenerateRequest(request_id=f"{label}-{index}", prompt=text, sampling=sampling)

    async def drive(engine: Engine, level: tuple[str, float]) -> dict[str, Any]:
        label = level_label(level)

        async def call(index: int, sample: Sample, begin: float) -> None:
            try:
                if plan.mode == "embeddings":
                    text = plan.prompts[index % len(plan.prompts)]
                    await engine.embed(EmbedRequest(request_id=f"{label}-{index}", inputs=(text,)))  # type: ignore[attr-defined]
                    return
                async for chunk in engine.generate(request(index, label)):
                    if chunk.text and sample.ttft is None:
                        sample.ttft = time.perf_counter() - begin
                    sample.output_tokens = chunk.completion_tokens
            except ServingError as exc:
                sample.error = str(exc.status_code)

        kwargs = {**plan.load_kwargs(level), "progress": job["progress"]}
        result = await measure_load(call, label=f"in-process {label}", **kwargs)
        return {**result.to_dict(), "label": label}

    engine = resolve(spec.engine)(spec, EnginePlan.model_validate(job["engine"]))
    try:
        await engine.start()
        if spec.task == "embed":
            await engine.embed(EmbedRequest(request_id="ready", inputs=("Hello",)))  # type: ignore[attr-defined]
        else:
            first = SamplingConfig(max_tokens=1, temperature=0)
            async for _ in engine.generate(GenerateRequest(request_id="ready", prompt="Hello", sampling=first)):
                pass
        ready = time.time() - psutil.Process().create_time()
        await asyncio.sleep(_SETTLE_S)
        memory = tree_memory(os.getpid())
        levels = {level_label(level): await drive(engine, level) for level in plan.levels}
    finally:
        await engine.shutdown()
    info = {"engine": spec.engine, "note": "no HTTP; ignore_eos cannot be passed to an Engine"}
    return asdict(SystemResult("in-process", ready, memory, levels, info))


def _child_main(job_path: str, out_path: str) -> int:
    """`python -m cluster.bench_baselines in-process JOB OUT`: SIGTERM cancels the run, so the engine is shut down."""
    # The engine's processes write warnings to fd 2: send those to the log (fd 1, set by the parent) and keep
    # the terminal (a duplicate of the old fd 2) for the progress bar and this process's own errors.
    sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
    os.dup2(1, 2)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(name)s: %(message)s")
    job = json.loads(Path(job_path).read_text())

    async def run() -> dict[str, Any]:
        task = asyncio.current_task()
        if task is not None:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await _in_process_child(job)

    try:
        result = asyncio.run(run())
    except asyncio.CancelledError:  # SIGTERM: the engine was shut down on the way out
        return 128 + signal.SIGTERM
    Path(out_path).write_text(json.dumps(result))
    return 0


# -- a local modelfleet cluster ----------------------------------------------------------------------------


@contextmanager
def modelfleet_cluster(
    config: ServingConfig,
    model_id: str,
    *,
    ready_timeout_s: float,
    num_cpus: int = 8,
    engine_cpus: str | None = None,
) -> Iterator[Started]:
    """Start a loopback Ray cluster in this process, serve only `model_id` of `config` on a free port, and
    stop it all when the block ends. Time to ready runs from `ray.init` to the first real answer; idle memory
    covers every process Ray started (the driver's descendants).

    Raises:
        BenchError: the model is not in the config, the app failed to deploy, or it never answered.
    """
    import ray
    from ray import serve

    from cluster.auth_token import use_token
    from cluster.local import free_port
    from deployments.app import build_app_from_plan

    spec = config.model(model_id)
    if spec is None:
        raise BenchError(f"model '{model_id}' is not in the config")
    port = free_port()
    config = config.model_copy(
        update={"models": (spec,), "router": config.router.model_copy(update={"host": "127.0.0.1", "port": port})}
    )
    # Short path: Ray's unix sockets live under the temp dir (107-byte limit).
    temp_dir = tempfile.mkdtemp(prefix="mf-bench-ray-", dir="/tmp")
    started = time.perf_counter()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    engine = cpus.parse_cpu_list(engine_cpus) if engine_cpus else None  # run_all's split, as `modelfleet up` makes
    deployment = compile_plan(config, engine_cpus=engine_cpus)
    client_cpus = cpus.usable_cpus()
    cpus.pin_current_thread(_ALL_CPUS)  # Ray starts on every core, as under `modelfleet up`
    try:
        use_token()  # a new local cluster, with the token of MODELFLEET_HOME (cluster.auth_token)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            namespace="bench",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        if threading.current_thread() is threading.main_thread():
            for sig, handler in handlers.items():  # ray.init's TERM handler would abort the process
                signal.signal(sig, handler)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        failure: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(build_app_from_plan(deployment), name=config.name, route_prefix="/")
            except Exception as exc:  # noqa: BLE001 - reported by the waiting loop below
                failure.append(exc)

        # serve.run blocks until the app runs, possibly forever: wait on it with a deadline instead.
        threading.Thread(target=deploy, name="bench-serve-run", daemon=True).start()
        base = f"http://127.0.0.1:{port}"
        wait_answer(
            base,
            model_id,
            timeout_s=ready_timeout_s,
            exited=lambda: f"deploying modelfleet failed: {failure[0]}" if failure else None,
            task=spec.task,
        )
        ready = time.perf_counter() - started
        if engine and _ALL_CPUS - engine:  # as `modelfleet deploy` does once the app answers
            cpus.pin_process_tree(os.getpid(), cpus.CpuPlan(engine=engine, serving=_ALL_CPUS - engine))
        cpus.pin_current_thread(client_cpus)
        time.sleep(_SETTLE_S)
        info = {"config": config.model_dump(mode="json"), "ray_num_cpus": num_cpus}
        yield Started(base, time_to_ready_s=ready, idle_memory=tree_memory(os.getpid(), include_root=False), info=info)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        cpus.pin_current_thread(client_cpus)
        shutil.rmtree(temp_dir, ignore_errors=True)


# -- running everything --------------------------------------------------------------------------------------


def _measure_http(name: str, started: Started, model: str, plan: LoadPlan, progress: bool) -> SystemResult:
    async def levels() -> dict[str, dict[str, Any]]:
        out = {}
        for level in plan.levels:
            kwargs = {**plan.request_kwargs(), **plan.load_kwargs(level), "progress": progress}
            result = await run_load(started.base_url, model, label=f"{name} {level_label(level)}", **kwargs)
            out[level_label(level)] = {**result.to_dict(), "label": level_label(level)}
        return out

    return SystemResult(name, started.time_to_ready_s, started.idle_memory, asyncio.run(levels()), started.info)


def run_all(
    compare: list[str],
    plan: LoadPlan,
    *,
    model: str,
    config_path: str | None,
    url: str | None,
    start_modelfleet: str | None,
    ready_timeout_s: float,
    num_cpus: int,
    log_dir: Path,
    progress: bool,
    engine_cpus: str = "off",
) -> dict[str, Any]:
    """Each baseline in `compare` (the model's spec from `config_path`), then the target: `url`, or a cluster
    started from the config file `start_modelfleet`. One at a time: only one engine runs at any moment.

    `engine_cpus` splits the cores as `modelfleet up` does (deployments.cpus): the modelfleet cluster runs on
    the serving cores with its engines on the others; the load generator (this process) runs on the serving
    cores for every system, so it never takes an engine's core; baselines start on all cores, with vLLM's
    model threads bound to the same engine cores.

    Raises:
        BenchError: a system failed to start, the model is missing from the config, or bad `engine_cpus`.
        ConfigError: a config file cannot be read or is invalid.
    """
    try:
        split = cpus.plan_cpus(engine_cpus, _ALL_CPUS)
    except ValueError as exc:
        raise BenchError(f"--engine-cpus: {exc}") from None
    config = load_config(config_path) if config_path else None
    spec = config.model(model) if config else None
    if config is not None and spec is None:
        raise BenchError(f"model '{model}' is not in {config_path} (models: {', '.join(m.id for m in config.models)})")
    results: list[SystemResult] = []
    engine_cpus = cpus.format_cpu_list(split.engine) if split else None
    with _cpu_split(split):
        for name in compare:
            if spec is None:
                raise BenchError("baselines need the model's spec: give a config")
            if name == "vllm-server":
                with vllm_server(
                    spec, ready_timeout_s=ready_timeout_s, log_dir=log_dir, engine_cpus=engine_cpus
                ) as started:
                    results.append(_measure_http(name, started, model, plan, progress))
            else:
                results.append(
                    run_in_process(
                        spec,
                        plan,
                        ready_timeout_s=ready_timeout_s,
                        log_dir=log_dir,
                        progress=progress,
                        engine_cpus=engine_cpus,
                    )
                )
        if url:
            results.append(_measure_http(TARGET, Started(url, info={"url": url}), model, plan, progress))
        elif start_modelfleet:
            target = config if start_modelfleet == config_path and config else load_config(start_modelfleet)
            with modelfleet_cluster(
                target, model, ready_timeout_s=ready_timeout_s, num_cpus=num_cpus, engine_cpus=engine_cpus
            ) as started:
                results.append(_measure_http(TARGET, started, model, plan, progress))
    return {
        "model": model,
        "cpus": f"{split.describe()}; the load generator on the serving cores in every run" if split else None,
        "spec": spec.model_dump(mode="json") if spec else None,
        "systems": [asdict(r) for r in results],
    }


@contextmanager
def _cpu_split(split: cpus.CpuPlan | None) -> Iterator[None]:
    """Give Ray's processes the environment `modelfleet up` gives them (`RAY_ENV`), and pin this thread, the load
    generator, to the serving cores; undo both when the block ends. `modelfleet_cluster` starts Ray on all cores,
    then moves it."""
    env = dict(RAY_ENV)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    before = cpus.usable_cpus()
    if split is not None:
        cpus.pin_current_thread(split.serving)
    try:
        yield
    finally:
        cpus.pin_current_thread(before)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "in-process":
        sys.exit("usage: python -m cluster.bench_baselines in-process JOB.json OUT.json")
    sys.exit(_child_main(sys.argv[2], sys.argv[3]))
