"""The container image `make image` builds is the one the rendered manifests name, and the Containerfile's own
defaults (a plain `docker build .`) match what the Makefile passes."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.k8s import COMMITTED_OVERLAYS
from cluster.k8s.image import image_tag, main, ray_base_image

ROOT = Path(__file__).resolve().parents[3]


def _images(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            else:
                yield from _images(value)
    elif isinstance(node, list):
        for item in node:
            yield from _images(item)


def _make_variable(name: str) -> str:
    found = re.search(rf"^{name} :?= (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert found, f"the Makefile sets no {name}"
    return found.group(1).strip()


def _containerfile_arg(name: str) -> str:
    found = re.search(rf"^ARG {name}=(.+)$", (ROOT / "Containerfile").read_text(), re.MULTILINE)
    assert found, f"the Containerfile has no default for {name}"
    return found.group(1).strip().strip('"')


@pytest.mark.parametrize("overlay", COMMITTED_OVERLAYS, ids=lambda o: o.name)
def test_the_manifests_name_the_image_make_builds(overlay: Any) -> None:
    assert overlay.options.image is None, "a committed overlay names the project's own image"
    images = set()
    for path in (ROOT / "k8s" / "overlays" / overlay.name).glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            images.update(_images(doc))
    assert images == {image_tag(overlay.options.profile)}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_make_image_tags_what_the_renderer_names(profile: str) -> None:
    out = subprocess.run(
        ["make", "-s", "image-tag", f"PY={sys.executable}", f"VLLM={profile}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out.strip() == image_tag(profile) == f"modelfleet:{metadata.version('modelfleet')}-{profile}"


def test_the_containerfile_defaults_match_the_makefile() -> None:
    assert _containerfile_arg("BASE") == ray_base_image("cpu") == f"rayproject/ray:{metadata.version('ray')}-py311-cpu"
    assert _containerfile_arg("TORCH_VERSION") == _make_variable("TORCH_VERSION")
    assert _containerfile_arg("MODEL_PACKAGES") == _make_variable("MODEL_PACKAGES")


def test_the_command_prints_tag_and_base(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", "gpu"]) == 0
    assert main(["base", "gpu"]) == 0
    assert capsys.readouterr().out.split() == [image_tag("gpu"), ray_base_image("gpu")]
    assert main(["tag"]) == 2
