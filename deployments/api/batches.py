"""OpenAI's Batches API (`/v1/batches`): create, retrieve, list and cancel batches, each run as a Ray job.

A batch is the same Ray job as `modelfleet batch submit` (`deployments.batch.job`): it runs the model's engine over
the input file with Ray Data and writes the answered lines to the batch's output file and the failed ones to its
error file, in the files folder. The ingress replica submits it through Ray's job API, found from inside the
cluster (the dashboard's address in Ray's internal KV), with the token the replica already runs with, and the
code it runs with (the app's `working_dir` package). A batch's state is its job's state, read when asked for; a
batch that ended is finalised once (its files registered) and then read from its record alone. With API keys
configured, a batch (and its result files) belongs to the key that created it: another key gets 404 for it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator

from deployments.api.files import NotFoundError, request_owner, store, visible
from deployments.api.wire import WireRequest
from deployments.auth import check_model
from deployments.auth.limits import charge
from deployments.batch.format import URLS, usage_of
from deployments.batch.spec import BatchJobSpec, partial_path
from deployments.batch.store import FileStore, new_batch_id, new_file_id
from deployments.batch.submission import JobAPIError, JobState, connect, job_state, stop_job, submit_job
from deployments.errors import InvalidRequestError, ModelNotFoundError, ServingError
from deployments.plan import ModelPlan
from models.spec import served_names

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = ["BatchCreateRequest", "BatchesUnavailableError", "configure", "router"]

_COMPLETION_WINDOW = "24h"
_WINDOW_S = 24 * 3600
_MAX_METADATA = 16
_CONNECT_TIMEOUT_S = 10.0
_SUBMIT_TIMEOUT_S = 30.0

router = APIRouter()


class BatchesUnavailableError(ServingError):
    """Raised when the cluster's Ray job API, which runs batches, is missing or does not answer."""

    status_code = 503
    error_type = "service_unavailable"


class BatchCreateRequest(WireRequest):
    """The body of `POST /v1/batches` (OpenAI's fields; others are refused by name)."""

    input_file_id: str = Field(description="A file uploaded with purpose 'batch'.")
    # The enums and bounds are stated in the OpenAPI document; the validators below give the named 400s.
    endpoint: str = Field(
        description="The url every line of the input calls: " + ", ".join(URLS) + ".",
        json_schema_extra={"enum": list(URLS)},
    )
    completion_window: str = Field(
        description="Only '24h', as in OpenAI's API.", json_schema_extra={"enum": [_COMPLETION_WINDOW]}
    )
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None,
        description="Up to 16 key-value pairs, kept with the batch.",
        json_schema_extra={"maxProperties": _MAX_METADATA},
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value not in URLS:
            raise ValueError(f"{value!r} is not a batch endpoint here; use one of {', '.join(URLS)}")
        return value

    @field_validator("completion_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if value != _COMPLETION_WINDOW:
            raise ValueError(f"only '{_COMPLETION_WINDOW}' is supported")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and (
            len(value) > _MAX_METADATA or any(len(k) > 64 or len(v) > 512 for k, v in value.items())
        ):
            raise ValueError(f"at most {_MAX_METADATA} pairs, keys up to 64 and values up to 512 characters")
        return value


@dataclass
class _State:
    #: Every name a batch may give its model (`id@version`, and the bare id of a default version) -> its plan.
    plans: dict[str, ModelPlan] = field(default_factory=dict)
    client: JobSubmissionClient | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_state = _State()


def configure(plans: Iterable[ModelPlan]) -> None:
    """Run batches with these models' plans (in this ingress process), named as requests name them: `id@version`,
    or the bare id for the default version."""
    plans = list(plans)
    by_version = {p.spec.versioned_id: p for p in plans}
    _state.plans = {name: by_version[spec.versioned_id] for name, spec in served_names(p.spec for p in plans).items()}


def _job_client() -> JobSubmissionClient:
    """The job API client of the cluster this replica runs in (created once)."""
    with _state.lock:
        if _state.client is None:
            from ray._private.services import get_webui_url_from_internal_kv

            address = get_webui_url_from_internal_kv()  # the dashboard's host:port, published by the head
            if not address:
                raise BatchesUnavailableError(
                    "This cluster runs without Ray's dashboard, which runs batch jobs: start it without --no-dashboard "
                    "(`modelfleet down`, then `modelfleet up`), or set batches.enabled: false",
                    code="batch_service_unavailable",
                )
            try:
                _state.client = connect(f"http://{address}", timeout_s=_CONNECT_TIMEOUT_S)
            except JobAPIError as exc:
                raise BatchesUnavailableError(str(exc), code="batch_service_unavailable") from None
        return _state.client


def _job_runtime_env() -> dict[str, Any]:
    """The code the job runs: this replica's own `working_dir` package, or (a driver without one, as in the
    in-process test cluster) the folder this code is imported from, on the same machine."""
    import ray

    own = dict(ray.get_runtime_context().runtime_env or {})
    if own.get("working_dir"):
        return {key: own[key] for key in ("working_dir", "env_vars") if own.get(key)}
    return {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}}


def _input_model(path: Path) -> str:
    """The one model the lines of a batch input name in `body.model` (lines that are no request are skipped)."""
    models: set[str] = set()
    with path.open("rb") as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            body = line.get("body") if isinstance(line, dict) else None
            model = body.get("model") if isinstance(body, dict) else None
            if isinstance(model, str):
                models.add(model)
    if len(models) != 1:
        found = f"names {len(models)} models ({', '.join(sorted(models))})" if models else "names no model"
        raise InvalidRequestError(
            f"The input file {found} in its lines' `body.model`: a batch runs one model", param="input_file_id"
        )
    return models.pop()


def _plan_for(model: str, endpoint: str) -> ModelPlan:
    check_model(model)  # a model the request's API key may not use: 404, as an unknown one
    plan = _state.plans.get(model)
    if plan is None:
        raise ModelNotFoundError(f"The model '{model}' does not exist. Served models: {', '.join(_state.plans)}")
    task = URLS[endpoint][0]
    if plan.spec.task != task:
        raise InvalidRequestError(f"The model '{model}' ({plan.spec.task}) does not serve {endpoint}", param="endpoint")
    if plan.spec.parallelism.world_size > 1:
        raise InvalidRequestError(
            f"The model '{model}' runs on {plan.spec.parallelism.world_size} workers (tensor/pipeline parallel); "
            "batches run single-worker engines only",
            param="model",
        )
    return plan


def _create(body: BatchCreateRequest) -> dict[str, Any]:
    files = store()
    source = files.get(body.input_file_id)
    if source is None or not visible(source.owner):  # another key's file is as missing as one never stored
        raise NotFoundError(f"No such file: '{body.input_file_id}'", param="input_file_id", code="file_not_found")
    if source.purpose != "batch":
        raise InvalidRequestError(
            f"The file '{source.id}' has purpose '{source.purpose}', not 'batch'", param="input_file_id"
        )
    model = _input_model(files.content_path(source.id))
    plan = _plan_for(model, body.endpoint)
    client = _job_client()
    batch_id, output_id, error_id = new_batch_id(), new_file_id(), new_file_id()
    spec = BatchJobSpec(
        model=plan,
        input=str(files.content_path(source.id)),
        output=str(files.content_path(output_id)),
        errors=str(files.content_path(error_id)),
        endpoint=body.endpoint,
        # The lines name the model as they did here: the bare id of a default version, too.
        names=(model,) if model != plan.spec.versioned_id else (),
    )
    record = {
        "id": batch_id,
        "endpoint": body.endpoint,
        "input_file_id": source.id,
        "completion_window": body.completion_window,
        "created_at": int(time.time()),
        "metadata": body.metadata,
        "model": plan.spec.versioned_id,
        "files": {"output_file_id": output_id, "error_file_id": error_id},
        "status": "validating",
        "owner": request_owner(),
    }
    files.put_batch(batch_id, record)
    try:
        submit_job(
            client,
            spec,
            job_id=batch_id,
            python=sys.executable,
            runtime_env=_job_runtime_env(),
            metadata={"batch_id": batch_id},
            timeout_s=_SUBMIT_TIMEOUT_S,
        )
    except JobAPIError as exc:
        files.put_batch(batch_id, {**record, "status": "failed", "failed_at": int(time.time()), "errors": [
            {"code": "batch_not_started", "message": str(exc), "param": None, "line": None}
        ]})  # fmt: skip
        raise BatchesUnavailableError(str(exc), code="batch_service_unavailable") from None
    return _wire(record)


def _register_results(files: FileStore, record: dict[str, Any], *, partial: bool) -> dict[str, str | None]:
    """Register the job's output and error files (its partial files when it was stopped); an empty one is
    dropped. Idempotent: another router replica may finalise the same batch at the same time."""
    ids: dict[str, str | None] = {}
    for key, kind in (("output_file_id", "output"), ("error_file_id", "error")):
        file_id = record["files"][key]
        path = files.content_path(file_id)
        if partial and not path.exists() and Path(partial_path(str(path))).exists():
            try:
                Path(partial_path(str(path))).replace(path)
            except FileNotFoundError:
                pass  # moved by another replica
        if path.exists() and path.stat().st_size > 0:
            files.register(
                file_id, filename=f"{record['id']}_{kind}.jsonl", purpose="batch_output", owner=record.get("owner")
            )
            ids[key] = file_id
        else:
            path.unlink(missing_ok=True)
            ids[key] = None
    return ids


def _counts(state: JobState) -> dict[str, int]:
    progress = state.progress
    if progress is None:
        return {"total": 0, "completed": 0, "failed": 0}
    return {"total": progress.total, "completed": progress.done - progress.failed, "failed": progress.failed}


def _refresh(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its job's current state; a batch that ended is finalised and stored for good."""
    if record.get("final"):
        return record
    try:
        state = job_state(_job_client(), record["id"])
    except JobAPIError as exc:
        raise BatchesUnavailableError(str(exc), code="batch_service_unavailable") from None
    now = {**record, "request_counts": _counts(state)}
    started = int(state.start_time_s) if state.start_time_s else None
    ended = int(state.end_time_s) if state.end_time_s else int(time.time())
    if state.status in ("RUNNING", "SUCCEEDED", "STOPPED", "FAILED") and started is not None:
        now["in_progress_at"] = started
    if not state.done:
        progress = state.progress
        if record.get("cancelling_at"):
            now["status"] = "cancelling"
        elif state.status == "PENDING":
            now["status"] = "validating"
        elif progress is not None and progress.total and progress.done == progress.total:
            now["status"], now["finalizing_at"] = "finalizing", int(time.time())
        else:
            now["status"] = "in_progress"
        return now
    files = store()
    if state.status == "SUCCEEDED":
        now.update(_register_results(files, record, partial=False), status="completed")
        now["finalizing_at"] = now["completed_at"] = ended
        _charge_once(files, now)
    elif state.status == "STOPPED":
        now.update(_register_results(files, record, partial=True), status="cancelled", cancelled_at=ended)
        _charge_once(files, now)
    else:
        message = state.message or "the batch job failed"
        now.update(status="failed", failed_at=ended)
        now["errors"] = [{"code": "batch_failed", "message": message, "param": None, "line": None}]
    now["final"] = True
    files.put_batch(record["id"], now)
    return now


def _charge_once(files: FileStore, record: dict[str, Any]) -> None:
    """Charge the tokens of a batch's answered lines to its key, once whichever router replica finalises it. Runs
    in a request of the batch's own key (only it sees the batch), so `charge` finds that key's buckets."""
    output = record.get("output_file_id")
    if output is None or not files.claim(record["id"], "charged"):
        return
    with files.content_path(output).open("rb") as lines:
        prompt_tokens, completion_tokens = usage_of(lines)
    charge(prompt_tokens, completion_tokens)


def _wire(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's Batch object of a record."""
    final = record.get("final", False)
    errors = record.get("errors")
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "model": record["model"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": record["status"],
        "output_file_id": record.get("output_file_id") if final else None,
        "error_file_id": record.get("error_file_id") if final else None,
        "created_at": record["created_at"],
        "in_progress_at": record.get("in_progress_at"),
        "expires_at": record["created_at"] + _WINDOW_S,
        "finalizing_at": record.get("finalizing_at"),
        "completed_at": record.get("completed_at"),
        "failed_at": record.get("failed_at"),
        "expired_at": None,
        "cancelling_at": record.get("cancelling_at"),
        "cancelled_at": record.get("cancelled_at"),
        "request_counts": record.get("request_counts") or {"total": 0, "completed": 0, "failed": 0},
        "metadata": record.get("metadata"),
    }


def _record(batch_id: str) -> dict[str, Any]:
    record = store().get_batch(batch_id)
    if record is None or not visible(record.get("owner")):  # another key's batch is as missing as none
        raise NotFoundError(f"No such batch: '{batch_id}'", param="batch_id", code="batch_not_found")
    return record


def _retrieve(batch_id: str) -> dict[str, Any]:
    return _wire(_refresh(_record(batch_id)))


def _cancel(batch_id: str) -> dict[str, Any]:
    record = _refresh(_record(batch_id))
    if record.get("final"):
        if record["status"] == "cancelled":
            return _wire(record)
        raise InvalidRequestError(
            f"The batch '{batch_id}' has ended ({record['status']}) and cannot be cancelled", param="batch_id"
        )
    try:
        stop_job(_job_client(), batch_id)
    except JobAPIError as exc:
        raise BatchesUnavailableError(str(exc), code="batch_service_unavailable") from None
    stored = {**_record(batch_id), "cancelling_at": int(time.time())}
    store().put_batch(batch_id, stored)
    return _wire({**record, "cancelling_at": stored["cancelling_at"], "status": "cancelling"})


def _list(limit: int, after: str | None) -> dict[str, Any]:
    records = [r for r in store().batches() if visible(r.get("owner"))]
    if after is not None:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = [_wire(_refresh(r)) for r in records[:limit]]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(records) > limit,
    }


# The job API calls and the files folder block: every route runs its work in a thread.
@router.post("/v1/batches")
async def create_batch(body: BatchCreateRequest) -> JSONResponse:
    """Start a batch over an uploaded file; every line's `body.model` names the one model that answers it."""
    return JSONResponse(await asyncio.to_thread(_create, body))


@router.get("/v1/batches")
async def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None) -> JSONResponse:
    """Batches, newest first; `after` is the cursor (a batch id)."""
    return JSONResponse(await asyncio.to_thread(_list, limit, after))


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str) -> JSONResponse:
    """A batch's state, request counts and (once it ended) its output and error files."""
    return JSONResponse(await asyncio.to_thread(_retrieve, batch_id))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str) -> JSONResponse:
    """Stop a batch; it reads 'cancelling' until its job has stopped, then 'cancelled' with the lines done so far."""
    return JSONResponse(await asyncio.to_thread(_cancel, batch_id))
