"""Filling a weights folder from the Hugging Face Hub: a model folder under the root is named as its Hub repo.

`ROOT/meta-llama/Llama-3.1-8B-Instruct` is filled from the repo `meta-llama/Llama-3.1-8B-Instruct`. Only
`modelfleet prepare --download-under ROOT` downloads (a Kubernetes Job fills the weights claim with it); serving
never reaches the Hub.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

__all__ = ["DownloadError", "download", "hub_targets"]

logger = logging.getLogger(__name__)


class DownloadError(ValueError):
    """Raised when a source under the root cannot name a Hub repo (the message names the fix)."""


def hub_targets(sources: Iterable[str], root: str) -> list[tuple[str, str]]:
    """The (repo id, folder) of each source that lies under `root`, in order, once each.

    Raises:
        DownloadError: a source under `root` is not `ROOT/<owner>/<name>`.
    """
    base = PurePosixPath(root)
    targets: dict[str, str] = {}
    for source in sources:
        path = PurePosixPath(source)
        if base not in path.parents:
            continue
        parts = path.relative_to(base).parts
        if len(parts) != 2:
            raise DownloadError(
                f"source {source} is under {root} but not at {root}/<owner>/<name>: the two folders below the root "
                "name the Hugging Face Hub repo it is downloaded from"
            )
        targets.setdefault("/".join(parts), str(path))
    return list(targets.items())


def download(repo_id: str, folder: str) -> bool:
    """Download a Hub repo's files into `folder` unless it already holds a complete model.

    Complete: `config.json` is there and no download is left unfinished (`huggingface_hub` resumes those).

    Returns:
        Whether anything was downloaded.
    """
    target = Path(folder)
    partial = target / ".cache" / "huggingface"
    if (target / "config.json").is_file() and not any(partial.rglob("*.incomplete")):
        return False
    from huggingface_hub import snapshot_download

    logger.info("downloading %s into %s", repo_id, target)
    snapshot_download(repo_id=repo_id, local_dir=target)
    return True
