"""The bench's statistics, load plan and SSE reading, on synthetic samples and recorded vLLM streams."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import pytest

from cluster.bench.load import LoadPlan, Mode, arrival_times
from cluster.bench.sse import StreamReader, sse_data
from cluster.bench.stats import Sample, percentile, summarize, token_mismatches

# Recorded from vLLM 0.32's OpenAI server (SmolLM2, max_tokens 4, include_usage); one comment line added.
RECORDED_CHAT = r"""data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":"The"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

: keep-alive comment

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" capital"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" of"},"logprobs":null,"finish_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[{"index":0,"delta":{"content":" France"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}

data: {"id":"chatcmpl-be48d8018a715bd5","object":"chat.completion.chunk","created":1795415166,"model":"smollm2","choices":[],"usage":{"prompt_tokens":37,"total_tokens":41,"completion_tokens":4},"system_fingerprint":"vllm-0.32.0-1f07c554"}

data: [DONE]

"""  # noqa: E501

RECORDED_COMPLETION = r"""data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":" Paris","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":".","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":"\n","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[{"index":0,"text":"\n","logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]}

data: {"id":"cmpl-93660bb028140aae","object":"text_completion","created":1795415167,"model":"smollm2","choices":[],"usage":{"prompt_tokens":5,"total_tokens":9,"completion_tokens":4},"system_fingerprint":"vllm-0.32.0-1f07c554"}

data: [DONE]

"""  # noqa: E501

# -- statistics -------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 2.0, 3.0], 0) == 1.0 and percentile([4.0, 1.0, 2.0, 3.0], 100) == 4.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_synthetic_samples() -> None:
    samples = [Sample(start=float(i), e2e=2.0, ttft=0.5, output_tokens=11) for i in range(4)]
    samples.append(Sample(start=1.0, e2e=0.1, error="500"))
    samples.append(Sample(start=2.0, e2e=7.0, error="timeout"))
    s = summarize(samples)
    assert s["requests"] == 6 and s["completed"] == 4
    assert s["errors"] == {"500": 1, "timeout": 1}
    assert s["wall_s"] == pytest.approx(9.0)  # first send at 0, last end at 2 + 7
    assert s["requests_per_s"] == pytest.approx(4 / 9)
    assert s["output_tokens"] == 44 and s["output_tokens_per_s"] == pytest.approx(44 / 9)
    assert s["mean_output_tokens"] == 11
    assert s["ttft_s"]["p50"] == 0.5 and s["e2e_s"]["p99"] == 2.0
    assert s["tpot_s"]["p50"] == pytest.approx((2.0 - 0.5) / 10)


def test_summarize_edge_cases() -> None:
    assert summarize([])["requests_per_s"] == 0.0
    only_errors = summarize([Sample(start=0.0, e2e=1.0, error="503")])
    assert only_errors["ttft_s"] is None and only_errors["errors"] == {"503": 1}
    assert Sample(start=0, e2e=1.0, ttft=0.2, output_tokens=1).tpot is None


def test_poisson_arrivals_are_seeded() -> None:
    first, again, other = arrival_times(4.0, 7), arrival_times(4.0, 7), arrival_times(4.0, 8)
    a = [first() for _ in range(2000)]
    assert a == [again() for _ in range(2000)] and a != [other() for _ in range(2000)]
    assert all(x < y for x, y in itertools.pairwise(a))
    assert a[-1] / len(a) == pytest.approx(1 / 4.0, rel=0.1)  # mean gap is 1/rate


# -- SSE ----------------------------------------------------------------------------------------------------


def _read(text: str, mode: Mode) -> StreamReader:
    reader = StreamReader(mode)
    for n, line in enumerate(text.splitlines()):
        data = sse_data(line)
        if data is not None:
            reader.feed(data, elapsed=float(n))
    return reader


def test_recorded_streams_are_read() -> None:
    chat = _read(RECORDED_CHAT, "chat")
    assert chat.done and chat.error is None
    assert chat.ttft == 2.0  # line 2: the role chunk's empty content is not the first token
    assert chat.chunks == 4 and chat.output_tokens == 4
    completion = _read(RECORDED_COMPLETION, "completions")
    assert completion.done and completion.ttft == 0.0 and completion.chunks == 4 and completion.output_tokens == 4
    no_usage = _read(RECORDED_CHAT.replace('"completion_tokens":4', '"completion_tokens":9'), "chat")
    assert no_usage.output_tokens == 9  # the usage chunk wins over counting content chunks


def test_stream_reader_without_usage_and_with_errors() -> None:
    reader = StreamReader("completions")
    reader.feed(json.dumps({"choices": [{"index": 0, "text": "a"}]}), 0.1)
    reader.feed(json.dumps({"choices": [{"index": 0, "text": ""}]}), 0.2)
    reader.feed(json.dumps({"choices": [{"index": 0, "text": "b"}]}), 0.3)
    assert reader.ttft == 0.1 and reader.output_tokens == 2
    reader.feed(json.dumps({"error": {"message": "x", "type": "internal_error"}}), 0.4)
    assert reader.error == "stream:internal_error"
    assert sse_data("event: ping") is None and sse_data("data:[DONE]") == "[DONE]"
    with pytest.raises(ValueError):
        StreamReader("chat").feed("not json", 0.0)


def test_plan_round_trips_for_the_in_process_child() -> None:
    plan = LoadPlan(levels=(("concurrency", 1.0), ("rate", 2.5)), prompts=("a", "b"), max_tokens=8)
    again = LoadPlan.from_dict(json.loads(json.dumps(asdict(plan))))
    assert again == plan
    assert plan.load_kwargs(("concurrency", 4.0))["concurrency"] == 4
    assert plan.load_kwargs(("rate", 2.5))["rate"] == 2.5
    per_level = LoadPlan(levels=(("concurrency", 1.0), ("concurrency", 32.0)), level_requests=(16, 96))
    assert LoadPlan.from_dict(json.loads(json.dumps(asdict(per_level)))) == per_level
    assert [per_level.load_kwargs(level)["num_requests"] for level in per_level.levels] == [16, 96]


def test_exact_tokens_only_for_generation_with_ignore_eos() -> None:
    assert LoadPlan(max_tokens=16).exact_tokens == 16
    assert LoadPlan(max_tokens=16, ignore_eos=False).exact_tokens is None
    assert LoadPlan(max_tokens=16, mode="embeddings").exact_tokens is None


def test_token_mismatches_count_completed_requests_off_the_mark() -> None:
    rows = [asdict(Sample(start=0.0, output_tokens=n)) for n in (16, 16, 15, 3, 15)]
    rows.append(asdict(Sample(start=0.0, output_tokens=0, error="500")))  # failed requests are not counted
    assert token_mismatches(rows, 16) == {3: 1, 15: 2}
    assert token_mismatches(rows[:2], 16) == {}
