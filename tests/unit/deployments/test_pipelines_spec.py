"""The `pipelines:` schema and its graph check at load: each refusal names the field and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployments.config import ConfigError, ServingConfig, load_config
from deployments.plan import compile_plan

ROOT = Path(__file__).resolve().parents[3]
MODELS = [
    {"id": "chat-a", "task": "generate", "engine": "echo"},
    {"id": "chat-b", "task": "generate", "engine": "echo"},
    {"id": "emb-a", "task": "embed", "engine": "echo"},
    {"id": "emb-b", "task": "embed", "engine": "echo", "engine_kwargs": {"dimensions": 8}},
]


def _config(*pipelines: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate({"models": MODELS, "pipelines": list(pipelines)})


def _refused(*pipelines: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        _config(*pipelines)
    return str(info.value)


def _split(pid: str = "canary", a: str = "chat-a", b: str = "chat-b") -> dict[str, Any]:
    return {"id": pid, "kind": "split", "targets": [{"model": a, "weight": 80}, {"model": b, "weight": 20}]}


def test_every_kind_validates_and_compiles_into_the_plan() -> None:
    config = _config(
        _split(),
        {"id": "safe", "kind": "fallback", "targets": [{"model": "canary"}, {"model": "chat-b"}]},
        {
            "id": "router",
            "kind": "switch",
            "rules": [
                {"max_prompt_tokens": 8, "model": "chat-a"},
                {"header": "x-tier", "equals": "gold", "model": "safe"},
                {"metadata": "lang", "regex": "^de", "model": "chat-b"},
                {"regex": "(?i)code", "model": "chat-b"},
            ],
            "default": "chat-a",
        },
        {
            "id": "rag",
            "kind": "sequence",
            "retrieve": {"model": "emb-a", "documents": "docs/rag"},
            "template": "Context:\n{passages}\n\nQ: {question}",
            "model": "router",
        },
        {"id": "both", "kind": "ensemble", "targets": [{"model": "emb-a"}, {"model": "emb-b"}], "merge": "concatenate"},
    )
    plan = {p.spec.id: p for p in compile_plan(config).pipelines}
    assert {pid: p.task for pid, p in plan.items()} == {
        "canary": "generate",
        "safe": "generate",
        "router": "generate",
        "rag": "generate",
        "both": "embed",
    }
    # Nested pipelines count: every model reachable through them.
    assert plan["rag"].models == ("emb-a", "chat-a", "chat-b")
    assert plan["rag"].spec.steps() == ["emb-a", "router"]


def test_unknown_target_names_the_field_and_the_choices() -> None:
    message = _refused(_split(b="chat-c"))
    assert "pipelines.0.targets.1.model: 'chat-c' is neither a model nor a pipeline" in message
    assert "'chat-b'" in message and "add it under `models:`" in message


def test_cycle_is_refused_with_its_path() -> None:
    message = _refused(
        {"id": "p", "kind": "fallback", "targets": [{"model": "chat-a"}, {"model": "q"}]},
        {"id": "q", "kind": "fallback", "targets": [{"model": "p"}, {"model": "chat-b"}]},
    )
    assert "cycle (p -> q -> p)" in message and "point one of them at a model" in message


def test_task_mismatch_embedding_model_as_a_chat_step() -> None:
    message = _refused(
        {"id": "rag", "kind": "sequence", "template": "{question}", "model": "emb-a"},
    )
    assert "pipelines.0.model: 'emb-a' serves task 'embed'" in message and "task 'generate'" in message
    message = _refused(_split(b="emb-a"))
    assert "pipelines.0.targets.1.model: serves task 'embed'" in message and "same task" in message
    message = _refused(
        {
            "id": "rag",
            "kind": "sequence",
            "retrieve": {"model": "chat-a", "documents": "docs/rag"},
            "template": "{passages} {question}",
            "model": "chat-b",
        }
    )
    assert "pipelines.0.retrieve.model: 'chat-a' serves task 'generate'" in message
    message = _refused(
        {"id": "e", "kind": "ensemble", "targets": [{"model": "chat-a"}, {"model": "chat-b"}], "merge": "average"}
    )
    assert "an ensemble merges embeddings" in message


def test_unreachable_rules_and_steps_are_refused() -> None:
    rules = [{"max_prompt_tokens": 100, "model": "chat-a"}, {"max_prompt_tokens": 50, "model": "chat-b"}]
    message = _refused({"id": "s", "kind": "switch", "rules": rules, "default": "chat-a"})
    assert "pipelines.0.rules.1: unreachable" in message and "smallest limit up" in message
    rules = [{"regex": "x", "model": "chat-a"}, {"regex": "x", "model": "chat-b"}]
    assert "pipelines.0.rules.1: unreachable" in _refused(
        {"id": "s", "kind": "switch", "rules": rules, "default": "chat-a"}
    )
    # A retrieval step whose passages the template never uses.
    message = _refused(
        {
            "id": "rag",
            "kind": "sequence",
            "retrieve": {"model": "emb-a", "documents": "docs/rag"},
            "template": "{question}",
            "model": "chat-a",
        }
    )
    assert "`retrieve` step is unreachable" in message


def test_pipeline_id_colliding_with_a_model_id() -> None:
    message = _refused(_split(pid="chat-a"))
    assert "pipelines.0.id: 'chat-a' is also a model id" in message


def test_fields_of_another_kind_and_missing_fields_are_named() -> None:
    assert "`merge` does not apply to a 'split' pipeline" in _refused({**_split(), "merge": "average"})
    assert "needs `default`" in _refused({"id": "s", "kind": "switch", "rules": [{"regex": "a", "model": "chat-a"}]})
    assert "needs a `weight`" in _refused(
        {"id": "c", "kind": "split", "targets": [{"model": "chat-a", "weight": 1}, {"model": "chat-b"}]}
    )
    assert "at least 2 `targets`" in _refused({"id": "f", "kind": "fallback", "targets": [{"model": "chat-a"}]})
    assert "exactly one condition" in _refused(
        {"id": "s", "kind": "switch", "rules": [{"model": "chat-a"}], "default": "chat-a"}
    )
    assert "{passages}" in _refused(
        {"id": "q", "kind": "sequence", "template": "{passages}{question}", "model": "chat-a"}
    )
    assert "may use only" in _refused({"id": "q", "kind": "sequence", "template": "{question}{x}", "model": "chat-a"})
    message = _refused(
        {
            "id": "q",
            "kind": "sequence",
            "retrieve": {"model": "emb-a", "documents": "nowhere/at-all"},
            "template": "{passages}{question}",
            "model": "chat-a",
        }
    )
    assert "`documents` 'nowhere/at-all' does not exist" in message


def test_load_config_reports_the_pipeline_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "models:\n  - {id: a, task: generate, engine: echo}\n"
        "pipelines:\n  - {id: p, kind: fallback, targets: [{model: a}, {model: zz}]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "pipelines.0.targets.1.model: 'zz' is neither a model nor a pipeline" in str(info.value)


@pytest.mark.parametrize("name", ["rag.yaml", "canary.yaml"])
def test_shipped_pipeline_examples_validate(name: str) -> None:
    config = load_config(ROOT / "deployments" / "configs" / name)
    assert config.pipelines
    assert compile_plan(config).pipelines


CLASSIFIER = {"id": "clf", "task": "classify", "engine": "transformers", "source": "tiny-bert-classifier"}


def _with_classifier(*pipelines: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate({"models": [*MODELS, CLASSIFIER], "pipelines": list(pipelines)})


def test_classifier_steps_in_a_switch_and_a_sequence() -> None:
    config = _with_classifier(
        {
            "id": "by-mood",
            "kind": "switch",
            "classifier": "clf",
            "rules": [{"label": "negative", "model": "chat-b"}, {"label": "positive", "model": "chat-a"}],
            "default": "chat-a",
        },
        {
            "id": "tagged",
            "kind": "sequence",
            "classifier": "clf",
            "template": "[{label}] {question}",
            "model": "chat-a",
        },
    )
    plans = {p.spec.id: p for p in compile_plan(config).pipelines}
    assert plans["by-mood"].task == "generate" and plans["by-mood"].models == ("chat-b", "chat-a", "clf")
    assert plans["tagged"].spec.steps() == ["clf", "chat-a"]


def test_classifier_mistakes_are_named() -> None:
    def refused(*pipelines: dict[str, Any]) -> str:
        with pytest.raises(ValueError) as info:
            _with_classifier(*pipelines)
        return str(info.value)

    rules = [{"label": "negative", "model": "chat-b"}]
    assert "needs the switch's `classifier`" in refused(
        {"id": "s", "kind": "switch", "rules": rules, "default": "chat-a"}
    )
    message = refused(
        {
            "id": "s",
            "kind": "switch",
            "classifier": "clf",
            "rules": [{"regex": "x", "model": "chat-b"}],
            "default": "chat-a",
        }
    )
    assert "`classifier` step is unreachable" in message
    message = refused({"id": "s", "kind": "switch", "classifier": "emb-a", "rules": rules, "default": "chat-a"})
    assert "pipelines.0.classifier: 'emb-a' serves task 'embed'" in message and "task 'classify'" in message
    assert "{label} without a `classifier`" in refused(
        {"id": "q", "kind": "sequence", "template": "{label} {question}", "model": "chat-a"}
    )
    assert "`classifier` step is unreachable" in refused(
        {"id": "q", "kind": "sequence", "classifier": "clf", "template": "{question}", "model": "chat-a"}
    )
    labels = [{"label": "a", "model": "chat-a"}, {"label": "a", "model": "chat-b"}]
    assert "rules.1: unreachable" in refused(
        {"id": "s", "kind": "switch", "classifier": "clf", "rules": labels, "default": "chat-a"}
    )


# -- classification pipelines ---------------------------------------------------------------------------------------


def _classifier(model_id: str, folder: Path, labels: list[str] | None) -> dict[str, Any]:
    """A classify model whose folder holds only its config.json: what the load check reads."""
    folder.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"num_labels": len(labels) if labels else 2}
    if labels:
        config["id2label"] = {str(i): label for i, label in enumerate(labels)}
    (folder / "config.json").write_text(json.dumps(config))
    return {"id": model_id, "task": "classify", "engine": "transformers", "source": str(folder)}


def _classifiers(tmp_path: Path, *labels: list[str] | None) -> list[dict[str, Any]]:
    return [_classifier(f"cls-{i}", tmp_path / f"cls-{i}", lab) for i, lab in enumerate(labels)]


def _ensemble(pid: str, merge: str, *targets: str) -> dict[str, Any]:
    return {"id": pid, "kind": "ensemble", "targets": [{"model": t} for t in targets], "merge": merge}


def _with(models: list[dict[str, Any]], *pipelines: dict[str, Any]) -> ServingConfig:
    return ServingConfig.model_validate({"models": [*MODELS, *models], "pipelines": list(pipelines)})


def test_classification_ensembles_splits_and_fallbacks(tmp_path: Path) -> None:
    three = ["negative", "neutral", "positive"]
    models = _classifiers(tmp_path, three, three, ["bad", "good"])
    config = _with(
        models,
        _ensemble("avg", "average", "cls-0", "cls-1"),
        _ensemble("vote", "vote", "cls-0", "cls-1", "cls-2"),  # vote: label sets may differ
        _split("canary", "cls-0", "cls-1"),
        {"id": "safe", "kind": "fallback", "targets": [{"model": "vote"}, {"model": "cls-2"}]},
        {
            "id": "gate",
            "kind": "switch",
            "classifier": "vote",
            "rules": [{"label": "bad", "model": "chat-b"}],
            "default": "chat-a",
        },
    )
    plan = {p.spec.id: p for p in compile_plan(config).pipelines}
    assert {pid: p.task for pid, p in plan.items()} == {
        "avg": "classify",
        "vote": "classify",
        "canary": "classify",
        "safe": "classify",
        "gate": "generate",
    }
    assert plan["avg"].labels == tuple(three)  # the averaged class is named by them
    assert plan["vote"].labels is None and plan["safe"].models == ("cls-0", "cls-1", "cls-2")


def test_average_over_different_labels_is_refused_naming_merge(tmp_path: Path) -> None:
    models = _classifiers(tmp_path, ["negative", "neutral", "positive"], ["negative", "positive", "neutral"])
    with pytest.raises(ValueError) as info:
        _with(models, _ensemble("avg", "average", "cls-0", "cls-1"))
    message = str(info.value)
    assert "pipelines.0.merge: 'average' adds the probabilities class by class" in message
    assert "'cls-1' has ['negative', 'positive', 'neutral']" in message and "use merge 'vote'" in message
    # Through a nested split too: every model the ensemble may reach counts.
    models += [_classifier("cls-2", tmp_path / "cls-2", ["negative", "neutral", "positive"])]
    with pytest.raises(ValueError) as info:
        _with(models, _split("either", "cls-1", "cls-2"), _ensemble("avg", "average", "cls-0", "either"))
    assert "pipelines.1.merge: 'average'" in str(info.value)
    # A folder that is not here (a packaged model name, another machine's path): checked on its answers instead.
    gone = {**models[1], "source": str(tmp_path / "elsewhere")}
    assert _with([models[0], gone], _ensemble("avg", "average", "cls-0", "cls-1")).pipelines


def test_merges_that_do_not_fit_the_task_are_refused(tmp_path: Path) -> None:
    models = _classifiers(tmp_path, ["a", "b"], ["a", "b"])
    with pytest.raises(ValueError) as info:
        _with(models, _ensemble("e", "concatenate", "cls-0", "cls-1"))
    assert "pipelines.0.merge: 'concatenate' does not merge task 'classify'; use 'vote' or 'average'" in str(info.value)
    message = _refused(_ensemble("e", "vote", "emb-a", "emb-b"))
    assert "pipelines.0.merge: 'vote' does not merge task 'embed'; use 'concatenate' or 'average'" in message
    with pytest.raises(ValueError) as info:
        _with(
            models,
            {
                "id": "gate",
                "kind": "switch",
                "classifier": "chat-a",
                "rules": [{"label": "a", "model": "chat-b"}],
                "default": "chat-a",
            },
        )
    assert "pipelines.0.classifier: 'chat-a' serves task 'generate'" in str(info.value)


def _rag_config(documents: str) -> str:
    return (
        "models:\n  - {id: chat, task: generate, engine: echo}\n  - {id: emb, task: embed, engine: echo}\n"
        "pipelines:\n  - id: rag\n    kind: sequence\n    model: chat\n    template: '{passages} {question}'\n"
        f"    retrieve: {{model: emb, documents: {documents}}}\n"
    )


def test_documents_are_read_at_load_relative_to_the_config_file_and_travel_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "conf" / "docs").mkdir(parents=True)
    (tmp_path / "conf" / "docs" / "a.md").write_text("# Facts\n\nThe sky is green.\n\nWater is dry.\n")
    path = tmp_path / "conf" / "c.yaml"
    path.write_text(_rag_config("docs"))
    config = load_config(path)
    retrieve = config.pipelines[0].retrieve
    assert retrieve is not None and retrieve.passages == ("The sky is green.", "Water is dry.")
    # Validated again elsewhere (Serve's args, a pod's serveConfigV2), the passages come with it: no file is read.
    (tmp_path / "conf" / "docs" / "a.md").unlink()
    again = ServingConfig.model_validate(json.loads(config.model_dump_json()))
    assert again.pipelines[0].retrieve == retrieve
    plan = compile_plan(again)
    assert plan.pipelines[0].spec.retrieve is not None
    assert plan.pipelines[0].spec.retrieve.passages == ("The sky is green.", "Water is dry.")


def test_a_relative_document_path_falls_back_to_the_project_root(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_rag_config("docs/rag"))
    retrieve = load_config(path).pipelines[0].retrieve
    assert retrieve is not None and any("Bellmarrow" in p for p in retrieve.passages or ())


def test_a_missing_or_empty_document_set_fails_the_load_naming_the_field_and_path(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_rag_config("gone"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "pipelines.0.retrieve: `documents` 'gone' does not exist" in message
    assert str(tmp_path / "gone") in message and str(ROOT / "gone") in message
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text("{}")
    path.write_text(_rag_config("empty"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"`documents` 'empty': {tmp_path / 'empty'} holds no passages" in str(info.value)
    path.write_text(_rag_config(str(tmp_path / "empty")).replace("documents:", "max_passages: 0, documents:"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "max_passages" in str(info.value)


def test_passages_may_be_given_inline_and_not_empty() -> None:
    base = {"id": "q", "kind": "sequence", "template": "{passages}{question}", "model": "chat-a"}
    config = _config({**base, "retrieve": {"model": "emb-a", "passages": ["one", "two"]}})
    assert config.pipelines[0].retrieve is not None and config.pipelines[0].retrieve.passages == ("one", "two")
    assert "give `documents`" in _refused({**base, "retrieve": {"model": "emb-a"}})
    assert "`passages` is empty" in _refused({**base, "retrieve": {"model": "emb-a", "passages": []}})
    assert "above `max_passages` 1" in _refused(
        {**base, "retrieve": {"model": "emb-a", "passages": ["a", "b"], "max_passages": 1}}
    )
