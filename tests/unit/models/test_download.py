"""Which Hub repo fills which folder of a weights root (no download: serving and tests never reach the Hub)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.download import DownloadError, download, hub_targets


def test_folders_under_the_root_name_their_hub_repo() -> None:
    sources = ["/models/meta-llama/Llama-3.1-8B-Instruct", "all-minilm-l6-v2", "/elsewhere/a/b"]
    sources.append("/models/meta-llama/Llama-3.1-8B-Instruct")  # a second version of the same weights
    assert hub_targets(sources, "/models") == [
        ("meta-llama/Llama-3.1-8B-Instruct", "/models/meta-llama/Llama-3.1-8B-Instruct")
    ]


def test_a_folder_that_names_no_repo_is_refused() -> None:
    with pytest.raises(DownloadError, match="<owner>/<name>"):
        hub_targets(["/models/llama"], "/models")


def test_a_complete_folder_is_not_downloaded_again(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert download("owner/name", str(tmp_path)) is False
