"""Engines run one model inside one replica; `resolve` picks the class by config name (and task), lazily."""

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
# Sequence-classification models (classifiers, cross-encoders) have an engine class of their own.
_TASK_ENGINES = {
    ("transformers", "classify"): ("deployments.engines.scoring", "SequenceClassificationEngine"),
    ("transformers", "score"): ("deployments.engines.scoring", "SequenceClassificationEngine"),
}


def resolve(name: str, task: str = "generate") -> type[Engine]:
    """The Engine class for a config's `engine` name and the model's `task`.

    Raises:
        KeyError: no engine has that name.
    """
    module_name, class_name = _TASK_ENGINES.get((name, task)) or _ENGINES[name]
    cls: type[Engine] = getattr(importlib.import_module(module_name), class_name)
    return cls
