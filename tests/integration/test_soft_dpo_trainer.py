"""Soft-label DPO through the trainer, against TRL's own ``DPOTrainer`` on the same tiny
model, rows and seed, for one SGD step (lr 1, no clipping: the step is minus the gradient).

At p_chosen = 1 the soft loss is TRL's sigmoid loss, so the first loss, the gradients and
the weights after the step agree. At p_chosen = 0.5 with the policy equal to the reference
(step 0: every implicit margin is 0) the soft loss is at its minimum, so the gradient is
zero and the step moves nothing, where TRL's loss pushes every pair's margin up.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignment.training.common import load_for_training, train_in_scratch
from alignment.training.dpo import _soft_label_trainer_class

pytestmark = pytest.mark.integration

TOPICS = ["tea", "rivers", "bread", "chess"]


def rows(p_chosen: float) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"Tell me about {topic}."}],
            "chosen": [{"role": "assistant", "content": f"Sure, please enjoy {topic}."}],
            "rejected": [{"role": "assistant", "content": f"No. I will never talk about {topic}."}],
            "p_chosen": p_chosen,
        }
        for topic in TOPICS
    ]


def one_sgd_step(trainer_class, model_path: Path, train_rows: list[dict]):
    """(trainer, gradients of the one step, its logged loss) of a DPO step on all rows."""
    import datasets
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    grads: list[torch.Tensor] = []

    def keep_grads(optimizer, args, kwargs):
        grads.extend(p.grad.clone() for g in optimizer.param_groups for p in g["params"])

    hook = register_optimizer_step_pre_hook(keep_grads)
    try:
        trainer, _ = train_in_scratch(
            trainer_class,
            DPOConfig,
            {
                "beta": 0.1,
                "loss_type": ["sigmoid"],
                "max_length": 32,
                "per_device_train_batch_size": len(train_rows),
                "max_steps": 1,
                "optim": "sgd",
                "learning_rate": 1.0,
                "lr_scheduler_type": "constant",
                "max_grad_norm": 0.0,  # no clipping
                "seed": 0,
            },
            model=load_for_training(AutoModelForCausalLM, model_path),
            ref_model=load_for_training(AutoModelForCausalLM, model_path),
            train_dataset=datasets.Dataset.from_list(train_rows),
            processing_class=AutoTokenizer.from_pretrained(model_path),
        )
    finally:
        hook.remove()
    loss = next(log["loss"] for log in trainer.state.log_history if "loss" in log)
    return trainer, grads, loss


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().float().flatten() for t in tensors])


@pytest.fixture(scope="module")
def trl_step(tiny_model):
    """TRL's sigmoid DPO, one step (p_chosen is not a column it reads)."""
    from trl import DPOTrainer

    return one_sgd_step(DPOTrainer, tiny_model, rows(1.0))


@pytest.mark.parametrize("p_chosen", [1.0, 0.75, 0.5])
def test_soft_dpo_first_step_against_trl_sigmoid(tiny_model, trl_step, p_chosen):
    trl, trl_grads, trl_loss = trl_step
    soft, soft_grads, soft_loss = one_sgd_step(
        _soft_label_trainer_class(), tiny_model, rows(p_chosen)
    )
    trl_grad, soft_grad = flat(trl_grads), flat(soft_grads)
    assert trl_grad.norm() > 1.0

    # Step 0: policy = reference, every margin 0, both losses log 2 whatever p_chosen is.
    assert soft_loss == pytest.approx(trl_loss, abs=1e-6)
    assert trl_loss == pytest.approx(math.log(2), abs=1e-4)
    # d/dm of the soft loss at m = 0 is β(σ(0) − p) = (2p − 1) times TRL's β(σ(0) − 1):
    # TRL's own gradient at p = 1, zero at p = 0.5.
    scale = 2 * p_chosen - 1
    assert torch.allclose(soft_grad, scale * trl_grad, rtol=1e-4, atol=1e-7)
    # the step itself: the weights move by (2p − 1) times TRL's move from the same start
    moved = flat(soft.model.parameters()) - flat(soft.ref_model.parameters())
    trl_moved = flat(trl.model.parameters()) - flat(trl.ref_model.parameters())
    assert torch.allclose(moved, scale * trl_moved, rtol=1e-4, atol=1e-6)
    if p_chosen == 0.5:
        assert soft_grad.abs().max() < 1e-7 and moved.abs().max() < 1e-7
