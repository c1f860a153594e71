"""Files and batches per API key, below HTTP: the owner each record keeps, what a key may see, and the owner a
batch's result files inherit (no Ray; the HTTP side is in tests/integration/test_keys.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.api import batches, files
from deployments.auth import Tenant
from deployments.auth.keys import bind_tenant
from deployments.auth.limits import KeyLimits, QuotaState, bind_request
from deployments.batch.store import FileStore, new_batch_id, new_file_id
from deployments.config import BatchesConfig


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FileStore]:
    before = (files._state.config, files._state.store)
    files.configure(BatchesConfig(files_dir=tmp_path))
    yield files.store()
    bind_tenant(None)
    files._state.config, files._state.store = before


def _as(name: str | None) -> None:
    bind_tenant(Tenant(name=name) if name is not None else None)


def test_records_keep_their_owner_and_the_wire_does_not_show_it(store: FileStore) -> None:
    record = store.add(io.BytesIO(b"x\n"), filename="in.jsonl", purpose="batch", max_bytes=1024, owner="team-a")
    assert store.get(record.id) == record and record.owner == "team-a"
    assert store.add(io.BytesIO(b"y\n"), filename="o.jsonl", purpose="batch", max_bytes=1024).owner is None
    assert "owner" not in files.file_object(record)


def test_a_key_sees_its_own_and_with_keys_off_everything(store: FileStore) -> None:
    mine = store.add(io.BytesIO(b"a\n"), filename="a.jsonl", purpose="batch", max_bytes=1024, owner="a")
    theirs = store.add(io.BytesIO(b"b\n"), filename="b.jsonl", purpose="batch", max_bytes=1024, owner="b")
    unowned = store.add(io.BytesIO(b"c\n"), filename="c.jsonl", purpose="batch", max_bytes=1024)
    _as("a")
    assert files.request_owner() == "a"
    assert files._get(mine.id) == mine
    for hidden in (theirs.id, unowned.id):  # stored before keys were on: no key's own
        with pytest.raises(files.NotFoundError, match=f"No such file: '{hidden}'"):
            files._get(hidden)
        with pytest.raises(files.NotFoundError):
            files._delete(hidden)
    assert store.get(theirs.id) == theirs  # the refused delete left it
    _as(None)
    assert files.request_owner() is None
    assert [files._get(r.id) for r in (mine, theirs, unowned)] == [mine, theirs, unowned]


def _ended(store: FileStore, owner: str | None) -> dict[str, object]:
    batch_id, output_id, error_id = new_batch_id(), new_file_id(), new_file_id()
    store.content_path(output_id).write_text('{"custom_id": "1"}\n')
    record: dict[str, object] = {
        "id": batch_id,
        "endpoint": "/v1/chat/completions",
        "input_file_id": new_file_id(),
        "completion_window": "24h",
        "created_at": int(time.time()),
        "model": "m",
        "files": {"output_file_id": output_id, "error_file_id": error_id},
        "status": "completed",
        "final": True,
        "owner": owner,
    }
    store.put_batch(batch_id, record)
    return record


def test_batches_and_their_results_belong_to_the_key_that_made_them(store: FileStore) -> None:
    store.add(io.BytesIO(b""), filename="ready", purpose="batch", max_bytes=1024)  # the folders exist
    mine, theirs = _ended(store, "a"), _ended(store, "b")
    ids = batches._register_results(store, mine, partial=False)
    output = store.get(str(ids["output_file_id"]))
    assert output is not None and output.owner == "a" and ids["error_file_id"] is None
    _as("a")
    assert [b["id"] for b in batches._list(20, None)["data"]] == [mine["id"]]
    assert batches._retrieve(str(mine["id"]))["status"] == "completed"
    for call in (batches._retrieve, batches._cancel):
        with pytest.raises(files.NotFoundError, match="No such batch"):
            call(str(theirs["id"]))
    _as("b")
    with pytest.raises(files.NotFoundError):
        files._get(output.id)
    _as(None)
    assert {b["id"] for b in batches._list(20, None)["data"]} == {mine["id"], theirs["id"]}


class _Charges:
    """The router's quota client, down to the store's own bucket logic (`QuotaState`) in this process."""

    def __init__(self) -> None:
        self.state = QuotaState(clock=lambda: 0.0)

    def charge(self, tenant: Tenant, tokens: int) -> None:
        self.state.charge(tenant.name, KeyLimits.of(tenant), tokens)


def test_a_finished_batchs_tokens_are_charged_to_its_key_once(store: FileStore) -> None:
    store.add(io.BytesIO(b""), filename="ready", purpose="batch", max_bytes=1024)  # the folders exist
    record = _ended(store, "a")
    output = record["files"]["output_file_id"]  # type: ignore[index]
    usage = [{"prompt_tokens": 30, "completion_tokens": 12}, {"prompt_tokens": 20, "completion_tokens": 8}]
    lines = [json.dumps({"custom_id": str(i), "response": {"body": {"usage": u}}}) for i, u in enumerate(usage)]
    store.content_path(output).write_text("\n".join([*lines, '{"custom_id": "x", "response": null}', "garbage"]))
    charges = _Charges()
    tenant = Tenant(name="a", tpm=1000, tokens_per_day=100)
    bind_request(tenant, charges)  # type: ignore[arg-type]
    try:
        for _ in range(3):  # retrieved again, or finalised by another router replica: charged once
            batches._charge_once(store, {**record, "output_file_id": output})
    finally:
        bind_request(None, None)
    buckets = charges.state._keys["a"]  # 50 prompt + 20 completion tokens, charged once
    assert buckets.tokens is not None and buckets.tokens.level == 1000 - 70
    assert buckets.day is not None and buckets.day.level == 100 - 70
