"""Reward model (TRL ``RewardTrainer``, sequence-classification head) with normalised scores.

Rows are preference pairs: ``prompt`` / ``chosen`` / ``rejected``, conversational
(lists of messages) or standard (strings), plus the judge's ``p_chosen`` in
[0.5, 1] (1.0 when absent). Three losses:

- ``hard``: −logσ(r_c − r_r), the Bradley-Terry loss.
- ``margin``: −logσ(r_c − r_r − m) with m = ``margin_scale``·(2p − 1), the Llama 2
  margin loss; TRL reads m from a ``margin`` column.
- ``soft_ce``: binary cross-entropy of σ(r_c − r_r) against p_chosen
  (``losses.soft_bradley_terry_loss``); the one override of TRL, in ``compute_loss``.

After training, the chosen and rejected responses of a reference set are scored
and their mean and standard deviation are written next to the model as
``rlaif_reward_stats.json``; ``score`` subtracts and divides by them, so every
later score has mean 0 and std 1 on that set.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from alignment.training import common
from alignment.training.losses import margin_from_soft_label, soft_bradley_terry_loss

STATS_FILE = "rlaif_reward_stats.json"
PAIR_COLUMNS = ("prompt", "chosen", "rejected")


class RewardStageConfig(common.TrainingStageConfig):
    loss: Literal["margin", "soft_ce", "hard"] = Field(
        "margin",
        description="margin: Llama 2 margin loss, margin from p_chosen; soft_ce: cross-entropy "
        "against p_chosen; hard: plain Bradley-Terry, p_chosen ignored.",
    )
    margin_scale: float = Field(
        1.0, ge=0, description="Margin at p_chosen = 1 for loss=margin (Llama 2 uses 1)."
    )
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    num_train_epochs: float = Field(1.0, gt=0, description="Passes over the pairs.")
    per_device_train_batch_size: int = Field(8, gt=0, description="Pairs per step.")
    max_length: int = Field(
        1024, gt=0, description="Tokens per prompt+response; longer pairs are dropped, as TRL does."
    )
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="Weight of mean((r_c + r_r)^2), which keeps rewards near 0 "
        "(Eisenstein et al. 2023, Eq. 2; 0.01 recommended).",
    )
    eval_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Held-out share of the training pairs when no eval set is given.",
    )
    seed: int = Field(0, description="Seed for the head's initialisation, shuffling and split.")


# --- rows -------------------------------------------------------------------------------------


def pair_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """prompt/chosen/rejected/p_chosen of each row (a list of dicts or a ``datasets.Dataset``)."""
    out = []
    for i, row in enumerate(rows):
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"preference row {i} lacks {missing}; rows need {list(PAIR_COLUMNS)}")
        p_chosen = float(row.get("p_chosen", 1.0))
        if not 0.5 <= p_chosen <= 1.0:
            raise ValueError(f"preference row {i} has p_chosen={p_chosen}; expected [0.5, 1]")
        out.append({c: row[c] for c in PAIR_COLUMNS} | {"p_chosen": p_chosen})
    return out


def split_eval(
    rows: list[dict[str, Any]],
    eval_rows: Iterable[dict[str, Any]] | None,
    fraction: float,
    seed: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): ``eval_rows`` when given, else a seeded ``fraction`` of ``rows``."""
    if eval_rows is not None:
        return rows, pair_rows(eval_rows)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = int(len(rows) * fraction)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


@dataclass
class WithPChosen:
    """Wraps a TRL preference collator so each batch also carries ``p_chosen`` (shape [B])."""

    collator: Callable[[list[dict[str, Any]]], dict[str, Any]]

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        batch = self.collator(examples)
        batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float)
        return batch


# --- scoring ----------------------------------------------------------------------------------


def chat_pair(prompt: str | list[dict], response: str | list[dict]) -> list[dict]:
    """The conversation a reward model scores: the prompt's messages (a plain prompt is one
    user turn) and the response as the assistant turn. Training rows, PPO's rollouts, RLOO/GRPO
    completions and the eval all reach the reward model in this one form."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if isinstance(response, str):
        return [*messages, {"role": "assistant", "content": response}]
    return [*messages, *response]


def chat_row(row: dict[str, Any]) -> dict[str, Any]:
    """A preference row in the form the reward model scores: a plain prompt as one user turn
    and plain responses as assistant turns (``chat_pair``); conversational fields as they are."""

    def turn(role: str, content: str | list[dict]) -> list[dict]:
        return [{"role": role, "content": content}] if isinstance(content, str) else content

    return row | {
        "prompt": turn("user", row["prompt"]),
        "chosen": turn("assistant", row["chosen"]),
        "rejected": turn("assistant", row["rejected"]),
    }


def reward_input_ids(tokenizer, prompt: str | list[dict], response: str | list[dict]) -> list[int]:
    """Tokens of prompt+response exactly as TRL's ``RewardTrainer`` tokenises a conversational
    pair: the chat template over ``chat_pair``. A tokenizer without a chat template gets
    TRL's standard form, prompt + response + EOS."""
    if tokenizer.chat_template is not None:
        messages = chat_pair(prompt, response)
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise ValueError("conversational rows need a tokenizer with a chat template")
    text = prompt + response
    if not text.endswith(tokenizer.eos_token):  # TRL appends EOS to standard-format responses
        text += tokenizer.eos_token
    return tokenizer(text)["input_ids"]


def raw_scores(
    model, tokenizer, prompts_and_responses: Sequence[tuple[Any, Any]], batch_size: int = 16
) -> list[float]:
    """Unnormalised rewards of (prompt, response) pairs, right-padded batches."""
    import torch

    ids = [reward_input_ids(tokenizer, p, r) for p, r in prompts_and_responses]
    scores: list[float] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, x in enumerate(chunk):
                input_ids[row, : len(x)] = torch.tensor(x)
                attention_mask[row, : len(x)] = 1
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)
            ).logits
            scores += logits.squeeze(-1).float().tolist()
    model.train(was_training)
    return scores


class RewardScorer:
    """The one way a saved reward model scores (prompt, response) pairs: on the chat template
    (``chat_pair``), normalised by the statistics stored with the model (mean 0, std 1 on its
    reference set). PPO, RLOO/GRPO and the eval all score through it.

    Example: ``RewardScorer(path)(["Hi"], ["Hello!"])`` -> ``[0.31]``
    """

    def __init__(
        self,
        model_dir: str | Path,
        normalise: bool = True,
        batch_size: int = 16,
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, dtype=torch.float32
        ).to(device or common.local_device())
        self.model.eval()
        stats_file = self.model_dir / STATS_FILE
        if normalise and not stats_file.exists():
            raise FileNotFoundError(
                f"{stats_file} is missing: a reward model saved by `rlaif train reward` has its "
                "statistics; pass normalise=False for raw scores"
            )
        stats = json.loads(stats_file.read_text()) if normalise else {"mean": 0.0, "std": 1.0}
        self.mean, self.std = float(stats["mean"]), float(stats["std"])

    def __call__(self, prompts: Sequence[Any], responses: Sequence[Any]) -> list[float]:
        pairs = list(zip(prompts, responses, strict=True))
        scores = raw_scores(self.model, self.tokenizer, pairs, self.batch_size)
        return [(s - self.mean) / self.std for s in scores]


def score(
    model_dir: str | Path,
    prompts_and_responses: Sequence[tuple[Any, Any]],
    normalise: bool = True,
    batch_size: int = 16,
) -> list[float]:
    """Rewards of (prompt, response) pairs from a saved reward model (``RewardScorer``).

    Example: ``score(path, [([{"role": "user", "content": "Hi"}],
    [{"role": "assistant", "content": "Hello!"}])])``
    """
    scorer = RewardScorer(model_dir, normalise=normalise, batch_size=batch_size)
    return scorer([p for p, _ in prompts_and_responses], [r for _, r in prompts_and_responses])


def pairwise_accuracy(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> float:
    """Fraction of pairs whose chosen response scores above the rejected one."""
    chosen = raw_scores(model, tokenizer, [(r["prompt"], r["chosen"]) for r in rows], batch_size)
    rejected = raw_scores(
        model, tokenizer, [(r["prompt"], r["rejected"]) for r in rows], batch_size
    )
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(rows)


def reference_stats(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> dict:
    """Mean and (population) std of the rewards of every chosen and rejected response."""
    import statistics

    responses = [(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    scores = raw_scores(model, tokenizer, responses, batch_size)
    std = statistics.pstdev(scores)
    if std < 1e-6:
        raise ValueError(f"reward model scores the reference set as a constant (std {std:.2e})")
    return {"mean": statistics.fmean(scores), "std": std, "n": len(scores)}


# --- training ---------------------------------------------------------------------------------


def _soft_ce_trainer_class():
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(RewardTrainer):
        """RewardTrainer whose loss is the cross-entropy against each pair's ``p_chosen``.

        TRL's ``compute_loss`` still runs the forward and logs its metrics; only the
        returned loss is replaced (center_rewards term kept).
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = WithPChosen(self.data_collator)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns = [*self._signature_columns, "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p_chosen = inputs.pop("p_chosen")
            _, outputs = super().compute_loss(model, inputs, return_outputs=True)
            r_chosen, r_rejected = outputs.logits.squeeze(-1).chunk(2)
            loss = soft_bradley_terry_loss(r_chosen, r_rejected, p_chosen).mean()
            if self.args.center_rewards_coefficient is not None:
                centering = ((r_chosen + r_rejected) ** 2).mean()
                loss = loss + self.args.center_rewards_coefficient * centering
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


def train_reward_model(
    base_model_path: str | Path,
    tokenizer_path: str | Path | None,
    train_rows: Iterable[dict[str, Any]],
    eval_rows: Iterable[dict[str, Any]] | None,
    reference_rows: Iterable[dict[str, Any]] | None,
    config: RewardStageConfig,
    output_dir: str | Path,
) -> common.StageResult:
    """Train a reward model on a causal LM folder; save it with its score statistics.

    ``eval_rows`` None holds out ``config.eval_fraction`` of ``train_rows``;
    ``reference_rows`` None normalises on the training pairs.
    """
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    train, held_out = split_eval(
        pair_rows(train_rows), eval_rows, config.eval_fraction, config.seed
    )
    reference = pair_rows(reference_rows) if reference_rows is not None else train
    if not train or not reference:
        raise ValueError(
            f"need training and reference pairs; got {len(train)} and {len(reference)}"
        )
    if config.loss == "margin":
        train = [
            r | {"margin": margin_from_soft_label(r["p_chosen"], config.margin_scale).item()}
            for r in train
        ]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or base_model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if tokenizer.chat_template is not None:  # TRL then trains on the tokens RewardScorer scores
        train = [chat_row(r) for r in train]
    # As TRL loads a model named by path: seeded (the score head is new and random), one
    # output; but float32 masters here, and pad_token_id set so the head reads the last token.
    set_seed(config.seed)
    model = common.load_for_training(
        AutoModelForSequenceClassification, base_model_path, config.use_qlora, num_labels=1
    )
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    trainer, output = common.train_in_scratch(
        _soft_ce_trainer_class() if config.loss == "soft_ce" else RewardTrainer,
        RewardConfig,
        {
            "learning_rate": config.learning_rate,
            "num_train_epochs": config.num_train_epochs,
            "per_device_train_batch_size": config.per_device_train_batch_size,
            "max_length": config.max_length,
            "center_rewards_coefficient": config.center_rewards_coefficient,
            "seed": config.seed,
        },
        model=model,
        train_dataset=datasets.Dataset.from_list(train),
        processing_class=tokenizer,
        peft_config=common.peft_config(config, task_type="SEQ_CLS"),
    )

    # Every rank scores the same rows with the same weights; rank 0's figures are kept.
    model = common.merged(trainer.model)
    batch_size = config.per_device_train_batch_size
    stats = common.from_main_process(reference_stats(model, tokenizer, reference, batch_size))
    accuracy = pairwise_accuracy(model, tokenizer, held_out, batch_size) if held_out else None
    metrics = {
        "eval_accuracy": common.from_main_process(accuracy),
        "mean": stats["mean"],
        "std": stats["std"],
        "reference_n": stats["n"],
        **common.loss_summary(trainer, output),
        "train_pairs": len(trainer.train_dataset),  # after TRL drops pairs over max_length
        "eval_pairs": len(held_out),
    }
    stats_file = {STATS_FILE: json.dumps(stats, indent=2)}
    path = common.save_stage(
        model, tokenizer, output_dir, base_model_path, "reward", config, metrics, files=stats_file
    )
    return common.StageResult(path, metrics)
