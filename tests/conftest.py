"""Test tiers are marked from the path (tests/unit -> unit, tests/integration -> integration, tests/cluster ->
cluster; the cluster tier runs only when -m names it).

Every test session keeps its state in one fresh folder of its own, removed at the end: the cluster home with
its Ray auth token (MODELFLEET_HOME), Ray's default temp folder (RAY_TMPDIR) and the model cache
(MODELFLEET_CACHE_DIR), unless the caller chose them. Nothing is read from or written to the user's `~/.ray`,
`~/.modelfleet`, `~/.cache/modelfleet` or `/tmp/ray`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No test and no default may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _short_base() -> str:
    # Ray's unix sockets live under its temp folders (107-byte limit): a long TMPDIR falls back to /tmp.
    base = tempfile.gettempdir()
    return base if len(base) <= 20 else "/tmp"


SESSION_DIR = Path(tempfile.mkdtemp(prefix="mf", dir=_short_base()))
for _name, _default in (
    ("MODELFLEET_HOME", SESSION_DIR / "home"),
    ("MODELFLEET_CACHE_DIR", SESSION_DIR / "cache"),
    # Ray's default temp folder: ray.cluster_utils.Cluster writes `ray_current_cluster` there.
    ("RAY_TMPDIR", SESSION_DIR),
):
    os.environ.setdefault(_name, str(_default))
(Path(os.environ["RAY_TMPDIR"]) / "ray").mkdir(parents=True, exist_ok=True)
# Test clusters listen on loopback only. Ray rewrites a 127.0.0.1 address to the host's outward IP unless
# this flag is off (cluster.deploy sets the same for the CLI).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Token authentication stays on: every cluster the tests start, and every driver, uses the session's token.
os.environ["RAY_AUTH_MODE"] = "token"
from cluster.auth_token import ray_auth_env  # noqa: E402 - after MODELFLEET_HOME is set

os.environ.pop("RAY_AUTH_TOKEN", None)
os.environ.update(ray_auth_env())

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).relative_to(_TESTS).parts[0]
        if tier in {"unit", "integration", "cluster"}:
            item.add_marker(getattr(pytest.mark, tier))
    # The container tier needs the built image and minutes of both cores: it runs only where -m names it (make
    # test-cluster), never in a plain run or under another -m (`-m "not slow"` would otherwise select it).
    if "cluster" not in (config.option.markexpr or ""):
        skipped = [item for item in items if item.get_closest_marker("cluster")]
        if skipped:
            config.hook.pytest_deselected(items=skipped)
            items[:] = [item for item in items if not item.get_closest_marker("cluster")]


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_DIR, ignore_errors=True)
