"""Test tiers are marked from the path (tests/unit -> unit, tests/integration -> integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# No test and no default may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(item.fspath).relative_to(_TESTS).parts[0]
        if tier in {"unit", "integration"}:
            item.add_marker(getattr(pytest.mark, tier))
