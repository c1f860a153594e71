"""The start-up breakdown's log reading (cluster.startup_timing) on log lines in the formats Ray, Serve, vLLM and
our replica write them."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cluster.startup_timing import first_stamp, log_stamp, phases, replica_split


def _epoch(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").timestamp()


def test_log_stamp_reads_ray_serve_and_vllm_lines() -> None:
    base = _epoch("2026-11-30 10:56:11")
    ray = "[2026-11-30 10:56:11,736 I 12416 12416] (gcs_server) gcs_server_main.cc:98: Ray cluster metadata"
    serve = "INFO 2026-11-30 10:56:11,250 controller 12887 -- Controller starting (version='2.60.0')."
    vllm = "(EngineCore pid=14637) INFO 11-30 10:56:11 [core.py:133] Initializing a V1 LLM engine"
    assert log_stamp(ray) == base + 0.736
    assert log_stamp(serve) == base + 0.25
    assert log_stamp(vllm, year=2026) == base
    assert log_stamp("Triton is installed, but doesn't include CPU backend.") is None


def test_first_stamp_takes_the_earliest_line_with_every_pattern(tmp_path: Path) -> None:
    one = tmp_path / "a.log"
    two = tmp_path / "b.log"
    one.write_text(
        "INFO 2026-11-30 10:00:01,000 x 1 -- router Started initializing replica.\n"
        "INFO 2026-11-30 10:00:05,000 x 1 -- model_a Started initializing replica.\n"
    )
    two.write_text(
        "no stamp model_a Started initializing\nINFO 2026-11-30 10:00:03,500 x 1 -- model_a Started initializing\n"
    )
    hit = first_stamp([one, two, tmp_path / "missing.log"], "model_a", "Started initializing")
    assert hit is not None
    assert hit[0] == _epoch("2026-11-30 10:00:03") + 0.5
    assert hit[1].endswith("model_a Started initializing")
    assert first_stamp([one, two], "never") is None


def test_replica_split_reads_the_ready_line() -> None:
    line = (
        "INFO 2026-11-30 16:45:31,561 modelfleet_replica:smollm2 jmmmt66q -- model smollm2 ready (vllm engine) in "
        "24.1 s: engine start 24.0 s (import 5.5 s, build 18.5 s), warm-up 0.1 s"
    )
    assert replica_split(line) == {"total": 24.1, "engine start": 24.0, "import": 5.5, "build": 18.5, "warm-up": 0.1}
    assert replica_split("model x ready (echo engine) in 0.0 s: engine start 0.0 s, warm-up 0.0 s") == {
        "total": 0.0,
        "engine start": 0.0,
        "warm-up": 0.0,
    }
    assert replica_split("Started initializing replica.") == {}


def test_phases_of_a_session_folder(tmp_path: Path) -> None:
    serve = tmp_path / "serve"
    serve.mkdir()
    (tmp_path / "gcs_server.out").write_text("[2026-11-30 10:00:02,000 I 1 1] (gcs_server) started\n")
    (tmp_path / "raylet.out").write_text("[2026-11-30 10:00:03,000 I 2 2] (raylet) main.cc:283: Setting cluster ID\n")
    (serve / "controller_5.log").write_text(
        "INFO 2026-11-30 10:00:05,000 controller 5 -- Controller starting (version='2.60.0').\n"
        "INFO 2026-11-30 10:00:07,000 controller 5 -- Deploying new version of Deployment(name='router')\n"
    )
    (serve / "proxy_127.0.0.1.log").write_text("INFO 2026-11-30 10:00:06,000 proxy 127.0.0.1 -- Proxy starting on\n")
    (serve / "replica_app_replica_m_abc.log").write_text(
        "INFO 2026-11-30 10:00:09,000 app_replica:m abc -- Started initializing replica.\n"
    )
    (tmp_path / "worker-1-01000000-9.out").write_text(
        "(EngineCore pid=10) INFO 11-30 10:00:20 [core.py:133] Initializing a V1 LLM engine\n"
        "(Worker pid=11) INFO 11-30 10:00:26 [default_loader.py:501] Loading weights took 0.21 seconds\n"
    )
    (tmp_path / "worker-1-01000000-9.err").write_text(
        "INFO 2026-11-30 10:00:30,000 app_replica:m abc -- model m ready (vllm engine) in 21.0 s: engine start "
        "20.5 s (import 6.0 s, build 14.0 s), warm-up 0.5 s\n"
    )
    found = {phase.name: round(phase.at_s, 3) for phase in phases(tmp_path, _epoch("2026-11-30 10:00:00"), "m")}
    assert found == {
        "GCS up": 2.0,
        "raylet up": 3.0,
        "Serve controller up": 5.0,
        "Serve proxy up": 6.0,
        "app submitted": 7.0,
        "replica constructor entered": 9.0,
        "vLLM imported in the replica": 15.0,
        "vLLM engine core process up": 20.0,
        "vLLM weights loaded": 26.0,
        "engine started": 29.5,
        "warm-up answered": 30.0,
    }
    # Another model's replica is not followed.
    assert "replica constructor entered" not in {p.name for p in phases(tmp_path, _epoch("2026-11-30 10:00:00"), "n")}


def test_the_replica_line_and_its_reader_agree() -> None:
    from deployments.replica import _start_split

    text = _start_split(24.04, {"import": 5.51, "build": 18.46}, 0.12)
    assert text == "engine start 24.0 s (import 5.5 s, build 18.5 s), warm-up 0.1 s"
    line = f"INFO 2026-11-30 16:45:31,561 modelfleet_replica:m abc -- model m ready (vllm engine) in 24.2 s: {text}"
    assert replica_split(line) == {"total": 24.2, "engine start": 24.0, "import": 5.5, "build": 18.5, "warm-up": 0.1}
    # An engine without phases of its own (echo, transformers).
    assert _start_split(0.01, {}, 0.0) == "engine start 0.0 s, warm-up 0.0 s"
