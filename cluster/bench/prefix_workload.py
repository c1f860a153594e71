"""The shared-prefix workload of `modelfleet bench --routing-compare`, and its arithmetic: G groups of requests, each
group a distinct long document (its shared prefix) followed by a short question of its own; the expected prefix-cache
hit rates of a routing policy; vLLM's hit rate measured from its counters; the ratios between policies.

Pure functions: no Ray, no HTTP. Token counts come from a `count_tokens` function (the model's tokenizer in a run).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "FIRST_WORDS",
    "PrefixWorkload",
    "SeriesValues",
    "build_workload",
    "counter_delta",
    "expected_hit_rate",
    "hit_rate",
    "kv_bytes_per_token",
    "ratio",
]

CountTokens = Callable[[str], int]
SeriesValues = Mapping[tuple[tuple[str, str], ...], float]  # one Prometheus series' labels -> its value

# Each group's document opens with its own word, so no two groups share even their first token.
FIRST_WORDS = (
    "Harbor", "Orchard", "Granite", "Lantern", "Meadow", "Copper", "Willow", "Falcon", "Quarry", "Saffron",
    "Glacier", "Tundra", "Beacon", "Cobalt", "Juniper", "Marble", "Nectar", "Pebble", "Raven", "Summit",
    "Thistle", "Velvet", "Walnut", "Zephyr", "Amber", "Bramble", "Cedar", "Dune", "Ember", "Fjord",
    "Garnet", "Heron", "Indigo", "Jasper", "Kestrel", "Lagoon", "Maple", "Nimbus", "Opal", "Prairie",
    "Quartz", "Ridge", "Sparrow", "Timber", "Umber", "Valley", "Wharf", "Yarrow", "Acorn", "Basalt",
    "Canyon", "Delta", "Estuary", "Fern", "Grove", "Hollow", "Island", "Jetty", "Kiln", "Loch",
    "Mesa", "Nook", "Oasis", "Pine",
)  # fmt: skip
_SUBJECTS = (
    "the harbor master", "a young engineer", "the village council", "an old ferryman", "the night clerk",
    "a traveling botanist", "the lighthouse keeper", "the mill owner", "a retired surveyor", "the schoolteacher",
    "the river pilot", "a visiting cartographer", "the blacksmith's daughter", "the station agent",
)  # fmt: skip
_VERBS = (
    "recorded", "questioned", "repaired", "measured", "described", "argued about", "mapped", "inspected",
    "collected", "photographed", "rebuilt", "catalogued", "defended", "traded",
)  # fmt: skip
_OBJECTS = (
    "the northern seawall", "a ledger of tides", "the copper bell", "three broken lanterns", "the grain prices",
    "the old stone bridge", "a crate of letters", "the winter storms", "the eastern road", "a pair of compasses",
    "the drowned orchard", "the fishing permits", "the clock tower", "a shipment of salt",
)  # fmt: skip
_CLAUSES = (
    "before the first frost arrived", "while the tide was turning", "after the market closed",
    "during the long drought",
    "because the council had asked twice", "although nobody believed the rumor", "as the fog rolled in from the bay",
    "when the last train had left", "so that the children could cross safely", "until the lamps were lit again",
)  # fmt: skip
_QUESTIONS = (
    "Who is mentioned first?", "What was repaired?", "Which season is described?", "Summarize the first line.",
    "Name one place in the text.", "What did the council ask?", "Which object appears most often?",
    "Give the document a title.",
)  # fmt: skip


@dataclass(frozen=True)
class PrefixWorkload:
    """The requests of one run, in the order they are sent, and what each one shares."""

    prompts: tuple[str, ...]
    groups: tuple[int, ...]  # the group of each prompt
    prefix_tokens: tuple[int, ...]  # the token count of each group's shared prefix
    prompt_tokens: tuple[int, ...]  # the token count of each prompt

    @property
    def num_groups(self) -> int:
        return len(self.prefix_tokens)


def _document(group: int, target_tokens: int, count_tokens: CountTokens, seed: int) -> str:
    """Group `group`'s shared prefix: sentences of real-ish text until `target_tokens` tokens (the first count at
    or above it), opening with the group's own first word."""
    rng = random.Random(f"{seed}:{group}")
    text = f"{FIRST_WORDS[group]} archive, record {group + 1}."
    tokens = count_tokens(text)
    while True:
        # Counted a sentence at a time (each opens with a space, so the counts add up), then checked whole.
        while tokens < target_tokens:
            sentence = (
                f" {rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                f"{rng.choice(_CLAUSES)}, and {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
            )
            text += sentence
            tokens += count_tokens(sentence)
        tokens = count_tokens(text)
        if tokens >= target_tokens:
            return text


def build_workload(
    groups: int, repeats: int, prefix_tokens: int, count_tokens: CountTokens, *, seed: int = 0
) -> PrefixWorkload:
    """`groups` x `repeats` prompts: group g's document (about `prefix_tokens` tokens, distinct from its first
    token on) followed by a question unique to the request. Sent in `repeats` rounds; each round holds every group
    once, in a seeded order of its own, so a group's requests arrive interleaved with the other groups'.

    Raises:
        ValueError: fewer than 1 group or repeat, more groups than `FIRST_WORDS`, or `prefix_tokens` < 16.
    """
    if not 1 <= groups <= len(FIRST_WORDS):
        raise ValueError(f"groups must be 1-{len(FIRST_WORDS)}, got {groups}")
    if repeats < 1 or prefix_tokens < 16:
        raise ValueError("repeats must be >= 1 and prefix_tokens >= 16")
    documents = [_document(g, prefix_tokens, count_tokens, seed) for g in range(groups)]
    rng = random.Random(seed)
    prompts: list[str] = []
    order: list[int] = []
    for round_ in range(repeats):
        members = list(range(groups))
        rng.shuffle(members)
        for g in members:
            question = _QUESTIONS[(g + round_) % len(_QUESTIONS)]
            prompts.append(f"{documents[g]}\n\nRequest {round_ + 1} about record {g + 1}: {question}\nAnswer:")
            order.append(g)
    return PrefixWorkload(
        prompts=tuple(prompts),
        groups=tuple(order),
        prefix_tokens=tuple(count_tokens(d) for d in documents),
        prompt_tokens=tuple(count_tokens(p) for p in prompts),
    )


def expected_hit_rate(workload: PrefixWorkload, replicas: int, policy: str, block_tokens: int = 1) -> float:
    """The prefix-cache hit rate (tokens hit / prompt tokens queried) the workload should give when every cache
    holds what it is sent and a group's shared prefix is the only text requests share.

    'prefix' sends a group's requests to one replica: every request after a group's first hits its prefix.
    'pow2' places each request on a replica independently (uniformly, as its two random picks are under an even
    load): of a group's K requests, the first on each replica misses, and K picks over R replicas land on
    R * (1 - (1 - 1/R)^K) distinct replicas on average. A hit covers the prefix's whole blocks (`block_tokens`).

    Raises:
        ValueError: an unknown policy, or replicas < 1.
    """
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    queried = sum(workload.prompt_tokens)
    if not queried:
        return 0.0
    hit_tokens = 0.0
    for g, prefix in enumerate(workload.prefix_tokens):
        k = workload.groups.count(g)
        misses: float
        if policy == "prefix":
            misses = min(k, 1)
        elif policy == "pow2":
            misses = replicas * (1 - (1 - 1 / replicas) ** k)
        else:
            raise ValueError(f"no expected hit rate for policy '{policy}'")
        hit_tokens += (k - misses) * (prefix // block_tokens * block_tokens)
    return hit_tokens / queried


def counter_delta(before: SeriesValues, after: SeriesValues) -> float:
    """How much a counter grew between two readings, summed over its series (one per replica process).

    A series first seen in `after` counts from 0 (a replica started in between); one gone from `after` (a replica
    stopped in between) counts nothing. A series that went down (its process restarted) counts from 0.
    """
    total = 0.0
    for labels, value in after.items():
        start = before.get(labels, 0.0)
        total += value - start if value >= start else value
    return total


def hit_rate(hits: float, queries: float) -> float | None:
    """hits / queries, or None when nothing was queried."""
    return hits / queries if queries > 0 else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def kv_bytes_per_token(config: Mapping[str, object], dtype_bytes: int) -> int:
    """KV-cache bytes one token takes in one replica: keys and values of every layer (a HF `config.json`)."""
    layers = int(str(config["num_hidden_layers"]))
    heads = int(str(config.get("num_key_value_heads") or config["num_attention_heads"]))
    head_dim = int(
        str(config.get("head_dim") or int(str(config["hidden_size"])) // int(str(config["num_attention_heads"])))
    )
    return 2 * layers * heads * head_dim * dtype_bytes
