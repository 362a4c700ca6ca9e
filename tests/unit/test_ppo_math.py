"""PPO's pure functions against numbers worked out by hand (no models)."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from pydantic import ValidationError

from alignment.training.ppo import (
    AdaptiveKLController,
    PPOConfig,
    explained_variance,
    gae,
    kl_penalty,
    masked_mean,
    masked_moments,
    masked_whiten,
    policy_loss,
    truncate_after_eos,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_three_steps():
    # gamma 0.9, lam 0.8 (gamma * lam = 0.72); the value after the last step is 0.
    # t=2: delta = 2 + 0 - 1.5 = 0.5                 A = 0.5
    # t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35        A = 0.35 + 0.72 * 0.5 = 0.71
    # t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4         A = 1.4 + 0.72 * 0.71 = 1.9112
    adv, ret = gae(t([1, 0, 2]), t([0.5, 1.0, 1.5]), t([1, 1, 1]), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t([1.9112, 0.71, 0.5]))
    assert torch.allclose(ret, t([2.4112, 1.71, 2.0]))  # returns = advantages + values


def test_gae_ignores_padding_after_the_end():
    rewards = t([1, 0, 2, 7], [1, 3, 5, 5])
    values = t([0.5, 1.0, 1.5, 9], [0.5, 1.0, 9, 9])
    mask = t([1, 1, 1, 0], [1, 1, 0, 0])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 2: t=1: delta = 3 - 1 = 2, A = 2; t=0: delta = 1 + 0.9 - 0.5 = 1.4, A = 1.4 + 0.72 * 2
    assert torch.allclose(adv, t([1.9112, 0.71, 0.5, 0], [2.84, 2.0, 0, 0]))
    assert torch.allclose(ret, t([2.4112, 1.71, 2.0, 0], [3.34, 3.0, 0, 0]))


def test_policy_loss_clips_by_hand():
    ratio = torch.tensor([1.5, 0.9, 1.1, 0.5])
    new_logp = ratio.log().requires_grad_()
    old_logp, adv = torch.zeros(4), torch.tensor([1.0, 1.0, -1.0, -1.0])
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   r=1.5, A=+1: max(-1.5, -1.2) = -1.2 (clipped)    r=0.9, A=+1: -0.9
    #   r=1.1, A=-1: 1.1                                 r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped)
    loss, clipfrac, approxkl = policy_loss(new_logp, old_logp, adv, torch.ones(4), 0.2)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 1.1 + 0.8) / 4)
    assert clipfrac.item() == 0.5
    expected_kl = sum(r - 1 - math.log(r) for r in [1.5, 0.9, 1.1, 0.5]) / 4
    assert approxkl.item() == pytest.approx(expected_kl, rel=1e-5)
    loss.backward()  # clipped tokens get no gradient; the others get -A * r / n
    assert torch.allclose(new_logp.grad, torch.tensor([0.0, -0.9 / 4, 1.1 / 4, 0.0]))

    masked = policy_loss(new_logp, old_logp, adv, torch.tensor([1.0, 1.0, 1.0, 0.0]), 0.2)
    assert masked[0].item() == pytest.approx((-1.2 - 0.9 + 1.1) / 3)
    assert masked[1].item() == pytest.approx(1 / 3)


def test_value_loss_clips_by_hand():
    new_v, old_v, returns = t(0.5, 0.1, -0.3), torch.zeros(3), t(1.0, 1.0, -1.0)
    # unclipped (v - R)^2: 0.25, 0.81, 0.49; clipped v: 0.2, 0.1, -0.2 -> 0.64, 0.81, 0.64
    loss, clipfrac = value_loss(new_v, old_v, returns, torch.ones(3), 0.2, clip=True)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.64) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    loss, clipfrac = value_loss(new_v, old_v, returns, torch.ones(3), 0.2, clip=False)
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.81 + 0.49) / 3)
    assert clipfrac.item() == 0.0


def test_kl_estimators():
    logp, ref_logp = torch.tensor([0.5, 0.25]).log(), torch.tensor([0.25, 0.5]).log()
    assert torch.allclose(kl_penalty(logp, ref_logp, "k1"), t(math.log(2), -math.log(2)))
    # k3 = (r - 1) - log r with r = p_ref / p: r = 0.5 and r = 2
    k3 = t(-0.5 + math.log(2), 1 - math.log(2))
    assert torch.allclose(kl_penalty(logp, ref_logp, "k3"), k3)
    assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(logp, ref_logp, "k2")


def test_masked_whiten_and_mean():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0)) * 3 + 5
    mask = (torch.arange(6) < torch.tensor([[6], [3], [5], [1]])).float()
    white = masked_whiten(x, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-5)
    assert masked_mean(white**2, mask).item() == pytest.approx(1.0, abs=1e-4)
    assert (white[mask == 0] == 0).all()
    kept = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(kept, mask).item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert masked_mean(t([1, 2, 100]), t([1, 1, 0])).item() == 1.5


def test_adaptive_kl_controller_moves_by_the_documented_amount():
    # beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon
    up = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert up.update(9.0, n_steps=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error 0.5 -> 0.2
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert down.update(5.4, n_steps=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    still = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert still.update(6.0, n_steps=1000) == pytest.approx(0.1)


def test_truncate_after_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    out, mask, has_eos = truncate_after_eos(responses, [2], pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False]


def test_truncate_after_the_first_of_any_end_token():
    # end tokens 2 (the tokenizer's EOS) and 4 (a second one, as Qwen's <|endoftext|>)
    responses = torch.tensor([[5, 4, 7, 2], [5, 2, 4, 8], [4, 6, 7, 8], [5, 6, 7, 8]])
    out, mask, has_eos = truncate_after_eos(responses, [2, 4], pad_id=0)
    assert out.tolist() == [[5, 4, 0, 0], [5, 2, 0, 0], [4, 0, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, True, True, False]


def all_reduce_among_threads(world: int):
    """sum_all for each of ``world`` threads: what torch.distributed.all_reduce(SUM) does
    among processes, so the distributed statistics run here without a process group."""
    barrier, slots = threading.Barrier(world, timeout=10), [None] * world

    def for_rank(rank: int):
        def sum_all(x: torch.Tensor) -> torch.Tensor:
            slots[rank] = x.clone()
            barrier.wait()
            total = sum(slots)
            barrier.wait()  # everyone has read the slots before they are reused
            return total

        return sum_all

    return for_rank


def on_two_ranks(fn, tensors: list[torch.Tensor], rows: int) -> list:
    """fn(*rank's rows of tensors, sum_all) with rows [:rows] on rank 0 and [rows:] on rank 1,
    each rank in its own thread."""
    sums, results, errors = all_reduce_among_threads(2), [None, None], []
    shares = [[t[:rows] for t in tensors], [t[rows:] for t in tensors]]

    def run(rank: int) -> None:
        try:
            results[rank] = fn(*shares[rank], sums(rank))
        except Exception as error:  # raised again in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    if errors:
        raise errors[0]
    return results


def test_distributed_whitening_equals_whitening_the_whole_batch():
    # Two ranks with different value ranges and different token counts: the whitening must use
    # the moments of all tokens of both ranks, as if the batch sat on one process.
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(3, 6, generator=gen), 5 + 3 * torch.randn(2, 6, generator=gen)])
    mask = (torch.arange(6) < torch.tensor([[6], [2], [4], [6], [5]])).float()
    whole_mean, whole_var = masked_moments(x, mask)
    assert whole_mean.item() == pytest.approx(masked_mean(x, mask).item(), rel=1e-5)
    assert whole_var.item() == pytest.approx(
        masked_mean((x - whole_mean) ** 2, mask).item(), rel=1e-5
    )
    for shift_mean in (True, False):
        whole = masked_whiten(x, mask, shift_mean)
        parts = on_two_ranks(
            lambda xr, mr, sum_all, shift=shift_mean: masked_whiten(xr, mr, shift, sum_all),
            [x, mask],
            rows=3,
        )
        assert torch.allclose(torch.cat(parts), whole, atol=1e-6)
        per_rank = torch.cat(
            [masked_whiten(x[:3], mask[:3], shift_mean), masked_whiten(x[3:], mask[3:], shift_mean)]
        )
        assert not torch.allclose(per_rank, whole, atol=0.1)  # per-process whitening differs

    moments = on_two_ranks(masked_moments, [x, mask], rows=3)
    for mean, var in moments:  # every rank holds the same moments
        assert mean.item() == pytest.approx(whole_mean.item(), rel=1e-5)
        assert var.item() == pytest.approx(whole_var.item(), rel=1e-5)


def test_distributed_explained_variance_equals_the_whole_batch():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(4, 5, generator=gen)
    pred = (
        target + 0.5 * torch.randn(4, 5, generator=gen) + torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    )
    mask = (torch.arange(5) < torch.tensor([[5], [3], [4], [2]])).float()
    whole = explained_variance(pred, target, mask)
    both = on_two_ranks(explained_variance, [pred, target, mask], rows=2)
    assert both == pytest.approx([whole, whole], rel=1e-5)


def test_config_reports_bad_values():
    with pytest.raises(ValidationError, match="mini_batch_size 5 must divide batch_size 16"):
        PPOConfig(batch_size=16, mini_batch_size=5)
    with pytest.raises(ValidationError, match="adaptive_kl needs kl_coef > 0, got 0.0"):
        PPOConfig(adaptive_kl=True, kl_coef=0.0)
    with pytest.raises(ValidationError, match="kl_estimator"):
        PPOConfig(kl_estimator="k2")
    with pytest.raises(ValidationError, match="cliprang"):
        PPOConfig(cliprang=0.1)  # unknown keys are errors
    assert PPOConfig(batch_size=16, mini_batch_size=4).ppo_epochs == 4
