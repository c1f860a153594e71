"""Weight conversion: turns a GGUF checkpoint into a plain safetensors folder that transformers and vLLM load."""

from __future__ import annotations

import logging
import time
from pathlib import Path

__all__ = ["ModelConversionError", "convert_gguf"]

logger = logging.getLogger(__name__)


class ModelConversionError(RuntimeError):
    """Raised when a checkpoint converts into a folder that lacks something serving needs (e.g. a chat template)."""


def convert_gguf(gguf_path: Path, target: Path, *, progress: bool = False) -> Path:
    """Dequantize a GGUF checkpoint to fp32 and save it with its tokenizer as a safetensors model folder.

    Needs the `gguf` and `accelerate` packages. The GGUF's chat template, bos/eos tokens and generation config are
    kept, so the folder serves chat completions as the original does.

    Args:
        gguf_path: The `.gguf` file.
        target: Folder to write (created if missing).
        progress: Show a progress bar on stderr (the conversion of a 135M model takes about 30 s).

    Returns:
        `target`, holding config.json, generation_config.json, model.safetensors and the tokenizer files.

    Raises:
        ModelConversionError: The GGUF carries no chat template or no eos token.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, target = Path(gguf_path), Path(target)
    label = gguf_path.name.split(".")[0]
    message = f"converting {label} GGUF -> safetensors (once, ~30 s)"
    logger.info("%s: %s -> %s", message, gguf_path, target)
    started = time.monotonic()
    with tqdm(total=4, desc=message, unit="step", disable=not progress) as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        if not tokenizer.chat_template:
            raise ModelConversionError(f"{gguf_path} carries no chat template; it cannot serve chat completions")
        if tokenizer.eos_token_id is None:
            raise ModelConversionError(f"{gguf_path} names no eos token; generation would never stop")
        bar.update()

        bar.set_postfix_str("dequantize")
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        bar.update()

        bar.set_postfix_str("save weights")
        # A GGUF-loaded model still names its quantizer and refuses to serialize ("quantized with
        # QuantizationMethod.GGUF ... not serializable"); the weights are already plain fp32 tensors.
        model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module.__setattr__ typing
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model.generation_config, "eos_token_id", None) is None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.save_pretrained(target, safe_serialization=True)
        bar.update()

        bar.set_postfix_str("save tokenizer")
        # The GGUF tokenizer claims an unbounded length and remembers how it was loaded; neither belongs on disk.
        tokenizer.model_max_length = model.config.max_position_embeddings
        for key in ("is_local", "local_files_only", "gguf_file"):
            tokenizer.init_kwargs.pop(key, None)
        tokenizer.save_pretrained(target)
        bar.update()
    logger.info("converted %s in %.1f s into %s", label, time.monotonic() - started, target)
    return target
