"""The decisions of each node kind, as pure functions: split choice, switch rules, templates, ensemble merges."""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Mapping, Sequence

from deployments.engines.protocol import ChatMessage, Classification, GenerateRequest
from deployments.errors import InvalidRequestError
from deployments.pipelines.spec import PipelineSpec, SwitchRule

__all__ = [
    "estimate_tokens",
    "label_of",
    "merge_classifications",
    "merge_embeddings",
    "question_of",
    "render",
    "split_choice",
    "switch_choice",
    "with_question",
]

# Characters per token of the usual BPE tokenizers on English text: the switch's length rules estimate with it
# instead of calling a tokenizer (a replica round trip per request).
CHARS_PER_TOKEN = 4
_UNIT = float(1 << 64)


def estimate_tokens(text: str) -> int:
    """The prompt's length in tokens, estimated as characters / 4 (rounded up)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def split_choice(targets: Sequence[tuple[str, float]], key: str | None, rng: random.Random | None = None) -> str:
    """The target of a weighted split: sticky per `key` by weighted rendezvous hashing, else drawn by weight.

    Rendezvous (highest random weight) hashing gives each (key, target) pair a fixed score: a key keeps its
    target for as long as the config does, and changing one weight moves only the keys that must move.
    """
    if key is None:
        return (rng or random).choices([t for t, _ in targets], weights=[w for _, w in targets])[0]

    def score(target: str, weight: float) -> float:
        digest = hashlib.sha256(f"{key}\0{target}".encode()).digest()
        unit = (int.from_bytes(digest[:8], "big") + 0.5) / _UNIT  # in (0, 1)
        return -weight / math.log(unit)

    return max(targets, key=lambda t: score(*t))[0]


def _matches(
    rule: SwitchRule, prompt: str, headers: Mapping[str, str], metadata: Mapping[str, str], label: str | None
) -> bool:
    if rule.label is not None:
        return rule.label == label
    if rule.max_prompt_tokens is not None:
        return estimate_tokens(prompt) <= rule.max_prompt_tokens
    if rule.header or rule.metadata:
        value = headers.get(rule.header) if rule.header else metadata.get(rule.metadata or "")
        if value is None:
            return False
        return value == rule.equals if rule.equals is not None else re.search(rule.regex or "", value) is not None
    return re.search(rule.regex or "", prompt) is not None


def switch_choice(
    spec: PipelineSpec,
    prompt: str,
    headers: Mapping[str, str],
    metadata: Mapping[str, str],
    label: str | None = None,
) -> str:
    """The target of the first rule that matches, else the switch's default.

    Args:
        spec: a 'switch' pipeline.
        prompt: the prompt text (chat: every message's content).
        headers: the request's headers, names in lower case.
        metadata: the chat request's `metadata` (empty for other requests).
        label: the switch's classifier's label of the prompt (None without a classifier).
    """
    for rule in spec.rules or ():
        if _matches(rule, prompt, headers, metadata, label):
            return rule.model
    return spec.default or ""


def question_of(request: GenerateRequest) -> str:
    """What a sequence answers: the last user message of a chat, or the prompt.

    Raises:
        InvalidRequestError: a chat with no user message, or a prompt given as token ids.
    """
    if request.messages is not None:
        users = [m for m in request.messages if m.role == "user"]
        if not users:
            raise InvalidRequestError("this pipeline answers the last user message: send one", param="messages")
        return users[-1].content
    if request.prompt is None:
        raise InvalidRequestError("a pipeline takes a text prompt, not token ids", param="prompt")
    return request.prompt


def with_question(request: GenerateRequest, text: str) -> GenerateRequest:
    """The request with its question (last user message, or prompt) replaced by `text`."""
    if request.messages is None:
        return request.model_copy(update={"prompt": text})
    messages = list(request.messages)
    last = max(i for i, m in enumerate(messages) if m.role == "user")
    messages[last] = ChatMessage(role="user", content=text, name=messages[last].name)
    return request.model_copy(update={"messages": tuple(messages)})


def render(template: str, question: str, passages: Sequence[str], label: str = "") -> str:
    """A sequence's prompt: the template with the question, the passages (one paragraph each) and the label."""
    return template.format(question=question, passages="\n\n".join(passages), label=label)


def merge_embeddings(
    results: Sequence[Sequence[Sequence[float]]], merge: str, names: Sequence[str]
) -> tuple[tuple[float, ...], ...]:
    """Each input's vectors from every model, joined ('concatenate') or averaged ('average').

    Raises:
        InvalidRequestError: 'average' over models of different sizes (the message names them).
    """
    merged = []
    for per_model in zip(*results, strict=True):
        if merge == "concatenate":
            merged.append(tuple(v for vector in per_model for v in vector))
            continue
        sizes = {len(v) for v in per_model}
        if len(sizes) != 1:
            got = ", ".join(f"{n}: {len(v)}" for n, v in zip(names, per_model, strict=True))
            raise InvalidRequestError(
                f"this ensemble averages embeddings of different sizes ({got}); its `merge` must be 'concatenate'",
                param="model",
            )
        merged.append(tuple(sum(col) / len(per_model) for col in zip(*per_model, strict=True)))
    return tuple(merged)


def label_of(classification: Classification) -> str:
    """The name a classification's most likely class votes with: its label, else its class index (as text)."""
    if classification.label is not None:
        return classification.label
    return str(max(range(len(classification.probs)), key=classification.probs.__getitem__))


def merge_classifications(
    results: Sequence[Sequence[Classification]],
    merge: str,
    names: Sequence[str],
    labels: Sequence[str] | None = None,
) -> tuple[tuple[Classification, ...], tuple[dict[str, int], ...]]:
    """Each input's classification from every model, merged by majority ('vote') or by mean probabilities
    ('average'); with each input's votes (label -> how many models gave it as their most likely class).

    'vote': the label most models give wins; a tie goes to the tied label whose voters' probabilities for it sum
    highest, then to the label of the earliest model (in `results` order). The answer's `probs` are those of the
    first model that voted for the winner. 'average': the mean probability vector, and its most likely class (the
    first of equal ones), named by `labels` (the models' shared labels, when known), else as a model whose own most
    likely class it is names it, else None.

    Raises:
        InvalidRequestError: 'average' over models with different class counts (the message names them).
    """
    merged: list[Classification] = []
    tallies: list[dict[str, int]] = []
    for per_model in zip(*results, strict=True):
        votes = [label_of(c) for c in per_model]
        tally = dict.fromkeys(votes, 0)  # in first-vote order: the order of the models
        for vote in votes:
            tally[vote] += 1
        tallies.append(tally)
        if merge == "vote":
            weight = {label: 0.0 for label in tally}
            for vote, c in zip(votes, per_model, strict=True):
                weight[vote] += max(c.probs)
            # max() keeps the first of equal keys, and `tally` is in model order: the earliest model breaks ties.
            winner = max(tally, key=lambda label: (tally[label], weight[label]))
            merged.append(per_model[votes.index(winner)])
            continue
        sizes = {len(c.probs) for c in per_model}
        if len(sizes) != 1:
            got = ", ".join(f"{n}: {len(c.probs)}" for n, c in zip(names, per_model, strict=True))
            raise InvalidRequestError(
                f"this ensemble averages classifications with different numbers of classes ({got}); its `merge` "
                "must be 'vote'",
                param="model",
            )
        probs = tuple(sum(col) / len(per_model) for col in zip(*(c.probs for c in per_model), strict=True))
        best = max(range(len(probs)), key=probs.__getitem__)
        if labels is not None and len(labels) == len(probs):
            label: str | None = labels[best]
        else:
            argmaxes = [max(range(len(c.probs)), key=c.probs.__getitem__) for c in per_model]
            label = next((c.label for c, top in zip(per_model, argmaxes, strict=True) if top == best), None)
        merged.append(Classification(probs=probs, label=label))
    return tuple(merged), tuple(tallies)
