"""The files folder of the Files and Batches API, the batch request body, the batches config, and a batch's
endpoint restriction on its lines (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.api.batches import BatchCreateRequest
from deployments.batch.format import LineError, parse_line
from deployments.batch.store import FileStore, FileTooLargeError, new_batch_id
from deployments.config import ServingConfig
from models.spec import ModelSpec

CHAT = ModelSpec(id="chat", task="generate", engine="echo")


def test_files_are_stored_listed_and_deleted(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    first = store.add(io.BytesIO(b"a\n" * 10), filename="in.jsonl", purpose="batch", max_bytes=1024)
    assert first.id.startswith("file-") and first.bytes == 20 and first.filename == "in.jsonl"
    assert store.content_path(first.id).read_bytes() == b"a\n" * 10
    assert store.get(first.id) == first
    second = store.add(io.BytesIO(b"b"), filename="other.jsonl", purpose="batch", max_bytes=1024)
    assert {r.id for r in store.files()} == {first.id, second.id}
    assert store.files("batch_output") == []
    assert store.delete(first.id) and not store.delete(first.id)
    assert store.get(first.id) is None and not store.content_path(first.id).exists()


def test_a_file_over_the_limit_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    with pytest.raises(FileTooLargeError, match="1024 bytes"):
        store.add(io.BytesIO(b"x" * 1025), filename="big.jsonl", purpose="batch", max_bytes=1024)
    assert store.files() == [] and list((tmp_path / "files").iterdir()) == []


@pytest.mark.parametrize("bad", ["../../etc/passwd", "file-../x", "file-" + "g" * 32, ""])
def test_ids_never_become_paths_outside_the_folder(tmp_path: Path, bad: str) -> None:
    store = FileStore(tmp_path)
    assert store.get(bad) is None and store.get_batch(bad) is None and not store.delete(bad)
    with pytest.raises(ValueError, match="not a file id"):
        store.content_path(bad)


def test_batch_records_round_trip(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    older, newer = new_batch_id(), new_batch_id()
    store.put_batch(older, {"id": older, "created_at": 1})
    store.put_batch(newer, {"id": newer, "created_at": 2})
    assert [r["id"] for r in store.batches()] == [newer, older]
    store.put_batch(older, {"id": older, "created_at": 1, "status": "completed"})
    assert store.get_batch(older) == {"id": older, "created_at": 1, "status": "completed"}


def test_batch_body_refuses_by_name() -> None:
    good = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert BatchCreateRequest.model_validate(good).metadata is None
    for change, param in [
        ({"endpoint": "/v1/responses"}, "endpoint"),
        ({"completion_window": "1h"}, "completion_window"),
        ({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}, "output_expires_after"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ]:
        with pytest.raises(ValidationError) as caught:
            BatchCreateRequest.model_validate({**good, **change})
        assert caught.value.errors()[0]["loc"] == (param,)


def test_batches_config_refuses_bad_values_by_name(tmp_path: Path) -> None:
    models = [{"id": "e", "task": "generate", "engine": "echo"}]
    config = ServingConfig.model_validate({"models": models, "batches": {"files_dir": str(tmp_path)}})
    assert config.batches.folder() == tmp_path and config.batches.enabled
    for batches, field in [({"files_dir": "relative/files"}, "files_dir"), ({"max_file_bytes": 10}, "max_file_bytes")]:
        with pytest.raises(ValidationError) as caught:
            ServingConfig.model_validate({"models": models, "batches": batches})
        assert caught.value.errors()[0]["loc"] == ("batches", field)


def test_a_batch_takes_lines_of_its_endpoint_only() -> None:
    line = {"custom_id": "r", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}
    raw = json.dumps(line).encode()
    assert parse_line(raw, 1, CHAT).url == "/v1/completions"
    with pytest.raises(LineError, match="is not this batch's endpoint '/v1/chat/completions'") as caught:
        parse_line(raw, 1, CHAT, endpoint="/v1/chat/completions")
    assert caught.value.code == "invalid_url" and caught.value.custom_id == "r"
