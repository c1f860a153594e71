"""SequenceClassificationEngine: a Hugging Face sequence-classification model served with PyTorch, as a classifier
(task 'classify') or as a cross-encoder that scores text pairs (task 'score'), batching concurrent inputs.

Imported only inside replica processes (it pulls in torch and transformers).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification

from deployments.engines.batching import BatchWorker, StepWorker, WorkItem
from deployments.engines.protocol import (
    Classification,
    ClassifyRequest,
    ClassifyResult,
    GenerateChunk,
    GenerateRequest,
    PoolingOptions,
    ScoreRequest,
    ScoreResult,
    ScoringEngine,
    check_token_ids,
)
from deployments.engines.torch_model import TorchModelEngine
from deployments.errors import EngineStartError, InvalidRequestError
from deployments.plan import EnginePlan
from models.spec import ModelSpec

__all__ = ["SequenceClassificationEngine"]


@dataclasses.dataclass(frozen=True)
class _Row:
    """One model input: token ids, segment ids of a pair (None: all zeros), and whether to apply the activation."""

    ids: list[int]
    type_ids: list[int] | None
    activate: bool


class SequenceClassificationEngine(TorchModelEngine, ScoringEngine):
    """Runs `AutoModelForSequenceClassification` from `spec.source`: one forward pass per batch of inputs.

    The activation follows vLLM's (and transformers' loss) convention: `problem_type` when the config sets it,
    else a sentence-transformers cross-encoder's `activation_fn`, else softmax over two or more labels and sigmoid
    over one. Task 'score' needs a model with one output (a cross-encoder). Truncation keeps the special tokens,
    as the Hugging Face tokenizer truncates. `engine_kwargs`: `num_threads` (torch CPU threads; default
    `resources.num_cpus`, at least 1).
    """

    def __init__(self, spec: ModelSpec, plan: EnginePlan | None = None) -> None:
        super().__init__(spec, plan)
        self._labels: dict[int, str] = {}
        self._activation = "softmax"
        self._type_ids = False

    @property
    def activation(self) -> str:
        """'softmax', 'sigmoid' or 'identity': what `use_activation` applies; known after `start`."""
        return self._activation

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """A classifier does not generate.

        Raises:
            InvalidRequestError: always (param `model`).
        """
        raise InvalidRequestError(
            f"model '{self.spec.id}' is a sequence classifier (task '{self.spec.task}') and cannot generate text",
            param="model",
        )
        yield  # an async generator, as `Engine.generate` is

    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        """Class probabilities (raw logits with `use_activation` false) and the top label of every input.

        Raises:
            InvalidRequestError: this model is not a classifier, an input is empty, too long or holds token ids
                outside the vocabulary, or `truncate_prompt_tokens` does not fit the model.
            EngineError: the batch failed (`EngineDeadError` if the engine stopped).
        """
        self._require_task("classify")
        self._running_worker()
        options = request.options
        limit = self._truncation(options, pair=False, add_special_tokens=request.add_special_tokens)
        rows = []
        for index, value in enumerate(request.inputs):
            if isinstance(value, str):
                ids, _ = self._encode(value, None, request.add_special_tokens, limit, options)
            else:
                check_token_ids(value, self._vocab_size, "input")
                ids = _cut(list(value), limit, options.truncation_side)
            self._check_length(ids, index, "input")
            rows.append(_Row(ids, None, options.use_activation is not False))
        outputs: list[tuple[float, ...]] = await self._run_all(rows)
        classifications = tuple(
            Classification(probs=out, label=self._labels.get(max(range(len(out)), key=out.__getitem__)))
            for out in outputs
        )
        return ClassifyResult(classifications=classifications, prompt_tokens=sum(len(r.ids) for r in rows))

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """The relevance score of every (query, document) pair: one query pairs with every document.

        Raises:
            InvalidRequestError: this model is not a cross-encoder, a pair is too long, or a token limit does not
                fit the model.
            EngineError: the batch failed (`EngineDeadError` if the engine stopped).
        """
        self._require_task("score")
        self._running_worker()
        options = request.options
        first, second = request.fields
        for name, value in (
            ("max_tokens_per_query", request.max_tokens_per_query),
            ("max_tokens_per_doc", request.max_tokens_per_doc),
        ):
            if value >= self._context_length:
                raise InvalidRequestError(
                    f"{name} ({value}) must be less than this model's context length ({self._context_length})",
                    param=name,
                )
        limit = self._truncation(options, pair=True, add_special_tokens=True)
        queries = request.queries * len(request.documents) if len(request.queries) == 1 else request.queries
        rows = []
        for index, (query, document) in enumerate(zip(queries, request.documents, strict=True)):
            query = self._cut_text(query, request.max_tokens_per_query)
            document = self._cut_text(document, request.max_tokens_per_doc)
            ids, type_ids = self._encode(query, document, True, limit, options)
            self._check_length(ids, index, second if len(request.queries) == 1 else first)
            rows.append(_Row(ids, type_ids, options.use_activation is not False))
        outputs: list[tuple[float, ...]] = await self._run_all(rows)
        return ScoreResult(scores=tuple(out[0] for out in outputs), prompt_tokens=sum(len(r.ids) for r in rows))

    # -- loading -------------------------------------------------------------------------------------

    def _engine_label(self) -> str:
        return f"engine 'transformers' with task '{self.spec.task}'"

    def _load(self, options: dict[str, Any]) -> None:
        self._load_model(AutoModelForSequenceClassification, options)
        config = self._model.config
        if self.spec.task == "score" and config.num_labels != 1:
            raise EngineStartError(
                f"task 'score' needs a cross-encoder (a sequence classifier with one output); model "
                f"'{self.spec.id}' has {config.num_labels} labels: serve it with task 'classify'"
            )
        self._labels = {int(k): str(v) for k, v in (config.id2label or {}).items()}
        self._activation = _activation(config)
        self._context_length = self._resolve_context_length()
        self._vocab_size = int(self._model.get_input_embeddings().num_embeddings)
        pad = self._tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else 0
        # BERT-style models tell the two texts of a pair apart by segment ids; some tokenizers (transformers 5)
        # leave them out unless asked.
        self._type_ids = "token_type_ids" in inspect.signature(self._model.forward).parameters

    def _new_worker(
        self, name: str, *, max_batch_size: int, wait_timeout_s: float, on_start: Callable[[], None]
    ) -> BatchWorker[Any] | StepWorker[Any]:
        return BatchWorker(
            name, self._run_batch, max_batch_size=max_batch_size, wait_timeout_s=wait_timeout_s, on_start=on_start
        )

    def _ready_note(self) -> str:
        labels = self._model.config.num_labels
        return f"{labels} labels, {self._activation}, context {self._context_length}"

    # -- validation and tokenization (event loop, before any batch) ----------------------------------

    def _require_task(self, task: str) -> None:
        if self.spec.task != task:
            what = "classify texts (/classify)" if task == "classify" else "score text pairs (/score, /rerank)"
            raise InvalidRequestError(
                f"model '{self.spec.id}' serves task '{self.spec.task}' and cannot {what}", param="model"
            )

    def _truncation(self, options: PoolingOptions, *, pair: bool, add_special_tokens: bool) -> int | None:
        """The token limit `truncate_prompt_tokens` asks for (None: no truncation), checked against the model."""
        wanted = options.truncate_prompt_tokens
        if wanted is None:
            return None
        limit = self._context_length if wanted == -1 else wanted
        specials = self._tokenizer.num_special_tokens_to_add(pair=pair) if add_special_tokens else 0
        least = specials + (2 if pair else 1)  # room for one token of each text
        if not least <= limit <= self._context_length:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be -1 (the context length) or between {least} and "
                f"{self._context_length} (this model's context length) for this request, got {wanted}",
                param="truncate_prompt_tokens",
            )
        return limit

    def _encode(
        self, text: str, pair: str | None, add_special_tokens: bool, limit: int | None, options: PoolingOptions
    ) -> tuple[list[int], list[int] | None]:
        tokenizer = self._tokenizer
        kwargs: dict[str, Any] = {"truncation": "longest_first", "max_length": limit} if limit is not None else {}
        if pair is not None and self._type_ids:
            kwargs["return_token_type_ids"] = True
        default_side = tokenizer.truncation_side
        tokenizer.truncation_side = options.truncation_side or default_side
        try:
            encoded = tokenizer(text, pair, add_special_tokens=add_special_tokens, **kwargs)
        finally:
            tokenizer.truncation_side = default_side
        type_ids = encoded.get("token_type_ids") if pair is not None and self._type_ids else None
        return list(encoded["input_ids"]), list(type_ids) if type_ids is not None else None

    def _cut_text(self, text: str, max_tokens: int) -> str:
        """`text` cut to its first `max_tokens` tokens (0: whole), at a character boundary, as vLLM cuts."""
        if max_tokens <= 0:
            return text
        while text:
            offsets = self._tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            if len(offsets) <= max_tokens:
                break
            text = text[: min(offsets[max_tokens - 1][1], len(text) - 1)]
        return text

    def _check_length(self, ids: list[int], index: int, param: str) -> None:
        if not ids or len(ids) > self._context_length:
            raise InvalidRequestError(
                f"{param} {index} has {len(ids)} tokens; this model accepts 1 to {self._context_length} tokens per "
                "input (set truncate_prompt_tokens to cut longer ones)",
                param=param,
            )

    # -- running -------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run_batch(self, items: list[WorkItem[_Row]]) -> None:
        width = max(len(item.payload.ids) for item in items)
        ids = torch.full((len(items), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):  # right padding: positions count from 0 in every row
            length = len(item.payload.ids)
            ids[row, :length] = torch.tensor(item.payload.ids)
            mask[row, :length] = 1
            if item.payload.type_ids is not None:
                types[row, :length] = torch.tensor(item.payload.type_ids)
        inputs = {"input_ids": ids.to(self._device), "attention_mask": mask.to(self._device)}
        if self._type_ids:
            inputs["token_type_ids"] = types.to(self._device)
        logits = self._model(**inputs).logits.float()
        if self._activation == "softmax":
            activated = logits.softmax(dim=-1)
        elif self._activation == "sigmoid":
            activated = logits.sigmoid()
        else:
            activated = logits
        for item, raw, active in zip(items, logits.cpu().tolist(), activated.cpu().tolist(), strict=True):
            item.send(tuple(active if item.payload.activate else raw), final=True)


def _activation(config: Any) -> str:
    """The activation vLLM applies to a sequence classifier's logits (`use_activation`), from its config.

    Raises:
        EngineStartError: a sentence-transformers activation other than Identity, Sigmoid or Softmax.
    """
    problem = getattr(config, "problem_type", None) or ""
    if problem == "regression":
        return "identity"
    if problem == "multi_label_classification":
        return "sigmoid"
    if problem != "single_label_classification":
        st = getattr(config, "sentence_transformers", None)
        name = st.get("activation_fn") if isinstance(st, dict) else None
        name = name or getattr(config, "sbert_ce_default_activation_function", None)
        if name is not None:
            kind = str(name).rsplit(".", 1)[-1]
            if kind == "Identity":
                return "identity"
            if kind not in ("Sigmoid", "Softmax"):
                raise EngineStartError(
                    f"the model's activation function {name!r} is not supported: Identity, Sigmoid or Softmax"
                )
    return "sigmoid" if config.num_labels < 2 else "softmax"


def _cut(ids: list[int], limit: int | None, side: str | None) -> list[int]:
    """Token ids cut to `limit` from `side` ('left' keeps the last ones; default right)."""
    if limit is None or len(ids) <= limit:
        return ids
    return ids[-limit:] if side == "left" else ids[:limit]
