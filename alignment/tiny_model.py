"""The embedded default model: a tiny Llama built locally, no download.

A byte-level BPE tokenizer is trained on the project's own text, a Llama is
built from a config (head_dim 64: vLLM's CPU attention refuses 16), and it is
trained for a fixed number of steps on chats rendered from that text, so its
words are words and, as a judge, it puts its mass on the option labels. Its
opinions are noise; the machinery around it is real. Everything is
deterministic from the seed and the corpus, and the folder name is a hash of
both, so a second build is a no-op.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from alignment import atomic, templates
from alignment.ids import content_id

BOS, END, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, END, *ROLE_TOKENS)

# One turn per role marker; the assistant turn is left open for generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class TinyModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    head_dim: int = 64  # vLLM CPU attention supports 32, 64, 80, 96, 112, 128, ...
    max_position_embeddings: int = 1024
    train_steps: int = 240
    batch_size: int = 8
    block_size: int = 384
    learning_rate: float = 3e-3
    seed: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLAIF_CACHE", Path.home() / ".cache" / "rlaif")) / "models"


def judge_examples(
    rng: random.Random, principle: str, prompt: str, first: str, second: str
) -> list[list[dict]]:
    """Judge questions answered with a label, so the judge learns where its answer goes.

    The answer rule (the shorter response wins; "yes" when the response is short)
    is arbitrary but learnable, so the tiny judge has opinions to record.
    """
    label = "A" if len(first.split()) <= len(second.split()) else "B"
    pairwise = templates.pairwise_judge_chat(principle, prompt, first, second)
    yes_label = rng.choice(templates.LABELS)
    no_label = "B" if yes_label == "A" else "A"
    pointwise = templates.pointwise_judge_chat(principle, prompt, first, yes_label)
    verdict = yes_label if len(first.split()) < 15 else no_label
    cot = templates.cot_answer_chat(
        templates.pairwise_cot_chat(principle, prompt, first, second),
        f"Response ({label}) is shorter and follows the principle.",
    )
    return [
        _answered(pairwise, label),
        _answered(pointwise, verdict),
        _answered(cot, label),
    ]


def _answered(chat: list[dict], label: str) -> list[dict]:
    *head, lead_in = chat
    return [*head, {"role": "assistant", "content": f"{lead_in['content']}{label})"}]


def corpus_chats(
    prompts: Sequence[str],
    principles: Sequence[tuple[str, str, str]],
    seed: int,
    n_chats: int = 1500,
) -> list[list[dict]]:
    """Chats in the shapes the pipeline uses: answers, critiques, revisions, judge questions.

    ``principles`` holds (principle, critique request, revision request) texts.
    """
    rng = random.Random(seed)
    sentences = [text for p in principles for text in p] + list(prompts)

    def reply(max_words: int) -> str:
        words = " ".join(rng.choice(sentences) for _ in range(3)).split()
        return " ".join(words[: rng.randint(4, max_words)])

    chats: list[list[dict]] = []
    for _ in range(n_chats):
        prompt = rng.choice(prompts)
        principle, critique, revision = rng.choice(principles)
        kind = rng.random()
        if kind < 0.4:
            chats.append(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply(40)}]
            )
        elif kind < 0.6:
            turns = templates.revision_chat(prompt, reply(30), critique, reply(30), revision)
            chats.append([*turns, {"role": "assistant", "content": reply(40)}])
        else:
            chats.extend(judge_examples(rng, principle, prompt, reply(30), reply(30)))
    return chats


def byte_level_bpe(texts: Sequence[str], vocab_size: int, special_tokens: Sequence[str]):
    """A byte-level BPE (GPT-2 style, as SmolLM2's and Qwen's) trained in memory on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def build_tokenizer(texts: Sequence[str], vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(texts, vocab_size, SPECIAL_TOKENS),
        bos_token=BOS,
        eos_token=END,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, config: TinyModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return LlamaForCausalLM(llama)


def train(model, token_ids: list[int], config: TinyModelConfig, progress=None) -> list[float]:
    """Plain next-token training on random windows of the packed corpus."""
    import torch

    generator = torch.Generator().manual_seed(config.seed)
    data = torch.tensor(token_ids, dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(config.train_steps):
        lr = config.learning_rate * 0.5 * (1 + math.cos(math.pi * step / config.train_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        starts = torch.randint(
            0, len(data) - config.block_size - 1, (config.batch_size,), generator=generator
        )
        batch = torch.stack([data[s : s + config.block_size] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress:
            progress(step + 1, config.train_steps, losses[-1])
    model.eval()
    return losses


def build_tiny_model(
    chats: Sequence[Sequence[dict]],
    config: TinyModelConfig = TinyModelConfig(),
    cache_dir: Path | None = None,
    progress=None,
) -> Path:
    """Build (or find) the tiny model for this corpus and config; return its folder."""
    import torch

    cache_dir = cache_dir or default_cache_dir()
    key = content_id("tiny-model", asdict(config), [list(c) for c in chats])
    target = cache_dir / f"tiny-{key[:12]}"
    if (target / "rlaif_build.json").exists():
        return target

    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer([m["content"] for c in chats for m in c], config.vocab_size)
    token_ids: list[int] = []
    for chat in chats:
        text = tokenizer.apply_chat_template(list(chat), tokenize=False)
        token_ids += tokenizer.encode(text, add_special_tokens=False)
    model = build_model(tokenizer, config)
    started = time.monotonic()
    losses = train(model, token_ids, config, progress)

    # A half-built folder at `target` (a crash; its marker file is missing) is replaced.
    with atomic.replacing(target) as staging:
        staging.mkdir()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        build = {
            "config": asdict(config),
            "corpus_chats": len(chats),
            "corpus_tokens": len(token_ids),
            "parameters": sum(p.numel() for p in model.parameters()),
            "loss_first": losses[0],
            "loss_last": sum(losses[-10:]) / min(10, len(losses)),
            "train_seconds": round(time.monotonic() - started, 1),
        }
        (staging / "rlaif_build.json").write_text(json.dumps(build, indent=2))
    return target
