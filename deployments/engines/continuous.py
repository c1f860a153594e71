"""Continuous batching for the transformers engine: the running decode batch, which requests join and leave per step.

One left-padded KV cache (transformers' `DynamicCache`) holds a row per running request, with its own attention
mask and positions. Joining requests are prefilled into a cache of their own, which is then padded and concatenated
onto the running one; finished rows are cut out at once. Driven by `batching.StepWorker` on the engine's thread.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812 - the usual torch alias
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from deployments.engines.batching import WorkItem
from deployments.engines.decoding import GenerateJob, Sequence, sample

__all__ = ["DecodeBatch"]


class DecodeBatch:
    """The requests a causal LM decodes together, advanced one token per `step` (a `batching.Stepper`).

    A step drops the rows whose client went away, prefills the joining requests (one forward pass over their
    left-padded prompts; each gets its first token), merges them into the running rows, then decodes one token
    for every row (a second forward pass). A row leaves as soon as its request is done. Every row keeps its own
    positions and mask, so its output is the one it gets alone (greedy, up to float rounding).

    Models whose cache is not made of plain full-attention layers (sliding windows, linear attention) cannot
    merge caches: there, requests join only when the batch is empty (static batches).
    """

    def __init__(
        self,
        model: Any,
        decoder: Any,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        device: torch.device,
        logits_to_keep: bool,
    ) -> None:
        self._model = model
        self._decoder = decoder  # the worker thread's own tokenizer (HF tokenizers are not thread-safe)
        self._eos_ids = eos_ids
        self._pad_id = pad_id
        self._device = device
        self._extra: dict[str, Any] = {"logits_to_keep": 1} if logits_to_keep else {}
        self._joinable: bool | None = None  # known after the first prefill: can caches be merged?
        self._rows: list[Sequence] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=device)  # [rows, cache width]: 0 = left padding
        self._next = torch.zeros((0,), dtype=torch.long, device=device)  # each row's next input token
        self._positions = torch.zeros((0, 1), dtype=torch.long, device=device)  # ... and its position

    def room(self, limit: int) -> int:
        """How many requests may join at the next step with at most `limit` rows."""
        if self._rows and self._joinable is False:
            return 0
        return max(0, limit - len(self._rows))

    def items(self) -> list[WorkItem[GenerateJob]]:
        """The requests still running."""
        return [row.item for row in self._rows]

    @property
    def width(self) -> int:
        """Columns of the running cache (the longest row's tokens, plus left padding of shorter rows)."""
        return int(self._mask.shape[1])

    def clear(self) -> None:
        """Drop every row and the cache."""
        self._rows, self._cache = [], None
        self._mask, self._next, self._positions = self._mask[:0, :0], self._next[:0], self._positions[:0]

    @torch.inference_mode()
    def step(self, joining: list[WorkItem[GenerateJob]]) -> None:
        """Let `joining` in and make one token for every running row; see the class docstring."""
        if self._rows:
            self._keep([row for row, seq in enumerate(self._rows) if not seq.item.cancelled])
        if joining:
            self._join(joining)
        if self._rows:
            self._decode()

    def _join(self, items: list[WorkItem[GenerateJob]]) -> None:
        rows = [Sequence(item, self._decoder, self._eos_ids, self._device) for item in items]
        prompts = [item.payload.prompt_ids for item in items]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row's next token goes in the last column
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        logits = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **self._extra,
        ).logits[:, -1, :]
        if self._joinable is None:
            self._joinable = all(type(layer) is DynamicLayer for layer in cache.layers)
        tokens = sample(logits, rows)
        keep = [r for r, (seq, t) in enumerate(zip(rows, tokens.tolist(), strict=True)) if not _finished(seq, t)]
        if not keep:
            return
        index = torch.tensor(keep, device=self._device)
        if len(keep) < len(rows):
            cache.batch_select_indices(index)
        rows = [rows[r] for r in keep]
        mask, tokens, positions = mask[index], tokens[index], positions[index, -1:] + 1
        if not self._rows:
            self._rows, self._cache, self._mask, self._next, self._positions = rows, cache, mask, tokens, positions
            return
        width = max(self.width, int(mask.shape[1]))
        for old, new in zip(_layers(self._cache), _layers(cache), strict=True):
            (old_keys, old_values), (new_keys, new_values) = _tensors(old), _tensors(new)
            old.keys = torch.cat([_pad_left(old_keys, width, dim=-2), _pad_left(new_keys, width, dim=-2)])
            old.values = torch.cat([_pad_left(old_values, width, dim=-2), _pad_left(new_values, width, dim=-2)])
        self._mask = torch.cat([_pad_left(self._mask, width, dim=-1), _pad_left(mask, width, dim=-1)])
        self._next = torch.cat([self._next, tokens])
        self._positions = torch.cat([self._positions, positions])
        self._rows += rows

    def _decode(self) -> None:
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        logits = self._model(
            input_ids=self._next[:, None],
            attention_mask=self._mask,
            position_ids=self._positions,
            past_key_values=self._cache,
            use_cache=True,
        ).logits[:, -1, :]
        self._positions = self._positions + 1
        self._next = sample(logits, self._rows)
        tokens = self._next.tolist()
        self._keep([r for r, (seq, t) in enumerate(zip(self._rows, tokens, strict=True)) if not _finished(seq, t)])

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows `keep`, and cut the left padding that no remaining row needs."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self.clear()
            return
        cache = cast(DynamicCache, self._cache)  # running rows always have one
        index = torch.tensor(keep, device=self._device)
        cache.batch_select_indices(index)
        self._mask, self._next, self._positions = self._mask[index], self._next[index], self._positions[index]
        self._rows = [self._rows[r] for r in keep]
        if not self._joinable:
            return
        lead = int(self._mask.any(dim=0).long().argmax())  # the first column some row attends to
        if lead > 0:
            self._mask = self._mask[:, lead:]
            for layer in _layers(cache):
                keys, values = _tensors(layer)
                layer.keys, layer.values = keys[..., lead:, :], values[..., lead:, :]


def _layers(cache: DynamicCache | None) -> list[DynamicLayer]:
    """The cache's layers, where merging and trimming them is allowed (`DecodeBatch._joinable`)."""
    return cast(list[DynamicLayer], cache.layers if cache is not None else [])


def _tensors(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values ([rows, heads, width, head size])."""
    return cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)


def _finished(seq: Sequence, token: int) -> bool:
    """Push `token` to the row (which sends its text); True once the row should leave (done or abandoned)."""
    return seq.item.cancelled or seq.push(token)


def _pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """`tensor` with zeros prepended along `dim` (-1 or -2) up to `width`."""
    missing = width - int(tensor.shape[dim])
    if missing == 0:
        return tensor
    return F.pad(tensor, (missing, 0) if dim == -1 else (0, 0, missing, 0))
