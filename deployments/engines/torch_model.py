"""TorchModelEngine: what the engines that serve a Hugging Face model with PyTorch share (the transformers engine,
the sequence-classification engine): loading model and tokenizer, picking device, dtype and thread count, the
batching worker's life, and submitting work to it.

Imported only inside replica processes (it pulls in torch and transformers).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoTokenizer

from deployments import cpus
from deployments.engines.batching import BatchWorker, StepWorker, WorkItem
from deployments.engines.hf_tokenizer import HFTokenizerMixin
from deployments.engines.protocol import Engine
from deployments.errors import EngineDeadError, EngineStartError
from deployments.plan import EnginePlan
from models.spec import ModelSpec

__all__ = ["TorchModelEngine"]

_SHUTDOWN_TIMEOUT_S = 10.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchModelEngine(HFTokenizerMixin, Engine):
    """Base of the engines that run one `transformers` model with PyTorch on one batching worker thread.

    A subclass names the `engine_kwargs` it accepts (`_ALLOWED_KWARGS`; `num_threads` is checked here), loads its
    model with `_load_model` from its `_load`, and builds its worker in `_new_worker`.
    `engine_kwargs.num_threads`: torch CPU threads; default `resources.num_cpus`, at least 1.
    """

    _ALLOWED_KWARGS: tuple[str, ...] = ("num_threads",)

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        # Records carry the engine's own module name, so log settings per engine keep working.
        self._logger = logging.getLogger(type(self).__module__)
        self._worker: BatchWorker[Any] | StepWorker[Any] | None = None
        self._tokenizer: Any = None  # used on the event loop only: HF tokenizers are not thread-safe
        self._model: Any = None
        self._device = torch.device("cpu")
        self._context_length = 0
        self._vocab_size = 0
        self._pad_id = 0

    @property
    def context_length(self) -> int:
        """Most tokens per request (prompt + output when generating; a text pair counts as one input); known
        after `start`."""
        return self._context_length

    async def start(self) -> None:
        """Resolve the source, load tokenizer and model, and start the batching worker.

        Raises:
            EngineStartError: bad `engine_kwargs`, the model cannot be loaded, or it does not fit the task.
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
        batching = self.spec.batching
        self._worker = self._new_worker(
            f"engine:{self.spec.id}",
            max_batch_size=batching.max_batch_size,
            wait_timeout_s=batching.batch_wait_timeout_s,
            on_start=self._pin_worker,
        )
        self._worker.start()
        self._logger.info("model %s ready on %s (%s)", self.spec.id, self._device, self._ready_note())

    async def check_health(self) -> None:
        """Return if the worker thread runs.

        Raises:
            EngineDeadError: the engine was never started, was shut down, or its worker thread died.
        """
        self._running_worker()

    async def shutdown(self) -> None:
        """Stop the worker (bounded wait) and fail queued requests with `EngineDeadError`."""
        if self._worker is not None:
            await asyncio.to_thread(self._worker.stop, _SHUTDOWN_TIMEOUT_S)

    # -- what a subclass provides -------------------------------------------------------------------

    @abc.abstractmethod
    def _load(self, options: dict[str, Any]) -> None:
        """Load the model (with `_load_model`) and set what the subclass needs from it; runs off the event loop.

        Raises:
            EngineStartError: the model does not fit the engine or the spec.
        """

    @abc.abstractmethod
    def _new_worker(
        self, name: str, *, max_batch_size: int, wait_timeout_s: float, on_start: Callable[[], None]
    ) -> BatchWorker[Any] | StepWorker[Any]:
        """The batching worker (not started yet) that runs this engine's model."""

    @abc.abstractmethod
    def _ready_note(self) -> str:
        """What the "model ready" log line says about the loaded model, after its device."""

    def _engine_label(self) -> str:
        """How `engine_kwargs` errors name this engine."""
        return "engine 'transformers'"

    # -- loading -------------------------------------------------------------------------------------

    def _check_engine_kwargs(self) -> dict[str, Any]:
        """The spec's `engine_kwargs`, checked; a subclass checks its own on top.

        Raises:
            EngineStartError: an option outside `_ALLOWED_KWARGS`, or a bad `num_threads`.
        """
        options = dict(self.spec.engine_kwargs)
        unknown = sorted(set(options) - set(self._ALLOWED_KWARGS))
        if unknown:
            raise EngineStartError(
                f"unknown engine_kwargs {unknown} for {self._engine_label()}; "
                f"allowed: {', '.join(self._ALLOWED_KWARGS)}"
            )
        threads = options.get("num_threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise EngineStartError(f"engine_kwargs.num_threads must be an integer >= 1, got {threads!r}")
        return options

    def _load_model(self, model_cls: Any, options: dict[str, Any]) -> str:
        """Pick device, dtype and torch threads, then load the tokenizer and a `model_cls` (an `AutoModel...`
        class) in eval mode on the device; return the resolved local path of the model."""
        from models.registry import resolve_source  # lazy: the registry may build tiny models on demand

        path = resolve_source(str(self.spec.source))  # ModelSpec requires a source for these engines
        wants_gpu = self.spec.resources.num_gpus > 0
        if wants_gpu and not torch.cuda.is_available():
            self._logger.warning("model %s asks for GPUs but CUDA is not available; running on CPU", self.spec.id)
        self._device = torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
        if self.spec.dtype == "auto":
            dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        else:
            dtype = _DTYPES[self.spec.dtype]
        # One torch thread per CPU the replica reserved: more threads than reserved cores spin against the
        # other processes on the node and were 3-10x slower on a busy 2-core machine.
        torch.set_num_threads(options.get("num_threads") or max(1, round(self.spec.resources.num_cpus)))

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = model_cls.from_pretrained(path, dtype=dtype)
        self._model = model.to(self._device).eval()
        return str(path)

    def _resolve_context_length(self) -> int:
        """`spec.context_length`, or the model's own limit when the spec leaves it out.

        Raises:
            EngineStartError: the spec asks for more than the model's limit, or neither states one.
        """
        config = self._model.config
        # Multimodal configs keep the language model's limits in their text config; others return themselves.
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

    # -- worker --------------------------------------------------------------------------------------

    def _pin_worker(self) -> None:
        """On CPU, compute on the engine cores of the plan (the node's CPU split, deployments.cpus), if any: the
        batch thread and the torch threads it starts run there, away from the serving processes."""
        reserved = cpus.parse_cpu_list(self.plan.cpus) if self.plan.cpus else None
        if reserved and self._device.type == "cpu" and cpus.pin_current_thread(reserved):
            self._logger.info("model %s computes on cores %s", self.spec.id, cpus.format_cpu_list(reserved))

    def _running_worker(self) -> BatchWorker[Any] | StepWorker[Any]:
        if self._worker is None or not self._worker.is_alive():
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")
        return self._worker

    async def _run_all(self, payloads: list[Any]) -> list[Any]:
        """Submit one work item per payload and wait for all of them (the payloads of concurrent requests share
        forward passes); return their results in order.

        Raises:
            EngineError: an item failed (`EngineDeadError` if the engine stopped); the first failure is raised.
        """
        worker = self._running_worker()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in payloads]
        items = [WorkItem(payload, loop, _settle(future)) for payload, future in zip(payloads, futures, strict=True)]
        try:
            for item in items:
                worker.submit(item)
            results = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for item in items:  # the caller went away or all are done: the worker skips what is left
                item.cancelled = True
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)


def _settle(future: asyncio.Future[Any]) -> Callable[[object], None]:
    def sink(value: object) -> None:
        if future.done():  # cancelled by the caller meanwhile
            return
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)

    return sink
