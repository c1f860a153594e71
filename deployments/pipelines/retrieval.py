"""Retrieval for sequences: the passages of a document set, embedded once, searched by cosine similarity."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import numpy as np

__all__ = ["PassageIndex", "Retriever"]

# Passages embedded per call while the index is built: one request of a size every engine batches well.
_EMBED_BATCH = 64

Embed = Callable[[Sequence[str]], Awaitable[Sequence[Sequence[float]]]]


class PassageIndex:
    """Passages and their unit vectors; `nearest` ranks them by cosine similarity."""

    def __init__(self, passages: Sequence[str], vectors: Sequence[Sequence[float]]) -> None:
        matrix = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.passages = list(passages)
        self._matrix = matrix / np.where(norms == 0, 1.0, norms)

    def nearest(self, vector: Sequence[float], k: int) -> list[str]:
        """The `k` passages nearest to `vector`, nearest first."""
        query = np.asarray(vector, dtype=np.float32)
        query = query / (np.linalg.norm(query) or 1.0)
        scores = self._matrix @ query
        order = np.argsort(-scores, kind="stable")[:k]
        return [self.passages[i] for i in order]


class Retriever:
    """A document set's index, built on first use (once per router replica) and kept for the replica's life.

    Built lazily, not in the router's constructor: the embedding model may not be up when the router starts,
    and a constructor cannot wait for it without blocking the deployment.
    """

    def __init__(self, passages: Sequence[str]) -> None:
        self.passages = list(passages)
        self._index: PassageIndex | None = None
        self._lock = asyncio.Lock()

    async def index(self, embed: Embed) -> PassageIndex:
        """The index, embedding the passages with `embed` the first time (concurrent callers wait for it).

        Raises:
            ServingError: the embedding model failed (a later request tries again).
        """
        async with self._lock:
            if self._index is None:
                passages = self.passages
                vectors: list[Sequence[float]] = []
                for start in range(0, len(passages), _EMBED_BATCH):
                    vectors.extend(await embed(passages[start : start + _EMBED_BATCH]))
                self._index = PassageIndex(passages, vectors)
            return self._index
