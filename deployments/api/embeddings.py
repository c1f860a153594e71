"""The response body of POST /v1/embeddings, for the HTTP route and for batch jobs alike."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from deployments.api.openai_models import EmbeddingRequest, usage
from deployments.auth.limits import charge
from deployments.engines.protocol import EmbedResult
from deployments.errors import InvalidRequestError

__all__ = ["embedding_body"]


def embedding_body(body: EmbeddingRequest, result: EmbedResult) -> dict[str, Any]:
    """OpenAI's embeddings response for `body` from the engine's `result`.

    Raises:
        InvalidRequestError: `dimensions` differs from the model's size.
    """
    size = len(result.embeddings[0])
    if body.dimensions is not None and body.dimensions != size:
        raise InvalidRequestError(
            f"This model returns {size} dimensions; `dimensions` must be {size} or unset", param="dimensions"
        )
    data = []
    for i, vector in enumerate(result.embeddings):
        value: Any = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    charge(result.prompt_tokens)  # to the request's API key, if any (a batch job has none)
    return {"object": "list", "data": data, "model": body.model, "usage": usage(result.prompt_tokens)}
