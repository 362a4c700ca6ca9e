"""GPU check (issue 16): what trains and judges without vLLM, on random-weight models of real
size, under bf16 autocast, with figures against plain TRL.

The device machine has torch (CUDA), transformers, peft and accelerate, and no vLLM, TRL,
datasets, pydantic, Prefect or DuckDB; nothing can be fetched there. ``bench/gpu_wheels.sh``
fetches the missing wheels here into ``bench/wheels/`` (ignored by git), which travels with
the working tree. Parts that need TRL are skipped with a note when ``import trl`` fails; the
rest needs torch, transformers, peft, accelerate and pydantic.

Parts (each one's failure is recorded and the next runs; the JSON is rewritten after each):

- ``models``: a Qwen2-0.5B-shaped policy (hidden 896, 24 layers, 14 heads, 2 KV heads,
  intermediate 4864, vocab 151936, tied embeddings) and a Qwen2-1.5B-shaped judge (hidden
  1536, 28 layers, 12 heads, 2 KV heads, intermediate 8960), random weights built from
  configs on the device (no hub), saved in bfloat16 with a byte-level BPE tokenizer trained
  here on the gold set's text (ChatML template, as Qwen's); the tokenizer's vocabulary must
  fit the config's ``vocab_size`` (padded, as Qwen's 151,665 tokens in 151,936 rows).
- ``checkpoint``: ``checkpoint_dtype`` reads bfloat16, ``load_for_training`` gives float32
  masters, plain ``from_pretrained`` gives bfloat16 (transformers 5's "auto").
- ``sft``, ``dpo_full``, ``dpo_lora``: rlaif's stage (``train_sft`` / ``train_dpo``, their
  defaults but for batch, max length and learning rate) against TRL's own ``SFTTrainer`` /
  ``DPOTrainer`` given the folder as a user would (``bf16=True``, TRL defaults, no end
  checkpoint). Per side: the dtype of the trainable parameters when the loop starts, the
  autocast dtype and the output dtype seen inside the forward pass, every step's loss,
  non-padding tokens/s over the steps after the warm-up, peak GPU memory; rlaif's saved
  precision record and saved dtype.
- ``ppo``: ``PPOTrainer`` (TRL 1.16 has no PPO), full fine-tune, a length reward: master
  dtype, autocast, finite losses, tokens/s of the timed batch.
- ``judge``: the contrast judge (``judge_comparisons``, mode contrast) on gold pairs through a
  transformers ``score_sequences`` (sum of the response's token log-probs under the
  principle's system prompt and the neutral one), the judge in bfloat16 as it is served, then
  again in float32: every label finite, prefill tokens/s, and how far bf16's Δ is from fp32's.
- ``qlora``: rlaif's ``train_sft`` with ``use_qlora`` (a 4-bit NF4 base from bitsandbytes,
  double quantisation, LoRA on top; docs/qlora.md) against TRL's ``SFTTrainer`` given the
  same 4-bit model and a LoRA config, figures as for ``sft``. Needs bitsandbytes (carried in
  bench/wheels, see bench/gpu_wheels.sh) and pydantic; skipped with the reason otherwise.

Without CUDA the script runs only with ``--tiny`` (the same shapes, tiny) and claims no GPU
figures (``gpu_figures: false``); tests/unit/test_gpu_bench.py runs it so on CPU.

    # device session (docs/benchmarks.md, "GPU check"): under 8 minutes on an H100
    python3 bench/gpu.py --out $OUT/gpu.json
    # CPU, tiny
    flock /tmp/rlaif-heavy.lock .venv/bin/python bench/gpu.py --tiny --out /tmp/gpu-tiny.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import REPO, write_results  # first: the offline settings

# The device machine runs a bare copy of the repository: the project is not installed there.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

GOLD = REPO / "alignment" / "data" / "judge_gold.jsonl"
PARTS = ("models", "checkpoint", "sft", "dpo_full", "dpo_lora", "ppo", "judge", "qlora")
LEARNING_RATES = {"sft": 2e-5, "dpo": 1e-6}  # rlaif's defaults, used by both sides
WHEELS_HINT = "carry bench/wheels (bench/gpu_wheels.sh) and install them first"

# ChatML, as Qwen's: no BOS, <|im_end|> ends a turn, <|endoftext|> pads.
PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int  # rows of the embedding; the tokenizer's vocabulary is padded to it
    tokenizer_vocab: int  # what the BPE trainer aims at (the gold set's text may give fewer)
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class Sizes:
    batch: int
    max_length: int
    warmup: int  # optimiser steps left out of tokens/s
    steps: int  # timed steps; one epoch over batch * (warmup + steps) rows
    eval_rows: int  # rlaif DPO's held-out pairs
    ppo_batch: int
    ppo_mini_batch: int
    ppo_epochs: int
    ppo_new_tokens: int
    ppo_batches: int  # the last one is timed
    judge_pairs: int
    judge_batch: int
    lora_r: int = 16
    lora_alpha: int = 32

    @property
    def rows(self) -> int:
        return self.batch * (self.warmup + self.steps)


SHAPES = {
    "full": {
        "policy": Shape(896, 24, 14, 2, 4864, 151936, 8192),  # Qwen2-0.5B
        "judge": Shape(1536, 28, 12, 2, 8960, 151936, 8192),  # Qwen2-1.5B
    },
    "tiny": {  # the real shapes' head_dim (64, 128), grouped KV heads and padded vocabulary
        "policy": Shape(128, 2, 2, 1, 256, 1024, 512),
        "judge": Shape(256, 2, 2, 1, 512, 1024, 512),
    },
}
SIZES = {
    "full": Sizes(batch=16, max_length=512, warmup=2, steps=6, eval_rows=8, ppo_batch=16,
                  ppo_mini_batch=8, ppo_epochs=2, ppo_new_tokens=48, ppo_batches=2,
                  judge_pairs=16, judge_batch=16),
    "tiny": Sizes(batch=2, max_length=128, warmup=1, steps=1, eval_rows=2, ppo_batch=2,
                  ppo_mini_batch=2, ppo_epochs=1, ppo_new_tokens=8, ppo_batches=1,
                  judge_pairs=2, judge_batch=4),
}  # fmt: skip


class Skipped(Exception):
    """A part that cannot run here; the message says why."""


# --- Environment ------------------------------------------------------------------------------


def version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as found

    try:
        return found(name)
    except PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {
            name: version(name)
            for name in (
                "transformers",
                "tokenizers",
                "accelerate",
                "peft",
                "trl",
                "datasets",
                "pydantic",
                "bitsandbytes",
            )
        },
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return info


def trl_problem() -> str | None:
    """Why TRL's trainers cannot be used here, or None."""
    try:
        import datasets  # noqa: F401
        from trl import DPOTrainer, SFTTrainer  # noqa: F401
    except Exception as error:  # ImportError, or a version clash inside
        return f"{type(error).__name__}: {error}"
    return None


def needs_pydantic() -> None:
    """rlaif's stage and judge configs are pydantic models; the device has no pydantic."""
    try:
        import pydantic  # noqa: F401
    except Exception as error:
        raise Skipped(
            f"pydantic not importable ({type(error).__name__}: {error}); {WHEELS_HINT}"
        ) from error


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dtypes(params: Iterator[Any]) -> list[str]:
    return sorted({str(p.dtype).removeprefix("torch.") for p in params})


def free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(record: dict[str, Any], key: str = "peak_gib") -> Iterator[None]:
    """Peak GPU memory allocated inside the block (CUDA only)."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        free()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        if cuda:
            record[key] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


def finite(values: Sequence[float | None]) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) for v in values)


# --- Data -------------------------------------------------------------------------------------


def gold() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLD.read_text().splitlines() if line.strip()]


def sft_rows(pairs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "completion": [{"role": "assistant", "content": p["chosen"]}],
        }
        for p in pairs
    ]


def preference_rows(pairs: Sequence[dict[str, Any]], p_chosen: bool = True) -> list[dict]:
    rows = []
    for i, p in enumerate(pairs):
        row = {
            "prompt": [{"role": "user", "content": p["prompt"]}],
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        if p_chosen:
            row["p_chosen"] = 0.6 + 0.1 * (i % 5)
        rows.append(row)
    return rows


# --- Models -----------------------------------------------------------------------------------


def build_tokenizer(texts: Sequence[str], vocab_size: int):
    """A byte-level BPE trained on ``texts``, with Qwen's ChatML special tokens."""
    from transformers import PreTrainedTokenizerFast

    from alignment.tiny_model import byte_level_bpe

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(texts, vocab_size, [PAD, IM_START, IM_END]),
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen2_config(shape: Shape, tokenizer):
    from transformers import Qwen2Config

    # Every field of a Shape but tokenizer_vocab is the Qwen2Config field of that name.
    model_shape = {k: v for k, v in asdict(shape).items() if k != "tokenizer_vocab"}
    return Qwen2Config(
        **model_shape,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def vocab_check(tokenizer, vocab_size: int, texts: Sequence[str]) -> dict[str, Any]:
    """The tokenizer's ids must all index the embedding: len(tokenizer) <= vocab_size."""
    highest = max(max(tokenizer.encode(t, add_special_tokens=False), default=0) for t in texts)
    highest = max(highest, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return {
        "tokenizer_tokens": len(tokenizer),
        "config_vocab_size": vocab_size,
        "padding_rows": vocab_size - len(tokenizer),
        "highest_id_seen": highest,
        "ok": len(tokenizer) <= vocab_size and highest < vocab_size,
    }


def build_model(shape: Shape, tokenizer, folder: Path, device: str) -> dict[str, Any]:
    """Random weights from the config, built on ``device`` in bfloat16, saved with the
    tokenizer; config.json records ``dtype: bfloat16`` as a real checkpoint's does."""
    import torch
    from transformers import AutoModelForCausalLM

    config = qwen2_config(shape, tokenizer)
    started = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    built = time.perf_counter() - started
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {
        "folder": folder.name,
        "shape": asdict(shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "head_dim": shape.hidden_size // shape.num_attention_heads,
        "build_s": round(built, 2),
        "save_s": round(time.perf_counter() - started - built, 2),
        "bytes_on_disk": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
    }
    del model
    free()
    return record


# --- Step clock: every Trainer.train call inside `clocked` --------------------------------------


def autocast_dtype(device_type: str) -> str | None:
    import torch

    if torch.is_autocast_enabled(device_type):
        return str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")
    return None


class ForwardProbe:
    """What a Linear inside the model sees while training: autocast and its output dtype.

    A leaf module, not the model: accelerate enters autocast inside the model's forward."""

    def __init__(self, model: Any) -> None:
        import torch

        self.seen: set[tuple[str | None, str]] = set()
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> None:
        device_type = output.device.type
        self.seen.add((autocast_dtype(device_type), str(output.dtype).removeprefix("torch.")))

    def record(self) -> dict[str, Any]:
        self.handle.remove()
        return {
            "autocast": sorted({a or "none" for a, _ in self.seen}),
            "linear_output_dtype": sorted({o for _, o in self.seen}),
        }


class StepClock:
    """One Trainer.train call: trainable dtypes at the start, forward probe, step ends (after
    a CUDA sync), tokens and loss of each batch."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.begin = self.end = 0.0
        self.step_ends: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.probe: ForwardProbe | None = None
        self.forward: dict[str, Any] = {}

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                model = kwargs["model"]
                trainable = [p for p in model.parameters() if p.requires_grad]
                clock.settings = {
                    "trainable_dtypes": dtypes(iter(trainable)),
                    "all_dtypes": dtypes(model.parameters()),
                    "trainable_parameters": sum(p.numel() for p in trainable),
                    "bf16_arg": bool(getattr(args, "bf16", False)),
                    "gradient_checkpointing": bool(
                        getattr(model, "is_gradient_checkpointing", False)
                    ),
                    "logging_steps": args.logging_steps,
                }
                clock.probe = ForwardProbe(model)
                sync()
                clock.begin = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                sync()
                clock.step_ends.append(time.perf_counter())

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.end = time.perf_counter()
                if clock.probe is not None:
                    clock.forward = clock.probe.record()

        return Callback()

    def figures(self, warmup: int) -> dict[str, Any]:
        ends, tokens = self.step_ends, self.tokens
        if len(ends) <= warmup or len(tokens) != len(ends):
            raise RuntimeError(f"{len(ends)} steps and {len(tokens)} batches; warm-up {warmup}")
        timed_s = ends[-1] - ends[warmup - 1] if warmup else ends[-1] - self.begin
        timed_tokens = sum(tokens[warmup:])
        return {
            **self.settings,
            **self.forward,
            "steps": len(ends),
            "timed_steps": len(ends) - warmup,
            "timed_tokens": timed_tokens,
            "tokens_per_s": round(timed_tokens / timed_s, 1),
            "s_per_step": round(timed_s / (len(ends) - warmup), 4),
            "first_step_s": round(ends[0] - self.begin, 3),
            "losses": [round(x, 5) for x in self.losses],
            "losses_finite": finite(self.losses),
        }


def fed_tokens(inputs: dict[str, Any]) -> int:
    mask = inputs.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())  # padding-free batches carry no padding


@contextlib.contextmanager
def clocked() -> Iterator[list[StepClock]]:
    """A StepClock for every ``Trainer.train`` call inside the block."""
    from transformers import Trainer

    clocks: list[StepClock] = []
    original = Trainer.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        clock = StepClock()
        self.add_callback(clock.callback())
        step = self.training_step

        def counted(model: Any, inputs: dict[str, Any], *rest: Any, **kw: Any) -> Any:
            clock.tokens.append(fed_tokens(inputs))
            loss = step(model, inputs, *rest, **kw)
            clock.losses.append(float(loss))
            return loss

        self.training_step = counted
        clocks.append(clock)
        return original(self, *args, **kwargs)

    Trainer.train = train  # type: ignore[method-assign]
    try:
        yield clocks
    finally:
        Trainer.train = original  # type: ignore[method-assign]


def measured(fn: Callable[[], Any], warmup: int) -> tuple[Any, dict[str, Any]]:
    """Runs ``fn`` (one Trainer.train inside) and reads its clock."""
    record: dict[str, Any] = {}
    with clocked() as clocks, peak_memory(record):
        start = time.perf_counter()
        result = fn()
        total = time.perf_counter() - start
    if len(clocks) != 1:
        raise RuntimeError(f"expected one Trainer.train call, saw {len(clocks)}")
    return result, {**clocks[0].figures(warmup), **record, "total_s": round(total, 2)}


# --- The parts --------------------------------------------------------------------------------


@dataclass
class Context:
    size: str
    device: str
    work: Path
    sizes: Sizes
    policy: Path | None = None
    judge: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def expected_autocast(self) -> str:
        return "bfloat16" if self.cuda else "none"


def part_models(ctx: Context) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    pairs = gold()
    texts = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected", "principle")]
    started = time.perf_counter()
    record: dict[str, Any] = {}
    for role in ("policy", "judge"):
        shape = SHAPES[ctx.size][role]
        tokenizer = build_tokenizer(texts, shape.tokenizer_vocab)
        folder = ctx.work / role
        record[role] = {
            **build_model(shape, tokenizer, folder, ctx.device),
            "vocab": vocab_check(tokenizer, shape.vocab_size, texts),
        }
        setattr(ctx, role, folder)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["checks"] = {
        f"{role} tokenizer fits vocab_size": record[role]["vocab"]["ok"]
        for role in ("policy", "judge")
    }
    return record


def part_checkpoint(ctx: Context) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from alignment.training.common import checkpoint_dtype, load_for_training, master_dtype

    folder = needs(ctx.policy)
    saved = str(checkpoint_dtype(folder)).removeprefix("torch.")
    master = load_for_training(AutoModelForCausalLM, folder)
    masters = master_dtype(master)
    del master
    auto = AutoModelForCausalLM.from_pretrained(folder)
    auto_dtype = str(auto.dtype).removeprefix("torch.")
    del auto
    free()
    return {
        "checkpoint_dtype": saved,
        "load_for_training": masters,
        "from_pretrained_auto": auto_dtype,
        "judge_checkpoint_dtype": str(checkpoint_dtype(needs(ctx.judge))).removeprefix("torch."),
        "checks": {
            "checkpoint saved bfloat16": saved == "bfloat16",
            "load_for_training gives float32 masters": masters == "float32",
        },
    }


def needs(folder: Path | None) -> Path:
    if folder is None:
        raise Skipped("needs the models part")
    return folder


def training_checks(ctx: Context, run: dict[str, Any], side: str) -> dict[str, bool]:
    return {
        f"{side}: trainable params float32": run["trainable_dtypes"] == ["float32"],
        f"{side}: autocast {ctx.expected_autocast}": run["autocast"] == [ctx.expected_autocast],
        f"{side}: losses finite": run["losses_finite"],
    }


def rlaif_saved(ctx: Context, path: Path, run: dict[str, Any]) -> dict[str, bool]:
    from alignment.training.common import checkpoint_dtype, saved_precision

    run["saved_precision"] = saved_precision(path)
    run["saved_dtype"] = str(checkpoint_dtype(path)).removeprefix("torch.")
    shutil.rmtree(path, ignore_errors=True)
    return {"rlaif: saved in the checkpoint's dtype (bfloat16)": run["saved_dtype"] == "bfloat16"}


def compared(ctx: Context, stage: str, rlaif: Callable[[Path], Any], raw: Callable[[str], Any]):
    """rlaif's stage, then plain TRL, on the same rows; both sides' figures and checks."""
    needs_pydantic()
    problem = trl_problem()
    if problem:
        raise Skipped(f"TRL not importable ({problem}); {WHEELS_HINT}")
    out = ctx.work / f"rlaif-{stage}"
    result, rlaif_run = measured(lambda: rlaif(out), ctx.sizes.warmup)
    free()
    rlaif_run["metrics"] = getattr(result, "metrics", None)
    checks = {**training_checks(ctx, rlaif_run, "rlaif"), **rlaif_saved(ctx, out, rlaif_run)}
    with tempfile.TemporaryDirectory(prefix=f"raw-{stage}-", dir=ctx.work) as scratch:
        _, raw_run = measured(lambda: raw(scratch), ctx.sizes.warmup)
    free()
    checks |= training_checks(ctx, raw_run, "plain TRL")
    return {
        "rows": ctx.sizes.rows,
        "batch": ctx.sizes.batch,
        "max_length": ctx.sizes.max_length,
        "rlaif": rlaif_run,
        "raw_trl": raw_run,
        "ratio": round(rlaif_run["tokens_per_s"] / raw_run["tokens_per_s"], 3),
        "checks": checks,
    }


def raw_args(config_class: type, scratch: str, ctx: Context, lr: float, **fields: Any):
    """TRL's defaults, as a user writes them on a GPU (bf16=True; TRL's own default), less the
    end-of-training checkpoint and any tracker."""
    import torch

    return config_class(
        output_dir=scratch,
        bf16=ctx.cuda,
        use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=ctx.sizes.batch,
        max_length=ctx.sizes.max_length,
        num_train_epochs=1,
        learning_rate=lr,
        seed=0,
        save_strategy="no",
        report_to="none",
        **fields,
    )


def part_sft(ctx: Context) -> dict[str, Any]:
    policy = needs(ctx.policy)
    rows = sft_rows(gold()[: ctx.sizes.rows])

    def rlaif(out: Path) -> Any:
        from alignment.training.sft import SFTStageConfig, train_sft

        config = SFTStageConfig(
            per_device_train_batch_size=ctx.sizes.batch,
            max_length=ctx.sizes.max_length,
            learning_rate=LEARNING_RATES["sft"],
        )
        return train_sft(policy, rows, config, out)

    def raw(scratch: str) -> Any:
        import datasets
        from trl import SFTConfig, SFTTrainer

        args = raw_args(SFTConfig, scratch, ctx, LEARNING_RATES["sft"])
        trainer = SFTTrainer(
            model=str(policy), args=args, train_dataset=datasets.Dataset.from_list(rows)
        )
        return trainer.train()

    return compared(ctx, "sft", rlaif, raw)


def dpo_part(ctx: Context, lora: bool) -> dict[str, Any]:
    policy = needs(ctx.policy)
    pairs = gold()
    train = pairs[: ctx.sizes.rows]
    held_out = pairs[ctx.sizes.rows : ctx.sizes.rows + ctx.sizes.eval_rows]

    def rlaif(out: Path) -> Any:
        from alignment.training.dpo import DPOStageConfig, train_dpo

        config = DPOStageConfig(
            per_device_train_batch_size=ctx.sizes.batch,
            max_length=ctx.sizes.max_length,
            learning_rate=LEARNING_RATES["dpo"],
            use_lora=lora,
            lora_r=ctx.sizes.lora_r,
            lora_alpha=ctx.sizes.lora_alpha,
        )
        return train_dpo(policy, preference_rows(train), preference_rows(held_out), config, out)

    def raw(scratch: str) -> Any:
        import datasets
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        args = raw_args(DPOConfig, scratch, ctx, LEARNING_RATES["dpo"])
        peft_config = (
            LoraConfig(
                r=ctx.sizes.lora_r,
                lora_alpha=ctx.sizes.lora_alpha,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
            if lora
            else None
        )
        data = datasets.Dataset.from_list(preference_rows(train, p_chosen=False))
        trainer = DPOTrainer(
            model=str(policy), args=args, train_dataset=data, peft_config=peft_config
        )
        return trainer.train()

    return compared(ctx, "dpo-lora" if lora else "dpo", rlaif, raw)


def part_dpo_full(ctx: Context) -> dict[str, Any]:
    return dpo_part(ctx, lora=False)


def part_dpo_lora(ctx: Context) -> dict[str, Any]:
    return dpo_part(ctx, lora=True)


def length_reward(prompts: list[str], responses: list[str]):
    """A reward with no model: longer answers (in characters, up to 200) score higher."""
    import torch

    return torch.tensor([min(len(r), 200) / 100.0 for r in responses])


def part_ppo(ctx: Context) -> dict[str, Any]:
    needs_pydantic()
    from transformers import AutoTokenizer

    from alignment.training.common import master_dtype
    from alignment.training.ppo import PPOConfig, PPOTrainer

    policy = needs(ctx.policy)
    s = ctx.sizes
    config = PPOConfig(
        num_batches=s.ppo_batches,
        batch_size=s.ppo_batch,
        mini_batch_size=s.ppo_mini_batch,
        ppo_epochs=s.ppo_epochs,
        max_new_tokens=s.ppo_new_tokens,
    )
    prompts = sorted({p["prompt"] for p in gold()})
    tokenizer = AutoTokenizer.from_pretrained(policy)
    record: dict[str, Any] = {"config": config.model_dump()}
    with peak_memory(record):
        trainer = PPOTrainer(config, str(policy), tokenizer, length_reward, prompts)
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        record["trainable_dtypes"] = dtypes(iter(trainable))
        record["master_dtype"] = master_dtype(model)
        record["accelerator_mixed_precision"] = str(trainer.accelerator.mixed_precision)
        tokens: list[int] = []
        rollout = trainer.rollout

        def counted(batch_prompts: list[str]) -> dict[str, Any]:
            batch = rollout(batch_prompts)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        trainer.rollout = counted  # type: ignore[method-assign]
        probe = ForwardProbe(model)
        history = trainer.train()
        record.update(probe.record())
    losses = [m[k] for m in history for k in ("policy/loss", "val/loss")]
    seconds = history[-1]["time/batch_seconds"]
    record.update(
        {
            "batches": len(history),
            "timed_batch_s": round(seconds, 3),
            "timed_tokens": tokens[-1],
            "tokens_per_s": round(tokens[-1] / seconds, 1),
            "losses": [round(x, 5) for x in losses],
            "losses_finite": finite(losses),
            "kl": [m["objective/kl"] for m in history],
        }
    )
    record["checks"] = training_checks(ctx, record, "rlaif")
    del trainer, model
    free()
    return record


class TransformersScorer:
    """The Backend protocol's ``score_sequences`` through one transformers forward per batch:
    the response's token log-probs after the chat before it (as ``VLLMBackend`` locates them),
    the end-of-turn token apart. Enough for the contrast judge; it generates nothing."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.model_name = "gpu-check-judge"
        self.tokens = 0
        self.seconds = 0.0

    def generate(self, chats: Any, sampling: Any) -> Any:
        raise NotImplementedError("the GPU check's judge only scores sequences")

    def score_options(self, chats: Any, options: Any) -> Any:
        raise NotImplementedError("the GPU check's judge only scores sequences")

    def response_tokens(self, chat: Sequence[dict[str, str]]):
        from alignment.backends import chat_response_tokens

        return chat_response_tokens(self.tokenizer, list(chat))

    def score_sequences(self, chats: Sequence[Sequence[dict[str, str]]]) -> list[Any]:
        import torch

        located = [self.response_tokens(chat) for chat in chats]
        order = sorted(range(len(located)), key=lambda i: len(located[i].token_ids))
        scores: list[Any] = [None] * len(located)
        device = self.model.device
        sync()
        started = time.perf_counter()
        with torch.no_grad():
            for at in range(0, len(order), self.batch_size):
                rows = order[at : at + self.batch_size]
                width = max(len(located[i].token_ids) for i in rows)
                ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(located[i].token_ids)
                    ids[r, :n] = torch.tensor(located[i].token_ids)
                    mask[r, :n] = 1
                ids, mask = ids.to(device), mask.to(device)
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                picked = logprobs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).cpu()
                for r, i in enumerate(rows):
                    n = len(located[i].token_ids)
                    scores[i] = located[i].score([None, *picked[r, : n - 1].tolist()])
                self.tokens += int(mask.sum())
                del logits, logprobs
        sync()
        self.seconds += time.perf_counter() - started
        return scores


def judge_with(folder: Path, dtype_name: str, comparisons: list[Any], ctx: Context):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.judge import judge_comparisons
    from alignment.judge_config import JudgeConfig

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype_name), device_map=ctx.device
    ).eval()
    scorer = TransformersScorer(model, tokenizer, ctx.sizes.judge_batch)
    config = JudgeConfig(mode="contrast")
    judge_comparisons(scorer, comparisons[:1], config)  # warm-up
    scorer.tokens, scorer.seconds = 0, 0.0
    labels = judge_comparisons(scorer, comparisons, config)
    figures = {
        "dtype": dtype_name,
        "prefill_tokens": scorer.tokens,
        "seconds": round(scorer.seconds, 3),
        "tokens_per_s": round(scorer.tokens / scorer.seconds, 1),
    }
    del model, scorer
    free()
    return labels, figures


def part_judge(ctx: Context) -> dict[str, Any]:
    needs_pydantic()
    from alignment.judge_eval import load_preference_set, to_comparisons

    folder = needs(ctx.judge)
    comparisons = to_comparisons(load_preference_set("builtin", ctx.sizes.judge_pairs))
    record: dict[str, Any] = {"comparisons": len(comparisons), "chats": 4 * len(comparisons)}
    with peak_memory(record):
        labels, record["bf16"] = judge_with(folder, "bfloat16", comparisons, ctx)
    fp32_labels, record["fp32"] = judge_with(folder, "float32", comparisons, ctx)
    deltas = [(x.delta_a, x.delta_b) for x in labels]
    ref = [(x.delta_a, x.delta_b) for x in fp32_labels]
    values = [d for pair in deltas + ref for d in pair] + [x.p_a for x in labels]
    gaps = [
        abs(a - b)
        for pair, fp32 in zip(deltas, ref, strict=True)
        for a, b in zip(pair, fp32, strict=True)
        if a is not None and b is not None
    ]
    same_side = [
        (x.p_a > 0.5) == (y.p_a > 0.5)
        for x, y in zip(labels, fp32_labels, strict=True)
        if x.p_a is not None and y.p_a is not None
    ]
    record.update(
        {
            "statuses": sorted({x.status for x in labels}),
            "p_a": [round(x.p_a, 4) if x.p_a is not None else None for x in labels],
            "max_abs_delta_gap_bf16_fp32": round(max(gaps), 4) if gaps else None,
            "same_side_bf16_fp32": round(sum(same_side) / len(same_side), 3) if same_side else None,
            "checks": {
                "every label ok": {x.status for x in labels} == {"ok"},
                "Δ and p finite": finite(values),
            },
        }
    )
    return record


def part_qlora(ctx: Context) -> dict[str, Any]:
    """rlaif's SFT with ``use_qlora`` against plain TRL's SFTTrainer given a 4-bit model and a
    LoRA config, as TRL's docs write it. TRL casts a quantized model's adapter to bf16;
    rlaif keeps float32 masters. Runs on CPU too (``--tiny``; bitsandbytes >= 0.49)."""
    import torch

    needs_pydantic()
    from alignment.training import common

    problem = common.qlora_problem(common.bitsandbytes_version(), torch.cuda.is_available())
    if problem:
        raise Skipped(f"{problem}; on the device: {WHEELS_HINT}")
    policy = needs(ctx.policy)
    rows = sft_rows(gold()[: ctx.sizes.rows])
    quantized: list[bool] = []  # what rlaif's stage loaded: a 4-bit base?

    def rlaif(out: Path) -> Any:
        from alignment.training.sft import SFTStageConfig, train_sft

        load = common.load_for_training

        def recorded(*args: Any, **kwargs: Any) -> Any:
            model = load(*args, **kwargs)
            quantized.append(common.is_quantized(model))
            return model

        config = SFTStageConfig(
            use_qlora=True,
            lora_r=ctx.sizes.lora_r,
            lora_alpha=ctx.sizes.lora_alpha,
            per_device_train_batch_size=ctx.sizes.batch,
            max_length=ctx.sizes.max_length,
            learning_rate=LEARNING_RATES["sft"],
        )
        common.load_for_training = recorded
        try:
            return train_sft(policy, rows, config, out)
        finally:
            common.load_for_training = load

    def raw(scratch: str) -> Any:
        import datasets
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        from trl import SFTConfig, SFTTrainer

        compute = torch.bfloat16 if ctx.cuda else torch.float32
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        model = AutoModelForCausalLM.from_pretrained(
            policy,
            quantization_config=quantization,
            dtype=compute,
            device_map={"": 0 if ctx.cuda else "cpu"},
        )
        lora = LoraConfig(
            r=ctx.sizes.lora_r,
            lora_alpha=ctx.sizes.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        args = raw_args(SFTConfig, scratch, ctx, LEARNING_RATES["sft"])
        data = datasets.Dataset.from_list(rows)
        return SFTTrainer(model=model, args=args, train_dataset=data, peft_config=lora).train()

    record = compared(ctx, "qlora", rlaif, raw)
    checks = record["checks"]
    checks["rlaif: 4-bit base"] = quantized == [True]
    # TRL's own QLoRA recipe: the adapter in bf16 (trl/trainer/sft_trainer.py)
    del checks["plain TRL: trainable params float32"]
    checks["plain TRL: trainable params bfloat16"] = record["raw_trl"]["trainable_dtypes"] == [
        "bfloat16"
    ]
    return record


RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "models": part_models,
    "checkpoint": part_checkpoint,
    "sft": part_sft,
    "dpo_full": part_dpo_full,
    "dpo_lora": part_dpo_lora,
    "ppo": part_ppo,
    "judge": part_judge,
    "qlora": part_qlora,
}


# --- Run --------------------------------------------------------------------------------------


def run(
    size: str = "full",
    parts: Sequence[str] = PARTS,
    work: Path | None = None,
    budget_s: float = 420.0,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The check; ``on_part`` gets the result so far after each part."""
    import torch

    if size not in SHAPES:
        raise ValueError(f"size must be one of {sorted(SHAPES)}, got {size!r}")
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    cuda = torch.cuda.is_available()
    if not cuda and size != "tiny":
        raise SystemExit(
            "bench/gpu.py: no CUDA device here; the GPU figures need one. "
            "`--tiny` checks the same code paths on CPU and claims no GPU figures."
        )
    started = time.monotonic()
    result: dict[str, Any] = {
        "size": size,
        "device": "cuda" if cuda else "cpu",
        "gpu_figures": cuda and size == "full",
        "note": (
            "GPU run at full size"
            if cuda and size == "full"
            else f"{'GPU' if cuda else 'CPU'} run at tiny size: it checks the code paths and "
            "dtypes and claims no GPU figures"
        ),
        "machine": machine(),
        "sizes": asdict(SIZES[size]),
        "budget_s": budget_s,
        "trl": trl_problem() or "ok",
        "parts": {},
    }
    with contextlib.ExitStack() as stack:
        if work is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rlaif-gpu-")))
        ctx = Context(size, result["device"], Path(work), SIZES[size])
        for name in PARTS:
            if name not in parts:
                continue
            spent = time.monotonic() - started
            if spent > budget_s:
                record = {"status": "skipped", "reason": f"time budget of {budget_s:.0f} s spent"}
            else:
                record = run_part(name, ctx)
            result["parts"][name] = record
            print(f"gpu check {name}: {json.dumps(summary(record), default=str)}", flush=True)
            result["seconds"] = round(time.monotonic() - started, 1)
            result["checks"] = all_checks(result)
            if on_part:
                on_part(result)
    return result


def run_part(name: str, ctx: Context) -> dict[str, Any]:
    started = time.monotonic()
    try:
        record = {"status": "ok", **RUNNERS[name](ctx)}
    except Skipped as why:
        record = {"status": "skipped", "reason": str(why)}
    except Exception as error:
        record = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    finally:
        free()
    record["seconds"] = round(time.monotonic() - started, 1)
    return record


def summary(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("status", "reason", "error", "seconds", "checks", "ratio", "tokens_per_s")
    return {k: v for k, v in record.items() if k in keep}


def all_checks(result: dict[str, Any]) -> dict[str, Any]:
    named = {
        f"{part}: {name}": ok
        for part, record in result["parts"].items()
        for name, ok in record.get("checks", {}).items()
    }
    failed = sorted(name for name, ok in named.items() if not ok)
    errors = sorted(p for p, r in result["parts"].items() if r["status"] == "error")
    return {"passed": len(named) - len(failed), "total": len(named), "failed": failed,
            "errors": errors}  # fmt: skip


# --- Report -----------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def _gib(run: dict[str, Any]) -> str:
    return f"{run['peak_gib']:.1f}" if "peak_gib" in run else "–"


def _loss(run: dict[str, Any]) -> str:
    losses = run.get("losses") or []
    return f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "–"


def _precision(run: dict[str, Any]) -> str:
    trainable, autocast = run.get("trainable_dtypes", ["?"]), run.get("autocast", ["?"])
    return f"{','.join(trainable)} / {','.join(autocast)}"


def _status(record: dict[str, Any]) -> str:
    if record["status"] == "skipped":
        return f"skipped: {record['reason']}"
    if record["status"] == "error":
        return f"error: {record['error'].splitlines()[0][:160]}"
    return "ok"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = m.get("gpu")
    device = (
        f"{gpu['name']} ({gpu['memory_gib']} GiB, compute capability {gpu['capability']}), "
        f"CUDA {m['cuda']}"
        if gpu
        else f"{m['cpu']}, {m['cores']} cores, no GPU"
    )
    packages = ", ".join(f"{k} {v or 'not installed'}" for k, v in m["packages"].items())
    checks = result.get("checks", {})
    lines = [
        "### GPU check (bench/gpu.py)",
        "",
        f"{result['note']}. Device: {device}; Python {m['python']}, torch {m['torch']}, "
        f"{packages}. Total {result.get('seconds', 0):.0f} s.",
        "",
    ]
    if not result["gpu_figures"]:
        lines += ["No GPU figures: this result is from a run at tiny size.", ""]
    models = result["parts"].get("models", {})
    if models.get("status") == "ok":
        described = []
        for role in ("policy", "judge"):
            r = models[role]
            v, shape = r["vocab"], r["shape"]
            described.append(
                f"{role} {_count(r['parameters'])} parameters ({shape['num_hidden_layers']} "
                f"layers, hidden {shape['hidden_size']}, head_dim {r['head_dim']}), "
                f"tokenizer {v['tokenizer_tokens']:,} tokens in {v['config_vocab_size']:,} rows"
            )
        lines += [
            "Random weights from Qwen2 configs (no hub), saved in bfloat16: "
            + "; ".join(described)
            + ".",
            "",
        ]
    lines += [
        f"Checks: {checks.get('passed', 0)} of {checks.get('total', 0)} passed"
        + (f"; failed: {', '.join(checks['failed'])}" if checks.get("failed") else "")
        + (f"; parts with errors: {', '.join(checks['errors'])}" if checks.get("errors") else "")
        + ".",
        "",
        "Training: trainable dtype / autocast seen inside the forward pass; loss at the first "
        "and last step; non-padding tokens/s after the warm-up steps; peak GPU memory. "
        f"Plain TRL: its trainer given the model folder, `bf16={result['device'] == 'cuda'}`, "
        "TRL defaults (no end checkpoint). Part seconds: "
        + ", ".join(f"{name} {p['seconds']:.0f}" for name, p in result["parts"].items())
        + ".",
        "",
        "| part | status | rlaif dtype / autocast | rlaif loss | rlaif tokens/s | plain TRL "
        "tokens/s | ratio | peak GiB (rlaif / TRL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("sft", "dpo_full", "dpo_lora", "ppo", "qlora"):
        record = result["parts"].get(name)
        if record is None:
            continue
        label = name.replace("_", " ")
        if record["status"] != "ok":
            lines.append(f"| {label} | {_status(record)} | | | | | | |")
            continue
        if "rlaif" in record:
            rl, raw = record["rlaif"], record["raw_trl"]
            lines.append(
                f"| {label} | ok | {_precision(rl)} | {_loss(rl)} | {rl['tokens_per_s']:,.0f} "
                f"| {raw['tokens_per_s']:,.0f} | {record['ratio']:.2f} | {_gib(rl)} / {_gib(raw)} |"
            )
        else:  # ppo, qlora: no TRL side
            lines.append(
                f"| {label} | ok | {_precision(record)} | {_loss(record)} "
                f"| {record['tokens_per_s']:,.0f} | – | – | {_gib(record)} |"
            )
    judge = result["parts"].get("judge")
    if judge is not None:
        lines.append("")
        if judge["status"] != "ok":
            lines.append(f"Contrast judge through transformers: {_status(judge)}.")
        else:
            lines.append(
                f"Contrast judge through transformers ({judge['comparisons']} gold comparisons, "
                f"{judge['chats']} chats): labels {', '.join(judge['statuses'])}; prefill "
                f"{judge['bf16']['tokens_per_s']:,.0f} tokens/s in bfloat16, "
                f"{judge['fp32']['tokens_per_s']:,.0f} in float32; largest |Δ bf16 − Δ fp32| "
                f"{judge['max_abs_delta_gap_bf16_fp32']} nats, same side in "
                f"{judge['same_side_bf16_fp32']:.0%} of comparisons (random weights: Δ is noise, "
                f"the gap is bf16's rounding); peak {_gib(judge)} GiB."
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="JSON result (default bench/results/gpu.json on a GPU)")
    parser.add_argument("--md", help="also write the markdown section here")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes; the only mode on CPU")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no part after this")
    parser.add_argument("--work", help="folder for the models (default: a temporary one)")
    args = parser.parse_args(argv)
    # The device tool returns the last 12,000 characters of output: no progress bars.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    size = "tiny" if args.tiny else "full"
    out = args.out or (
        "bench/results/gpu.json" if size == "full" else tempfile.gettempdir() + "/gpu-tiny.json"
    )
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]

    def save(result: dict[str, Any]) -> None:  # after each part: a killed run keeps its figures
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1, default=str) + "\n")

    work = Path(args.work) if args.work else None
    result = run(size, parts, work, args.budget_s, on_part=save)
    result = json.loads(json.dumps(result, default=str))  # numpy scalars and the like
    write_results(result, out, args.md, markdown)
    checks = result["checks"]
    print(f"checks: {checks['passed']} of {checks['total']} passed; failed {checks['failed']}")


if __name__ == "__main__":
    main()
