"""TransformersEngine: serves one Hugging Face model with PyTorch, batching concurrent requests on one worker thread.

Imported only inside replica processes (it pulls in torch and transformers).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from deployments import cpus
from deployments.engines.batching import BatchStats, BatchWorker, StepWorker, WorkItem
from deployments.engines.continuous import DecodeBatch
from deployments.engines.decoding import GenerateJob
from deployments.engines.hf_tokenizer import HFTokenizerMixin
from deployments.engines.protocol import (
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerateChunk,
    GenerateRequest,
    check_context,
    check_output_budget,
    check_token_ids,
    require_basic_sampling,
)
from deployments.errors import EngineDeadError, EngineStartError, InvalidRequestError
from deployments.plan import EnginePlan
from models.spec import ModelSpec

__all__ = ["TransformersEngine"]

logger = logging.getLogger(__name__)

_ALLOWED_KWARGS = ("num_threads", "pooling")
_POOLING = ("mean", "cls")
_SHUTDOWN_TIMEOUT_S = 10.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The SamplingConfig options beyond temperature/top_p/stop/seed that this engine implements (cheap per-row logit
# edits); the rest (penalties, logprobs, structured outputs) are refused by name.
_SUPPORTED = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "logit_bias",
)


class TransformersEngine(HFTokenizerMixin, Engine, EmbeddingEngine):
    """Runs a causal LM (`task='generate'`) or an encoder (`task='embed'`) from `spec.source`.

    Generation batches continuously on one worker thread (`continuous.DecodeBatch`): up to
    `spec.batching.max_batch_size` requests decode together, a new request joins the running batch at the next
    step, and one that finishes (or whose client goes away) leaves at once. Embeddings run in batches of up to
    that size.
    `engine_kwargs`: `num_threads` (torch CPU threads; default `resources.num_cpus`, at least 1) and `pooling`
    ('mean' or 'cls', embed only; default 'mean').
    """

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        self._worker: BatchWorker[Any] | StepWorker[Any] | None = None
        self._tokenizer: Any = None  # used on the event loop: templates, encoding, validation
        self._decoder: Any = None  # a second instance for the worker thread; HF tokenizers are not thread-safe
        self._model: Any = None
        self._device = torch.device("cpu")
        self._context_length = 0
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id = 0
        self._pooling = "mean"
        self._logits_to_keep = False
        self._vocab_size = 0

    @property
    def stats(self) -> BatchStats:
        """Batching counters (batches run, items, largest batch); zeros before `start`."""
        return self._worker.stats if self._worker is not None else BatchStats()

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + output) per request; known after `start`."""
        return self._context_length

    @property
    def device(self) -> torch.device:
        """Where the model runs; known after `start`."""
        return self._device

    async def start(self) -> None:
        """Resolve the source, load tokenizer and model, and start the batching worker.

        Raises:
            EngineStartError: bad `engine_kwargs`, or the model cannot be loaded.
        """
        options = self._check_engine_kwargs()
        try:
            await asyncio.to_thread(self._load, options)
        except EngineStartError:
            raise
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one typed error
            raise EngineStartError(
                f"cannot load model '{self.spec.id}' from '{self.spec.source}': {type(exc).__name__}: {exc}"
            ) from exc
        name, batching = f"engine:{self.spec.id}", self.spec.batching
        if self.spec.task == "generate":
            self._worker = StepWorker(
                name,
                self._decode_batch(),
                max_batch_size=batching.max_batch_size,
                wait_timeout_s=batching.batch_wait_timeout_s,
                on_start=self._pin_worker,
            )
        else:
            self._worker = BatchWorker(
                name,
                self._embed_batch,
                max_batch_size=batching.max_batch_size,
                wait_timeout_s=batching.batch_wait_timeout_s,
                on_start=self._pin_worker,
            )
        self._worker.start()
        logger.info(
            "model %s ready on %s (%s, context %d)", self.spec.id, self._device, self._model.dtype, self._context_length
        )

    def _pin_worker(self) -> None:
        """On CPU, compute on the engine cores of the plan (the node's CPU split, deployments.cpus), if any: the
        batch thread and the torch threads it starts run there, away from the serving processes."""
        reserved = cpus.parse_cpu_list(self.plan.cpus) if self.plan.cpus else None
        if reserved and self._device.type == "cpu" and cpus.pin_current_thread(reserved):
            logger.info("model %s computes on cores %s", self.spec.id, cpus.format_cpu_list(reserved))

    async def check_health(self) -> None:
        """Return if the worker thread runs.

        Raises:
            EngineDeadError: the engine was never started, was shut down, or its worker thread died.
        """
        if self._worker is None or not self._worker.is_alive():
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")

    async def shutdown(self) -> None:
        """Stop the worker (bounded wait) and fail queued requests with `EngineDeadError`."""
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop, _SHUTDOWN_TIMEOUT_S)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Stream the output of one request; see `Engine.generate`.

        Chunks carry only non-empty text deltas, except the last, which carries `finish_reason` and may
        have empty text. `completion_tokens` counts generated tokens, EOS included.

        Raises:
            InvalidRequestError: the prompt is empty or does not fit, `max_tokens` is too large, or this
                model does not generate.
            EngineError: the batch this request ran in failed (`EngineDeadError` if the engine stopped).
        """
        job = self._prepare_generate(request)
        worker = self._running_worker()
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[object] = asyncio.Queue()
        item: WorkItem[GenerateJob] = WorkItem(job, loop, results.put_nowait)
        worker.submit(item)
        try:
            while True:
                value = await results.get()
                if isinstance(value, BaseException):
                    raise value
                chunk: GenerateChunk = value  # type: ignore[assignment]
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            item.cancelled = True  # client gone or stream done: the worker stops spending steps on it

    async def embed(self, request: EmbedRequest) -> EmbedResult:
        """Embed every input; inputs of concurrent requests share forward passes.

        Raises:
            InvalidRequestError: an input is empty or longer than the context, or this model does not embed.
            EngineError: the batch failed (`EngineDeadError` if the engine stopped).
        """
        if self.spec.task != "embed":
            raise InvalidRequestError(f"model '{self.spec.id}' does not serve embeddings", param="model")
        worker = self._running_worker()
        encoded: list[list[int]] = self._tokenizer(list(request.inputs))["input_ids"]
        for index, ids in enumerate(encoded):
            if not ids or len(ids) > self._context_length:
                raise InvalidRequestError(
                    f"input {index} has {len(ids)} tokens; this model accepts 1 to {self._context_length} tokens "
                    "per input",
                    param="input",
                )
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in encoded]
        items = [WorkItem(ids, loop, _settle(future)) for ids, future in zip(encoded, futures, strict=True)]
        try:
            for item in items:
                worker.submit(item)
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for item in items:
                item.cancelled = True
        vectors: list[tuple[float, ...]] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            vectors.append(result)
        return EmbedResult(embeddings=tuple(vectors), prompt_tokens=sum(len(ids) for ids in encoded))

    # -- loading -------------------------------------------------------------------------------------

    def _check_engine_kwargs(self) -> dict[str, Any]:
        options = dict(self.spec.engine_kwargs)
        unknown = sorted(set(options) - set(_ALLOWED_KWARGS))
        if unknown:
            raise EngineStartError(
                f"unknown engine_kwargs {unknown} for engine 'transformers'; allowed: {', '.join(_ALLOWED_KWARGS)}"
            )
        threads = options.get("num_threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise EngineStartError(f"engine_kwargs.num_threads must be an integer >= 1, got {threads!r}")
        pooling = options.get("pooling", "mean")
        if pooling not in _POOLING:
            raise EngineStartError(f"engine_kwargs.pooling must be one of {', '.join(_POOLING)}, got {pooling!r}")
        if "pooling" in options and self.spec.task != "embed":
            raise EngineStartError("engine_kwargs.pooling applies only to models with task 'embed'")
        return options

    def _load(self, options: dict[str, Any]) -> None:
        from models.registry import resolve_source  # lazy: the registry may build tiny models on demand

        path = resolve_source(str(self.spec.source))  # ModelSpec requires a source for this engine
        wants_gpu = self.spec.resources.num_gpus > 0
        if wants_gpu and not torch.cuda.is_available():
            logger.warning("model %s asks for GPUs but CUDA is not available; running on CPU", self.spec.id)
        self._device = torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
        if self.spec.dtype == "auto":
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[self.spec.dtype]
        # One torch thread per CPU the replica reserved: more threads than reserved cores spin against the
        # other processes on the node and were 3-10x slower on a busy 2-core machine.
        torch.set_num_threads(options.get("num_threads") or max(1, round(self.spec.resources.num_cpus)))
        self._pooling = options.get("pooling", "mean")

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._decoder = AutoTokenizer.from_pretrained(path)
        model_cls = AutoModelForCausalLM if self.spec.task == "generate" else AutoModel
        model: Any = model_cls.from_pretrained(path, dtype=dtype)
        self._model = model.to(self._device).eval()
        self._context_length = self._resolve_context_length()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(self._model.forward).parameters

        eos: set[int] = set()
        for source in (getattr(self._model, "generation_config", None), self._tokenizer):
            value = getattr(source, "eos_token_id", None)
            eos.update([value] if isinstance(value, int) else (value or []))
        self._eos_ids = frozenset(eos)
        self._vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        pad = self._tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else min(eos, default=0)

    def _resolve_context_length(self) -> int:
        config = self._model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(config, "max_position_embeddings", None)
        wanted = self.spec.context_length
        if wanted is not None and limit is not None and wanted > limit:
            raise EngineStartError(
                f"context_length {wanted} is above the model's max_position_embeddings ({limit}): lower it"
            )
        if wanted is not None:
            return wanted
        if limit is None:
            raise EngineStartError(f"model '{self.spec.id}' does not state its context length: set context_length")
        return int(limit)

    # -- validation (event loop, before any batch) --------------------------------------------------

    def _prepare_generate(self, request: GenerateRequest) -> GenerateJob:
        if self.spec.task != "generate":
            raise InvalidRequestError(f"model '{self.spec.id}' serves embeddings and cannot generate", param="model")
        self._running_worker()
        sampling = request.sampling
        require_basic_sampling(sampling, "transformers", _SUPPORTED)
        if request.tool_choice != "none":
            raise InvalidRequestError(
                f"tool_choice '{request.tool_choice}' is not supported by the transformers engine (tool calls need "
                "constrained decoding or a tool-call parser): set tool_choice to 'none' or serve the model on vllm",
                param="tool_choice",
            )
        check_output_budget(self.spec, sampling)
        check_token_ids((token for token, _ in sampling.logit_bias), self._vocab_size, "logit_bias")
        if request.messages is not None:
            param = "messages"
            ids = self._render_chat(request.messages, request.tools, add_generation_prompt=True)
        elif request.prompt_token_ids is not None:
            param = "prompt"
            ids = list(request.prompt_token_ids)
            check_token_ids(ids, self._vocab_size, param)
        else:
            param = "prompt"
            ids = self._tokenizer.encode(request.prompt)
        ids = list(ids)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        check_context(self._context_length, len(ids), sampling, param)
        return GenerateJob(ids, sampling)

    def _running_worker(self) -> BatchWorker[Any] | StepWorker[Any]:
        if self._worker is None or not self._worker.is_alive():
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")
        return self._worker

    # -- worker thread -------------------------------------------------------------------------------

    def _decode_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self._model,
            self._decoder,
            eos_ids=self._eos_ids,
            pad_id=self._pad_id,
            device=self._device,
            logits_to_keep=self._logits_to_keep,
        )

    def _generate_batch(self, items: list[WorkItem[GenerateJob]]) -> None:
        """Run `items` together from start to end, none joining later (what the worker does when they arrive at
        once): a reference for tests, off the worker thread."""
        batch = self._decode_batch()
        batch.step(items)
        while batch.items():
            batch.step([])

    @torch.inference_mode()
    def _embed_batch(self, items: list[WorkItem[list[int]]]) -> None:
        width = max(len(item.payload) for item in items)
        ids = torch.full((len(items), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            ids[row, : len(item.payload)] = torch.tensor(item.payload)
            mask[row, : len(item.payload)] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        if self._pooling == "cls":
            vectors = hidden[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        if self.spec.normalize:
            vectors = F.normalize(vectors, p=2.0, dim=-1)
        for item, vector in zip(items, vectors.cpu().tolist(), strict=True):
            item.send(tuple(vector), final=True)


def _settle(future: asyncio.Future[Any]) -> Callable[[object], None]:
    def sink(value: object) -> None:
        if future.done():  # cancelled by the caller meanwhile
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    return sink
