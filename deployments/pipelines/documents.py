"""A sequence's document set, read when the config is loaded: its passages then travel inside the config.

Read where the config is loaded (the CLI, `render-k8s`), not in the router replica: the replica runs in Ray's
copy of the project (or in a pod), where a path on the deploying machine means nothing. Carried in the config,
the passages reach the router by one means everywhere: the plan on the local cluster, `serveConfigV2` on KubeRay.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["PROJECT_ROOT", "DocumentSetError", "load_passages", "read_document_set", "resolve_documents"]

#: The folder holding `deployments/`: where a relative path is looked for when the config file's folder lacks it.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_SUFFIXES = (".md", ".txt")
_PARAGRAPH = re.compile(r"\n\s*\n")
_HEADING = re.compile(r"^#+\s")


class DocumentSetError(ValueError):
    """Raised when a document set is missing, unreadable, empty, or too large (the message names the path)."""


def resolve_documents(value: str, config_dir: Path | None) -> tuple[Path, list[Path]]:
    """Where `value` points: as given when absolute, else the config file's folder, then the project root.

    Returns:
        The path found (or the first candidate, when none exists) and every candidate looked at.
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return path, [path]
    candidates = [(config_dir / path).resolve()] if config_dir is not None else []
    candidates.append(PROJECT_ROOT / path)
    found = next((c for c in candidates if c.exists()), candidates[0])
    return found, candidates


def load_passages(path: Path, max_passages: int) -> list[str]:
    """The paragraphs of a file, or of every *.md / *.txt file under a folder (sorted by path); bare headings are
    dropped.

    Raises:
        DocumentSetError: unreadable, nothing to read, or more than `max_passages` passages.
    """
    files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file()) if path.is_dir() else [path]
    passages = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DocumentSetError(f"cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
        for block in _PARAGRAPH.split(text):
            paragraph = " ".join(block.split())
            if paragraph and not (_HEADING.match(paragraph) and "\n" not in block.strip()):
                passages.append(paragraph)
    if not passages:
        raise DocumentSetError(f"{path} holds no passages (paragraphs of *.md or *.txt files)")
    if len(passages) > max_passages:
        raise DocumentSetError(f"{path} holds {len(passages)} passages, above `max_passages` {max_passages}")
    return passages


def read_document_set(value: str, config_dir: Path | None, max_passages: int) -> tuple[str, list[str]]:
    """Resolve and read `retrieve.documents`.

    Returns:
        The absolute path read, and its passages.

    Raises:
        DocumentSetError: naming `documents`, the value and every place looked at.
    """
    path, looked_at = resolve_documents(value, config_dir)
    if not path.exists():
        places = " and ".join(str(p) for p in looked_at)
        raise DocumentSetError(
            f"`documents` '{value}' does not exist (looked at {places}): give a file or folder of passages, "
            "absolute or relative to the config file"
        )
    try:
        return str(path), load_passages(path, max_passages)
    except DocumentSetError as exc:
        raise DocumentSetError(f"`documents` '{value}': {exc}") from None
