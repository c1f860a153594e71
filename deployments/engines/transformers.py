"""TransformersEngine: serves one Hugging Face model with PyTorch, batching concurrent requests on one worker thread.

Imported only inside replica processes (it pulls in torch and transformers).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from deployments.engines.batching import BatchStats, BatchWorker, StepWorker, WorkItem
from deployments.engines.continuous import DecodeBatch
from deployments.engines.decoding import GenerateJob
from deployments.engines.protocol import (
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    GenerateChunk,
    GenerateRequest,
    check_context,
    check_output_budget,
    check_token_ids,
    require_basic_sampling,
)
from deployments.engines.torch_model import TorchModelEngine
from deployments.errors import EngineStartError, InvalidRequestError
from deployments.plan import EnginePlan
from models.spec import ModelSpec

__all__ = ["TransformersEngine"]

_POOLING = ("mean", "cls")
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


class TransformersEngine(TorchModelEngine, EmbeddingEngine):
    """Runs a causal LM (`task='generate'`) or an encoder (`task='embed'`) from `spec.source`.

    Generation batches continuously on one worker thread (`continuous.DecodeBatch`): up to
    `spec.batching.max_batch_size` requests decode together, a new request joins the running batch at the next
    step, and one that finishes (or whose client goes away) leaves at once. Embeddings run in batches of up to
    that size.
    `engine_kwargs`: `num_threads` (torch CPU threads; default `resources.num_cpus`, at least 1) and `pooling`
    ('mean' or 'cls', embed only; default 'mean').
    """

    _ALLOWED_KWARGS = ("num_threads", "pooling")

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        self._decoder: Any = None  # a second tokenizer for the worker thread; HF tokenizers are not thread-safe
        self._eos_ids: frozenset[int] = frozenset()
        self._pooling = "mean"
        self._logits_to_keep = False

    @property
    def stats(self) -> BatchStats:
        """Batching counters (batches run, items, largest batch); zeros before `start`."""
        return self._worker.stats if self._worker is not None else BatchStats()

    @property
    def device(self) -> torch.device:
        """Where the model runs; known after `start`."""
        return self._device

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
        self._running_worker()  # a stopped engine fails before any tokenizing
        encoded: list[list[int]] = self._tokenizer(list(request.inputs))["input_ids"]
        for index, ids in enumerate(encoded):
            if not ids or len(ids) > self._context_length:
                raise InvalidRequestError(
                    f"input {index} has {len(ids)} tokens; this model accepts 1 to {self._context_length} tokens "
                    "per input",
                    param="input",
                )
        vectors: list[tuple[float, ...]] = await self._run_all(encoded)
        return EmbedResult(embeddings=tuple(vectors), prompt_tokens=sum(len(ids) for ids in encoded))

    # -- loading -------------------------------------------------------------------------------------

    def _check_engine_kwargs(self) -> dict[str, Any]:
        options = super()._check_engine_kwargs()
        pooling = options.get("pooling", "mean")
        if pooling not in _POOLING:
            raise EngineStartError(f"engine_kwargs.pooling must be one of {', '.join(_POOLING)}, got {pooling!r}")
        if "pooling" in options and self.spec.task != "embed":
            raise EngineStartError("engine_kwargs.pooling applies only to models with task 'embed'")
        return options

    def _load(self, options: dict[str, Any]) -> None:
        path = self._load_model(AutoModelForCausalLM if self.spec.task == "generate" else AutoModel, options)
        self._pooling = options.get("pooling", "mean")
        self._decoder = AutoTokenizer.from_pretrained(path)
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

    def _new_worker(
        self, name: str, *, max_batch_size: int, wait_timeout_s: float, on_start: Callable[[], None]
    ) -> BatchWorker[Any] | StepWorker[Any]:
        if self.spec.task == "generate":
            return StepWorker(
                name,
                self._decode_batch(),
                max_batch_size=max_batch_size,
                wait_timeout_s=wait_timeout_s,
                on_start=on_start,
            )
        return BatchWorker(
            name, self._embed_batch, max_batch_size=max_batch_size, wait_timeout_s=wait_timeout_s, on_start=on_start
        )

    def _ready_note(self) -> str:
        return f"{self._model.dtype}, context {self._context_length}"

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
        if request.continuation:  # a migrated stream: what it generated elsewhere follows the prompt
            check_token_ids(request.continuation, self._vocab_size, param)
            ids += request.continuation
        check_context(self._context_length, len(ids), sampling, param)
        return GenerateJob(ids, sampling)

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
