"""Tiny test models: deterministic offline builds that transformers loads and runs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from models.tiny import build_tiny_bert, build_tiny_llama


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_tiny_llama_folder_is_a_standard_llama_checkpoint(tiny_llama: Path) -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_llama / name).is_file(), name
    config = json.loads((tiny_llama / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "float32"
    assert config["num_hidden_layers"] == 2
    assert config["max_position_embeddings"] == 2048
    generation = json.loads((tiny_llama / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_tiny_llama_loads_and_runs(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.vocab_size == len(tokenizer) == 4096
    assert model.dtype == torch.float32
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")

    batch = tokenizer(["the capital of France is", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], 4096)
    assert torch.isfinite(logits).all()

    prompt = tokenizer("hello", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 5


def test_tiny_llama_tokenizer_round_trips_text(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    text = "Hello world, the capital of France is Paris! 42 naïve ☃"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_llama_chat_template_renders(tiny_llama: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\n"
    without = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert without == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.convert_tokens_to_ids("<|assistant|>") in ids


def test_tiny_bert_loads_and_embeds(tiny_bert: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModel.from_pretrained(tiny_bert)
    assert model.config.model_type == "bert"
    assert model.config.vocab_size == len(tokenizer)
    batch = tokenizer(["Hello Paris", "the quick dog runs home"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    assert pooled.shape == (2, model.config.hidden_size)
    assert torch.isfinite(pooled).all()
    pooling = json.loads((tiny_bert / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True
    assert pooling["word_embedding_dimension"] == model.config.hidden_size


def test_builds_are_deterministic(tmp_path: Path, tiny_llama: Path, tiny_bert: Path) -> None:
    assert _digests(build_tiny_llama(tmp_path / "llama")) == _digests(tiny_llama)
    assert _digests(build_tiny_bert(tmp_path / "bert")) == _digests(tiny_bert)
