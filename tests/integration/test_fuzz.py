"""A schema-driven fuzz run (schemathesis) over the served OpenAPI document, with the real model names it lists.

Every default check runs (no 5xx, responses as documented, invalid requests refused), and one of ours replaces
`positive_data_acceptance` so that only the documented semantic refusals pass (see `schemathesis_hooks.py`). The app
serves one model of each task, each on the engine that implements that task's whole surface (vLLM for generation,
transformers for embeddings, classification and scoring), so no engine-specific refusal stands between a valid
request and its answer; the per-engine refusals are tested by name in test_openai_surface.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import surface_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FUZZ_TIMEOUT_S = 1200


def test_fuzz_finds_no_server_error_and_no_valid_request_refused(
    deploy: Callable[[dict[str, Any]], str],
    tiny_llama: Path,
    tiny_bert: Path,
    classifier_dir: Path,
    cross_encoder_dir: Path,
    tmp_path: Path,
) -> None:
    encoder = {"engine": "transformers", "context_length": 128, "resources": {"num_cpus": 0.5}}
    base = deploy(
        {
            "name": "fuzz",
            "route_prefix": "/fuzz",
            "models": [
                {**surface_model(tiny_llama), "id": "fuzz-vllm"},
                {"id": "fuzz-embed", "task": "embed", "source": str(tiny_bert), **encoder},
                {"id": "fuzz-classify", "task": "classify", "source": str(classifier_dir), **encoder},
                {"id": "fuzz-score", "task": "score", "source": str(cross_encoder_dir), **encoder},
            ],
        }
    )
    cli = Path(sys.executable).with_name("schemathesis")
    cmd = [str(cli), "run", f"{base}/openapi.json", "--url", base, "--checks", "all"]
    cmd += ["--exclude-checks", "positive_data_acceptance", "--max-examples", "40", "--seed", "20261130"]
    cmd += ["--workers", "1", "--generation-database", "none", "--no-color"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    try:
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=FUZZ_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis did not finish within {FUZZ_TIMEOUT_S} s:\n{str(exc.stdout)[-6000:]}")
    summary = run.stdout[-12000:]
    assert run.returncode == 0, f"schemathesis found failures (exit {run.returncode}):\n{summary}\n{run.stderr[-2000:]}"
    assert "generated" in summary and " passed" in summary, summary
