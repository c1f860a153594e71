"""vLLM's own OpenAI server as a baseline: started with the engine arguments the deployment plan gives the same
model, on a free loopback port, and always stopped.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.bench.systems.process import (
    SETTLE_S,
    BenchError,
    Started,
    shm_files,
    spawn,
    stop,
    tail,
    tree_memory,
    wait_answer,
)
from deployments.plan import plan_engine
from models.spec import ModelSpec

__all__ = ["vllm_server", "vllm_server_command"]


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
    if vllm_spec.tool_call_parser:  # the spec's parser reads tool calls for tool_choice 'auto', as in our engine
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", vllm_spec.tool_call_parser]
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
    proc = spawn(cmd, log, env=env)
    shm: set[str] = set()
    try:
        base = f"http://127.0.0.1:{port}"

        def exited() -> str | None:
            code = proc.poll()
            return None if code is None else f"vLLM's server exited with code {code}:\n{tail(log)}"

        wait_answer(base, spec.id, timeout_s=ready_timeout_s, exited=exited)
        ready = time.perf_counter() - started
        time.sleep(SETTLE_S)
        info = {"command": shlex.join(cmd), "env": env, "log": str(log), "pid": proc.pid}
        yield Started(base, time_to_ready_s=ready, idle_memory=tree_memory(proc.pid), info=info)
    finally:
        shm = shm_files(proc.pid)
        stop(proc)
        for path in sorted(shm):  # only files this server's processes mapped
            Path(path).unlink(missing_ok=True)
