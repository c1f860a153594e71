"""The cluster's own Ray auth token: created once in MODELFLEET_HOME (mode 0600), handed to every Ray process
and client modelfleet starts, so token authentication stays on without `~/.ray/auth_token`.

Ray 2.60 heads refuse to start in token mode without a token, and a driver sends one only in token mode. Ray
looks for the token in `RAY_AUTH_TOKEN`, then the file named by `RAY_AUTH_TOKEN_PATH`, then `~/.ray/auth_token`;
modelfleet always names its own file, so a user's `~/.ray/auth_token` is neither needed nor touched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from models.settings import get_settings

__all__ = ["TOKEN_FILE", "ensure_token", "ray_auth_env", "use_token"]

logger = logging.getLogger(__name__)

TOKEN_FILE = "auth_token"


def ensure_token(home: Path | None = None) -> Path:
    """The token file of the cluster whose state lives in `home` (default: MODELFLEET_HOME); created with Ray's own
    generator if it does not exist yet, readable by its owner only.

    Safe when several processes ask at once: the file is created exclusively, and a loser reads the winner's.
    """
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    home = home or get_settings().home
    home.mkdir(parents=True, exist_ok=True)
    path = home / TOKEN_FILE
    if path.exists() and path.stat().st_size > 0:
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return path
    partial = home / f".{TOKEN_FILE}.{os.getpid()}"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(generate_new_authentication_token())
    try:
        os.link(partial, path)  # fails if another process won the race: its token stands
        logger.info("created the cluster's Ray auth token in %s", path)
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)
    return path


def ray_auth_env(home: Path | None = None) -> dict[str, str]:
    """Environment that makes a Ray process or client use the cluster's token (created if needed)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ensure_token(home))}


def use_token(home: Path | None = None) -> Path:
    """Make this process (a driver, a job or status client) and the processes it starts use the cluster's token.

    Call it before connecting to the cluster or starting one. A `RAY_AUTH_TOKEN` in the environment would win
    over the file, so it is dropped.

    Returns:
        The token file.
    """
    env = ray_auth_env(home)
    if os.environ.pop("RAY_AUTH_TOKEN", None) is not None:
        logger.info("ignoring RAY_AUTH_TOKEN from the environment: the cluster uses %s", env["RAY_AUTH_TOKEN_PATH"])
    os.environ.update(env)
    from ray._raylet import AuthenticationTokenLoader, Config

    # Ray caches its config and the token it loaded first: make this process see token mode and this file.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    return Path(env["RAY_AUTH_TOKEN_PATH"])
