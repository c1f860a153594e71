"""The files folder of OpenAI's Files and Batches API: uploaded files and batch results, and the batches' records.

Layout under the folder: `files/<file id>` (the content) beside `files/<file id>.json` (its FileRecord), and
`batches/<batch id>.json`. Each file and batch records the *name* of the API key that made it (`owner`, never the
key; None when keys are off), which the API uses to show a key only its own. Every write goes to a temporary name
first and is renamed, so a reader (another router replica, the batch job) never sees half a record. Ids are checked
against their pattern before they become paths.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import Field

from models.spec import FrozenModel

__all__ = ["FileRecord", "FileStore", "FileTooLargeError", "new_batch_id", "new_file_id"]

_FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
_BATCH_ID = re.compile(r"^batch_[0-9a-f]{32}$")
_COPY_CHUNK = 1 << 20


def new_file_id() -> str:
    """A new file id, in OpenAI's spelling."""
    return f"file-{uuid.uuid4().hex}"


def new_batch_id() -> str:
    """A new batch id, in OpenAI's spelling; also the id of the Ray job that runs the batch."""
    return f"batch_{uuid.uuid4().hex}"


class FileTooLargeError(Exception):
    """Raised when a file being stored grows past the store's limit; nothing is kept."""


class FileRecord(FrozenModel):
    """One stored file, as OpenAI's File object describes it."""

    id: str = Field(description="The file id (`file-...`).")
    bytes: int = Field(description="Size of the content in bytes.")
    created_at: int = Field(description="Unix time the file was stored.")
    filename: str = Field(description="The name it was uploaded with, or the name of a batch result.")
    purpose: str = Field(description="`batch` (uploaded input), `batch_output` (a batch's output or error file).")
    owner: str | None = Field(
        None, description="Name of the API key that uploaded it (or ran its batch); None: stored with keys off."
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    partial.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
    os.replace(partial, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return data


class FileStore:
    """Files and batch records in one folder (see the module docstring); blocking I/O, call it from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files = root / "files"
        self._batches = root / "batches"

    def _ready(self) -> None:
        self._files.mkdir(parents=True, exist_ok=True)
        self._batches.mkdir(parents=True, exist_ok=True)

    def check_writable(self) -> None:
        """Create the store's folders and write a file in each.

        Raises:
            OSError: they cannot be created or written.
        """
        self._ready()
        for folder in (self._files, self._batches):
            with tempfile.NamedTemporaryFile(dir=folder):
                pass

    def content_path(self, file_id: str) -> Path:
        """Where the content of `file_id` lives (or will: a batch job writes its results there)."""
        if not _FILE_ID.match(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        return self._files / file_id

    def add(
        self, source: BinaryIO, *, filename: str, purpose: str, max_bytes: int, owner: str | None = None
    ) -> FileRecord:
        """Copy `source` into the store as a new file.

        Raises:
            FileTooLargeError: the content is larger than `max_bytes` (nothing is kept).
        """
        self._ready()
        file_id = new_file_id()
        path = self.content_path(file_id)
        partial = path.with_name(f".{file_id}.partial")
        size = 0
        try:
            with partial.open("wb") as out:
                while chunk := source.read(_COPY_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLargeError(f"the file is larger than the limit of {max_bytes} bytes")
                    out.write(chunk)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return self._record(file_id, filename=filename, purpose=purpose, owner=owner)

    def register(
        self, file_id: str, *, filename: str, purpose: str, source: Path | None = None, owner: str | None = None
    ) -> FileRecord:
        """Record the content already at `content_path(file_id)` (moved there from `source` first, if given)."""
        self._ready()
        if source is not None:
            os.replace(source, self.content_path(file_id))
        return self._record(file_id, filename=filename, purpose=purpose, owner=owner)

    def _record(self, file_id: str, *, filename: str, purpose: str, owner: str | None) -> FileRecord:
        record = FileRecord(
            id=file_id,
            bytes=self.content_path(file_id).stat().st_size,
            created_at=int(time.time()),
            filename=filename,
            purpose=purpose,
            owner=owner,
        )
        _write_json(self._files / f"{file_id}.json", record.model_dump())
        return record

    def get(self, file_id: str) -> FileRecord | None:
        """The record of `file_id`, or None (also for a string that is no file id)."""
        if not _FILE_ID.match(file_id):
            return None
        data = _read_json(self._files / f"{file_id}.json")
        return FileRecord.model_validate(data) if data is not None else None

    def files(self, purpose: str | None = None) -> list[FileRecord]:
        """Every stored file (of `purpose`, if given), newest first."""
        if not self._files.is_dir():
            return []
        records = [FileRecord.model_validate_json(p.read_text()) for p in self._files.glob("file-*.json")]
        return sorted(
            (r for r in records if purpose in (None, r.purpose)), key=lambda r: (r.created_at, r.id), reverse=True
        )

    def delete(self, file_id: str) -> bool:
        """Remove the file and its record; False when there was none."""
        if self.get(file_id) is None:
            return False
        (self._files / f"{file_id}.json").unlink(missing_ok=True)
        self.content_path(file_id).unlink(missing_ok=True)
        return True

    def put_batch(self, batch_id: str, data: dict[str, Any]) -> None:
        """Store (or replace) a batch's record."""
        self._ready()
        _write_json(self._batches / f"{batch_id}.json", data)

    def claim(self, batch_id: str, what: str) -> bool:
        """True for the first caller only, across router replicas sharing the folder: a step of a batch that must
        happen once (charging its tokens)."""
        self._ready()
        try:
            os.close(os.open(self._batches / f"{batch_id}.{what}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return False
        return True

    def get_batch(self, batch_id: str) -> dict[str, Any] | None:
        """A batch's record, or None (also for a string that is no batch id)."""
        if not _BATCH_ID.match(batch_id):
            return None
        return _read_json(self._batches / f"{batch_id}.json")

    def batches(self) -> list[dict[str, Any]]:
        """Every batch record, newest first."""
        if not self._batches.is_dir():
            return []
        records = [json.loads(p.read_text(encoding="utf-8")) for p in self._batches.glob("batch_*.json")]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)
