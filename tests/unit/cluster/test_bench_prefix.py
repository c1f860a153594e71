"""`modelfleet bench --routing-compare`: the shared-prefix workload, the hit-rate and ratio arithmetic, the config each
policy is deployed with, the options, and the report, without a cluster."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cluster.bench.load import LoadResult
from cluster.bench.options import parse_options
from cluster.bench.prefix import RoutingCompare, routing_config
from cluster.bench.prefix_report import ROUTING_TITLE, routing_table, write_routing_section
from cluster.bench.prefix_workload import (
    FIRST_WORDS,
    PrefixWorkload,
    build_workload,
    counter_delta,
    expected_hit_rate,
    hit_rate,
    kv_bytes_per_token,
    ratio,
)
from cluster.bench.stats import Sample
from cluster.bench.systems.process import BenchError
from deployments.config import ServingConfig, load_config
from deployments.plan import compile_plan


def _words(text: str) -> int:
    return len(text.split())


# -- the workload ---------------------------------------------------------------------------------------------------


def test_each_group_is_sent_once_per_round_and_every_prompt_is_its_own() -> None:
    work = build_workload(6, 3, 120, _words, seed=1)
    assert len(work.prompts) == 18 and len(set(work.prompts)) == 18
    assert Counter(work.groups) == {g: 3 for g in range(6)}
    for round_ in range(3):  # each round holds every group once: a group's requests are interleaved with others'
        assert sorted(work.groups[round_ * 6 : (round_ + 1) * 6]) == list(range(6))
    assert work.groups[:6] != work.groups[6:12]  # each round in an order of its own


def test_a_group_shares_its_document_and_no_two_groups_share_a_first_word() -> None:
    work = build_workload(5, 2, 200, _words)
    documents = {}
    for prompt, group in zip(work.prompts, work.groups, strict=True):
        document = prompt.split("\n\n")[0]
        assert documents.setdefault(group, document) == document
    assert len({d.split()[0] for d in documents.values()}) == 5
    assert [documents[g].split()[0] for g in range(5)] == list(FIRST_WORDS[:5])
    for g, tokens in enumerate(work.prefix_tokens):
        # the first count at or above the target: at most one sentence (under 40 words) over it
        assert tokens == _words(documents[g]) and 200 <= tokens < 240
    assert all(p > work.prefix_tokens[g] for p, g in zip(work.prompt_tokens, work.groups, strict=True))


def test_the_workload_is_the_same_for_the_same_seed_only() -> None:
    assert build_workload(3, 2, 64, _words, seed=7) == build_workload(3, 2, 64, _words, seed=7)
    assert build_workload(3, 2, 64, _words, seed=7).prompts != build_workload(3, 2, 64, _words, seed=8).prompts


@pytest.mark.parametrize(("groups", "repeats", "tokens"), [(0, 4, 100), (len(FIRST_WORDS) + 1, 4, 100), (2, 0, 100)])
def test_bad_workload_shapes_are_refused(groups: int, repeats: int, tokens: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        build_workload(groups, repeats, tokens, _words)


def test_smollm2_prefixes_hold_1500_tokens_by_its_own_tokenizer() -> None:
    from transformers import AutoTokenizer

    from models.registry import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source("smollm2-135m-instruct")))

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    work = build_workload(24, 1, 1500, count)
    assert all(1500 <= t <= 1560 for t in work.prefix_tokens), work.prefix_tokens
    assert max(work.prompt_tokens) + 16 <= 2048  # fits SmolLM2's context with the answer
    first_tokens = {tokenizer(p, add_special_tokens=False)["input_ids"][0] for p in work.prompts}
    assert len(first_tokens) == 24  # distinct from the first token on


# -- the arithmetic -------------------------------------------------------------------------------------------------


def _even_workload(groups: int, repeats: int, prefix: int, prompt: int) -> PrefixWorkload:
    order = tuple(g for _ in range(repeats) for g in range(groups))
    return PrefixWorkload(("x",) * len(order), order, (prefix,) * groups, (prompt,) * len(order))


def test_expected_hit_rates_of_each_policy() -> None:
    work = _even_workload(24, 4, 1500, 1530)
    # prefix: 3 of each group's 4 requests hit their 1500 tokens, of 4 x 1530 queried
    assert expected_hit_rate(work, 2, "prefix") == pytest.approx(3 * 1500 / (4 * 1530))
    # pow2 over 2 replicas: 4 picks reach 2 * (1 - 1/16) = 1.875 replicas, each missing once
    assert expected_hit_rate(work, 2, "pow2") == pytest.approx((4 - 1.875) * 1500 / (4 * 1530))
    # one replica: the policies agree; whole blocks only
    assert expected_hit_rate(work, 1, "pow2") == pytest.approx(expected_hit_rate(work, 1, "prefix"))
    assert expected_hit_rate(work, 2, "prefix", block_tokens=128) == pytest.approx(3 * 1408 / (4 * 1530))
    with pytest.raises(ValueError, match="session"):
        expected_hit_rate(work, 2, "session")


def test_counter_deltas_sum_the_replicas_that_ran_in_the_window() -> None:
    a, b, c = (("replica", "a"),), (("replica", "b"),), (("replica", "c"),)
    before = {a: 100.0, b: 50.0, c: 30.0}
    after = {a: 160.0, b: 20.0, (("replica", "d"),): 40.0}  # b restarted (counts from 0), c gone, d new
    assert counter_delta(before, after) == 60 + 20 + 40
    assert counter_delta({}, {}) == 0.0


def test_hit_rate_and_ratios() -> None:
    assert hit_rate(30, 40) == 0.75 and hit_rate(0, 0) is None
    assert ratio(0.5, 0.25) == 2.0 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, None) is None


def test_kv_bytes_per_token_of_smollm2() -> None:
    config = {"num_hidden_layers": 30, "num_key_value_heads": 3, "num_attention_heads": 9, "hidden_size": 576}
    assert kv_bytes_per_token(config, 4) == 2 * 30 * 3 * 64 * 4 == 46080


# -- the config each policy runs ------------------------------------------------------------------------------------

_COMPARE = RoutingCompare(("prefix", "pow2"), replicas=2, groups=24, repeats=4, prefix_tokens=1500, kv_cache_gb=2.0)


def test_each_policy_deploys_fixed_replicas_with_prefix_caching() -> None:
    config = load_config("deployments/configs/default.yaml")
    for policy, router in (("prefix", "deployments.routing.prefix.PrefixRouter"), ("pow2", None)):
        target = routing_config(config, "smollm2", policy, _COMPARE)
        (spec,) = target.models
        assert (spec.scaling.min_replicas, spec.scaling.max_replicas) == (2, 2) and spec.routing.policy == policy
        model = compile_plan(target, engine_cpus="0").models[0]
        assert model.engine.kwargs["enable_prefix_caching"] is True
        assert model.engine.kwargs["kv_cache_memory_bytes"] == 2 << 30
        options = model.serve_options
        assert (options.get("request_router_config") or {}).get("request_router_class") == router


def test_configs_unfit_for_the_comparison_are_refused() -> None:
    config = load_config("deployments/configs/default.yaml")
    with pytest.raises(BenchError, match="not on vllm"):
        routing_config(config, "minilm", "prefix", _COMPARE)
    with pytest.raises(BenchError, match="not in the config"):
        routing_config(config, "nope", "prefix", _COMPARE)
    assert isinstance(routing_config(config, "smollm2", "pow2", _COMPARE), ServingConfig)


# -- the options -----------------------------------------------------------------------------------------------------

_BASE = ["--start-modelfleet", "deployments/configs/default.yaml", "--model", "smollm2"]


def test_routing_options_parse() -> None:
    options = parse_options([*_BASE, "--routing-compare", "prefix,pow2", "--concurrency", "4", "--replicas", "3"])
    assert options.routing_compare == ("prefix", "pow2") and options.replicas == 3 and options.prefix_tokens == 1500
    assert options.load_plan().levels == (("concurrency", 4.0),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--routing-compare", "prefix,session"], "--routing-compare"),
        (["--routing-compare", "prefix,prefix"], "each policy once"),
        (["--routing-compare", "prefix,pow2", "--concurrency", "1,4"], "one level"),
        (["--routing-compare", "prefix,pow2", "--num-requests", "8"], "drop --num-requests"),
        (["--routing-compare", "prefix,pow2", "--compare", "vllm-server"], "drop --compare"),
        (["--routing-compare", "prefix,pow2", "--mode", "embeddings"], "embeddings"),
        (["--prefix-groups", "8"], "--prefix-groups apply to --routing-compare only"),
        (["--routing-compare", "prefix,pow2", "--prefix-groups", "65"], "--prefix-groups"),
    ],
)
def test_bad_routing_command_lines_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_options([*_BASE, *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_routing_compare_needs_a_cluster_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_options(["--url", "http://127.0.0.1:9", "--model", "m", "--routing-compare", "prefix,pow2"])
    assert "needs --start-modelfleet" in capsys.readouterr().err


# -- the report ------------------------------------------------------------------------------------------------------


def _system(name: str, ttft: float, hits: float, queries: float) -> dict[str, Any]:
    samples = [Sample(start=i * 0.1, e2e=ttft + 1.0, ttft=ttft, output_tokens=16) for i in range(4)]
    level = LoadResult("c=4", samples)
    from cluster.bench.stats import summarize

    level.summary = summarize(samples)
    return {
        "name": name,
        "time_to_ready_s": 30.0,
        "idle_memory": None,
        "levels": {"c=4": level.to_dict()},
        "info": {
            "prefix_cache": {
                "hits": hits,
                "queries": queries,
                "hit_rate": hit_rate(hits, queries),
                "expected_hit_rate": 0.7,
                "replicas_counted": 2,
            },
            "load_average": {"start": 1.0, "mean": 2.0, "max": 3.0},
        },
    }


def test_the_table_gives_each_policy_and_prefix_over_pow2() -> None:
    table = routing_table([_system("prefix", 0.2, 720, 1000), _system("pow2", 0.5, 500, 1000)])
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert table.splitlines()[0] == "| metric | prefix | pow2 | prefix / pow2 |"
    assert lines["TTFT p50 (s)"] == "| TTFT p50 (s) | 0.200 | 0.500 | 0.40x |"
    assert lines["prefix-cache hit rate (vLLM's counters)"].endswith("| 0.720 | 0.500 | 1.44x |")
    assert lines["completed / errors"] == "| completed / errors | 4 / 0 | 4 / 0 |  |"


def test_the_section_replaces_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# Benchmarks\n\n<!-- bench:other:start -->\n## Other\nkept\n<!-- bench:other:end -->\n")
    results = {
        "machine": {
            "cores": 2,
            "cpu": "x",
            "memory_gib": 23.5,
            "python": "3.11",
            "os": "Linux",
            "packages": {"vllm": "0"},
            "date": "today",
        },
        "plan": {"mode": "completions", "levels": [["concurrency", 4.0]], "max_tokens": 16, "warmup": 2},
        "spec": {"engine": "vllm", "source": "smollm2-135m-instruct", "context_length": 2048},
        "model": "smollm2",
        "command": "python -m cluster.bench --routing-compare prefix,pow2",
        "token_check": [],
        "uptime_before": "load average 1.0 1.0 1.0",
        "uptime_after": "load average 2.0 2.0 2.0",
        "workload": {
            "groups": 24,
            "repeats": 4,
            "replicas": 2,
            "prefix_tokens": [1500, 1522],
            "prompt_tokens": [1518, 1543],
            "kv_cache_gb": 2.0,
            "bytes_per_token": 46080,
            "tokens_per_replica": 46603,
            "distinct_prefix_tokens": 36200,
        },
        "systems": [_system("prefix", 0.2, 720, 1000), _system("pow2", 0.5, 500, 1000)],
    }
    for _ in range(2):  # written twice: replaced, not appended
        write_routing_section(path, ROUTING_TITLE, results)
    text = path.read_text()
    assert text.count(f"## {ROUTING_TITLE}") == 1 and "## Other\nkept" in text
    assert "46603 tokens" in text and "load average 2.0 2.0 2.0" in text and "| TTFT p50 (s) |" in text


def test_the_block_size_is_read_from_vllms_cache_config_metric() -> None:
    from cluster.bench.prefix import _BLOCK_SIZE

    line = (
        'ray_vllm_cache_config_info{Component="core_worker",_block_size_resolved="True",block_size="128",'
        'effective_attention_block_size="64",enable_prefix_caching="True"} 1.0'
    )
    match = _BLOCK_SIZE.search(f"# TYPE x gauge\n{line}\n")
    assert match is not None and match.group(1) == "128"


def test_ratios_are_to_pow2_whatever_the_order() -> None:
    table = routing_table([_system("pow2", 0.5, 500, 1000), _system("prefix", 0.2, 720, 1000)])
    assert table.splitlines()[0] == "| metric | pow2 | prefix | prefix / pow2 |"
    assert "| TTFT p50 (s) | 0.500 | 0.200 | 0.40x |" in table
