"""LoRA adapters on the vLLM engine: the adapter table (name -> vLLM's LoRARequest), loading and unloading them in
the running engine, the folder checks, and the CPU kind gate.

vLLM is imported only when a LoRARequest is built or an engine is asked, so importing this module stays cheap.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable
from typing import Any

from deployments.errors import EngineDeadError, EngineError, EngineStartError, ModelNotFoundError
from models.spec import AdapterSpec, ModelSpec, adapter_problem

__all__ = ["KindGate", "LoRAMixin", "check_adapters"]

logger = logging.getLogger(__name__)


class LoRAMixin:
    """The LoRA capability of an engine (VLLMEngine): which adapters the model has now, and which are loaded.

    The adapter list starts as the spec's and changes in place (`set_adapters`, from the replica's `reconfigure`), so
    adding, removing or repointing an adapter restarts nothing. Each (name, folder) gets its own LoRARequest id: vLLM
    caches adapters by id, so a repointed adapter is a new one to it.
    """

    spec: ModelSpec
    _llm: Any

    def _init_lora(self, spec: ModelSpec) -> None:
        self._lora_ids = itertools.count(1)
        self._loras: dict[str, Any] = {}  # adapter name -> vllm LoRARequest
        self._lora_paths: dict[str, str] = {}
        self.set_adapters(spec.adapters)

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters this engine serves now."""
        return tuple(self._lora_paths)

    def set_adapters(self, adapters: Iterable[AdapterSpec]) -> list[str]:
        """Serve these adapters from now on.

        Returns:
            The names whose LoRARequest went away (removed, or repointed to another folder): a caller that loaded
            them unloads them (`unload_adapter` with the old request's id, which it holds).
        """
        wanted = {a.name: str(a.path) for a in adapters}
        gone = [name for name, path in self._lora_paths.items() if wanted.get(name) != path]
        for name in gone:
            del self._lora_paths[name]
            self._loras.pop(name, None)
        for name, path in wanted.items():
            if name not in self._lora_paths:
                self._lora_paths[name] = path
        return gone

    def _lora_request(self, name: str | None) -> Any:
        """vLLM's LoRARequest of the adapter `name`, or None (the base model).

        Raises:
            ModelNotFoundError: the model has no adapter of that name (now: it may have been removed).
        """
        if name is None:
            return None
        request = self._loras.get(name)
        if request is None:
            path = self._lora_paths.get(name)
            if path is None:
                raise ModelNotFoundError(f"The model '{name}' does not exist ('{self.spec.id}' has no such adapter)")
            from vllm.lora.request import LoRARequest

            request = self._loras[name] = LoRARequest(lora_name=name, lora_int_id=next(self._lora_ids), lora_path=path)
        return request

    async def load_adapter(self, name: str) -> Any:
        """Load the adapter into the running engine (vLLM's `add_lora`); returns its LoRARequest.

        Raises:
            ModelNotFoundError: the model has no adapter of that name.
            EngineDeadError: the engine is not running.
            EngineError: vLLM cannot load the adapter's folder.
        """
        request = self._lora_request(name)
        if self._llm is None:
            raise EngineDeadError(f"the engine for model '{self.spec.id}' is not running")
        try:
            await self._llm.add_lora(request)
        except Exception as exc:  # vLLM's loader failure becomes one typed error
            raise EngineError(
                f"vLLM cannot load adapter '{name}' of model '{self.spec.id}' ({type(exc).__name__}): {exc}"
            ) from exc
        logger.info("adapter %s (id %d) loaded on model %s", name, request.lora_int_id, self.spec.id)
        return request

    async def unload_adapter(self, request: Any) -> None:
        """Remove a loaded adapter (its LoRARequest) from the running engine (vLLM's `remove_lora`). A request still
        running with it is not cut: vLLM loads what its running requests name again at its next step."""
        if self._llm is None:
            return  # stopped: nothing is loaded
        await self._llm.remove_lora(request.lora_int_id)
        logger.info("adapter %s (id %d) unloaded from model %s", request.lora_name, request.lora_int_id, self.spec.id)


class KindGate:
    """Lets requests of one kind at a time run (base model, or adapters): a request of the other kind waits until
    those running finish; while it waits, new requests of the running kind wait behind it (no starvation).

    Vendor quirk (vLLM's CPU LoRA kernels, vllm/lora/ops/torch_ops): in a batch that mixes base-model and adapter
    requests, the base requests' "no adapter" index -1 selects the last adapter slot, so they get an adapter's output
    (open upstream fixes: vllm-project/vllm PRs 48421, 49656). On CPU replicas of a model with adapters, base and
    adapter requests never run together.
    """

    def __init__(self) -> None:
        self._cond: asyncio.Condition | None = None  # made on the engine's loop, at first use
        self._base = True  # the kind running while `_active` > 0
        self._active = 0
        self._waiting = {True: 0, False: 0}

    async def acquire(self, base: bool) -> None:
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            self._waiting[base] += 1
            try:
                await self._cond.wait_for(
                    lambda: self._active == 0 or (self._base == base and not self._waiting[not base])
                )
            finally:
                self._waiting[base] -= 1
            self._base = base
            self._active += 1

    async def release(self) -> None:
        self._active -= 1  # first: a cancellation below must not leave the request counted
        if self._active == 0 and self._cond is not None:
            async with self._cond:  # free but for a moment: the lock is held only to check or count
                self._cond.notify_all()


def check_adapters(spec: ModelSpec, adapters: Iterable[AdapterSpec] | None = None) -> None:
    """Check each LoRA adapter's folder (the spec's, or `adapters`) on this node, so a bad one is refused with its
    name rather than failing its requests later: peft's adapter_config.json there, with a rank within
    `max_lora_rank`.

    Raises:
        EngineStartError: the message names the adapter and the fix.
    """
    for adapter in spec.adapters if adapters is None else adapters:
        problem = adapter_problem(adapter, spec.max_lora_rank)
        if problem is not None:
            raise EngineStartError(f"model '{spec.id}': {problem}")
