"""The engine in-process as a baseline: the spec's engine driven with no HTTP by the same load driver, in a fresh
Python process of its own (`python -m cluster.bench.systems.in_process JOB OUT`), so it is gone afterwards.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.bench.load import LoadPlan, level_label, measure_load
from cluster.bench.stats import Sample
from cluster.bench.systems.process import SETTLE_S, BenchError, SystemResult, spawn, stop, tail, tree_memory
from deployments.plan import EnginePlan, plan_engine
from models.spec import ModelSpec

__all__ = ["run_in_process"]


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
    proc = spawn([sys.executable, "-m", __name__, str(job), str(out)], log, stderr_to_log=False)
    try:
        code = proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the in-process baseline ran past {budget:.0f} s; see {log}") from None
    finally:
        stop(proc)
    if code != 0 or not out.exists():
        raise BenchError(f"the in-process baseline failed (exit {code}):\n{tail(log)}")
    result = SystemResult(**json.loads(out.read_text()))
    result.info["log"] = str(log)
    return result


async def _in_process_child(job: dict[str, Any]) -> dict[str, Any]:
    import psutil

    from deployments.engines import resolve
    from deployments.engines.protocol import ChatMessage, EmbedRequest, Engine, GenerateRequest, SamplingConfig
    from deployments.errors import ServingError

    spec, plan = ModelSpec.model_validate(job["spec"]), LoadPlan.from_dict(job["plan"])
    # ignore_eos reaches vLLM's SamplingParams (and the transformers decoder) through the engine's SamplingConfig.
    sampling = SamplingConfig(
        max_tokens=plan.max_tokens, temperature=plan.temperature, ignore_eos=plan.exact_tokens is not None
    )

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
        await asyncio.sleep(SETTLE_S)
        memory = tree_memory(os.getpid())
        levels = {level_label(level): await drive(engine, level) for level in plan.levels}
    finally:
        await engine.shutdown()
    info = {"engine": spec.engine, "note": "no HTTP; ignore_eos goes in the engine's SamplingConfig"}
    return asdict(SystemResult("in-process", ready, memory, levels, info))


def _child_main(job_path: str, out_path: str) -> int:
    """`python -m cluster.bench.systems.in_process JOB OUT`: SIGTERM cancels the run, so the engine is shut down."""
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m cluster.bench.systems.in_process JOB.json OUT.json")
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
