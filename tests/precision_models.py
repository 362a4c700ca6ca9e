"""Checkpoints shaped like the ones GPU users train, built from the tiny model on CPU.

Real instruct checkpoints (Qwen2.5, Llama 3) ship bfloat16 weights and a
``generation_config.json`` whose fields (``repetition_penalty``, several end tokens)
``generate`` applies unless told otherwise. The tiny model is float32 with no
generation config, so tests built only on it cannot see what goes wrong on those.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignment.tiny_model import ROLE_TOKENS

REPETITION_PENALTY = 1.3
SECOND_END = ROLE_TOKENS[1]  # "<|user|>": a second end token, as Qwen's <|endoftext|>


def bf16_checkpoint(tiny_model: Path, dest: Path) -> Path:
    """The tiny model saved in bfloat16, with a generation config carrying
    ``repetition_penalty`` 1.3 and two end tokens (the tokenizer's EOS and ``SECOND_END``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=end_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        repetition_penalty=REPETITION_PENALTY,
        do_sample=True,
        temperature=0.7,
        top_p=0.8,
        top_k=20,
    ).save_pretrained(dest)
    return dest


def end_token_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(SECOND_END)]


def stored_dtype(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")
