"""Test tiers are marked from the path (tests/unit -> unit, tests/integration -> integration)."""

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
# Cluster state and deploy records of the tests stay out of the user's ~/.modelfleet.
_OWN_HOME = None if "MODELFLEET_HOME" in os.environ else tempfile.mkdtemp(prefix="mf-home-", dir="/tmp")
if _OWN_HOME:
    os.environ["MODELFLEET_HOME"] = _OWN_HOME
# Test clusters listen on loopback only. Ray rewrites a 127.0.0.1 address to the host's outward IP unless
# this flag is off, and a driver given an explicit address sends the auth token only in token mode
# (cluster.deploy sets the same two for the CLI).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).relative_to(_TESTS).parts[0]
        if tier in {"unit", "integration"}:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _OWN_HOME:
        shutil.rmtree(_OWN_HOME, ignore_errors=True)
