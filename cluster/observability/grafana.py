"""Upload the dashboards to a Grafana through its HTTP API (grafana-client): into one folder, overwriting the
earlier versions of the same uids."""

from __future__ import annotations

from dataclasses import dataclass

import requests
from grafana_client import GrafanaApi  # type: ignore[import-untyped]
from grafana_client.client import GrafanaClientError, GrafanaException  # type: ignore[import-untyped]

from cluster.observability.dashboards import DASHBOARDS, build

__all__ = ["FOLDER_TITLE", "FOLDER_UID", "GrafanaError", "Pushed", "push"]

FOLDER_UID = "modelfleet"
FOLDER_TITLE = "modelfleet"
_TIMEOUT_S = 30.0


class GrafanaError(RuntimeError):
    """Raised when Grafana cannot be reached or refuses a call (the message says which and why)."""


@dataclass(frozen=True)
class Pushed:
    """One dashboard as Grafana stored it."""

    uid: str
    title: str
    url: str
    version: int | None


def push(url: str, token: str | None, *, folder_uid: str = FOLDER_UID, timeout_s: float = _TIMEOUT_S) -> list[Pushed]:
    """Create the folder if it is missing, then create or overwrite every dashboard in it.

    Args:
        url: Grafana's base URL (`http://host:3000`, or with a path prefix when Grafana serves under one).
        token: a service-account token (Editor role) or API key; None: credentials in the URL, if any.
        folder_uid: the folder's uid (created with the title 'modelfleet' when missing).
        timeout_s: per HTTP call.

    Returns:
        What Grafana stored, per dashboard.

    Raises:
        GrafanaError: Grafana did not answer, or refused a call (bad token, no permission, invalid dashboard).
    """
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    try:
        api.health.check()  # a wrong URL fails here, before anything is written
        try:
            api.folder.get_folder(folder_uid)
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise
            api.folder.create_folder(FOLDER_TITLE, uid=folder_uid)
        pushed = []
        for board in DASHBOARDS:
            model, _ = build(board)
            stored = api.dashboard.update_dashboard(
                {"dashboard": model, "folderUid": folder_uid, "overwrite": True, "message": "modelfleet dashboards"}
            )
            pushed.append(Pushed(board.uid, board.title, str(stored.get("url", "")), stored.get("version")))
    except GrafanaException as exc:
        raise GrafanaError(f"Grafana at {url} refused a call: {exc}") from None
    except requests.RequestException as exc:
        raise GrafanaError(f"cannot reach Grafana at {url}: {type(exc).__name__}: {exc}") from None
    return pushed
