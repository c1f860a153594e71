"""Engines run one model inside one replica; `resolve` picks the class by config name, lazily."""

from __future__ import annotations

import importlib

from deployments.engines.protocol import (
    EmbeddingEngine,
    EmbedRequest,
    EmbedResult,
    Engine,
    GenerateChunk,
    GenerateRequest,
    SamplingConfig,
)

__all__ = [
    "EmbedRequest",
    "EmbedResult",
    "EmbeddingEngine",
    "Engine",
    "GenerateChunk",
    "GenerateRequest",
    "SamplingConfig",
    "resolve",
]

# Imported lazily so the router process never loads torch or transformers.
_ENGINES = {
    "echo": ("deployments.engines.echo", "EchoEngine"),
    "transformers": ("deployments.engines.transformers", "TransformersEngine"),
    "vllm": ("deployments.engines.vllm", "VLLMEngine"),
}


def resolve(name: str) -> type[Engine]:
    """The Engine class for a config's `engine` name.

    Raises:
        KeyError: no engine has that name.
    """
    module_name, class_name = _ENGINES[name]
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls
