"""A corpus of hand-made hostile requests for every endpoint (issue 13, item 5), as plain data.

Each `Case` is one raw HTTP request (method, path, body bytes, headers) and the statuses that are right for it:
the named 4xx of an OpenAI error body, or a clean 200 where the request is odd but valid. `test_hostile.py` sends
them to a real app (`hostile_config`) and checks that none answers 5xx, none shows a traceback, and each gets a
status it allows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.scaling import ScalingConfig

__all__ = ["MAX_BODY_BYTES", "Case", "cases", "hostile_config"]

MAX_BODY_BYTES = 65_536
BAD_REQUEST = frozenset({400})
OK = frozenset({200})
TOO_LARGE = frozenset({413})
BIG = 2**70  # beyond every 64-bit field
DIGITS = "9" * 5000  # beyond Python's int-from-text limit (4300 digits): json.loads itself refuses it
JSON = {"content-type": "application/json"}
# Generations of one model a request may start at once (deployments.api.completions), at the default scaling of
# the echo models below: the bound of the router's queue.
AT_ONCE: int = ScalingConfig.model_fields["max_queued_requests"].default


@dataclass(frozen=True)
class Case:
    """One hostile request and the statuses that are right for it."""

    name: str
    method: str
    path: str
    body: bytes | None = None
    expect: frozenset[int] = BAD_REQUEST
    headers: Mapping[str, str | bytes] = field(default_factory=lambda: dict(JSON))
    chunked: bool = False  # sent without Content-Length, in pieces
    param: str | None = None  # the error's `param`, where the case names it

    @property
    def id(self) -> str:
        return f"{self.method} {self.path.split('?')[0][:40]} {self.name}"


def hostile_config(classifier: Path, cross_encoder: Path, files_dir: Path) -> dict[str, Any]:
    """An app with a model of every task: echo engines for generation and embeddings (one of them slow, for the
    disconnect and slow-client cases), the tiny transformers classifier and cross-encoder for the rest."""
    echo = {"engine": "echo", "resources": {"num_cpus": 0.25}}
    encoder = {"engine": "transformers", "context_length": 64, "resources": {"num_cpus": 0.5}}
    return {
        "name": "hostile",
        "route_prefix": "/hostile",
        "models": [
            {"id": "echo", "task": "generate", **echo},
            {"id": "echo-slow", "task": "generate", **echo, "engine_kwargs": {"token_delay_s": 0.5}},
            {"id": "echo-embed", "task": "embed", **echo},
            {"id": "classifier", "task": "classify", "source": str(classifier), **encoder},
            {"id": "reranker", "task": "score", "source": str(cross_encoder), **encoder},
        ],
        "router": {"max_body_bytes": MAX_BODY_BYTES, "body_timeout_s": 5.0},
        "batches": {"files_dir": str(files_dir)},
    }


@dataclass(frozen=True)
class _Endpoint:
    path: str
    body: dict[str, Any]
    text: str  # a text field, to poison
    number: str  # a numeric (or boolean) field, for NaN and infinities
    listed: str | None = None  # a list field, for empty and giant lists
    item: Any = "a"  # one element of that list
    empty_ok: bool = False  # an empty list there is valid (200)
    giant_ok: bool = False  # a list of `giant` items there is valid (200)
    giant: int = 5000  # as many as fit under the body limit


ENDPOINTS = {
    "chat": _Endpoint(
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4},
        "model",
        "temperature",
        "messages",
        {"role": "user", "content": "a"},
        giant_ok=True,
        giant=1500,
    ),
    "completions": _Endpoint(
        "/v1/completions", {"model": "echo", "prompt": "hello there", "max_tokens": 4}, "prompt", "top_p", "prompt"
    ),
    "embeddings": _Endpoint(
        "/v1/embeddings", {"model": "echo-embed", "input": "hello there"}, "input", "dimensions", "input"
    ),
    "tokenize": _Endpoint(
        "/tokenize", {"model": "classifier", "prompt": "hello there"}, "prompt", "add_special_tokens"
    ),
    "tokenize chat": _Endpoint(
        "/tokenize",
        {"model": "classifier", "messages": [{"role": "user", "content": "hello there"}]},
        "model",
        "add_generation_prompt",
        "messages",
        {"role": "user", "content": "a"},
        giant=1500,
    ),
    "detokenize": _Endpoint(
        "/detokenize",
        {"model": "classifier", "tokens": [101, 102]},
        "model",
        "tokens",
        "tokens",
        5,
        empty_ok=True,
        giant_ok=True,
    ),
    "classify": _Endpoint(
        "/classify", {"model": "classifier", "input": "hello there"}, "input", "truncate_prompt_tokens", "input"
    ),
    "score": _Endpoint(
        "/score", {"model": "reranker", "text_1": "hello", "text_2": "there"}, "text_1", "max_tokens_per_doc", "text_2"
    ),
    "rerank": _Endpoint(
        "/rerank",
        {"model": "reranker", "query": "hello", "documents": ["there", "world"]},
        "query",
        "top_n",
        "documents",
    ),
    "batches": _Endpoint(
        "/v1/batches",
        {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
        "input_file_id",
        "completion_window",
    ),
}


def _dump(body: Any) -> bytes:
    # Python's json writes NaN, Infinity and integers of any size as the literals a hostile client sends.
    return json.dumps(body).encode()


def _nested(depth: int, leaf: str = "1") -> bytes:
    return b"[" * depth + leaf.encode() + b"]" * depth


def _deep_object(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def _with_raw(body: dict[str, Any], name: str, raw: bytes) -> bytes:
    """`body` as JSON with field `name` set to the raw JSON text `raw` (which json.dumps could not write)."""
    marker = "\x00MARK\x00"
    return _dump({**body, name: marker}).replace(_dump(marker), raw)


def _endpoint_cases(kind: str, ep: _Endpoint) -> Iterator[Case]:
    def post(name: str, body: bytes, expect: frozenset[int] = BAD_REQUEST, **kw: Any) -> Case:
        return Case(f"{kind}: {name}", "POST", ep.path, body, expect, **kw)

    base = ep.body
    # Deep and huge JSON.
    yield post("100k nested arrays (over the body limit)", _nested(100_000), TOO_LARGE)
    yield post("100k nested arrays, chunked", _nested(100_000), TOO_LARGE, chunked=True)
    yield post("30k nested arrays (under the limit)", _nested(30_000))
    yield post("30k nested arrays in a field", _with_raw(base, ep.text, _nested(30_000)))
    yield post("900 nested arrays in a field", _with_raw(base, ep.text, _nested(900)))
    yield post("900 nested objects in an unknown field", _with_raw(base, "extra", _deep_object(900)))
    pad = "a " * ((MAX_BODY_BYTES - len(_dump(base)) - 64) // 2)
    # Just under the limit: valid JSON, too long for the model (words or tokens over its context): a 400, or a 200
    # where the endpoint takes it whole, or a 404 where the field names a model or a file.
    yield post("body just under the limit", _dump({**base, ep.text: pad}), frozenset({200, 400, 404}))
    yield post("body just over the limit", _dump({**base, ep.text: pad * 2}), TOO_LARGE)
    yield post("body over the limit, chunked", _dump({**base, ep.text: pad * 2}), TOO_LARGE, chunked=True)
    # Bytes that are not JSON, or not UTF-8.
    yield post("invalid UTF-8 in a string", _dump({**base, ep.text: "AB"}).replace(b"AB", b"\xff\xfe\xc3"))
    yield post("invalid UTF-8 in a key", _dump(base)[:-1] + b', "\xff\xfe": 1}')
    yield post("lone surrogate \\ud800 in a string", _dump({**base, ep.text: "x\ud800y"}))
    yield post("lone surrogate \\udfff as a key", _dump({**base, "\udfff": 1}))
    yield post("lone surrogate as the whole body", b'"\\ud800"')
    yield post("NUL bytes in JSON text", _dump(base).replace(b"{", b"{\x00", 1))
    yield post("empty body", b"")
    yield post("truncated JSON", _dump(base)[:-3])
    yield post("body is a JSON list", b"[]")
    yield post("body is a JSON string", b'"hello"')
    yield post("body is null", b"null")
    yield post("body is an integer beyond 64 bits", str(BIG).encode())
    yield post("body is NaN", b"NaN")
    yield post("empty object", b"{}")
    yield post("text/plain content type", _dump(base), frozenset({200, 400}), headers={"content-type": "text/plain"})
    # NaN and infinities where a number (or a boolean) goes.
    for literal in ("NaN", "Infinity", "-Infinity"):
        yield post(f"{literal} in `{ep.number}`", _with_raw(base, ep.number, literal.encode()))
    yield post("NaN in a list of numbers", _with_raw(base, ep.number, b"[NaN, 1e999]"))
    # Integers beyond 64 bits, and beyond Python's own limit on digits.
    yield post(f"2**70 in `{ep.number}`", _dump({**base, ep.number: BIG}))
    yield post(f"5000-digit integer in `{ep.number}`", _with_raw(base, ep.number, DIGITS.encode()))
    yield post("5000-digit integer in an unknown field", _with_raw(base, "extra", DIGITS.encode()))
    # Wrong types and unknown fields.
    yield post(f"`{ep.text}` is a number", _dump({**base, ep.text: 12}))
    yield post(f"`{ep.text}` is an object", _dump({**base, ep.text: {"a": [1]}}))
    yield post(f"`{ep.text}` is a boolean", _dump({**base, ep.text: True}))
    yield post("unknown field", _dump({**base, "frobnicate": 1}))
    yield post("1000 unknown fields", _dump({**base, **{f"x{i}": i for i in range(1000)}}))
    yield post("duplicate keys", _dump(base)[:-1] + b', "' + next(iter(base)).encode() + b'": 7}')
    # Empty and giant lists.
    if ep.listed is not None:
        yield post(f"empty `{ep.listed}`", _dump({**base, ep.listed: []}), OK if ep.empty_ok else BAD_REQUEST)
        giant = _dump({**base, ep.listed: [ep.item] * ep.giant})
        yield post(f"{ep.giant} items in `{ep.listed}`", giant, OK if ep.giant_ok else BAD_REQUEST)
        yield post(f"`{ep.listed}` of empty lists", _dump({**base, ep.listed: [[]] * 3}))


def _specific_cases() -> Iterator[Case]:
    chat = ENDPOINTS["chat"].body
    comp = ENDPOINTS["completions"].body
    c, p = "/v1/chat/completions", "/v1/completions"
    yield Case("max_tokens 2**70", "POST", c, _dump({**chat, "max_tokens": BIG}))
    yield Case("max_tokens -1", "POST", p, _dump({**comp, "max_tokens": -1}))
    yield Case("seed 2**70", "POST", c, _dump({**chat, "seed": BIG}))
    yield Case("seed -2**70", "POST", p, _dump({**comp, "seed": -BIG}))
    yield Case("seed 2**63-1 (the edge, valid)", "POST", p, _dump({**comp, "seed": 2**63 - 1}), OK)
    yield Case("n 2**70", "POST", c, _dump({**chat, "n": BIG}))
    yield Case("logit_bias key 2**70", "POST", c, _dump({**chat, "logit_bias": {str(BIG): 1}}))
    yield Case("logit_bias key -1", "POST", c, _dump({**chat, "logit_bias": {"-1": 1}}))
    yield Case("logit_bias value 2**70", "POST", c, _dump({**chat, "logit_bias": {"1": BIG}}))
    yield Case("logit_bias value 1e999 (infinity)", "POST", p, _with_raw(comp, "logit_bias", b'{"1": 1e999}'))
    yield Case("logit_bias value NaN", "POST", p, _with_raw(comp, "logit_bias", b'{"1": NaN}'))
    yield Case("logit_bias of 5000 keys", "POST", p, _dump({**comp, "logit_bias": {str(i): 1 for i in range(5000)}}))
    yield Case("prompt token ids [2**70]", "POST", p, _dump({**comp, "prompt": [BIG]}))
    yield Case("prompt token ids [-1]", "POST", p, _dump({**comp, "prompt": [-1]}))
    yield Case("prompt of 5000 token ids", "POST", p, _dump({**comp, "prompt": list(range(5000))}))
    yield Case("prompt lists of token ids [[2**70]]", "POST", p, _dump({**comp, "prompt": [[BIG]]}))
    yield Case("stop list empty", "POST", c, _dump({**chat, "stop": []}), OK)
    yield Case("stop list of 5000", "POST", c, _dump({**chat, "stop": ["x"] * 5000}))
    yield Case("stop of empty string", "POST", c, _dump({**chat, "stop": [""]}))
    yield Case("message content list empty", "POST", c, _dump({**chat, "messages": [{"role": "user", "content": []}]}))
    yield Case("message role unknown", "POST", c, _dump({**chat, "messages": [{"role": "god", "content": "x"}]}))
    yield Case("stream is the string 'true'", "POST", c, _dump({**chat, "stream": "true"}))
    yield Case("stream 1", "POST", c, _dump({**chat, "stream": 1}))
    yield Case(
        "valid surrogate pair (emoji)",
        "POST",
        c,
        _dump({**chat, "messages": [{"role": "user", "content": "\U0001f600 ok"}]}),
        OK,
    )
    yield Case("prompt with NUL characters", "POST", p, _dump({**comp, "prompt": "a\x00b \x00"}), OK)
    yield Case(
        "embeddings 2048 inputs (the limit, valid)",
        "POST",
        "/v1/embeddings",
        _dump({"model": "echo-embed", "input": ["a"] * 2048}),
        OK,
    )
    yield Case("detokenize token id 2**70", "POST", "/detokenize", _dump({"model": "classifier", "tokens": [BIG]}))
    yield Case(
        "detokenize token id 2**31 - 1 (outside the vocabulary)",
        "POST",
        "/detokenize",
        _dump({"model": "classifier", "tokens": [2**31 - 1]}),
    )
    yield Case("classify token ids [2**70]", "POST", "/classify", _dump({"model": "classifier", "input": [BIG]}))
    yield Case(
        "classify token id outside the vocabulary",
        "POST",
        "/classify",
        _dump({"model": "classifier", "input": [2**31 - 1]}),
    )
    yield Case(
        "rerank top_n 2**70",
        "POST",
        "/rerank",
        _dump({"model": "reranker", "query": "q", "documents": ["a"], "top_n": BIG}),
    )
    yield Case(
        "score 5000 x 5000 pairs",
        "POST",
        "/score",
        _dump({"model": "reranker", "queries": ["a"] * 5000, "documents": ["b"] * 5000}),
    )
    yield Case("model id of 50k characters", "POST", c, _dump({**chat, "model": "m" * 50_000}), frozenset({404}))
    yield Case("model id with NUL and newline", "POST", c, _dump({**chat, "model": "echo\x00\n"}), frozenset({404}))
    yield Case("wrong method PUT", "PUT", c, _dump(chat), frozenset({405}))
    yield Case("method OPTIONS", "OPTIONS", c, None, frozenset({405}))
    yield Case(
        "stream_options.include_usage NaN",
        "POST",
        c,
        _with_raw({**chat, "stream": True}, "stream_options", b'{"include_usage": NaN}'),
    )
    yield Case("top_logprobs 2**70", "POST", c, _dump({**chat, "logprobs": True, "top_logprobs": BIG}))
    yield Case(
        "gzip content-encoding over garbage",
        "POST",
        c,
        b"\x1f\x8b garbage",
        headers={**JSON, "content-encoding": "gzip"},
    )
    # 64 prompts x 16 choices: 1024 generations in one request, more than echo's queue ever holds at once
    # (max_queued_requests: 256 by default): a 400 naming the limit, not a 429 that a retry can never get past.
    assert 64 * 16 > AT_ONCE, AT_ONCE
    many = _dump({**comp, "prompt": ["a b c"] * 64, "n": 16, "max_tokens": 3})
    yield Case(f"64 prompts x n 16 (over the {AT_ONCE} at once)", "POST", p, many, param="n")
    yield Case("64 prompts x n 16, streamed", "POST", p, _dump({**json.loads(many), "stream": True}), param="n")
    over = _dump({**comp, "prompt": ["a"] * (AT_ONCE + 1), "max_tokens": 1})
    yield Case(f"{AT_ONCE + 1} prompts", "POST", p, over, param="prompt")
    # At the limit: answered whole, or refused as a momentarily full queue (a retry can succeed).
    at_limit = _dump({**comp, "prompt": ["a b c"] * (AT_ONCE // 16), "n": 16, "max_tokens": 3})
    yield Case(f"{AT_ONCE // 16} prompts x n 16 (at most {AT_ONCE})", "POST", p, at_limit, frozenset({200, 429}))
    # Headers Serve's proxy decodes as UTF-8 (request id, session id, multiplexed model id) before our code runs.
    for header in ("x-request-id", "X-Session-Id", "serve_multiplexed_model_id"):
        bad: dict[str, str | bytes] = {**JSON, header: b"\xff\xfe\xc3"}
        yield Case(f"{header} of invalid UTF-8", "POST", c, _dump(chat), headers=bad, param=header.lower())
    valid: dict[str, str | bytes] = {**JSON, "x-request-id": "r-\u00e9".encode()}
    yield Case("x-request-id of UTF-8 (valid)", "POST", c, _dump(chat), OK, headers=valid)
    # Models: ids in the path.
    yield Case("model id of 20k characters", "GET", "/v1/models/" + "m" * 20_000, None, frozenset({404, 414}))
    yield Case("model id of invalid UTF-8", "GET", "/v1/models/%ff%fe%c3", None, frozenset({404}))
    yield Case("model id with NUL", "GET", "/v1/models/ec%00ho", None, frozenset({404}))
    yield Case("model id with ../", "GET", "/v1/models/..%2f..%2fetc%2fpasswd", None, frozenset({404}))
    # Files: queries, ids and forms.
    yield Case("files limit 2**70", "GET", f"/v1/files?limit={BIG}", None)
    yield Case("files limit NaN", "GET", "/v1/files?limit=NaN", None)
    yield Case("files limit 5000 digits", "GET", f"/v1/files?limit={DIGITS}", None)
    yield Case("files after invalid UTF-8", "GET", "/v1/files?after=%ff%fe", None, OK)
    yield Case("files order unknown", "GET", "/v1/files?order=sideways", None)
    yield Case("file id ../../etc/passwd", "GET", "/v1/files/..%2f..%2fetc%2fpasswd", None, frozenset({404}))
    yield Case(
        "file content ../../etc/passwd", "GET", "/v1/files/..%2f..%2fetc%2fpasswd/content", None, frozenset({404})
    )
    yield Case("file id of invalid UTF-8", "GET", "/v1/files/%ff%fe", None, frozenset({404}))
    yield Case("file id with NUL", "DELETE", "/v1/files/file-%00", None, frozenset({404}))
    yield Case("upload that is JSON, not a form", "POST", "/v1/files", _dump({"purpose": "batch"}))
    yield Case(
        "upload form without a boundary",
        "POST",
        "/v1/files",
        b"--x\r\n",
        headers={"content-type": "multipart/form-data"},
    )
    yield Case(
        "upload form cut off",
        "POST",
        "/v1/files",
        b'--xx\r\nContent-Disposition: form-data; name="purpose"',
        headers={"content-type": "multipart/form-data; boundary=xx"},
    )
    yield Case(
        "upload form of invalid UTF-8", "POST", "/v1/files", _form({"purpose": b"\xff\xfe"}), headers=_FORM_HEADERS
    )
    yield Case(
        "upload purpose lone surrogate",
        "POST",
        "/v1/files",
        _form({"purpose": "\ud800".encode("utf-8", "surrogatepass")}),
        headers=_FORM_HEADERS,
    )
    yield Case(
        "upload with 1000 fields",
        "POST",
        "/v1/files",
        _form({f"f{i}": b"x" for i in range(1000)}),
        headers=_FORM_HEADERS,
    )
    yield Case(
        "upload with two files", "POST", "/v1/files", _form({"purpose": b"batch"}, files=2), headers=_FORM_HEADERS
    )
    yield Case(
        "upload named ../../evil",
        "POST",
        "/v1/files",
        _form({"purpose": b"batch"}, files=1, name="../../evil"),
        headers=_FORM_HEADERS,
        expect=OK,
    )
    # Batches.
    yield Case("batches limit 2**70", "GET", f"/v1/batches?limit={BIG}", None)
    yield Case("batch id ../", "GET", "/v1/batches/..%2f..%2fetc", None, frozenset({404}))
    yield Case("batch cancel of a NUL id", "POST", "/v1/batches/%00/cancel", None, frozenset({404}))
    yield Case(
        "batch metadata of 5000 keys",
        "POST",
        "/v1/batches",
        _dump({**ENDPOINTS["batches"].body, "metadata": {str(i): "v" for i in range(5000)}}),
    )


_BOUNDARY = "hostileboundary"
_FORM_HEADERS = {"content-type": f"multipart/form-data; boundary={_BOUNDARY}"}


def _form(fields: dict[str, bytes], *, files: int = 0, name: str = "in.jsonl") -> bytes:
    parts = [
        f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'.encode() + value + b"\r\n"
        for key, value in fields.items()
    ]
    line = _dump({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}) + b"\n"
    for _ in range(files):
        head = f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/jsonl\r\n\r\n" + line + b"\r\n")
    return b"".join(parts) + f"--{_BOUNDARY}--\r\n".encode()


def cases() -> list[Case]:
    """Every case: the generic ones for each JSON endpoint, then the ones particular to one endpoint."""
    out = [case for kind, ep in ENDPOINTS.items() for case in _endpoint_cases(kind, ep)]
    return out + list(_specific_cases())
