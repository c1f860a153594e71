"""The batch job's worker driven directly with the echo engine (no Ray), the job spec, and the CLI without a cluster."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cluster.cli import main
from cluster.jobs import BatchError, build_spec
from deployments.batch.job import index_input, read_range
from deployments.batch.runner import BatchRunner
from deployments.config import ServingConfig
from deployments.plan import plan_model
from models.spec import ModelSpec

CONFIG = ServingConfig(
    models=[
        ModelSpec(id="echo", task="generate", engine="echo", engine_kwargs={"fail_marker": "BOOM"}),
        ModelSpec(id="vec", task="embed", engine="echo", engine_kwargs={"dimensions": 8}),
    ]
)


def _runner(model_id: str) -> Iterator[BatchRunner]:
    spec = next(m for m in CONFIG.models if m.id == model_id)
    runner = BatchRunner(plan_model(spec).model_dump_json())
    yield runner
    runner.close()


@pytest.fixture
def echo() -> Iterator[BatchRunner]:
    yield from _runner("echo")


@pytest.fixture
def vec() -> Iterator[BatchRunner]:
    yield from _runner("vec")


def _run(runner: BatchRunner, lines: list[Any]) -> list[dict[str, Any]]:
    raws = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    out = runner({"line": np.arange(1, len(raws) + 1), "raw": np.array(raws, dtype=object)})
    results = [json.loads(text) for text in out["output"]]
    assert out["failed"].tolist() == [r["error"] is not None or r["response"]["status_code"] != 200 for r in results]
    return results


def _req(custom_id: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def test_chat_and_completions_bodies(echo: BatchRunner) -> None:
    chat, text, two, bad = _run(
        echo,
        [
            _req("c", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello batch world"}]}),
            _req("t", "/v1/completions", {"prompt": "a b c", "max_tokens": 2}),
            _req("n", "/v1/completions", {"prompt": ["x y", "z"], "n": 2}),
            _req("b", "/v1/completions", {"prompt": "a", "max_tokens": 0}),
        ],
    )
    assert chat["custom_id"] == "c" and chat["error"] is None
    body = chat["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "echo"
    assert body["choices"][0]["message"]["content"] == "hello batch world"
    assert body["usage"]["completion_tokens"] == 3
    choice = text["response"]["body"]["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("a b", "length")
    assert [c["text"] for c in two["response"]["body"]["choices"]] == ["x y", "x y", "z", "z"]
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "max_tokens"
    # Each answered line has its own request id, also inside a 400.
    assert len({r["response"]["request_id"] for r in (chat, text, two, bad)}) == 4


def test_an_engine_error_fails_only_its_line(echo: BatchRunner) -> None:
    good, boom = _run(
        echo,
        [
            _req("ok", "/v1/chat/completions", {"messages": [{"role": "user", "content": "fine"}]}),
            _req("boom", "/v1/completions", {"prompt": "one BOOM three"}),
        ],
    )
    assert good["response"]["status_code"] == 200
    assert boom["custom_id"] == "boom" and boom["response"]["status_code"] == 500
    rid = boom["response"]["request_id"]
    assert boom["response"]["body"]["error"]["message"] == f"Internal server error (request id {rid})"


def test_bad_lines_each_get_a_line(echo: BatchRunner) -> None:
    results = _run(
        echo,
        [
            b"not json",
            {"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}},
            _req("emb", "/v1/embeddings", {"input": "x"}),
            {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
        ],
    )
    assert [r["error"]["code"] for r in results] == [
        "invalid_json",
        "missing_custom_id",
        "invalid_url",
        "invalid_method",
    ]
    assert "line 2 has no custom_id" in results[1]["error"]["message"]


def test_embeddings(vec: BatchRunner) -> None:
    one, many, wrong = _run(
        vec,
        [
            _req("1", "/v1/embeddings", {"input": "hello"}),
            _req("2", "/v1/embeddings", {"input": ["a", "b c"], "model": "vec"}),
            _req("3", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ],
    )
    vector = one["response"]["body"]["data"][0]["embedding"]
    assert len(vector) == 8 and abs(sum(v * v for v in vector) - 1) < 1e-6
    assert [d["index"] for d in many["response"]["body"]["data"]] == [0, 1]
    assert many["response"]["body"]["usage"]["prompt_tokens"] == 3
    assert wrong["error"]["code"] == "invalid_url"


def test_a_whole_file_through_the_reader(tmp_path: Path, echo: BatchRunner) -> None:
    """What the job does per range, without Ray Data: every request line gives exactly one output line."""
    path = tmp_path / "in.jsonl"
    lines = [json.dumps(_req(f"r{i}", "/v1/completions", {"prompt": f"p{i}"})) for i in range(25)]
    lines[7] = "{broken"
    path.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    ranges, total = index_input(path, range_lines=4)
    outputs: list[dict[str, Any]] = []
    for item in ranges:
        rows = read_range(item)
        if rows:
            batch = {
                "line": np.array([r["line"] for r in rows]),
                "raw": np.array([r["raw"] for r in rows], dtype=object),
            }
            outputs += [json.loads(text) for text in echo(batch)["output"]]
    assert total == len(outputs) == 25
    assert sorted(o["custom_id"] for o in outputs if o["custom_id"]) == sorted(f"r{i}" for i in range(25) if i != 7)
    assert "line 8 is not valid JSON" in next(o for o in outputs if o["custom_id"] is None)["error"]["message"]


def test_build_spec(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("{}\n")
    spec = build_spec(CONFIG, "echo", source, tmp_path / "out" / "o.jsonl", batch_size=4)
    assert spec.model.spec.id == "echo" and spec.batch_size == 4 and spec.concurrency == 1
    assert spec.output == str(tmp_path / "out" / "o.jsonl")
    assert spec.model.serve_options["ray_actor_options"]["num_cpus"] == 1
    with pytest.raises(BatchError, match="has no model 'nope' \\(models: echo, vec\\)"):
        build_spec(CONFIG, "nope", source, tmp_path / "o.jsonl")
    with pytest.raises(BatchError, match="does not exist"):
        build_spec(CONFIG, "echo", tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
    with pytest.raises(BatchError, match="must not be the input"):
        build_spec(CONFIG, "echo", source, source)


def test_cli_batch_needs_a_cluster_with_the_dashboard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MODELFLEET_HOME", str(tmp_path))
    args = ["--model", "echo", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl")]
    assert main(["batch", "submit", *args]) == 1
    assert "start one with `modelfleet up`" in capsys.readouterr().err
    assert main(["batch", "status", "batch-123"]) == 1
    with pytest.raises(SystemExit):
        main(["batch", "submit", "--model", "echo"])  # --input and --output are required
