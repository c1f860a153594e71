"""The node kinds' decisions, as pure functions: split, switch, sequence templates, ensemble merges, retrieval."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from deployments.engines.protocol import ChatMessage, Classification, GenerateRequest
from deployments.errors import InvalidRequestError
from deployments.pipelines import nodes
from deployments.pipelines.documents import load_passages
from deployments.pipelines.retrieval import PassageIndex
from deployments.pipelines.spec import PipelineSpec


def test_split_is_sticky_and_follows_the_weights() -> None:
    targets = [("stable", 80.0), ("canary", 20.0)]
    picks = {f"user-{i}": nodes.split_choice(targets, f"user-{i}") for i in range(20_000)}
    share = Counter(picks.values())["stable"] / len(picks)
    assert 0.79 <= share <= 0.81
    assert all(nodes.split_choice(targets, user) == target for user, target in list(picks.items())[:500])


def test_split_weight_change_moves_only_the_users_that_must_move() -> None:
    before = {u: nodes.split_choice([("a", 80.0), ("b", 20.0)], u) for u in map(str, range(5000))}
    after = {u: nodes.split_choice([("a", 50.0), ("b", 50.0)], u) for u in map(str, range(5000))}
    moved = [u for u in before if before[u] != after[u]]
    assert all(before[u] == "a" and after[u] == "b" for u in moved)  # nobody moves from b to a
    assert 0.25 <= len(moved) / len(before) <= 0.35


def test_split_without_a_key_draws_by_weight() -> None:
    rng = random.Random(7)
    draws = Counter(nodes.split_choice([("a", 3.0), ("b", 1.0)], None, rng) for _ in range(4000))
    assert 0.72 <= draws["a"] / 4000 <= 0.78


def _switch() -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "id": "s",
            "kind": "switch",
            "rules": [
                {"header": "x-tier", "equals": "gold", "model": "big"},
                {"metadata": "lang", "regex": "^de", "model": "german"},
                {"regex": "(?i)\\bcode\\b", "model": "coder"},
                {"max_prompt_tokens": 4, "model": "small"},
            ],
            "default": "big",
        }
    )


@pytest.mark.parametrize(
    ("prompt", "headers", "metadata", "target"),
    [
        ("hi", {"x-tier": "gold"}, {}, "big"),
        ("hi", {"x-tier": "silver"}, {"lang": "de-CH"}, "german"),
        ("write CODE for me please, a long request", {}, {}, "coder"),
        ("short", {}, {}, "small"),  # 5 characters: 2 tokens
        ("a prompt well above sixteen characters", {}, {}, "big"),
    ],
)
def test_switch_first_matching_rule_wins(
    prompt: str, headers: dict[str, str], metadata: dict[str, str], target: str
) -> None:
    assert nodes.switch_choice(_switch(), prompt, headers, metadata) == target


def test_switch_on_a_classifier_label() -> None:
    spec = PipelineSpec.model_validate(
        {
            "id": "s",
            "kind": "switch",
            "classifier": "clf",
            "rules": [{"label": "negative", "model": "careful"}, {"max_prompt_tokens": 2, "model": "small"}],
            "default": "big",
        }
    )
    assert (
        nodes.switch_choice(spec, "a long prompt, much longer than eight characters", {}, {}, "negative") == "careful"
    )
    assert nodes.switch_choice(spec, "a long prompt, much longer than eight characters", {}, {}, "positive") == "big"
    assert nodes.switch_choice(spec, "hey", {}, {}, "positive") == "small"
    assert nodes.render("[{label}] {question}", "q", [], "neutral") == "[neutral] q"


def test_token_estimate_is_characters_over_four() -> None:
    assert [nodes.estimate_tokens(t) for t in ("", "abcd", "abcde")] == [0, 1, 2]


def test_sequence_question_and_template() -> None:
    chat = GenerateRequest(
        request_id="r",
        messages=(
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="first"),
            ChatMessage(role="assistant", content="ok"),
            ChatMessage(role="user", content="what is X?"),
        ),
    )
    assert nodes.question_of(chat) == "what is X?"
    prompt = nodes.render("Facts:\n{passages}\nQ: {question} {{literal}}", "what is X?", ["p1 {x}", "p2"])
    assert prompt == "Facts:\np1 {x}\n\np2\nQ: what is X? {literal}"
    filled = nodes.with_question(chat, prompt)
    assert [m.content for m in filled.messages or ()] == ["be brief", "first", "ok", prompt]
    text = GenerateRequest(request_id="r", prompt="why?")
    assert nodes.with_question(text, "filled").prompt == "filled"
    with pytest.raises(InvalidRequestError) as info:
        nodes.question_of(GenerateRequest(request_id="r", messages=(ChatMessage(role="system", content="x"),)))
    assert info.value.param == "messages"
    with pytest.raises(InvalidRequestError):
        nodes.question_of(GenerateRequest(request_id="r", prompt_token_ids=(1, 2)))


def test_ensemble_merges() -> None:
    a = [(1.0, 0.0), (0.0, 1.0)]
    b = [(3.0, 2.0), (2.0, 3.0)]
    assert nodes.merge_embeddings([a, b], "concatenate", ["a", "b"]) == ((1.0, 0.0, 3.0, 2.0), (0.0, 1.0, 2.0, 3.0))
    assert nodes.merge_embeddings([a, b], "average", ["a", "b"]) == ((2.0, 1.0), (1.0, 2.0))
    with pytest.raises(InvalidRequestError) as info:
        nodes.merge_embeddings([a, [(1.0,), (2.0,)]], "average", ["a", "c"])
    assert "a: 2, c: 1" in info.value.message


def test_passages_and_nearest(tmp_path: Path) -> None:
    (tmp_path / "b.md").write_text("# Title\n\nSecond file,\nfirst paragraph.\n\n\nlast one\n")
    (tmp_path / "a.txt").write_text("alpha paragraph\n\nbeta paragraph\n")
    (tmp_path / "skip.json").write_text("{}")
    passages = load_passages(tmp_path, 10)
    assert passages == ["alpha paragraph", "beta paragraph", "Second file, first paragraph.", "last one"]
    index = PassageIndex(passages, [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0)])
    assert index.nearest((0.9, 0.1, 0.0), 2) == ["alpha paragraph", "last one"]
    assert index.nearest((0, 0, 5), 1) == ["Second file, first paragraph."]


def _cls(label: str | None, *probs: float) -> Classification:
    return Classification(probs=probs, label=label)


def test_vote_takes_the_majority_label_per_input() -> None:
    a = [_cls("pos", 0.1, 0.9), _cls("neg", 0.6, 0.4)]
    b = [_cls("pos", 0.3, 0.7), _cls("pos", 0.45, 0.55)]
    c = [_cls("neg", 0.8, 0.2), _cls("neg", 0.7, 0.3)]
    merged, votes = nodes.merge_classifications([a, b, c], "vote", ["a", "b", "c"])
    assert [m.label for m in merged] == ["pos", "neg"]
    assert votes == ({"pos": 2, "neg": 1}, {"neg": 2, "pos": 1})
    # The probabilities are those of the first model that voted for the winner.
    assert merged[0] is a[0] and merged[1] is a[1]


def test_vote_breaks_ties_by_summed_probability_then_by_target_order() -> None:
    # Label sets differ (3 classes and 2): labels are compared by name.
    a = [_cls("neutral", 0.2, 0.5, 0.3), _cls("x", 0.6, 0.4)]
    b = [_cls("positive", 0.1, 0.2, 0.7), _cls("y", 0.4, 0.6)]
    merged, votes = nodes.merge_classifications([a, b], "vote", ["a", "b"])
    assert votes[0] == {"neutral": 1, "positive": 1}
    assert merged[0].label == "positive"  # 0.7 > 0.5
    assert merged[1].label == "x"  # 0.6 each: the earlier target's label
    # A model without label names votes with its class index.
    merged, votes = nodes.merge_classifications([[_cls(None, 0.2, 0.8)], [_cls("1", 0.4, 0.6)]], "vote", ["a", "b"])
    assert votes == ({"1": 2},) and merged[0].probs == (0.2, 0.8)


def test_average_of_probabilities_and_its_label() -> None:
    a = [_cls("neg", 0.6, 0.4)]
    b = [_cls("pos", 0.2, 0.8)]
    merged, _ = nodes.merge_classifications([a, b], "average", ["a", "b"])
    assert merged[0].probs == pytest.approx((0.4, 0.6)) and merged[0].label == "pos"
    # The mean's best class may be no model's own best: the load-time labels name it, else it is unnamed.
    a, b = [_cls("x", 0.5, 0.45, 0.05)], [_cls("z", 0.05, 0.45, 0.5)]
    merged, _ = nodes.merge_classifications([a, b], "average", ["a", "b"], ["x", "y", "z"])
    assert merged[0].label == "y"
    assert nodes.merge_classifications([a, b], "average", ["a", "b"])[0][0].label is None
    with pytest.raises(InvalidRequestError) as info:
        nodes.merge_classifications([a, [_cls("p", 0.5, 0.5)]], "average", ["a", "c"])
    assert "a: 3, c: 2" in info.value.message and "must be 'vote'" in info.value.message
