"""The batch file format line by line, the progress lines, and how the job splits its input (no Ray)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from deployments.api.openai_models import EmbeddingRequest
from deployments.batch.format import (
    BatchRequest,
    LineError,
    embedding_body,
    error_line,
    failure_line,
    is_failure,
    parse_line,
    success_line,
    validate_body,
)
from deployments.batch.job import index_input, read_range
from deployments.batch.progress import Progress, last_progress
from deployments.engines.protocol import EmbedResult
from deployments.errors import EngineDeadError, InvalidRequestError
from models.spec import ModelSpec

CHAT = ModelSpec(id="chat", task="generate", engine="echo")
EMBED = ModelSpec(id="vec", task="embed", engine="echo")


def _line(**fields: Any) -> bytes:
    base: dict[str, Any] = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {}}
    return json.dumps({**base, **fields}).encode()


def test_parse_a_good_line() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    request = parse_line(_line(body=body), 3, CHAT)
    assert request == BatchRequest(line=3, custom_id="r1", url="/v1/chat/completions", body=body)
    assert parse_line(_line(url="/v1/embeddings", body={"input": "x"}), 1, EMBED).url == "/v1/embeddings"


@pytest.mark.parametrize(
    ("raw", "code", "custom_id", "words"),
    [
        (b"{not json", "invalid_json", None, "line 7 is not valid JSON"),
        (b"\xff\xfe{}", "invalid_json", None, "line 7 is not valid JSON"),
        (b'["a list"]', "invalid_json", None, "line 7 is not a JSON object"),
        (_line(custom_id=None), "missing_custom_id", None, "line 7 has no custom_id"),
        (_line(custom_id=""), "missing_custom_id", None, "line 7 has no custom_id"),
        (_line(custom_id=5), "missing_custom_id", None, "line 7 has no custom_id"),
        (_line(method="GET"), "invalid_method", "r1", "method must be POST, not 'GET'"),
        (_line(url="/v1/images"), "invalid_url", "r1", "'/v1/images' is not a batch endpoint"),
        (_line(url="/v1/embeddings"), "invalid_url", "r1", "is not served by model 'chat' (generate)"),
        (_line(body=[1]), "invalid_body", "r1", "body must be a JSON object"),
    ],
)
def test_bad_lines_name_the_problem(raw: bytes, code: str, custom_id: str | None, words: str) -> None:
    with pytest.raises(LineError) as caught:
        parse_line(raw, 7, CHAT)
    assert caught.value.code == code and caught.value.custom_id == custom_id
    assert words in caught.value.message
    line = error_line(caught.value)
    assert line["response"] is None and line["error"] == {"code": code, "message": caught.value.message}
    assert line["custom_id"] == custom_id and line["id"].startswith("batch_req_")
    assert is_failure(line)


def test_chat_url_on_an_embedding_model_is_refused() -> None:
    with pytest.raises(LineError, match=r"use one of /v1/embeddings"):
        parse_line(_line(), 1, EMBED)


def test_body_validates_as_the_http_api_does() -> None:
    request = parse_line(_line(body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}), 1, CHAT)
    wire = validate_body(request, CHAT)
    assert wire.model == "chat"  # the batch's model when the body names none
    assert wire.sampling(CHAT.max_output_tokens).max_tokens == 3  # type: ignore[call-arg]
    bad = parse_line(_line(body={"messages": [], "temperature": 9}), 1, CHAT)
    with pytest.raises(ValidationError) as caught:
        validate_body(bad, CHAT)
    line = failure_line(bad, "rid", caught.value)
    assert line["error"] is None
    assert line["response"]["status_code"] == 400 and line["response"]["request_id"] == "rid"
    error = line["response"]["body"]["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "temperature"  # the first field wrong
    assert "messages:" in error["message"] and "temperature:" in error["message"]
    assert is_failure(line)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream": True}, "stream"),
    ],
)
def test_body_refusals(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        validate_body(parse_line(_line(body=body), 1, CHAT), CHAT)
    assert caught.value.param == param


def test_engine_failures_become_responses_with_their_status() -> None:
    request = parse_line(_line(), 1, CHAT)
    dead = failure_line(request, "rid", EngineDeadError("engine gone"))
    assert dead["response"]["status_code"] == 503
    unexpected = failure_line(request, "rid", RuntimeError("secret detail"))
    assert unexpected["response"]["status_code"] == 500
    assert unexpected["response"]["body"]["error"]["message"] == "Internal server error (request id rid)"


def test_success_line_shape() -> None:
    line = success_line(parse_line(_line(), 1, CHAT), "rid", {"object": "chat.completion"})
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["response"] == {"status_code": 200, "request_id": "rid", "body": {"object": "chat.completion"}}
    assert line["error"] is None and not is_failure(line)


def test_embedding_body() -> None:
    result = EmbedResult(embeddings=((0.5, -1.0), (1.0, 0.0)), prompt_tokens=4)
    body = embedding_body(EmbeddingRequest(model="vec", input=["a", "b"]), result)
    assert body["object"] == "list" and body["model"] == "vec"
    assert [d["embedding"] for d in body["data"]] == [(0.5, -1.0), (1.0, 0.0)]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
    packed = embedding_body(EmbeddingRequest(model="vec", input="a", encoding_format="base64"), result)
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == [0.5, -1.0]
    with pytest.raises(InvalidRequestError, match="must be 2 or unset"):
        embedding_body(EmbeddingRequest(model="vec", input="a", dimensions=3), result)


def test_progress_round_trip() -> None:
    log = "\n".join(
        [
            "starting",
            Progress(done=0, total=10, failed=0).line(),
            "(MapWorker pid=1) something else",
            Progress(done=4, total=10, failed=1).line(),
            "[modelfleet-batch] progress garbage",
        ]
    )
    assert last_progress(log) == Progress(done=4, total=10, failed=1)
    assert last_progress("no progress yet") is None
    assert str(Progress(done=4, total=10, failed=1)) == "4/10 lines (40%), 1 failed"


def test_index_and_read_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    # Line 3 is blank (no request), line 5 is not UTF-8, the last line has no newline.
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n\n{"a": 4}\n\xff\n{"a": 6}\n{"a": 7}')
    ranges, total = index_input(path, range_lines=2)
    assert total == 6
    assert [(r["first_line"], r["start"]) for r in ranges] == [(1, 0), (3, 18), (5, 28), (7, 39)]
    rows = [row for r in ranges for row in read_range(r)]
    assert [row["line"] for row in rows] == [1, 2, 4, 5, 6, 7]
    assert rows[3]["raw"] == b"\xff\n" and rows[-1]["raw"] == b'{"a": 7}'
    merged, _ = index_input(path, range_lines=1, max_ranges=3)  # 7 one-line ranges, merged by 3
    assert [(r["first_line"], r["start"], r["end"]) for r in merged] == [(1, 0, 19), (4, 19, 39), (7, 39, 47)]
    assert [row["line"] for r in merged for row in read_range(r)] == [1, 2, 4, 5, 6, 7]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert index_input(empty, range_lines=8)[1] == 0
    empty.write_bytes(b"")
    assert index_input(empty, range_lines=8) == ([], 0)
