"""The commands the bench runs for its baselines and its cross-check, and the report it writes (table, markdown,
plot), from synthetic results."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.bench import report
from cluster.bench.crosscheck import vllm_bench_command
from cluster.bench.load import LoadPlan
from cluster.bench.run import check_tokens
from cluster.bench.stats import Sample, summarize
from cluster.bench.systems.vllm_server import vllm_server_command
from models.spec import ModelSpec

# -- the vLLM server's command line ------------------------------------------------


def test_vllm_server_command_mirrors_the_engine(tmp_path: Path) -> None:
    spec = ModelSpec(
        id="smollm2",
        task="generate",
        engine="vllm",
        source="x",
        context_length=2048,
        tool_call_parser="hermes",
        engine_kwargs={
            "max_num_seqs": 8,
            "enable_prefix_caching": False,
            "cpu_kvcache_space_gb": 2,
            "cpu_omp_threads_bind": "0",
        },
    )
    cmd, env = vllm_server_command(spec, tmp_path, 1234)
    text = " ".join(cmd)
    assert "-m vllm.entrypoints.openai.api_server" in text and f"--model {tmp_path}" in text
    for part in (
        "--served-model-name smollm2",
        "--host 127.0.0.1",
        "--port 1234",
        "--dtype float32",
        "--max-model-len 2048",
        "--enforce-eager",
        f"--kv-cache-memory-bytes {2 << 30}",
        "--max-num-seqs 8",
        "--no-enable-prefix-caching",
        "--generation-config vllm",
        "--enable-auto-tool-choice --tool-call-parser hermes",
    ):
        assert part in text
    assert env == {"VLLM_CPU_OMP_THREADS_BIND": "0"}
    # Another engine's kwargs mean nothing to vLLM; the KV cache still gets the engine's 1 GiB default.
    other = ModelSpec(id="m", task="generate", engine="transformers", source="x", engine_kwargs={"num_threads": 1})
    cmd, env = vllm_server_command(other, tmp_path, 1)
    assert "--num-threads" not in cmd and f"--kv-cache-memory-bytes {1 << 30}" in " ".join(cmd) and env == {}
    # The plan's engine cores become vLLM's thread binding, as in a replica.
    assert vllm_server_command(other, tmp_path, 1, engine_cpus="0")[1] == {"VLLM_CPU_OMP_THREADS_BIND": "0"}


def test_vllm_server_command_passes_every_engine_argument_of_the_plan(tmp_path: Path) -> None:
    from deployments.plan import plan_engine

    spec = ModelSpec(id="m", task="generate", engine="vllm", source="x", engine_kwargs={"seed": 3})
    cmd, _ = vllm_server_command(spec, tmp_path, 1)
    for key, value in plan_engine(spec).kwargs.items():
        if key in ("model", "tokenizer"):
            continue
        flag = "--" + key.replace("_", "-")
        assert (flag in cmd) if value is not False else ("--no-" + key.replace("_", "-") in cmd), key


# -- the report ------------------------------------------------------------------------------------------


def _system(name: str, tok_s: float, ttft: float, ready: float | None) -> dict[str, Any]:
    summary = summarize([Sample(start=0.0, e2e=1.0, ttft=ttft, output_tokens=int(tok_s))])
    return {
        "name": name,
        "time_to_ready_s": ready,
        "idle_memory": {"rss_gib": 2.0, "pss_gib": 1.5, "processes": 3},
        "levels": {"c=1": {"label": "c=1", "summary": summary, "samples": []}},
        "info": {},
    }


def _results() -> dict[str, Any]:
    systems = [_system("vllm-server", 100.0, 0.2, 40.0), _system("modelfleet", 80.0, 0.3, 20.0)]
    machine = {
        "cores": 2,
        "cpu": "cpu",
        "memory_gib": 24,
        "python": "3.11",
        "os": "linux",
        "packages": {},
        "date": "2030-01-01 00:00 UTC",
    }
    plan = {
        "mode": "chat",
        "max_tokens": 64,
        "temperature": 0.0,
        "ignore_eos": True,
        "num_requests": 1,
        "duration_s": 60.0,
        "warmup": 2,
    }
    return {"model": "m", "spec": None, "systems": systems, "machine": machine, "plan": plan, "command": "python -m x"}


def test_table_has_ratios() -> None:
    table = report.markdown_table(_results()["systems"])
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "modelfleet / vllm-server" in table
    assert "| 100.0 | 80.0 | 0.80x |" in lines["c=1 output tok/s"]
    assert "| 0.200 | 0.300 | 1.50x |" in lines["c=1 TTFT p50 (s)"]
    assert "| 40.0 | 20.0 | 0.50x |" in lines["time to first real answer (s)"]
    assert "1 / 0" in lines["c=1 completed / errors"]


def test_embeddings_table_reports_embeddings_per_second() -> None:
    table = report.markdown_table(_results()["systems"], "embeddings")
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "c=1 embeddings/s" in lines and "c=1 e2e p99 (ms)" in lines
    assert "c=1 output tok/s" not in lines and "c=1 TTFT p50 (s)" not in lines


def test_markdown_section_is_replaced_in_place(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    report.write_markdown_section(doc, "Overhead", _results())
    report.write_markdown_section(doc, "Overhead", _results())
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n") and text.count("## Overhead") == 1
    assert "`python -m x`" in text and "modelfleet / vllm-server" in text


def test_png_is_written(tmp_path: Path) -> None:
    out = tmp_path / "bench.png"
    report.write_png(_results(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vllm_bench_command_sends_our_request_shape(tmp_path: Path) -> None:
    plan = LoadPlan(levels=(("concurrency", 4.0), ("rate", 2.5)), level_requests=(8, 12), max_tokens=16, warmup=1)
    args = dict(tokenizer=tmp_path / "model", dataset=tmp_path / "p.jsonl", out=tmp_path / "out.json")
    cmd = vllm_bench_command("http://127.0.0.1:9/v1", "smollm2", plan, ("concurrency", 4.0), **args)
    assert cmd[:2] == [sys.executable, "-c"] and cmd[3] == str(tmp_path / "out.json")
    text = " ".join(cmd[3:])
    for part in (
        "--backend openai-chat",
        "--base-url http://127.0.0.1:9 ",
        "--endpoint /v1/chat/completions",
        "--model smollm2",
        f"--tokenizer {tmp_path / 'model'}",
        "--dataset-name custom",
        "--skip-chat-template",
        "--custom-output-len 16",
        "--num-prompts 8",
        "--num-warmups 1",
        "--max-concurrency 4 --request-rate inf",
        "--ignore-eos",
    ):
        assert part in text, part
    rate = vllm_bench_command("http://127.0.0.1:9", "m", plan, ("rate", 2.5), **args)
    assert "--request-rate 2.5" in " ".join(rate) and "--max-concurrency" not in rate and "12" in rate
    completions = LoadPlan(mode="completions", ignore_eos=False)
    cmd = vllm_bench_command("http://127.0.0.1:9", "m", completions, ("concurrency", 1.0), **args)
    assert "openai" in cmd and "/v1/completions" in cmd and "--ignore-eos" not in cmd


def test_vllm_bench_rows_stand_beside_ours() -> None:
    results = _results()
    results["systems"][1]["info"]["vllm_bench"] = {"c=1": {"output_throughput": 78.0, "median_ttft_ms": 310.0}}
    table = report.markdown_table(results["systems"])
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "| - | 78.0 |" in lines["c=1 output tok/s (vllm bench serve)"]
    assert "| - | 0.310 |" in lines["c=1 TTFT p50 (s) (vllm bench serve)"]
    assert "vllm bench serve" not in report.markdown_table(_results()["systems"])


def test_markdown_records_ignore_eos_and_its_check(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    report.write_markdown_section(doc, "Overhead", {**_results(), "token_check": []})
    assert "ignore_eos on for every system (every completed request returned exactly max_tokens" in doc.read_text()
    results = {**_results(), "token_check": ["modelfleet c=1: 2 x 63 tokens instead of 64"]}
    report.write_markdown_section(doc, "Overhead", results)
    assert "NOT every request returned max_tokens: modelfleet c=1: 2 x 63" in doc.read_text()
    results = _results()
    results["plan"]["ignore_eos"] = False
    report.write_markdown_section(doc, "Overhead", results)
    assert "ignore_eos off" in doc.read_text() and doc.read_text().count("## Overhead") == 1


def test_token_check_reads_both_clients() -> None:
    rows = [asdict(Sample(start=0.0, output_tokens=n)) for n in (16, 15)]
    crosscheck = {"c=1": {"output_lens_min_max": [14, 16]}, "c=2": {"output_lens_min_max": [16, 16]}}
    systems = [{"name": "modelfleet", "levels": {"c=1": {"samples": rows}}, "info": {"vllm_bench": crosscheck}}]
    assert check_tokens(systems, LoadPlan(max_tokens=16)) == [
        "modelfleet c=1: 1 x 15 tokens instead of 16",
        "modelfleet c=1 (vllm bench serve): 14-16 tokens, not 16",
    ]
    assert check_tokens(systems, LoadPlan(max_tokens=16, ignore_eos=False)) == []


def test_markdown_names_the_ingress_of_the_cluster_it_started(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    report.write_markdown_section(doc, "Overhead", _results())  # --url: no cluster of ours, no line
    assert "ingress" not in doc.read_text()
    results = _results()
    results["systems"][1]["info"] = {"config": {"router": {"ingress": "haproxy"}}}
    report.write_markdown_section(doc, "Overhead", results)
    assert "- modelfleet's ingress: Serve's HAProxy (router.ingress: haproxy)" in doc.read_text()
    results["systems"][1]["info"] = {"config": {"router": {"ingress": "python"}}}
    report.write_markdown_section(doc, "Overhead", results)
    assert "- modelfleet's ingress: Serve's Python proxy" in doc.read_text()
