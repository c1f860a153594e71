"""Per-request decoding in the transformers engine's batches: sampling, stop strings and incremental detokenization."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deployments.engines.batching import WorkItem
from deployments.engines.protocol import FinishReason, GenerateChunk, SamplingConfig

__all__ = ["GenerateJob", "Sequence", "sample"]

_GREEDY_BELOW = 1e-5  # temperatures this small would overflow the logits: treat them as greedy


@dataclass(frozen=True)
class GenerateJob:
    """One request's work for the batch thread: its prompt ids and sampling settings."""

    prompt_ids: list[int]
    sampling: SamplingConfig


class Sequence:
    """One request's decoding state inside a batch: its tokens, the text already sent, its stop strings."""

    def __init__(self, item: WorkItem[GenerateJob], decoder: Any, eos_ids: frozenset[int], device: torch.device):
        self.item = item
        self.sampling = item.payload.sampling
        self.generator: torch.Generator | None = None
        if self.sampling.temperature >= _GREEDY_BELOW:
            self.generator = torch.Generator(device=device)
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)
        self._decoder = decoder
        self._eos_ids = eos_ids
        self._prompt_tokens = len(item.payload.prompt_ids)
        self._ids: list[int] = []  # generated ids that make text (EOS excluded)
        self._unsent: list[int] = []  # generated ids not yet reported in a chunk
        self._count = 0
        self._sent = 0  # characters of text already sent
        # Penalised ids (prompt and output, as vLLM does); logit bias and EOS ids as tensors, built once.
        self._seen = list(item.payload.prompt_ids) if self.sampling.repetition_penalty != 1.0 else []
        bias = self.sampling.logit_bias
        self._bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=device) if bias else None
        self._bias = torch.tensor([b for _, b in bias], dtype=torch.float32, device=device) if bias else None
        self._eos_tensor = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device) if eos_ids else None

    def adjust(self, logits: torch.Tensor) -> None:
        """Edit this row's logits in place before sampling: logit bias, repetition penalty, no EOS before
        min_tokens (vLLM's order: these come before temperature and top-k/top-p/min-p)."""
        if self._bias_ids is not None and self._bias is not None:
            logits.index_add_(0, self._bias_ids, self._bias)
        if self._seen:
            seen = torch.tensor(sorted(set(self._seen)), dtype=torch.long, device=logits.device)
            scores = logits[seen]
            penalty = self.sampling.repetition_penalty
            logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        if self._count < self.sampling.min_tokens and self._eos_tensor is not None:
            logits[self._eos_tensor] = float("-inf")

    def push(self, token: int) -> bool:
        """Add one generated token and send the text that became final; True once the sequence is done."""
        self._count += 1
        self._unsent.append(token)
        if self._seen:
            self._seen.append(token)
        finish: FinishReason | None = None
        if token in self._eos_ids and not self.sampling.ignore_eos:
            finish = "stop"
        else:
            self._ids.append(token)
            if self._count >= self.sampling.max_tokens:
                finish = "length"
        # Decoding the whole list (not just the new token) keeps multi-token characters and spacing right.
        text = self._decoder.decode(
            self._ids, skip_special_tokens=self.sampling.skip_special_tokens, clean_up_tokenization_spaces=False
        )
        end = len(text)
        # Before min_tokens, stop strings do not end the output either (as in vLLM).
        stops = self.sampling.stop if self._count >= self.sampling.min_tokens else ()
        stop_at = _find_stop(text, stops, self._sent)
        if stop_at is not None:
            end, finish = max(stop_at, self._sent), "stop"
        elif finish is None:
            end -= _partial_stop(text, self.sampling.stop)  # might become a stop string: hold it back
            if text[:end].endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                end = len(text[:end].rstrip("\ufffd"))
        delta = text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        if delta or finish is not None:
            chunk = GenerateChunk(
                text=delta,
                prompt_tokens=self._prompt_tokens,
                completion_tokens=self._count,
                finish_reason=finish,
                token_ids=tuple(self._unsent),
            )
            self._unsent = []
            self.item.send(chunk, final=finish is not None)
        return finish is not None


def _find_stop(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Index of the earliest stop string in the unsent part of `text` (with overlap), or None."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(hits, default=None)


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def sample(logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
    """Pick one token per row: greedy at temperature 0, else temperature + top-k/min-p/top-p with the row's
    generator; each row's logit edits (bias, penalty, min_tokens) come first."""
    logits = logits.float()
    for row, seq in enumerate(sequences):
        seq.adjust(logits[row])
    tokens = logits.argmax(dim=-1)
    for row, seq in enumerate(sequences):
        if seq.generator is None:
            continue
        scaled = logits[row] / seq.sampling.temperature
        if seq.sampling.top_k > 0 and seq.sampling.top_k < scaled.numel():
            kth = scaled.topk(seq.sampling.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        if seq.sampling.min_p > 0:
            probs = probs.masked_fill(probs < seq.sampling.min_p * probs.max(), 0.0)
            probs = probs / probs.sum()
        if seq.sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs >= seq.sampling.top_p  # the top token always stays
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        tokens[row] = torch.multinomial(probs, 1, generator=seq.generator)[0]
    return tokens
