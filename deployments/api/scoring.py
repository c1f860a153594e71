"""POST /classify, /score and /rerank: request and response bodies in vLLM's shapes, and the responses built from
the engine's results.

vLLM's fields that this server does not implement (chat-form classification `messages`, `instruction` and
`chat_template_kwargs` of score templates, `padding`, `cache_salt`, `mm_processor_kwargs`, multimodal inputs) are
refused by name, as every unknown field is.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.api.wire import WireRequest, same_type
from deployments.auth.limits import charge
from deployments.engines.protocol import (
    ClassifyRequest,
    ClassifyResult,
    PoolingOptions,
    ScoreRequest,
    ScoreResult,
)
from deployments.errors import InvalidRequestError

__all__ = [
    "ClassificationRequest",
    "ClassificationResponse",
    "RerankRequest",
    "RerankResponse",
    "ScoreResponse",
    "ScoreTextsRequest",
    "classification_body",
    "rerank_body",
    "score_body",
]

_MAX_INPUTS = 2048
_TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
_Texts = Annotated[list[str], Field(min_length=1, max_length=_MAX_INPUTS)]
# -1 (the model's context length) or a positive count; 0 would leave nothing to classify.
_Truncate = Annotated[Literal[-1], same_type(int)] | Annotated[int, Field(ge=1, le=2**31 - 1)]
_TokenLimit = Annotated[int, Field(ge=0, le=2**31 - 1)]
# The spellings vLLM accepts for the two sides of /score, in the order it tries them.
_SCORE_PAIRS = (("queries", "documents"), ("queries", "items"), ("data_1", "data_2"), ("text_1", "text_2"))
_SCORE_FIELDS = ("queries", "documents", "items", "data_1", "data_2", "text_1", "text_2")


class _PoolingFields(WireRequest):
    """The fields every classification and scoring request has (vLLM's pooling request fields)."""

    model: str = Field(min_length=1, description="Id of a served model (see GET /v1/models).")
    user: str | None = Field(None, description="The end user; a model with routing policy 'session' keys on it.")
    truncate_prompt_tokens: _Truncate | None = Field(
        None,
        description=(
            "vLLM: cut each input (a pair counts as one) to this many tokens, special tokens kept; -1: the model's "
            "context length. Unset: a longer input is refused."
        ),
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="vLLM: 'right' keeps the first tokens (the default), 'left' the last ones."
    )
    use_activation: bool | None = Field(
        None,
        description="vLLM: apply the model's activation (softmax, or sigmoid for one label); false returns logits.",
    )
    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="vLLM: names the response (`<kind>-<request_id>`); unset: the request's X-Request-Id names it.",
    )
    priority: Annotated[Literal[0], same_type(int)] = Field(
        0, description="vLLM: only 0; requests are served in arrival order (no priority scheduling)."
    )

    def options(self) -> PoolingOptions:
        """The engine's tokenization and activation settings."""
        return PoolingOptions(
            truncate_prompt_tokens=self.truncate_prompt_tokens,
            truncation_side=self.truncation_side,
            use_activation=self.use_activation,
        )

    def response_id(self, kind: str, request_id: str) -> str:
        """The response id: `<kind>-` and the body's `request_id`, else the request's id (its X-Request-Id).

        vLLM lets the header win; Serve's proxy adds one to every request, so here the body's field wins.
        """
        return f"{kind}-{self.request_id or request_id}"


class ClassificationRequest(_PoolingFields):
    """Body of POST /classify: texts (or prompts as token ids) to classify."""

    input: (
        str
        | _Texts
        | Annotated[list[_TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[_TokenId], Field(min_length=1)]], Field(min_length=1, max_length=_MAX_INPUTS)]
    ) = Field(description="A text, a list of texts (at most 2048), or prompts as token ids.")
    add_special_tokens: bool = Field(True, description="vLLM: add the tokenizer's special tokens ([CLS], [SEP]).")

    @model_validator(mode="before")
    @classmethod
    def _no_chat_form(cls, data: Any) -> Any:
        if isinstance(data, dict) and "messages" in data:
            raise InvalidRequestError(
                "messages: chat-form classification is not supported; send the text as `input`", param="messages"
            )
        return data

    def internal(self, request_id: str, routing_key: str | None) -> ClassifyRequest:
        """The engine's request."""
        value = self.input
        inputs: tuple[str | tuple[int, ...], ...]
        if isinstance(value, str):
            inputs = (value,)
        elif all(isinstance(v, int) for v in value):  # the token ids of one prompt
            inputs = (tuple(v for v in value if isinstance(v, int)),)
        else:  # texts, or prompts as token ids
            inputs = tuple(v if isinstance(v, str) else tuple(v) for v in value if not isinstance(v, int))
        return ClassifyRequest(
            request_id=request_id,
            inputs=inputs,
            add_special_tokens=self.add_special_tokens,
            options=self.options(),
            routing_key=routing_key,
        )


class _ScoringFields(_PoolingFields):
    max_tokens_per_query: _TokenLimit = Field(
        0, description="vLLM: cut each query to this many tokens first (below the context length); 0: no cut."
    )
    max_tokens_per_doc: _TokenLimit = Field(
        0, description="vLLM: cut each document to this many tokens first (below the context length); 0: no cut."
    )


def _one_spelling(schema: dict[str, Any]) -> None:
    """The document says what `pairs` checks: exactly one of vLLM's spellings, complete, and nothing of another."""

    # A field set to null counts as not sent, as in `internal`.
    def given(*names: str) -> dict[str, Any]:
        return {"required": list(names), "properties": {name: {"not": {"type": "null"}} for name in names}}

    schema["oneOf"] = [
        {**given(*pair), "not": {"anyOf": [given(other) for other in _SCORE_FIELDS if other not in pair]}}
        for pair in _SCORE_PAIRS
    ]


class ScoreTextsRequest(_ScoringFields):
    """Body of POST /score: queries and documents, under any of vLLM's names for them (`queries` with `documents`
    or `items`, `data_1` with `data_2`, `text_1` with `text_2`). One query is paired with every document; else the
    i-th query with the i-th document."""

    model_config = ConfigDict(json_schema_extra=_one_spelling)

    queries: str | _Texts | None = Field(None, description="The query, or one query per document.")
    documents: str | _Texts | None = Field(None, description="The documents (with `queries`).")
    items: str | _Texts | None = Field(None, description="The documents (with `queries`), vLLM's other name.")
    data_1: str | _Texts | None = Field(None, description="The query side (with `data_2`).")
    data_2: str | _Texts | None = Field(None, description="The document side (with `data_1`).")
    text_1: str | _Texts | None = Field(None, description="The query side (with `text_2`).")
    text_2: str | _Texts | None = Field(None, description="The document side (with `text_1`).")

    def internal(self, request_id: str, routing_key: str | None) -> ScoreRequest:
        """The engine's request.

        Raises:
            InvalidRequestError: no complete spelling, two spellings mixed, or several queries that do not match
                the documents one to one.
        """
        given = [name for name in _SCORE_FIELDS if getattr(self, name) is not None]
        pair = next((p for p in _SCORE_PAIRS if all(getattr(self, n) is not None for n in p)), None)
        if pair is None:
            first = next((p for p in _SCORE_PAIRS if p[0] in given or p[1] in given), _SCORE_PAIRS[0])
            missing = next(n for n in first if n not in given)
            raise InvalidRequestError(
                f"{missing}: required; send `queries` with `documents` (or `items`), `data_1` with `data_2`, or "
                "`text_1` with `text_2`",
                param=missing,
            )
        extra = next((name for name in given if name not in pair), None)
        if extra is not None:
            raise InvalidRequestError(
                f"{extra}: not allowed with `{pair[0]}` and `{pair[1]}`; send one pair of fields", param=extra
            )
        return _score_request(self, request_id, routing_key, pair, getattr(self, pair[0]), getattr(self, pair[1]))


class RerankRequest(_ScoringFields):
    """Body of POST /rerank: documents ranked by their relevance to one query (vLLM's and Jina's shape)."""

    query: str = Field(description="The query.")
    documents: str | _Texts = Field(description="The documents to rank (at most 2048).")
    top_n: int = Field(0, ge=0, le=2**31 - 1, description="Return only the best n documents; 0: all of them.")

    def internal(self, request_id: str, routing_key: str | None) -> ScoreRequest:
        """The engine's request."""
        return _score_request(self, request_id, routing_key, ("query", "documents"), self.query, self.documents)


def _score_request(
    body: _ScoringFields,
    request_id: str,
    routing_key: str | None,
    fields: tuple[str, str],
    first: str | list[str],
    second: str | list[str],
) -> ScoreRequest:
    queries = (first,) if isinstance(first, str) else tuple(first)
    documents = (second,) if isinstance(second, str) else tuple(second)
    if len(queries) not in (1, len(documents)):
        raise InvalidRequestError(
            f"{fields[0]}: {len(queries)} queries for {len(documents)} documents; send one query, or one per "
            "document (1:1, 1:N or N:N)",
            param=fields[0],
        )
    return ScoreRequest(
        request_id=request_id,
        queries=queries,
        documents=documents,
        max_tokens_per_query=body.max_tokens_per_query,
        max_tokens_per_doc=body.max_tokens_per_doc,
        fields=fields,
        options=body.options(),
        routing_key=routing_key,
    )


class _Response(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class PoolingUsage(_Response):
    """Tokens read; nothing is generated."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0


class ClassificationData(_Response):
    """One input's classification."""

    index: int
    label: str | None = Field(description="The most likely class's name (the model's id2label).")
    probs: list[float] = Field(description="Class probabilities; the raw logits with `use_activation` false.")
    num_classes: int


class ClassificationResponse(_Response):
    """Body of a /classify answer."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class ScoreData(_Response):
    """One pair's score."""

    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(_Response):
    """Body of a /score answer: one score per document, in document order."""

    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage


class RerankDocument(_Response):
    """The ranked document as sent."""

    text: str | None = None
    multi_modal: None = Field(None, description="Always null: multimodal documents are not supported.")


class RerankResult(_Response):
    """One document's place in the ranking."""

    index: int = Field(description="The document's position in the request.")
    document: RerankDocument
    relevance_score: float


class RerankUsage(_Response):
    """Tokens read."""

    prompt_tokens: int
    total_tokens: int


class RerankResponse(_Response):
    """Body of a /rerank answer: documents by falling relevance."""

    id: str
    model: str
    usage: RerankUsage
    results: list[RerankResult]


def _usage(tokens: int) -> PoolingUsage:
    return PoolingUsage(prompt_tokens=tokens, total_tokens=tokens)


def classification_body(body: ClassificationRequest, result: ClassifyResult, response_id: str) -> dict[str, Any]:
    """vLLM's /classify response for `body` from the engine's `result`."""
    charge(result.prompt_tokens)  # to the request's API key, if any
    data = [
        ClassificationData(index=i, label=c.label, probs=list(c.probs), num_classes=len(c.probs))
        for i, c in enumerate(result.classifications)
    ]
    response = ClassificationResponse(
        id=response_id, created=int(time.time()), model=body.model, data=data, usage=_usage(result.prompt_tokens)
    )
    return response.model_dump()


def score_body(body: ScoreTextsRequest, result: ScoreResult, response_id: str) -> dict[str, Any]:
    """vLLM's /score response for `body` from the engine's `result`."""
    charge(result.prompt_tokens)  # to the request's API key, if any
    data = [ScoreData(index=i, score=score) for i, score in enumerate(result.scores)]
    response = ScoreResponse(
        id=response_id, created=int(time.time()), model=body.model, data=data, usage=_usage(result.prompt_tokens)
    )
    return response.model_dump()


def rerank_body(body: RerankRequest, result: ScoreResult, response_id: str) -> dict[str, Any]:
    """vLLM's /rerank response: documents sorted by score (stable for ties), the best `top_n` when it is set."""
    charge(result.prompt_tokens)  # to the request's API key, if any
    documents = [body.documents] if isinstance(body.documents, str) else body.documents
    results = [
        RerankResult(index=i, document=RerankDocument(text=text), relevance_score=score)
        for i, (text, score) in enumerate(zip(documents, result.scores, strict=True))
    ]
    results.sort(key=lambda r: r.relevance_score, reverse=True)
    if 0 < body.top_n < len(results):
        results = results[: body.top_n]
    usage = RerankUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return RerankResponse(id=response_id, model=body.model, usage=usage, results=results).model_dump()
