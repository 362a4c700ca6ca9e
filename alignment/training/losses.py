"""Soft-label preference losses shared by the reward and DPO stages (pure torch).

The judge gives each pair ``p_chosen`` = P(chosen is better) in [0.5, 1]. With
the Bradley-Terry model P(chosen ≻ rejected) = σ(Δ), the soft-label loss is the
binary cross-entropy against that target instead of against 1:

    loss = −[p · logσ(Δ) + (1 − p) · logσ(−Δ)]
         = −logσ(Δ) + (1 − p) · Δ            (since logσ(−Δ) = logσ(Δ) − Δ)

At p = 1 it is the usual −logσ(Δ). Below 1 it stops pushing Δ up once
σ(Δ) = p (its minimum is at Δ = logit(p)), so a confident correct margin costs
more than under the hard loss and a wrong-direction margin costs less. Every
function returns per-example losses; the caller takes the mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_bradley_terry_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, p_chosen: torch.Tensor | float
) -> torch.Tensor:
    """Per-example BCE of σ(r_chosen − r_rejected) against the target ``p_chosen``."""
    delta = r_chosen - r_rejected
    p = torch.as_tensor(p_chosen, dtype=delta.dtype, device=delta.device)
    return -(p * F.logsigmoid(delta) + (1 - p) * F.logsigmoid(-delta))


def margin_from_soft_label(p_chosen: torch.Tensor | float, scale: float) -> torch.Tensor:
    """Llama-2 style reward margin: ``scale · (2p − 1)``, 0 at p = 0.5, ``scale`` at p = 1.

    Llama 2 (Touvron et al. 2023, §3.2.2) subtracts a margin m(r) that grows with
    the annotators' rating, from 0 for "negligibly better" to 1 for "significantly
    better": loss = −logσ(r_c − r_r − m). Here the judge's confidence plays the
    rating. The map is linear and bounded on purpose: ``scale · logit(p)`` would be
    infinite at p = 1, which hard-labelled pairs carry.
    """
    p = torch.as_tensor(p_chosen, dtype=torch.float32)
    return scale * (2 * p - 1)


def soft_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    p_chosen: torch.Tensor | float,
    beta: float,
) -> torch.Tensor:
    """Soft-label DPO: the soft BCE on the implicit reward margin β·(Δπ − Δref).

    Δπ and Δref are chosen-minus-rejected sequence log-probs under the policy and
    the reference. At p = 1 this is TRL's ``sigmoid`` loss −logσ(β·(Δπ − Δref));
    TRL's ``label_smoothing`` is the same idea with one global ε = 1 − p.
    """
    delta_policy = policy_chosen_logps - policy_rejected_logps
    delta_ref = ref_chosen_logps - ref_rejected_logps
    implicit_margin = beta * (delta_policy - delta_ref)
    return soft_bradley_terry_loss(implicit_margin, torch.zeros_like(implicit_margin), p_chosen)
