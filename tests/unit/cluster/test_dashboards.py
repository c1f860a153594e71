"""The Grafana dashboards as code: their shape, that they query only metrics that exist, the files and ConfigMap
they are written to, and their upload with grafana-client.

No Grafana server installs here (not in Debian, PyPI or npm), so the upload goes to a small fake of Grafana's HTTP
API of our own (the calls grafana-client makes, recorded, answered as Grafana documents them): a fake at our
boundary, not a mock of the client. That each panel's query returns data is checked against a real Prometheus in
tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.cli import main
from cluster.k8s.monitoring import DASHBOARDS_CONFIG_MAP
from cluster.local import free_port
from cluster.observability import DASHBOARDS, build, export, panel_queries
from cluster.observability.grafana import FOLDER_UID, GrafanaError, push
from deployments import metrics

ROOT = Path(__file__).resolve().parents[3]
_VARIABLES = {"cluster", "model", "__rate_interval"}


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, Any]]:
    return {board.uid: build(board)[0] for board in DASHBOARDS}


def test_dashboards_have_unique_uids_ids_and_known_variables(models: dict[str, dict[str, Any]]) -> None:
    assert set(models) == {"modelfleet-overview", "modelfleet-model", "modelfleet-cluster"}
    for uid, model in models.items():
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), uid
        defined = {v["name"] for v in model["templating"]["list"]}
        assert {"datasource", "cluster"} <= defined
        for panel in model["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
            assert panel.get("description") is not None
        for query in panel_queries(model):
            assert query.variables() <= _VARIABLES | defined, query
            assert 'ray_io_cluster=~"$cluster"' in query.expr, query  # every series keeps to the chosen cluster


def test_dashboards_query_only_metrics_that_exist_and_show_every_one(models: dict[str, dict[str, Any]]) -> None:
    suffixes = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    ours = {m.exported + s for m in metrics.METRICS for s in suffixes[m.kind]}
    used = {
        name
        for model in models.values()
        for query in panel_queries(model)
        for name in re.findall(r"\bray_modelfleet_\w+", query.expr)
    }
    assert used <= ours, used - ours
    shown = {m.exported for m in metrics.METRICS if any(name.startswith(m.exported) for name in used)}
    assert shown == {m.exported for m in metrics.METRICS}


def test_only_the_gpu_panels_are_marked_gpu_only() -> None:
    gpu = {title for board in DASHBOARDS for title in build(board)[1]}
    assert gpu == {"GPU utilization by node", "GPU memory used by node"}


def test_export_matches_the_committed_files_and_the_config_map(tmp_path: Path) -> None:
    assert main(["dashboards", "export", "--out", str(tmp_path)]) == 0
    written = {p.name: p.read_text() for p in tmp_path.iterdir()}
    assert set(written) == {f"{board.uid}.json" for board in DASHBOARDS}
    committed = {p.name: p.read_text() for p in (ROOT / "k8s" / "dashboards").iterdir()}
    assert written == committed, "run `modelfleet render-k8s` (make k8s)"
    (config_map,) = [d for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "dashboards.yaml").read_text()) if d]
    assert config_map["metadata"]["name"] == DASHBOARDS_CONFIG_MAP
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["data"] == written
    assert all(json.loads(text)["uid"] == name.removesuffix(".json") for name, text in written.items())
    # A later export removes the files of dashboards that are gone, and only those.
    (tmp_path / "modelfleet-old.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("mine")
    export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*written, "notes.txt"])


# -- upload -------------------------------------------------------------------------------------------------------


class FakeGrafana(ThreadingHTTPServer):
    """The parts of Grafana's HTTP API that a push uses, recording every call."""

    def __init__(self, port: int, token: str) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.token = token
        self.calls: list[tuple[str, str, Any]] = []
        self.folders: set[str] = set()
        self.dashboards: dict[str, dict[str, Any]] = {}


class _Handler(BaseHTTPRequestHandler):
    server: FakeGrafana

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.calls.append((self.command, self.path, body))
        if self.path == "/api/health":
            return self._answer(200, {"database": "ok", "version": "11.6.0"})
        if self.headers.get("Authorization") != f"Bearer {self.server.token}":
            return self._answer(401, {"message": "invalid API key"})
        if self.command == "GET" and self.path.startswith("/api/folders/"):
            uid = self.path.rsplit("/", 1)[1]
            if uid in self.server.folders:
                return self._answer(200, {"uid": uid, "title": "modelfleet"})
            return self._answer(404, {"message": "folder not found", "status": "not-found"})
        if self.command == "POST" and self.path == "/api/folders":
            self.server.folders.add(body["uid"])
            return self._answer(200, {"uid": body["uid"], "title": body["title"]})
        if self.command == "POST" and self.path == "/api/dashboards/db":
            if body["folderUid"] not in self.server.folders:
                return self._answer(400, {"message": "folder not found"})
            uid = body["dashboard"]["uid"]
            version = self.server.dashboards.get(uid, {}).get("version", 0) + 1
            self.server.dashboards[uid] = {**body["dashboard"], "version": version}
            return self._answer(200, {"uid": uid, "url": f"/d/{uid}/x", "status": "success", "version": version})
        return self._answer(404, {"message": "not found"})

    do_GET = do_POST = _handle


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    server = FakeGrafana(free_port(), token="t0k")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_push_creates_the_folder_once_and_overwrites_dashboards(grafana: FakeGrafana) -> None:
    url = f"http://127.0.0.1:{grafana.server_port}"
    first = push(url, "t0k")
    assert [(c[0], c[1]) for c in grafana.calls] == [
        ("GET", "/api/health"),
        ("GET", f"/api/folders/{FOLDER_UID}"),
        ("POST", "/api/folders"),
        *[("POST", "/api/dashboards/db")] * len(DASHBOARDS),
    ]
    for _, _, body in grafana.calls[3:]:
        assert body["overwrite"] is True and body["folderUid"] == FOLDER_UID
    assert {p.uid for p in first} == set(grafana.dashboards) == {board.uid for board in DASHBOARDS}
    assert grafana.dashboards["modelfleet-overview"]["title"] == "modelfleet / Overview"
    grafana.calls.clear()
    again = push(url, "t0k")
    assert ("POST", "/api/folders") not in [(c[0], c[1]) for c in grafana.calls]
    assert {p.version for p in again} == {2}


def test_push_command_reports_a_refused_token_and_an_unreachable_grafana(
    grafana: FakeGrafana, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{grafana.server_port}"
    with pytest.raises(GrafanaError, match="refused"):
        push(url, "wrong")
    assert not grafana.dashboards
    assert main(["dashboards", "push", "--url", url, "--token", "wrong"]) == 1
    assert "Unauthorized" in capsys.readouterr().err
    assert main(["dashboards", "push", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x"]) == 1
    assert "cannot reach Grafana" in capsys.readouterr().err
    assert main(["dashboards", "push", "--url", url, "--token", "t0k"]) == 0
    assert f"{url}/d/modelfleet-model/x" in capsys.readouterr().out
