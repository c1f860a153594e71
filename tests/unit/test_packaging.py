"""The wheel holds every module and every data file of the project: it is built, installed apart from the checkout,
and every module is imported from there (what `pip install .` and the container image ship)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "deployments", "models")
_BUILD_INPUTS = ("pyproject.toml", "README.md", *PACKAGES)
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")

# Runs in a fresh interpreter whose path holds the install and the venv's dependencies, never the checkout.
_IMPORT_ALL = r"""
import importlib, json, sys
target, modules = sys.argv[1], json.loads(sys.argv[2])
# The venv's editable install maps the project's packages, and any submodule the install lacks, to a checkout:
# drop its finders so that a module missing from the wheel fails to import instead of coming from there.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
found, failed = {}, {}
for name in modules:
    try:
        found[name] = importlib.import_module(name).__file__
    except Exception as exc:
        failed[name] = f"{type(exc).__name__}: {exc}"
if not failed:  # the default config is read from inside the install, as `modelfleet` reads it
    from cluster.cli import DEFAULT_CONFIG
    from deployments.config import load_config
    load_config(DEFAULT_CONFIG)
print(json.dumps({"found": found, "failed": failed}))
"""


def _source_files() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path.relative_to(ROOT))
    return files


def _module_name(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built from a copy of the sources (the build writes build/ and egg-info beside them)
    and installed with `pip install --target`; nothing is downloaded."""
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    for name in _BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=_SKIP)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", base / "dist", src],
        check=True,
        env=env,
        timeout=120,
    )
    (wheel,) = (base / "dist").glob("modelfleet-*.whl")
    target = base / "site"
    subprocess.run(
        [*pip, "install", "--quiet", "--no-deps", "--target", target, wheel], check=True, env=env, timeout=120
    )
    return target


def test_every_module_imports_from_the_install(installed: Path, tmp_path: Path) -> None:
    modules = [
        _module_name(rel) for rel in _source_files() if rel.suffix == ".py" and rel.name != "__main__.py"
    ]  # a __main__ runs its command when imported
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _IMPORT_ALL, str(installed), json.dumps(modules)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, "modules the wheel lacks or cannot import: check [tool.setuptools] in pyproject"
    outside = {name: file for name, file in result["found"].items() if not Path(file).is_relative_to(installed)}
    assert outside == {}, "imported from outside the install"


def test_every_data_file_is_installed(installed: Path) -> None:
    data = [rel for rel in _source_files() if rel.suffix != ".py"]
    assert Path("deployments/configs/default.yaml") in data
    missing = [str(rel) for rel in data if not (installed / rel).is_file()]
    assert missing == [], "package data the wheel lacks: add it to [tool.setuptools.package-data] in pyproject"
    # A script run by path (the HAProxy launcher) must stay executable.
    lost_mode = [str(rel) for rel in data if os.access(ROOT / rel, os.X_OK) and not os.access(installed / rel, os.X_OK)]
    assert lost_mode == []


def test_the_command_is_installed(installed: Path) -> None:
    assert (installed / "bin" / "modelfleet").is_file()
