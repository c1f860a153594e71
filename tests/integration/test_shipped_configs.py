"""Every shipped config and README example, run the way a user runs them: `modelfleet up` in a fresh HOME, then
`modelfleet deploy deployments/configs/X.yaml` (Ray's working_dir upload, so the app runs from Ray's copy of the
project, not from this checkout), then one real request per model and pipeline through the official client, and
every curl line and complete SDK example of the README against the config it belongs to."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.local import free_port
from deployments.config import load_config
from deployments.pipelines.spec import plan_pipelines
from tests.integration.test_cli import CLI, ROOT, _env

pytestmark = pytest.mark.slow

CONFIGS = ROOT / "deployments" / "configs"
# gpu.yaml asks for GPUs, which this machine has not; every other shipped config is deployed here.
SHIPPED = sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "gpu.yaml")
README = ROOT / "README.md"
README_BASE = "http://127.0.0.1:8000"
# README curl lines whose model no shipped config serves, each with the reason.
NOT_SHIPPED = {"mood-vote": "a config snippet of three classifiers shown inline, not a shipped config"}
RAG_QUESTION = "What is the capital of the island of Quorvath?"
# Configs that share models follow each other, so that a redeploy keeps their replicas.
ORDER = ["default.yaml", "rag.yaml", "smollm2-transformers.yaml", "classify.yaml", "canary.yaml", "echo.yaml"]


@dataclass(frozen=True)
class Cluster:
    home: Path
    port: int
    env: dict[str, str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args], env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A local cluster as `modelfleet up` starts it for a new user (its defaults: the dashboard on)."""
    root = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))  # short: Ray's unix sockets live under HOME
    (root / "h").mkdir()
    (root / "t").mkdir()
    # The converted models are shared with the session: converting SmolLM2 again proves nothing new here.
    env = {**_env(root / "h"), "MODELFLEET_CACHE_DIR": os.environ["MODELFLEET_CACHE_DIR"]}
    cluster = Cluster(home=root / "h", port=free_port(), env=env)
    up = cluster.run("up", timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield cluster
    finally:
        cluster.run("down", timeout=180)
        shutil.rmtree(root, ignore_errors=True)


def _targets(name: str) -> list[tuple[str, str]]:
    """(model or pipeline id, task) of every model and pipeline of a shipped config."""
    config = load_config(CONFIGS / name)
    models = [(m.id, m.task) for m in config.models]
    return models + [(p.spec.id, p.task) for p in plan_pipelines(config.models, config.pipelines)]


def _ask(cluster: Cluster, model: str, task: str) -> None:
    """One real request to `model`, chosen by its task, through the official client where it has a method."""
    client = cluster.client()
    if task == "generate":
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
        )
        assert reply.choices[0].message.content, f"{model}: empty answer"
    elif task == "embed":
        vectors = client.embeddings.create(model=model, input=["a cat sat", "a kitten sat"])
        assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 0
    elif task == "classify":  # the openai client has no method for vLLM's /classify
        r = httpx.post(f"{cluster.base}/classify", json={"model": model, "input": ["good", "bad"]}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 2
    elif task == "score":
        body = {"model": model, "query": "capital of France", "documents": ["Paris", "a dog"]}
        r = httpx.post(f"{cluster.base}/rerank", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["results"]) == 2
    else:
        pytest.fail(f"{model}: no request written for task {task!r}")


def _readme_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The shell commands of a block: comment lines dropped, backslash continuations and quoted newlines joined."""
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if current.rstrip().endswith("\\"):
            continue
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append(current.replace("\\\n", " "))
        current = ""
    return commands


@dataclass(frozen=True)
class Curl:
    config: str
    url: str
    headers: dict[str, str]
    body: str


def _readme_curls() -> list[Curl]:
    """Every curl of the README's bash blocks, with the config it runs against: the block's `modelfleet serve X`,
    else the default config (the one `make serve` serves)."""
    curls = []
    for block in _readme_blocks("bash"):
        served = re.search(r"modelfleet serve (\S+\.yaml)", block)
        config = Path(served.group(1)).name if served else "default.yaml"
        for command in _commands(block):
            words = shlex.split(command, comments=True)
            words = words[: words.index("|")] if "|" in words else words  # `| grep ...` reads the answer
            if words[0] != "curl":
                continue
            url = next(w for w in words[1:] if "localhost:" in w or "127.0.0.1:" in w)
            headers = dict(h.split(": ", 1) for h in (words[i + 1] for i, w in enumerate(words) if w == "-H"))
            body = next(words[i + 1] for i, w in enumerate(words) if w == "-d")
            curls.append(Curl(config, url, headers, body))
    return curls


def _check_readme_curls(cluster: Cluster, config: str) -> None:
    served = {m.id for m in cluster.client().models.list().data}
    for curl in (c for c in _readme_curls() if c.config == config):
        model = json.loads(curl.body)["model"]
        if model in NOT_SHIPPED and model not in served:
            continue
        url = re.sub(r"^(http://)?(localhost|127\.0\.0\.1):8000", cluster.base, curl.url)
        r = httpx.post(url, content=curl.body, headers=curl.headers, timeout=120)
        assert r.status_code == 200, f"README's curl to {curl.url} with {curl.body}: {r.status_code} {r.text}"


def _sdk_examples() -> list[str]:
    """The README's complete SDK examples: the Python blocks that import the client and talk to the local API."""
    return [b for b in _readme_blocks("python") if "from openai import OpenAI" in b and README_BASE in b]


def _check_sdk_examples(cluster: Cluster) -> None:
    """Run as written: the chat and embeddings example, and the Batch API example to its end."""
    examples = _sdk_examples()
    assert len(examples) >= 2, "the README's SDK and Batch API examples are gone"
    with tempfile.TemporaryDirectory() as work:
        for example in examples:
            code = example.replace(README_BASE, cluster.base)
            result = subprocess.run(
                [sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600, check=False
            )
            assert result.returncode == 0, f"README example failed:\n{example}\n{result.stdout}\n{result.stderr}"
            if "batches.create" in example:
                assert "completed" in result.stdout, result.stdout
            else:
                assert "384" in result.stdout, result.stdout


def _check_rag_question(cluster: Cluster) -> None:
    """The README's question, answered only by docs/rag/, which Ray's upload of the project leaves out."""
    client = cluster.client()
    messages: Any = [{"role": "user", "content": RAG_QUESTION}]
    raw = client.chat.completions.with_raw_response.create(model="rag", messages=messages, max_tokens=40, temperature=0)
    assert raw.headers["x-modelfleet-models"] == "minilm,smollm2"
    assert "Bellmarrow" in (raw.parse().choices[0].message.content or ""), raw.text
    stream = client.chat.completions.create(model="rag", messages=messages, max_tokens=40, temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Bellmarrow" in streamed, streamed


def test_every_shipped_config_and_readme_curl_is_covered() -> None:
    assert sorted(ORDER) == SHIPPED, "add the new config to ORDER"
    curls = _readme_curls()
    assert len(curls) >= 6, curls
    for curl in curls:
        assert curl.config in SHIPPED, f"README serves {curl.config}, which is not a shipped config"
        model = json.loads(curl.body)["model"]
        assert model in NOT_SHIPPED or model in {t for t, _ in _targets(curl.config)}, (
            f"README's curl names {model}, which {curl.config} does not serve"
        )


@pytest.mark.parametrize("name", ORDER)
def test_shipped_config_deployed_as_a_user_does(cluster: Cluster, name: str) -> None:
    """`modelfleet deploy` of the file, then one request per model and pipeline, the README's curl lines for
    it, and its README examples."""
    result = cluster.run("deploy", str(CONFIGS / name), "--port", str(cluster.port))
    assert result.returncode == 0, f"modelfleet deploy {name} failed:\n{result.stdout}\n{result.stderr}"
    assert f"ready: {cluster.base}/v1" in result.stdout
    served = {m.id for m in cluster.client().models.list().data}
    for model, task in _targets(name):
        assert model in served, f"{name}: {model} is not in /v1/models ({sorted(served)})"
        _ask(cluster, model, task)
    _check_readme_curls(cluster, name)
    if name == "rag.yaml":
        _check_rag_question(cluster)
    if name == "default.yaml":  # what `make serve` serves, on a cluster with `modelfleet up`'s defaults
        _check_sdk_examples(cluster)
