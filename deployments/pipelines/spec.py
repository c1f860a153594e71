"""PipelineSpec: the schema of `pipelines:` (virtual models composed of models), and the graph check at load."""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from deployments.pipelines.documents import read_document_set
from models.spec import FrozenModel, ModelSpec, served_names

__all__ = [
    "TEMPLATE_FIELDS",
    "PipelinePlan",
    "PipelineSpec",
    "PipelineTarget",
    "RetrieveConfig",
    "SwitchRule",
    "classifier_labels",
    "plan_pipelines",
]

# The placeholders a sequence's `template` may use.
TEMPLATE_FIELDS = ("question", "passages", "label")
Kind = Literal["sequence", "switch", "ensemble", "split", "fallback"]
Task = Literal["generate", "embed", "classify", "score"]
# What each kind reads: any other kind-specific field set on a pipeline is refused by name.
_KIND_FIELDS: dict[str, set[str]] = {
    "sequence": {"retrieve", "classifier", "template", "model"},
    "switch": {"rules", "default", "classifier"},
    "ensemble": {"targets", "merge"},
    "split": {"targets", "sticky_header"},
    "fallback": {"targets"},
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "sequence": ("template", "model"),
    "switch": ("rules", "default"),
    "ensemble": ("targets", "merge"),
    "split": ("targets",),
    "fallback": ("targets",),
}
_KIND_DEFAULTS = {"sticky_header": "x-session-id"}
# The merges an ensemble offers for each task its targets serve.
_ENSEMBLE_MERGES: dict[str, tuple[str, ...]] = {"embed": ("concatenate", "average"), "classify": ("vote", "average")}
_HEADER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


class PipelineTarget(FrozenModel):
    """One target of a split, fallback or ensemble: a model, or another pipeline."""

    model: str = Field(description="Id of a served model or of another pipeline.")
    weight: float | None = Field(
        None, gt=0, description="split only: this target's share of the traffic (weights are relative, e.g. 80/20)."
    )


class SwitchRule(FrozenModel):
    """One rule of a switch: a single condition, and the model it sends matching requests to."""

    model: str = Field(description="Where a request that matches goes: a model id or another pipeline's id.")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Matches prompts of at most this many tokens, estimated as characters / 4 (the usual ratio "
        "of BPE tokenizers; no tokenizer is called).",
    )
    header: str | None = Field(None, description="Matches on this request header's value (with `equals` or `regex`).")
    metadata: str | None = Field(
        None, description="Matches on this key of the chat request's `metadata` (with `equals` or `regex`)."
    )
    equals: str | None = Field(None, description="With `header` or `metadata`: the value that matches.")
    regex: str | None = Field(
        None,
        description="A regular expression searched in the header or metadata value; alone: in the prompt (chat: "
        "every message's content).",
    )
    label: str | None = Field(
        None, description="Matches when the switch's `classifier` gives the prompt this label (its most likely class)."
    )

    @field_validator("header")
    @classmethod
    def _header_name(cls, value: str | None) -> str | None:
        if value is not None and not _HEADER_NAME.match(value):
            raise ValueError(f"`header` '{value}' is not an HTTP header name (letters, digits, '-')")
        return value.lower() if value else value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"`regex` {value!r} is not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _one_condition(self) -> SwitchRule:
        on = [n for n in ("max_prompt_tokens", "header", "metadata", "label") if getattr(self, n) is not None]
        if self.regex is not None and not (self.header or self.metadata):
            on.append("regex")
        if len(on) != 1:
            raise ValueError(
                "a switch rule needs exactly one condition: `max_prompt_tokens`, `header`, `metadata`, `regex` or "
                "`label` "
                f"(this one has {on or 'none'}); split it into several rules"
            )
        if (self.header or self.metadata) and (self.equals is None) == (self.regex is None):
            raise ValueError("a `header` or `metadata` rule needs exactly one of `equals` and `regex`")
        if self.equals is not None and not (self.header or self.metadata):
            raise ValueError("`equals` applies to a `header` or `metadata` rule: add one, or use `regex`")
        return self

    def condition(self) -> tuple[str, ...]:
        """What the rule tests, as a comparable key (two rules with the same key: the second never matches)."""
        if self.max_prompt_tokens is not None:
            return ("max_prompt_tokens",)
        if self.label is not None:
            return ("label", self.label)
        where = ("header", self.header) if self.header else ("metadata", self.metadata) if self.metadata else ()
        return (*where, "equals" if self.equals is not None else "regex", str(self.equals or self.regex))


class RetrieveConfig(FrozenModel):
    """A sequence's retrieval step: embed the question, take the nearest passages of a document set."""

    model: str = Field(description="The embedding model (task 'embed') that embeds the documents and the question.")
    documents: str | None = Field(
        None,
        description="A text/markdown file, or a folder of them (*.md, *.txt), absolute or relative to the config "
        "file's folder (then to the project root). Read when the config is loaded, so a missing or empty set fails "
        "the deploy; its passages (the paragraphs, split at blank lines) travel inside the config to the router "
        "replica wherever it runs, and are embedded once per router replica, on the pipeline's first request.",
    )
    passages: tuple[str, ...] | None = Field(
        None,
        description="The passages themselves: filled from `documents` when the config is loaded; give them here "
        "instead of `documents` to inline a document set.",
    )
    top_k: int = Field(3, ge=1, le=64, description="How many passages go into the prompt, nearest first.")
    max_passages: int = Field(4096, ge=1, description="Most passages the document set may hold (refused at load).")

    @model_validator(mode="before")
    @classmethod
    def _read_documents(cls, data: object, info: ValidationInfo) -> object:
        if not isinstance(data, dict) or data.get("passages") is not None or not isinstance(data.get("documents"), str):
            return data
        config_dir = (info.context or {}).get("config_dir")
        max_passages = data.get("max_passages", cls.model_fields["max_passages"].default)
        if not isinstance(max_passages, int) or max_passages < 1:
            return data  # the field's own check names it
        _, passages = read_document_set(data["documents"], config_dir, max_passages)
        return {**data, "passages": passages}

    @model_validator(mode="after")
    def _some_passages(self) -> RetrieveConfig:
        if self.passages is None:
            raise ValueError("give `documents` (a file or folder of passages) or `passages`")
        if not self.passages:
            raise ValueError("`passages` is empty: give at least one passage")
        if len(self.passages) > self.max_passages:
            raise ValueError(f"{len(self.passages)} passages, above `max_passages` {self.max_passages}")
        return self


class PipelineSpec(FrozenModel):
    """A virtual model composed of served models; clients call it by its `id` like any model."""

    id: str = Field(description="The name clients send in the `model` field; must differ from every model's id.")
    kind: Kind = Field(
        description=(
            "'sequence': retrieve passages, fill `template`, answer with `model`. 'switch': the first rule that "
            "matches picks the target, else `default`. 'ensemble': every target at once, outputs merged by `merge` "
            "(embeddings or classifications). 'split': weighted traffic split, sticky per user. 'fallback': the "
            "first target, and the next one when it answers 429/503, times out or dies before its first token."
        )
    )
    description: str | None = Field(None, description="What the pipeline is for (shown in /v1/models).")
    targets: tuple[PipelineTarget, ...] | None = Field(
        None, description="split, fallback, ensemble: the targets (fallback: in the order tried)."
    )
    rules: tuple[SwitchRule, ...] | None = Field(None, description="switch: the rules, tried in order.")
    default: str | None = Field(None, description="switch: where a request that matches no rule goes.")
    model: str | None = Field(None, description="sequence: the model (or pipeline) that answers the filled prompt.")
    retrieve: RetrieveConfig | None = Field(None, description="sequence: the retrieval step.")
    classifier: str | None = Field(
        None,
        description="switch, sequence: a classification model (task 'classify') that labels the prompt first; "
        "switch rules match its label (`label`), a sequence's template gets it as `{label}`.",
    )
    template: str | None = Field(
        None,
        description="sequence: the prompt sent to `model`, with `{question}` (the client's last user message or "
        "prompt), `{passages}` (the retrieved passages, one per paragraph) and `{label}` (the `classifier`'s label). "
        "Literal braces are doubled.",
    )
    merge: Literal["concatenate", "average", "vote"] | None = Field(
        None,
        description="ensemble: how the targets' outputs are merged. Embedding models: 'concatenate' joins the "
        "vectors, 'average' averages them (equal sizes). Classification models: 'vote' takes each input's majority "
        "label (labels compared by name, so the models need not share a label set; a tie goes to the label whose "
        "voters' summed probability is highest, then to the label of the earliest target; `probs` are those of the "
        "first target that voted for the winner); 'average' averages the probability vectors (the models must "
        "have the same labels in the same order) and takes the most likely label.",
    )
    sticky_header: str | None = Field(
        None,
        description="split: the request header that keys a session (default x-session-id); without it the "
        "request's `user` field does; without either each request is drawn at random by weight.",
    )
    step_timeout_s: float | None = Field(
        None,
        gt=0,
        description="Longest one step may take (a stream: until its first token) before it fails with a 408 "
        "(fallback: the next target is tried). Default: the router's request_timeout_s.",
    )

    @model_validator(mode="after")
    def _kind_fields(self) -> PipelineSpec:
        own = _KIND_FIELDS[self.kind]
        for name in set().union(*_KIND_FIELDS.values()) - own:
            if getattr(self, name) is not None:
                raise ValueError(f"`{name}` does not apply to a '{self.kind}' pipeline: remove it")
        for name in _REQUIRED[self.kind]:
            if not getattr(self, name):
                raise ValueError(f"a '{self.kind}' pipeline needs `{name}`")
        targets = self.targets or ()
        least = 1 if self.kind == "fallback" else 2
        if self.kind in ("split", "fallback", "ensemble") and len(targets) < max(least, 2):
            raise ValueError(f"a '{self.kind}' pipeline needs at least 2 `targets`")
        weighted = [t.weight is not None for t in targets]
        if self.kind == "split" and not all(weighted):
            raise ValueError("every target of a split needs a `weight` (e.g. 80 and 20)")
        if self.kind != "split" and any(weighted):
            raise ValueError(f"`weight` applies to split targets only: remove it from this '{self.kind}' pipeline")
        seen = [t.model for t in targets]
        if len(set(seen)) != len(seen):
            raise ValueError("a target appears twice in `targets`: list each once (split: add up its weights)")
        if self.kind == "sequence":
            self._check_template()
        labels = [r.label for r in self.rules or () if r.label is not None]
        if self.kind == "switch" and bool(labels) != (self.classifier is not None):
            raise ValueError(
                "a `label` rule needs the switch's `classifier`: add one"
                if labels
                else "the `classifier` step is unreachable: no rule matches on `label`; add one or drop classifier"
            )
        return self

    def _check_template(self) -> None:
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(self.template or "") if f is not None}
        except ValueError as exc:
            raise ValueError(f"`template` is not a valid template ({exc}): double literal braces ({{{{ }}}})") from None
        unknown = names - set(TEMPLATE_FIELDS)
        if unknown:
            raise ValueError(
                f"`template` uses {sorted(unknown)}; it may use only {{question}}, {{passages}} and {{label}}"
            )
        if "question" not in names:
            raise ValueError("`template` must contain {question}, or the client's question is lost")
        if ("passages" in names) != (self.retrieve is not None):
            raise ValueError(
                "`template` uses {passages} without a `retrieve` step"
                if self.retrieve is None
                else "the `retrieve` step is unreachable: `template` never uses {passages}; add it or drop retrieve"
            )
        if ("label" in names) != (self.classifier is not None):
            raise ValueError(
                "`template` uses {label} without a `classifier`"
                if self.classifier is None
                else "the `classifier` step is unreachable: `template` never uses {label}; add it or drop classifier"
            )

    @property
    def sticky(self) -> str:
        """split: the session header."""
        return (self.sticky_header or _KIND_DEFAULTS["sticky_header"]).lower()

    def edges(self) -> list[tuple[str, str]]:
        """Each target this pipeline may call: (field path inside the pipeline, model or pipeline id)."""
        out = [(f"targets.{i}.model", t.model) for i, t in enumerate(self.targets or ())]
        out += [(f"rules.{i}.model", r.model) for i, r in enumerate(self.rules or ())]
        if self.default:
            out.append(("default", self.default))
        if self.retrieve:
            out.append(("retrieve.model", self.retrieve.model))
        if self.classifier:
            out.append(("classifier", self.classifier))
        if self.model:
            out.append(("model", self.model))
        return out

    def steps(self) -> list[str]:
        """The ids this pipeline calls, in order, each once (what /v1/models shows)."""
        return list(dict.fromkeys(target for _, target in self.edges()))


class PipelinePlan(FrozenModel):
    """One pipeline as the router runs it: its spec, the task it serves and every model it may reach."""

    spec: PipelineSpec
    task: Task = Field(description="The task the pipeline serves, from its targets ('generate', 'embed', ...).")
    models: tuple[str, ...] = Field(description="Every served model the pipeline may call, through nested ones too.")
    labels: tuple[str, ...] | None = Field(
        None,
        description="A classification ensemble merging by 'average': its models' shared labels, in class order, "
        "when a model folder is on the planning machine (they name the averaged class); else None.",
    )


def plan_pipelines(models: Sequence[ModelSpec], pipelines: Iterable[PipelineSpec]) -> tuple[PipelinePlan, ...]:
    """Check the pipeline graph against the models and give each pipeline's task and reachable models.

    Raises:
        ValueError: a pipeline id is taken, a target is unknown, pipelines call each other in a cycle, a step
            serves the wrong task, a rule can never match, an ensemble's `merge` does not fit its task, or an
            'average' of classifiers whose folders give different labels; the message names the field and the fix.
    """
    # Targets name models as requests do: `id@version`, or the bare id for the default version.
    by_id = served_names(models)
    tasks: dict[str, str] = {name: m.task for name, m in by_id.items()}
    specs = list(pipelines)
    index: dict[str, int] = {}
    for i, p in enumerate(specs):
        if p.id in tasks:
            raise ValueError(f"pipelines.{i}.id: '{p.id}' is also a model id: give the pipeline its own id")
        if p.id in index:
            raise ValueError(f"pipelines.{i}.id: '{p.id}' appears twice: every pipeline needs its own id")
        index[p.id] = i
    for i, p in enumerate(specs):
        for where, target in p.edges():
            if target not in tasks and target not in index:
                raise ValueError(
                    f"pipelines.{i}.{where}: '{target}' is neither a model nor a pipeline; use one of "
                    f"{sorted([*tasks, *index])} or add it under `models:`"
                )
        _check_unreachable(i, p)
    planned: dict[str, PipelinePlan] = {}

    def visit(pid: str, trail: tuple[str, ...]) -> PipelinePlan:
        if pid in trail:
            cycle = " -> ".join([*trail[trail.index(pid) :], pid])
            raise ValueError(
                f"pipelines.{index[pid]}: the pipelines call each other in a cycle ({cycle}); "
                "point one of them at a model"
            )
        if pid in planned:
            return planned[pid]
        i, spec = index[pid], specs[index[pid]]
        reach: list[str] = []
        step_task: dict[str, str] = {}
        for where, target in spec.edges():
            if target in index:
                sub = visit(target, (*trail, pid))
                step_task[where], reach = sub.task, [*reach, *sub.models]
            else:
                step_task[where], reach = tasks[target], [*reach, target]
        task, reached = _task_of(i, spec, step_task), tuple(dict.fromkeys(reach))
        labels = None
        if spec.kind == "ensemble" and spec.merge == "average" and task == "classify":
            labels = _same_labels(i, [by_id[m] for m in reached])
        plan = PipelinePlan(spec=spec, task=task, models=reached, labels=labels)
        planned[pid] = plan
        return plan

    return tuple(visit(p.id, ()) for p in specs)


def _task_of(i: int, spec: PipelineSpec, step_task: dict[str, str]) -> Task:
    """The pipeline's task; raises ValueError where a step serves the wrong one."""
    where = f"pipelines.{i}"
    classifier = step_task.pop("classifier", None)
    if classifier is not None and classifier != "classify":
        raise ValueError(
            f"{where}.classifier: '{spec.classifier}' serves task '{classifier}'; the classifier step needs a "
            "classification model (task 'classify')"
        )
    if spec.kind == "sequence":
        if spec.retrieve is not None and step_task["retrieve.model"] != "embed":
            raise ValueError(
                f"{where}.retrieve.model: '{spec.retrieve.model}' serves task '{step_task['retrieve.model']}'; "
                "retrieval needs an embedding model (task 'embed')"
            )
        if step_task["model"] != "generate":
            raise ValueError(
                f"{where}.model: '{spec.model}' serves task '{step_task['model']}'; a sequence answers with a chat "
                "model (task 'generate')"
            )
        return "generate"
    first_where, first = next(iter(step_task.items()))
    for path, task in step_task.items():
        if task != first:
            raise ValueError(
                f"{where}.{path}: serves task '{task}' but {where}.{first_where} serves '{first}': every target "
                "of a pipeline must serve the same task"
            )
    if spec.kind == "ensemble":
        merges = _ENSEMBLE_MERGES.get(first)
        if merges is None:
            raise ValueError(
                f"{where}.targets: an ensemble merges embeddings or classifications; its targets serve task "
                f"'{first}' (use a split or fallback for other tasks)"
            )
        if spec.merge not in merges:
            choices = " or ".join(repr(m) for m in merges)
            raise ValueError(f"{where}.merge: '{spec.merge}' does not merge task '{first}'; use {choices}")
    return first  # type: ignore[return-value]  # one of the model tasks


def _same_labels(i: int, models: Sequence[ModelSpec]) -> tuple[str, ...] | None:
    """An 'average' of classifications adds probabilities class by class: every model the ensemble may reach must
    have the same labels in the same order. Checked for the models whose folder is here (its config.json's
    id2label); the others are checked on each answer (their class counts must match). Returns the labels, if
    known."""
    known = [(m.id, labels) for m in models if (labels := classifier_labels(m)) is not None]
    for model_id, labels in known[1:]:
        if labels != known[0][1]:
            raise ValueError(
                f"pipelines.{i}.merge: 'average' adds the probabilities class by class, but '{known[0][0]}' has "
                f"labels {list(known[0][1])} and '{model_id}' has {list(labels)}: use merge 'vote' (it compares "
                "labels by name), or targets with the same labels in the same order"
            )
    return known[0][1] if known else None


def classifier_labels(model: ModelSpec) -> tuple[str, ...] | None:
    """A classification model's labels in class order (its config.json's id2label, else its class count as
    'LABEL_<i>', as transformers names them), when `source` is a model folder on this machine; else None."""
    if model.task != "classify" or not model.source:
        return None
    config = Path(model.source).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None  # a packaged model's name, or a folder of another machine: checked on its answers
    id2label = data.get("id2label") or {str(k): f"LABEL_{k}" for k in range(int(data.get("num_labels", 2)))}
    return tuple(str(id2label[key]) for key in sorted(id2label, key=int))


def _check_unreachable(i: int, spec: PipelineSpec) -> None:
    """A switch rule that an earlier rule always pre-empts can never be reached."""
    seen: dict[tuple[str, ...], int] = {}
    largest: tuple[int, int] | None = None  # (limit, rule index) of the widest length rule so far
    for j, rule in enumerate(spec.rules or ()):
        limit = rule.max_prompt_tokens
        if limit is not None:
            if largest is not None and limit <= largest[0]:
                raise ValueError(
                    f"pipelines.{i}.rules.{j}: unreachable, rule {largest[1]} comes first and already takes every "
                    f"prompt of at most {largest[0]} tokens: put length rules in order from the smallest limit up"
                )
            largest = (limit, j)
            continue
        key = rule.condition()
        if key in seen:
            raise ValueError(
                f"pipelines.{i}.rules.{j}: unreachable, rule {seen[key]} has the same condition and comes first; "
                "remove one"
            )
        seen[key] = j
