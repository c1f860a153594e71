"""OpenAI's Files API (`/v1/files`): upload a batch input, list, retrieve, read and delete files in the files folder.

The routes live on an `APIRouter` that the ingress includes; `configure` (called by the ingress replica when it
starts) points them at the folder of `ServingConfig.batches`. The upload arrives as multipart form data (what the
openai SDK sends) and is spooled to disk by Starlette's parser, never held whole in memory; the ingress middleware
bounds its size as it arrives (`UPLOAD_PATH`, see `upload_limit`). With API keys configured, a key sees only the
files it uploaded (and its batches' results): another key's file answers 404, as a missing one does (OpenAI's way).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from deployments.auth import current_tenant
from deployments.batch.store import FileRecord, FileStore, FileTooLargeError
from deployments.config import BatchesConfig
from deployments.errors import InvalidRequestError, RequestTooLargeError, ServingError

__all__ = [
    "UPLOAD_PATH",
    "NotFoundError",
    "configure",
    "file_object",
    "request_owner",
    "router",
    "store",
    "upload_limit",
    "visible",
]

UPLOAD_PATH = "/v1/files"
# Room for the multipart framing around the file (boundaries, part headers, the purpose field): the middleware
# lets that much more through, and the route checks the file itself against the exact limit.
_FORM_OVERHEAD_BYTES = 65_536
_FORM_FIELDS = ("file", "purpose")
_PURPOSES = ("batch",)

router = APIRouter()


class NotFoundError(ServingError):
    """Raised when a file or batch id names nothing in the files folder, or the Files/Batches API is off."""

    status_code = 404
    error_type = "not_found_error"


@dataclass
class _State:
    config: BatchesConfig | None = None
    store: FileStore | None = None


_state = _State()


def configure(config: BatchesConfig) -> None:
    """Serve the files folder of `config` (in this ingress process), checked now: a folder this replica cannot write
    fails its start, naming the setting, rather than each upload later.

    Raises:
        RuntimeError: `batches.files_dir` cannot be written here.
    """
    _state.config = config
    _state.store = FileStore(config.folder())
    if config.enabled:
        try:
            _state.store.check_writable()
        except OSError as exc:
            raise RuntimeError(
                f"batches.files_dir: cannot write to {config.folder()} ({exc.strerror or exc}): give a folder this "
                "router replica can write (shared with the batch jobs), or set batches.enabled: false"
            ) from None


_OFF = "The Files and Batches API is off on this server (config `batches.enabled`)"


def _config() -> BatchesConfig:
    if _state.config is None or not _state.config.enabled:
        raise NotFoundError(_OFF)
    return _state.config


def store() -> FileStore:
    """The files folder of this process.

    Raises:
        NotFoundError: the Files and Batches API is off.
    """
    if _state.store is None or _config() is None:
        raise NotFoundError(_OFF)
    return _state.store


def upload_limit() -> int | None:
    """The body limit of `POST UPLOAD_PATH` (the file limit plus the form's framing); None when the API is off."""
    config = _state.config
    return config.max_file_bytes + _FORM_OVERHEAD_BYTES if config is not None and config.enabled else None


def request_owner() -> str | None:
    """The owner the request being served gives what it creates: its API key's name (None: keys are off)."""
    tenant = current_tenant()
    return tenant.name if tenant is not None else None


def visible(owner: str | None) -> bool:
    """Whether a file or batch of `owner` is the current request's to see: its own key's only (all, with keys off)."""
    tenant = current_tenant()
    return tenant is None or tenant.name == owner


def file_object(record: FileRecord) -> dict[str, Any]:
    """OpenAI's File object of a stored file (its owner is not shown)."""
    return {
        **record.model_dump(exclude={"owner"}),
        "object": "file",
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


def _get(file_id: str) -> FileRecord:
    record = store().get(file_id)
    if record is None or not visible(record.owner):  # another key's file is as missing as one never stored
        raise NotFoundError(f"No such file: '{file_id}'", param="file_id", code="file_not_found")
    return record


def _delete(file_id: str) -> None:
    _get(file_id)  # 404 for another key's file
    if not store().delete(file_id):
        raise NotFoundError(f"No such file: '{file_id}'", param="file_id", code="file_not_found")


# The form the route parses itself (below), stated for the OpenAPI document.
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": list(_FORM_FIELDS),
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": list(_PURPOSES)},
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}


@router.post(UPLOAD_PATH, openapi_extra=_UPLOAD_BODY)
async def create_file(request: Request) -> JSONResponse:
    """Upload a file (multipart: `file`, `purpose`='batch'), up to `batches.max_file_bytes`.

    Parsed here rather than by FastAPI's `UploadFile` parameters, which answer every parser failure with a bare
    400: an upload cut off by the size limit must stay a 413.
    """
    config = _config()
    files = store()
    form = await request.form(max_files=1, max_fields=len(_FORM_FIELDS))
    try:
        for name in form:
            if name not in _FORM_FIELDS:
                raise InvalidRequestError(f"Unrecognized request argument supplied: {name}", param=name)
        purpose = form.get("purpose")
        if not isinstance(purpose, str):
            raise InvalidRequestError("`purpose` is required (a form field): 'batch'", param="purpose")
        if purpose not in _PURPOSES:
            raise InvalidRequestError(
                f"purpose {purpose!r} is not supported: this server takes files for batches only ('batch')",
                param="purpose",
            )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("`file` is required (a file part of the form)", param="file")
        try:
            record = await asyncio.to_thread(
                files.add,
                upload.file,
                filename=upload.filename or "upload.jsonl",
                purpose=purpose,
                max_bytes=config.max_file_bytes,
                owner=request_owner(),
            )
        except FileTooLargeError as exc:
            raise RequestTooLargeError(str(exc), param="file", code="file_too_large") from None
    finally:
        await form.close()
    return JSONResponse(file_object(record))


@router.get(UPLOAD_PATH)
async def list_files(
    purpose: str | None = None,
    limit: int = Query(10_000, ge=1, le=10_000),
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> JSONResponse:
    """Stored files (of one `purpose`), newest first unless `order=asc`; `after` is the cursor (a file id)."""
    records = [r for r in await asyncio.to_thread(store().files, purpose) if visible(r.owner)]
    if order == "asc":
        records.reverse()
    if after is not None:
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    page = records[:limit]
    return JSONResponse(
        {
            "object": "list",
            "data": [file_object(r) for r in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": len(records) > limit,
        }
    )


@router.get(UPLOAD_PATH + "/{file_id}")
async def retrieve_file(file_id: str) -> JSONResponse:
    """One file's File object."""
    return JSONResponse(file_object(await asyncio.to_thread(_get, file_id)))


@router.get(UPLOAD_PATH + "/{file_id}/content")
async def file_content(file_id: str) -> FileResponse:
    """The file's content (JSON lines)."""
    record = await asyncio.to_thread(_get, file_id)
    return FileResponse(store().content_path(record.id), media_type="application/jsonl", filename=record.filename)


@router.delete(UPLOAD_PATH + "/{file_id}")
async def delete_file(file_id: str) -> JSONResponse:
    """Delete a file (a batch whose job has not read it yet then fails)."""
    await asyncio.to_thread(_delete, file_id)
    return JSONResponse({"id": file_id, "object": "file", "deleted": True})
