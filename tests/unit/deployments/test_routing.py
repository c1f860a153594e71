"""Cache-affine routing, the pure parts (no Ray): the bounded table, routing keys and the spec (the plan: test_plan)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.config import ServingConfig
from deployments.engines.protocol import ChatMessage, EmbedRequest, GenerateRequest
from deployments.plan import compile_plan
from deployments.routing.keys import (
    key_hash,
    prefix_keys,
    prompt_text,
    rendezvous_first,
    routed_request,
    session_key,
)
from deployments.routing.table import AffinityTable
from models.spec import ModelSpec


def _echo(**overrides: Any) -> ModelSpec:
    return ModelSpec(**{"id": "e", "task": "generate", "engine": "echo", **overrides})


# -- the table ------------------------------------------------------------------------------------------------


def test_table_forgets_the_least_recently_used_key() -> None:
    table: AffinityTable[str] = AffinityTable(3)
    for key, replica in ((1, "a"), (2, "b"), (3, "c")):
        table.put(key, replica)
    assert table.get(1) == "a"  # 1 is now the most recently used: 2 is the oldest
    table.put(4, "d")
    assert len(table) == 3 and 2 not in table
    assert [table.get(k) for k in (1, 3, 4)] == ["a", "c", "d"]
    table.put(3, "b")  # a key that moves keeps one entry
    table.put(5, "e")
    assert len(table) == 3 and 1 not in table and table.get(3) == "b"


def test_table_bound_holds_under_many_keys() -> None:
    table: AffinityTable[int] = AffinityTable(100)
    for key in range(10_000):
        table.put(key, key)
    assert len(table) == 100
    assert all(table.get(k) == k for k in range(9_900, 10_000)) and table.get(0) is None
    table.discard(9_999)
    table.discard(123)  # unknown: nothing happens
    assert len(table) == 99
    with pytest.raises(ValueError, match="max_size"):
        AffinityTable(0)


# -- keys -----------------------------------------------------------------------------------------------------


def test_session_key_comes_from_the_request_else_serve() -> None:
    keyed = GenerateRequest(request_id="r", prompt="hi", routing_key="s-1")
    other = GenerateRequest(request_id="r2", prompt="other text", routing_key="s-1")
    assert session_key(keyed) == session_key(other) == key_hash(b"s-1")
    assert session_key(GenerateRequest(request_id="r", prompt="hi"), "from-serve") == key_hash(b"from-serve")
    assert session_key(GenerateRequest(request_id="r", prompt="hi")) is None
    assert session_key(None) is None
    assert session_key(EmbedRequest(request_id="r", inputs=("x",), routing_key="u")) == key_hash(b"u")


def test_routed_request_is_found_among_the_call_args() -> None:
    request = GenerateRequest(request_id="r", prompt="hi")
    assert routed_request([request]) is request
    assert routed_request(["other", request]) is request
    assert routed_request([]) is None  # e.g. the readiness call


def test_prompt_text_of_prompts_and_chats() -> None:
    assert prompt_text(GenerateRequest(request_id="r", prompt="abc")) == "abc"
    chat = GenerateRequest(
        request_id="r",
        messages=(ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")),
    )
    longer = GenerateRequest(request_id="r", messages=(*(chat.messages or ()), ChatMessage(role="user", content="x")))
    assert prompt_text(chat) == "system\x1fbe brief\x1euser\x1fhi\x1e"
    text, more = prompt_text(chat), prompt_text(longer)
    assert text is not None and more is not None and more.startswith(text)  # a longer chat extends the prefix
    assert prompt_text(EmbedRequest(request_id="r", inputs=("x",))) is None
    assert prompt_text(None) is None


def test_prefix_keys_match_on_shared_whole_blocks() -> None:
    shared = "s" * 40  # 2.5 blocks of 16
    a = prefix_keys(shared + "tail one", 16, 1000)
    b = prefix_keys(shared + "another tail", 16, 1000)
    assert len(a) == 3 and len(b) == 3  # whole blocks only
    assert a[-2:] == b[-2:]  # the two whole blocks of the shared prefix give the same keys...
    assert a[0] != b[0]  # ...and the block where the texts differ does not
    # Longest prefix first; a key chains every block before it, so equal blocks at different places differ.
    assert prefix_keys("x" * 32, 16, 1000)[0] != prefix_keys("x" * 32, 16, 1000)[1]
    assert prefix_keys("short", 16, 1000) == []
    assert len(prefix_keys("y" * 10_000, 16, 64)) == 4  # only the first max_chars are hashed
    assert prefix_keys("z" * 64, 16, 1000) == prefix_keys("z" * 64, 16, 1000)  # stable across calls


def test_new_keys_spread_over_replicas_the_same_way_everywhere() -> None:
    names = ["r1", "r2", "r3"]
    placed = [rendezvous_first(key_hash(f"session-{i}".encode()), names) for i in range(300)]
    counts = [placed.count(i) for i in range(3)]
    assert all(c > 50 for c in counts), counts
    # The order of the replica list does not matter, only the names.
    again = [names[rendezvous_first(key_hash(f"session-{i}".encode()), names)] for i in range(300)]
    flipped = [names[::-1][rendezvous_first(key_hash(f"session-{i}".encode()), names[::-1])] for i in range(300)]
    assert again == flipped
    # Removing a replica moves only the keys that were on it.
    without = [["r1", "r3"][rendezvous_first(key_hash(f"session-{i}".encode()), ["r1", "r3"])] for i in range(300)]
    assert all(w == a for w, a in zip(without, again, strict=True) if a != "r2")
    with pytest.raises(ValueError, match="no replicas"):
        rendezvous_first(1, [])


# -- the spec -------------------------------------------------------------------------------------------------


def test_routing_defaults_to_serves_own_router() -> None:
    spec = _echo()
    assert spec.routing.policy == "pow2"
    assert "request_router_config" not in compile_plan(ServingConfig(models=(spec,))).models[0].serve_options


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"session_header": "x-user"}, "`session_header` applies to policy 'session', not 'pow2'"),
        ({"policy": "session", "prefix_block_chars": 64}, "set policy: prefix"),
        ({"table_size": 10}, "applies to policy 'session' or 'prefix'"),
        ({"policy": "session", "session_header": "x session"}, "must be a header name"),
        ({"policy": "prefix", "prefix_block_chars": 512, "prefix_max_chars": 256}, "raise prefix_max_chars"),
        ({"policy": "prefix", "prefix_block_chars": 8}, "greater than or equal to 16"),
        ({"policy": "round-robin"}, "'pow2', 'session' or 'prefix'"),
    ],
)
def test_bad_routing_is_refused_with_the_fix(routing: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        _echo(routing=routing)


def test_routing_must_fit_the_model() -> None:
    with pytest.raises(ValidationError, match="lower overload_queue_len or unset it"):
        _echo(routing={"policy": "session", "overload_queue_len": 9}, scaling={"max_ongoing_requests": 8})
    with pytest.raises(ValidationError, match="use policy 'pow2' or 'session' for embeddings"):
        _echo(task="embed", routing={"policy": "prefix"})
    assert _echo(task="embed", routing={"policy": "session"}).routing.policy == "session"


def test_session_header_is_case_insensitive() -> None:
    assert _echo(routing={"policy": "session", "session_header": "X-Conversation"}).routing.session_header == (
        "x-conversation"
    )
