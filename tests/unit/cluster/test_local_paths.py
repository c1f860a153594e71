"""Where the local cluster puts Ray's temp folder: short enough for every unix socket Ray makes under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.local import ray_temp_dir

# The longest socket Ray makes: the dashboard's MetricsHead module, in a session of a 7-digit pid.
LONGEST_SOCKET = "session_2026-12-07_23-53-36_699259_4194304/sockets/dash_MetricsHead"
UNIX_PATH_MAX = 107


@pytest.mark.parametrize(
    "home",
    [
        "/root/.modelfleet",
        "/home/alice/.modelfleet",
        "/tmp/fresh-check.DmXd1v/home/.modelfleet",  # a fresh-check's HOME: the dashboard once failed there
        "/tmp/mfci.AbCdEf/home/.modelfleet",
        "/home/a-rather-long-user-name/projects/serving/.modelfleet",
    ],
)
def test_every_socket_of_the_head_fits_a_unix_path(home: str) -> None:
    temp_dir = ray_temp_dir(Path(home))
    assert len(f"{temp_dir}/{LONGEST_SOCKET}") <= UNIX_PATH_MAX, temp_dir
    if len(home) <= 24:
        assert temp_dir == Path(home) / "ray"  # kept beside the cluster's state where it fits
