"""Tiny random-weight test models (a 2-layer Llama, a 2-layer BERT encoder, classifier and cross-encoder) built
offline and deterministically.

Tokenizers are built locally with `tokenizers` (BPE trained on a generated corpus; a fixed WordPiece vocab).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "TINY_CLASSIFIER_LABELS",
    "build_tiny_bert",
    "build_tiny_bert_classifier",
    "build_tiny_cross_encoder",
    "build_tiny_llama",
]

logger = logging.getLogger(__name__)

_SEED = 0
_LLAMA_VOCAB = 4096

# Zephyr-style turns; bos comes from the template, so engines tokenize the rendered prompt without special tokens.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The tiny classifier's labels, in id order (its config's id2label).
TINY_CLASSIFIER_LABELS = ("negative", "neutral", "positive")
# Wider than BERT's 0.02, so that the random heads' outputs differ visibly between inputs (tests rank by them).
_HEAD_INIT_RANGE = 0.2

_LLAMA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_WORDS = (
    "the a an one two three some many every this that these those my your our their his her its "
    "cat dog bird fish horse model server cluster request token river city country capital mountain "
    "teacher student farmer doctor engineer child friend king queen robot garden house road market "
    "book letter song story question answer number system network machine computer language word "
    "runs walks sees finds builds writes reads sends answers serves loads learns counts opens closes "
    "likes wants makes takes gives keeps brings holds moves turns starts stops helps asks tells "
    "big small quick slow bright dark old new happy quiet loud green blue red warm cold early late "
    "and or but because while when after before with without under over near into from to of in on "
    "is was are were has had will can should may must not very often always never sometimes "
    "France Paris Germany Berlin Spain Madrid Italy Rome Japan Tokyo Egypt Cairo Canada Ottawa "
    "hello thanks please yes no maybe today tomorrow yesterday morning evening night week year"
).split()

_SYLLABLES = "ka lo mi ne ru sa ti vo ze ba de fi gu ho ja ku li mo nu pe qui ra so tu ve wa xi yo zu".split()


def _corpus(n_sentences: int = 6000) -> Iterator[str]:
    """Yield generated English-like sentences, plus invented words and numbers for BPE merge variety."""
    rng = random.Random(_SEED)
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 14))]
        # Invented names give the trainer enough distinct pieces to fill the vocabulary.
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        words.insert(rng.randrange(len(words)), name.capitalize() if i % 2 else name)
        if i % 3 == 0:
            words.append(str(rng.randint(0, 99999)))
        sentence = " ".join(words)
        yield sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","])
    for role in ("system", "user", "assistant"):
        yield f"<|{role}|>\nWhat is the capital of France? The capital of France is Paris.</s>"


def _bpe_tokenizer() -> Any:
    """Train a byte-level BPE tokenizer (GPT-2/Llama-3 style) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_LLAMA_VOCAB,
        special_tokens=_LLAMA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=_LLAMA_SPECIALS[4:],
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def _wordpiece_vocab() -> dict[str, int]:
    """A fixed WordPiece vocabulary: specials, characters (plain and `##`), corpus words and syllables.

    Built by hand rather than with `WordPieceTrainer`, whose token order varies from run to run.
    """
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-<>|/"))
    pieces = sorted({w.lower() for w in _WORDS} | set(_SYLLABLES))
    tokens = [*_BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *pieces, *(f"##{s}" for s in _SYLLABLES)]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _wordpiece_tokenizer() -> Any:
    """Build an uncased WordPiece tokenizer (BERT style) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(_wordpiece_vocab(), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_llama(target: Path) -> Path:
    """Build a random 2-layer `LlamaForCausalLM` with a locally trained BPE tokenizer and a chat template.

    Args:
        target: Folder to write (created if missing; existing files are overwritten).

    Returns:
        `target`, holding config.json, generation_config.json, model.safetensors and the tokenizer files.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    target = Path(target)
    tokenizer = _bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(_SEED)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    logger.info("built tiny-llama (%d parameters, vocab %d) in %s", model.num_parameters(), len(tokenizer), target)
    return target


def build_tiny_bert(target: Path) -> Path:
    """Build a random 2-layer `BertModel` encoder with a fixed, locally built WordPiece tokenizer.

    The folder also carries `1_Pooling/config.json` (mean pooling), like sentence-transformers models.

    Args:
        target: Folder to write (created if missing; existing files are overwritten).

    Returns:
        `target`, holding config.json, model.safetensors and the tokenizer files.
    """
    import torch
    from transformers import BertConfig, BertModel

    target = Path(target)
    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(_SEED)
    model = BertModel(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    pooling = target / "1_Pooling"
    pooling.mkdir(exist_ok=True)
    (pooling / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": config.hidden_size,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    logger.info("built tiny-bert (%d parameters, vocab %d) in %s", model.num_parameters(), len(tokenizer), target)
    return target


def _sequence_classifier(target: Path, name: str, num_labels: int, id2label: dict[int, str] | None) -> Path:
    """Build and save a random 2-layer `BertForSequenceClassification` with the fixed WordPiece tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    target = Path(target)
    tokenizer = _wordpiece_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=_HEAD_INIT_RANGE,
        num_labels=num_labels,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()} if id2label else None,
    )
    torch.manual_seed(_SEED)
    model = BertForSequenceClassification(config)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    logger.info("built %s (%d parameters, %d labels) in %s", name, model.num_parameters(), num_labels, target)
    return target


def build_tiny_bert_classifier(target: Path) -> Path:
    """Build a random 2-layer BERT sequence classifier with three labels (`TINY_CLASSIFIER_LABELS`).

    Args:
        target: Folder to write (created if missing; existing files are overwritten).

    Returns:
        `target`, holding config.json (with id2label), model.safetensors and the tokenizer files.
    """
    labels = dict(enumerate(TINY_CLASSIFIER_LABELS))
    return _sequence_classifier(target, "tiny-bert-classifier", len(labels), labels)


def build_tiny_cross_encoder(target: Path) -> Path:
    """Build a random 2-layer BERT cross-encoder: a sequence classifier with one output (the pair's score).

    Args:
        target: Folder to write (created if missing; existing files are overwritten).

    Returns:
        `target`, holding config.json (num_labels 1), model.safetensors and the tokenizer files.
    """
    return _sequence_classifier(target, "tiny-cross-encoder", 1, None)
