"""Hand-computed checks for alignment/algos.py (numbers from notes/ppo-checklist.md section (a)),
plus invariances: masked values never leak, loop = closed form, micro-batches sum to the batch."""
from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from torch.testing import assert_close

from alignment import algos
from alignment.algos import (
    AdaptiveKLController,
    FixedKLController,
    KL_ESTIMATORS,
    RolloutBatch,
    aggregate_loss,
    compute_gae,
    compute_kl,
    compute_token_rewards,
    compute_value_loss,
    entropy_from_logits,
    first_true_indices,
    logprobs_from_hidden,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_clip_loss,
    truncate_after_stop,
)

T = torch.tensor
ATOL = dict(atol=1e-5, rtol=1e-5)


def gae(r, v, m=None, **kw):
    r, v = T([r]), T([v])
    m = torch.ones_like(r, dtype=torch.bool) if m is None else T([m], dtype=torch.bool)
    adv, ret = compute_gae(r, v, m, **kw)
    return adv[0], ret[0]


# --------------------------------------------------------------------------- (a)1-4 GAE


def test_gae_gamma1_lambda095():
    # delta = r + V_next - V = [0.1, 0.1, 1 - 0.7]
    # A2 = 0.3, A1 = 0.1 + 0.95*0.3 = 0.385, A0 = 0.1 + 0.95*0.385; R = A + V
    adv, ret = gae([0, 0, 1.0], [0.5, 0.6, 0.7], gamma=1.0, gae_lambda=0.95)
    assert_close(adv, T([0.46575, 0.385, 0.3]), **ATOL)
    assert_close(ret, T([0.96575, 0.985, 1.0]), **ATOL)


def test_gae_gamma09_lambda05_and_swapped():
    # delta = [0.9*0.6-0.5, 0.9*0.7-0.6, 0.3] = [0.04, 0.03, 0.3]; gamma*lambda = 0.45
    adv, ret = gae([0, 0, 1.0], [0.5, 0.6, 0.7], gamma=0.9, gae_lambda=0.5)
    assert_close(adv, T([0.11425, 0.165, 0.3]), **ATOL)
    assert_close(ret, T([0.61425, 0.765, 1.0]), **ATOL)
    # gamma=0.5: delta = [-0.2, -0.25, 0.3]; A1 = -0.25 + 0.45*0.3 = -0.115; A0 = -0.2 - 0.45*0.115
    adv, _ = gae([0, 0, 1.0], [0.5, 0.6, 0.7], gamma=0.5, gae_lambda=0.9)
    assert_close(adv[0], T(-0.25175), **ATOL)


def test_gae_monte_carlo_when_gamma_lambda_1():
    # A_t = (sum of future rewards) - V_t = 1 - V_t; R_t = 1
    adv, ret = gae([0, 0, 1.0], [0.5, 0.6, 0.7], gamma=1.0, gae_lambda=1.0)
    assert_close(adv, T([0.5, 0.4, 0.3]), **ATOL)
    assert_close(ret, T([1.0, 1.0, 1.0]), **ATOL)


def test_gae_padding():
    adv, ret = gae([0, 0, 1.0, 0], [0.5, 0.6, 0.7, 9.9], [1, 1, 1, 0], gamma=1.0, gae_lambda=0.95)
    assert_close(adv, T([0.46575, 0.385, 0.3, 0.0]), **ATOL)
    assert ret[3] == 0
    # Without the mask the pad value leaks: delta = [0.1, 0.1, 10.2, -9.9] -> A0 = 0.912488
    adv, _ = gae([0, 0, 1.0, 0], [0.5, 0.6, 0.7, 9.9], gamma=1.0, gae_lambda=0.95)
    assert_close(adv[0], T(0.9124875), **ATOL)


def test_gae_ignores_masked_values_and_rewards():
    torch.manual_seed(0)
    r, v = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.arange(6) < T([6, 3, 1, 4]).unsqueeze(-1)
    adv, ret = compute_gae(r, v, mask, gamma=0.99, gae_lambda=0.9)
    junk = torch.where(mask, 0.0, 1e3)
    adv2, ret2 = compute_gae(r + junk, v - junk, mask, gamma=0.99, gae_lambda=0.9)
    assert_close(adv, adv2)
    assert_close(ret, ret2)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_gae_loop_equals_closed_form():
    # Eq. 16 of the GAE paper: A_t = sum_l (gamma*lambda)^l delta_{t+l}, as one matrix product.
    torch.manual_seed(1)
    gamma, lam, length = 0.97, 0.9, 7
    r, v = torch.randn(3, length, dtype=torch.float64), torch.randn(3, length, dtype=torch.float64)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], dim=1)
    delta = r + gamma * next_v - v
    lag = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # lag[t, k] = k - t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp(min=0).double(), 0.0)
    expected = delta @ discount.T
    mask = torch.ones(3, length, dtype=torch.bool)
    adv, ret = compute_gae(r, v, mask, gamma=gamma, gae_lambda=lam)
    assert_close(adv, expected)
    assert_close(ret, expected + v)


def test_gae_has_no_grad():
    v = torch.randn(2, 3, requires_grad=True)
    adv, ret = compute_gae(torch.zeros(2, 3), v, torch.ones(2, 3), gamma=1.0, gae_lambda=0.95)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- (a)5 masked statistics


def test_masked_whiten():
    x, m = T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]], dtype=torch.bool)
    assert_close(masked_whiten(x, m), T([[-1.0, 0.0, 1.0, 0.0]]), **ATOL)  # mean 2, unbiased var 1
    # biased var = 2/3 -> 1/sqrt(2/3) = 1.224745
    assert_close(masked_whiten(x, m, unbiased=False), T([[-1.224745, 0.0, 1.224745, 0.0]]), **ATOL)
    x = T([[2.0, 4.0, 6.0]])  # mean 4, unbiased var 4
    assert_close(masked_whiten(x, torch.ones_like(x)), T([[-1.0, 0.0, 1.0]]), **ATOL)
    kept_mean = masked_whiten(x, torch.ones_like(x), shift_mean=False)
    assert_close(kept_mean, T([[3.0, 4.0, 5.0]]), **ATOL)


def test_masked_mean_var():
    x = T([[1.0, float("nan")], [3.0, float("inf")]])
    m = T([[1, 0], [1, 0]], dtype=torch.bool)
    assert_close(masked_mean(x, m), T(2.0))  # NaN/inf at pads ignored
    assert_close(masked_mean(x, m, dim=1), T([1.0, 3.0]))
    assert_close(masked_mean(x, torch.zeros_like(m)), T(0.0))  # empty -> 0, not NaN
    assert_close(masked_var(x, m), T(2.0))  # (1 + 1) / (2 - 1)
    assert_close(masked_var(x, m, unbiased=False), T(1.0))
    with pytest.raises(ValueError, match="at least 2"):
        masked_var(x, T([[1, 0], [0, 0]], dtype=torch.bool))


# --------------------------------------------------------------------------- (a)6 KL estimators


def test_kl_estimators_hand_values():
    lp, ref = T([math.log(0.5), math.log(0.25)]), T([math.log(0.25), math.log(0.5)])
    # d = +-ln 2; k2 = (ln 2)^2 / 2; k3 = exp(-d) - 1 + d: 0.5 - 1 + 0.693147, 2 - 1 - 0.693147
    assert_close(compute_kl(lp, ref, "k1"), T([0.693147, -0.693147]), **ATOL)
    assert_close(compute_kl(lp, ref, "k2"), T([0.240227, 0.240227]), **ATOL)
    assert_close(compute_kl(lp, ref, "k3"), T([0.193147, 0.306853]), **ATOL)


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_kl_zero_when_policy_is_reference(name):
    lp = torch.log_softmax(torch.randn(2, 5, 7), dim=-1)[..., 0]
    assert_close(compute_kl(lp, lp.clone(), name), torch.zeros(2, 5))


def test_kl_mask_and_clamp_keep_values_finite():
    lp, ref = T([[-1.0, -500.0]]), T([[-1.0, -0.1]])  # pad holds a huge log-ratio
    kl = compute_kl(lp, ref, "k3", response_mask=T([[1, 0]], dtype=torch.bool))
    assert_close(kl, T([[0.0, 0.0]]))
    lp.requires_grad_(True)
    compute_kl(lp, ref, "k3").sum().backward()  # d clamped to -20: exp(20) is finite
    assert torch.isfinite(lp.grad).all()


def test_registry_lookup_error_lists_names_and_suggests():
    assert KL_ESTIMATORS.names() == ["k1", "k2", "k3"]
    with pytest.raises(KeyError, match="known: k1, k2, k3"):
        compute_kl(torch.zeros(1), torch.zeros(1), "low_var_kl")
    with pytest.raises(ValueError, match="did you mean 'token-mean'"):
        aggregate_loss(torch.zeros(1, 2), torch.ones(1, 2), "token_mean")


# --------------------------------------------------------------------------- (a)7 token rewards


def test_token_rewards_score_on_last_valid_token():
    kl = T([[0.1, -0.2, 0.3, 5.0]])  # 5.0 sits on a pad
    mask = T([[1, 1, 1, 0]], dtype=torch.bool)
    # -0.1 * kl = [-0.01, 0.02, -0.03]; score 2 added at index 2 -> 1.97
    rewards = compute_token_rewards(T([2.0]), kl, mask, kl_coef=0.1)
    assert_close(rewards, T([[-0.01, 0.02, 1.97, 0.0]]), **ATOL)


def test_token_rewards_empty_row_gets_nothing():
    mask = T([[1, 1, 1], [0, 0, 0]])
    rewards = compute_token_rewards(T([2.0, 3.0]), torch.zeros(2, 3), mask, kl_coef=0.1)
    assert_close(rewards, T([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


# --------------------------------------------------------------------------- (a)8 policy loss


def test_ppo_clip_hand_values_and_gradient():
    ratio, adv = T([0.5, 0.5, 1.0, 1.3, 1.5]), T([1.0, -1.0, 1.0, -1.0, 1.0])
    logprobs = ratio.log().unsqueeze(0).requires_grad_(True)
    mask = torch.ones(1, 5, dtype=torch.bool)
    loss, metrics = ppo_clip_loss(
        logprobs, torch.zeros(1, 5), adv.unsqueeze(0), mask, clip_eps_low=0.2, clip_eps_high=0.2
    )
    # -min(r*A, clip(r, 0.8, 1.2)*A): r=0.5,A=+1 keeps -0.5; r=0.5,A=-1 clips to 0.8; r=1 gives -1;
    # r=1.3,A=-1 keeps 1.3 (the larger loss); r=1.5,A=+1 clips to -1.2. Mean -0.6/5, 2 of 5 clipped.
    assert_close(loss, T([[-0.5, 0.8, -1.0, 1.3, -1.2]]), **ATOL)
    assert_close(aggregate_loss(loss, mask, "token-mean"), T(-0.12), **ATOL)
    assert_close(metrics["policy/clipfrac"], T(0.4))
    assert set(metrics) == {
        "policy/clipfrac", "policy/dual_clipfrac", "policy/approxkl", "policy/ratio_mean"
    }
    loss.sum().backward()
    # d(-A*r)/d lp = -A*r where unclipped; 0 where the clipped (constant) term wins
    assert_close(logprobs.grad, T([[-0.5, 0.0, -1.0, 1.3, 0.0]]), **ATOL)


def test_ppo_clip_asymmetric_and_dual_clip():
    fn = ppo_clip_loss
    lp, mask = T([[math.log(1.25), math.log(5.0)]]), torch.ones(1, 2, dtype=torch.bool)
    # Clip-Higher: 1.25 < 1 + 0.28 stays unclipped for A = +1
    loss, _ = fn(lp, torch.zeros(1, 2), T([[1.0, 1.0]]), mask, clip_eps_low=0.2, clip_eps_high=0.28)
    assert_close(loss, T([[-1.25, -1.28]]), **ATOL)
    # ratio 5, A = -1: unclipped loss 5 > clipped 1.2; dual clip c = 3 caps it at -A*c = 3
    loss, metrics = fn(lp, torch.zeros(1, 2), T([[-1.0, -1.0]]), mask,
                       clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=3.0)
    assert_close(loss, T([[1.25, 3.0]]), **ATOL)
    assert_close(metrics["policy/dual_clipfrac"], T(0.5))
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        fn(lp, lp, T([[1.0, 1.0]]), mask, clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=0.5)


def test_ppo_clip_first_minibatch_is_on_policy():
    torch.manual_seed(0)
    lp = torch.randn(3, 4)
    loss, metrics = ppo_clip_loss(
        lp, lp.clone(), torch.randn(3, 1), torch.ones(3, 4), clip_eps_low=0.2, clip_eps_high=0.2
    )
    assert metrics["policy/approxkl"] == 0 and metrics["policy/clipfrac"] == 0
    assert_close(metrics["policy/ratio_mean"], T(1.0))


# --------------------------------------------------------------------------- (a)9 aggregation


def test_aggregate_modes():
    loss = T([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert_close(aggregate_loss(loss, mask, "token-mean"), T(2.5))  # 10 / 4
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-mean"), T(3.0))  # (2 + 4) / 2
    assert_close(aggregate_loss(loss, mask, "seq-mean-token-sum"), T(5.0))  # (6 + 4) / 2


@pytest.mark.parametrize("mode", get_args(algos.AggMode))
def test_data_parallel_shards_with_global_normalizer_equal_whole_batch(mode):
    torch.manual_seed(0)
    loss = torch.randn(6, 5)
    mask = torch.arange(5) < T([5, 1, 3, 2, 4, 5]).unsqueeze(-1)  # uneven token counts per shard
    whole = aggregate_loss(loss, mask, mode)
    normalizer = mask.sum() if mode == "token-mean" else (mask.sum(-1) > 0).sum()
    parts = [(loss[i : i + 2], mask[i : i + 2]) for i in range(0, 6, 2)]  # 3 ranks, 2 rows each
    shards = sum(aggregate_loss(l, m, mode, global_normalizer=normalizer) for l, m in parts)
    assert_close(shards, whole)
    if mode == "token-mean":  # the naive per-shard mean differs: why the normaliser exists
        naive = sum(aggregate_loss(l, m, mode) for l, m in parts) / 3
        assert not torch.allclose(naive, whole)


def test_grad_accumulation_1x8_equals_8x1():
    torch.manual_seed(0)
    old, adv = torch.randn(8, 4), torch.randn(8, 4)
    mask = torch.arange(4) < torch.randint(1, 5, (8, 1))
    fn = ppo_clip_loss
    lp_whole = (old + 0.3 * torch.randn(8, 4)).requires_grad_(True)
    lp_micro = lp_whole.detach().clone().requires_grad_(True)
    loss, _ = fn(lp_whole, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.2)
    aggregate_loss(loss, mask, "token-mean").backward()
    for i in range(8):
        loss, _ = fn(lp_micro[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1],
                     clip_eps_low=0.2, clip_eps_high=0.2)
        aggregate_loss(loss, mask[i : i + 1], "token-mean", global_normalizer=mask.sum()).backward()
    assert_close(lp_micro.grad, lp_whole.grad)


# --------------------------------------------------------------------------- (a)10 value loss


def test_value_loss_hand_values():
    values = T([[0.9, 0.6, 7.0]], requires_grad=True)
    mask = T([[1, 1, 0]], dtype=torch.bool)
    old_values, returns = T([[0.5, 0.5, 0.0]]), T([[1.0, 1.0, 0.0]])
    loss, metrics = compute_value_loss(values, old_values, returns, mask, clip_eps_value=0.2)
    # V=0.9: (0.9-1)^2 = 0.01, V_clip = 0.7 -> 0.09 (clipped wins); V=0.6: V_clip = 0.6 -> 0.16 both
    assert_close(loss, T([[0.045, 0.08, 0.0]]), **ATOL)
    # 1/2 * mean(0.09, 0.16) = 0.0625
    assert_close(aggregate_loss(loss, mask, "token-mean"), T(0.0625), **ATOL)
    assert_close(metrics["value/clipfrac"], T(0.5))
    assert set(metrics) == {"value/clipfrac", "value/vpred_mean", "value/error"}


# --------------------------------------------------------------------------- (a)11 logits


def test_entropy_hand_values():
    assert_close(entropy_from_logits(torch.zeros(4)), T(math.log(4)), **ATOL)  # 1.386294
    # -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.039721
    assert_close(entropy_from_logits(T([0.5, 0.25, 0.25]).log()), T(1.039721), **ATOL)
    # temperature -> infinity flattens any distribution to uniform
    flat = entropy_from_logits(T([3.0, 0.0, 0.0, 0.0]), temperature=1e6)
    assert_close(flat, T(math.log(4)), **ATOL)


def test_logprobs_from_logits_matches_log_softmax_with_temperature():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, labels[..., None])[..., 0]
    assert_close(logprobs_from_logits(logits, labels, temperature=0.7), expected)
    assert logprobs_from_logits(logits.bfloat16(), labels).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, temperature=0.0)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100])  # 7: chunks that cut rows; 100: one chunk
def test_logprobs_from_hidden_equals_full_logits_with_grads(chunk_size):
    """Chunked + checkpointed = the plain (B, T, V) computation: values and gradients (hidden, head
    weight and bias) within 1e-5, for a PPO-shaped loss on log-probs and entropy."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13)
    hidden, labels = torch.randn(3, 5, 8, requires_grad=True), torch.randint(0, 13, (3, 5))
    weights = torch.randn(3, 5)

    def loss_and_grads(logprobs, entropy):
        loss = (weights * logprobs.exp()).sum() - 0.1 * entropy.sum()
        return [loss, *torch.autograd.grad(loss, [hidden, head.weight, head.bias])]

    logits = head(hidden)
    plain = loss_and_grads(logprobs_from_logits(logits, labels, 0.7), entropy_from_logits(logits, 0.7))
    logprobs, entropy = logprobs_from_hidden(hidden, labels, head, 0.7, entropy=True, chunk_size=chunk_size)
    assert logprobs.shape == entropy.shape == (3, 5)
    for got, want in zip(loss_and_grads(logprobs, entropy), plain):
        assert_close(got, want, **ATOL)


def test_logprobs_from_hidden_no_grad_and_bad_args():
    head, hidden, labels = torch.nn.Linear(4, 6), torch.randn(2, 3, 4), torch.randint(0, 6, (2, 3))
    with torch.no_grad():
        logprobs, entropy = logprobs_from_hidden(hidden, labels, head, chunk_size=2)
        assert_close(logprobs, logprobs_from_logits(head(hidden), labels))
    assert entropy is None and not logprobs.requires_grad
    for bad in (dict(chunk_size=0), dict(temperature=0.0)):
        with pytest.raises(ValueError, match="must be > 0"):
            logprobs_from_hidden(hidden, labels, head, **bad)


# --------------------------------------------------------------------------- (a)12 KL controllers


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(kl_coef=0.1, target_kl=6.0, horizon=10000)
    # error = clip(12/6 - 1, -0.2, 0.2) = 0.2; beta *= 1 + 0.2 * 256 / 10000
    ctl.update(current_kl=12.0, n_steps=256)
    assert ctl.kl_coef == pytest.approx(0.100512)
    ctl = AdaptiveKLController(kl_coef=0.1, target_kl=6.0, horizon=10000)
    ctl.update(current_kl=3.0, n_steps=10000)  # error -0.2 (clipped from -0.5)
    assert ctl.kl_coef == pytest.approx(0.08)
    fixed = FixedKLController(kl_coef=0.05)
    fixed.update(current_kl=100.0, n_steps=256)
    assert fixed.kl_coef == 0.05


# --------------------------------------------------------------------------- (a)13 truncation


EOS, PAD = 1, 0


def test_first_true_indices():
    bools = T([[False, True, True], [False, False, False], [True, False, False]])
    assert first_true_indices(bools).tolist() == [1, 3, 0]


def test_truncate_after_stop():
    ids, mask, has_stop = truncate_after_stop(T([[5, 7, EOS, 9, 9], [5, 7, 8, 9, 9]]), EOS, PAD)
    assert ids.tolist() == [[5, 7, EOS, PAD, PAD], [5, 7, 8, 9, 9]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]  # EOS is an action: it stays valid
    assert has_stop.tolist() == [True, False]
    # score 2 lands on the EOS (index 2) / on the last token (index 4);
    # the missing-stop penalty (1.0) applies to row 2 only
    scores = torch.where(has_stop, 2.0, 2.0 - 1.0)
    rewards = compute_token_rewards(scores, torch.zeros(2, 5), mask, kl_coef=0.1)
    assert rewards.tolist() == [[0, 0, 2.0, 0, 0], [0, 0, 0, 0, 1.0]]


def test_truncate_ignores_prompt_stop_and_accepts_several_ids():
    sequence = T([[2, 5, EOS, 6, 7, 8, 9]])  # an EOS inside the 3-token prompt
    _, mask, has_stop = truncate_after_stop(sequence[:, 3:], EOS, PAD)
    assert mask.all() and not has_stop.any()
    _, mask, has_stop = truncate_after_stop(T([[5, 42, 7]]), [EOS, 42], PAD)
    assert mask.tolist() == [[True, True, False]] and has_stop.all()
    with pytest.raises(ValueError, match="must differ"):
        truncate_after_stop(T([[5, 7]]), EOS, EOS)


# --------------------------------------------------------------------------- RolloutBatch


def test_rollout_batch_select_and_shape_check():
    b, q, t = 4, 3, 5
    batch = RolloutBatch(
        query_ids=torch.zeros(b, q, dtype=torch.long),
        query_mask=torch.ones(b, q, dtype=torch.bool),
        response_ids=torch.zeros(b, t, dtype=torch.long),
        response_mask=torch.ones(b, t, dtype=torch.bool),
        old_logprobs=torch.arange(b * t, dtype=torch.float).view(b, t),
        scores=torch.arange(b, dtype=torch.float),
    )
    mini = batch.select(T([3, 1]))
    assert len(mini) == 2 and mini.scores.tolist() == [3.0, 1.0] and mini.values is None
    assert_close(mini.old_logprobs, batch.old_logprobs[[3, 1]])
    with pytest.raises(ValueError, match="RolloutBatch.values has shape"):
        RolloutBatch(**{**vars(batch), "values": torch.zeros(b, t + 1)})
