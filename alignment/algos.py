"""Shared RL math (the PPO stage, the evals' log-probs): advantages, KL estimators, losses, aggregation.

Pure: tensors in, tensors out; only torch is imported. Shapes: B sequences, T response tokens,
V vocabulary. `response_mask` is True on valid response tokens (up to and including the stop
token); every per-token output is 0 where it is False. Hand-computed checks for each function are
in `tests/unit/test_algos.py` (numbers from `notes/ppo-checklist.md`, section (a)).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence, get_args

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from alignment.registry import Registry, did_you_mean

Metrics = dict[str, Tensor]  # fixed keys; detached 0-dim tensors, .item() them once, when logging


# ------------------------------------------------------------------------ masked statistics


AllReduce = Callable[[Tensor], Tensor]
"""Sums a tensor over the data-parallel ranks and returns the sum, e.g. `lambda t: accelerator.reduce(t, "sum")`.
Given to the masked statistics below, it makes them statistics of the global batch: every rank's rows, as if
they were concatenated in one process (sums and counts are reduced, in float64)."""


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, *, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of `x` over the positions where `mask` is True.

    Args:
        x: (B, T), or any shape; masked-out values are ignored, even NaN or inf.
        mask: bool or 0/1, same shape as `x`.
        dim: reduce over this dim only; None reduces over everything.
        all_reduce: with dim None, the mean over every rank's positions (`AllReduce`); None = this process's.

    Returns:
        0-dim tensor, or `x` reduced over `dim`. An empty mask gives 0, not NaN.

    Raises:
        ValueError: `all_reduce` with a `dim`.
    """
    mask = mask.bool()
    kept = torch.where(mask, x, 0)
    if all_reduce is not None:
        if dim is not None:
            raise ValueError("masked_mean reduces over ranks only over every dim (dim=None)")
        total, count = all_reduce(torch.stack([kept.sum().double(), mask.sum().double()]))
        return (total / count.clamp(min=1)).to(kept.dtype)
    if dim is None:
        return kept.sum() / mask.sum().clamp(min=1)
    return kept.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_count(mask: Tensor, *, all_reduce: AllReduce | None = None) -> int:
    """Valid positions in `mask`, over every rank with `all_reduce` (a host sync)."""
    count = mask.bool().sum()
    return int(count if all_reduce is None else all_reduce(count.double()))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, *, all_reduce: AllReduce | None = None) -> Tensor:
    """Variance of `x` over the positions where `mask` is True (0-dim tensor), two-pass (mean first).

    Args:
        x: (B, T). mask: (B, T), bool or 0/1.
        unbiased: Bessel's correction n/(n-1), as TRL and verl; False gives the biased variance,
            as OpenRLHF and OpenAI's lm-human-preferences.
        all_reduce: the variance over every rank's positions (`AllReduce`); None = this process's.

    Raises:
        ValueError: fewer than 2 valid positions (1 when biased), over every rank with `all_reduce`.
    """
    count, minimum = masked_count(mask, all_reduce=all_reduce), 2 if unbiased else 1  # host sync: once per rollout
    if count < minimum:
        raise ValueError(f"masked_var needs at least {minimum} valid positions, got {count}")
    var = masked_mean((x - masked_mean(x, mask, all_reduce=all_reduce)) ** 2, mask, all_reduce=all_reduce)
    return var * count / (count - 1) if unbiased else var


def masked_whiten(
    x: Tensor, mask: Tensor, shift_mean: bool = True, unbiased: bool = True, eps: float = 1e-8,
    *, all_reduce: AllReduce | None = None,
) -> Tensor:
    """Scale `x` to unit variance (and zero mean) over its valid positions; pads set to 0.

    Args:
        x: (B, T). mask: (B, T), bool or 0/1.
        shift_mean: False keeps the mean (for rewards, so that their sign survives).
        unbiased: see `masked_var`.
        eps: added to the variance under the square root.
        all_reduce: mean and variance over every rank's positions (`AllReduce`): data-parallel ranks
            whiten their shards as one global batch would be. None = this process's.

    Returns:
        (B, T): (x - mean) / sqrt(var + eps), + mean when not shift_mean; 0 at pads.
    """
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    var = masked_var(x, mask, unbiased=unbiased, all_reduce=all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)


# ------------------------------------------------------------------------ KL estimators


class KLEstimator(Protocol):
    def __call__(self, logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float) -> Tensor: ...


KL_ESTIMATORS: Registry[KLEstimator] = Registry("KL estimator")


def _log_ratio(logprobs: Tensor, ref_logprobs: Tensor, clamp: float) -> Tensor:
    # Bounding d keeps exp(-d) in k3 and its gradient finite (fp32 overflows near 88); 20 as verl.
    return (logprobs - ref_logprobs).clamp(min=-clamp, max=clamp)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float = 20.0) -> Tensor:
    """k1 = d = log pi(y) - log pi_ref(y): unbiased, high variance, can be negative.

    Schulman 2020, "Approximating KL Divergence"; the classic in-reward penalty (Ziegler et al.
    2019, arXiv 1909.08593, Eq. 2). All estimators: logprobs, ref_logprobs (B, T) -> (B, T);
    `clamp` bounds |d|.
    """
    return _log_ratio(logprobs, ref_logprobs, clamp)


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float = 20.0) -> Tensor:
    """k2 = d^2 / 2: biased, low variance, >= 0 (Schulman 2020). Shapes as `kl_k1`."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs, clamp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, *, clamp: float = 20.0) -> Tensor:
    """k3 = exp(-d) - 1 + d: unbiased, low variance, >= 0 (Schulman 2020). GRPO's in-loss KL
    (Shao et al. 2024, arXiv 2402.03300, Eq. 4). Shapes as `kl_k1`."""
    d = _log_ratio(logprobs, ref_logprobs, clamp)
    return torch.expm1(-d) + d


def compute_kl(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    estimator: str = "k1",
    *,
    response_mask: Tensor | None = None,
    clamp: float = 20.0,
) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) with a registered estimator.

    Args:
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens.
        estimator: a name in `KL_ESTIMATORS`: "k1", "k2" or "k3".
        response_mask: (B, T); the result is 0 at its pads. None leaves every position as is.
        clamp: bound on |logprobs - ref_logprobs|.

    Returns:
        (B, T).
    """
    kl = KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs, clamp=clamp)
    return kl if response_mask is None else torch.where(response_mask.bool(), kl, 0)


# ------------------------------------------------------------------------ rewards, advantages


def compute_token_rewards(
    scores: Tensor, kl: Tensor, response_mask: Tensor, kl_coef: float
) -> Tensor:
    """Per-token RLHF reward: r_t = -kl_coef * kl_t, plus the score on the last valid token.

    Ziegler et al. 2019 (arXiv 1909.08593) Eq. 2, spread over tokens. The score goes on the last
    valid token (the stop token if there is one), not one past it (checklist section 2, trl #1893).

    Args:
        scores: (B,). kl: (B, T) per-token KL estimate, no grad. response_mask: (B, T).
        kl_coef: the KL coefficient beta.

    Returns:
        (B, T), 0 at pads. A row without a valid token gets no score.
    """
    mask = response_mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=-1, keepdim=True)  # (B, 1); -1: empty row
    rewards = torch.where(mask, -kl_coef * kl, 0)
    return rewards + (positions == last) * scores.unsqueeze(-1).to(rewards.dtype)


@torch.no_grad()
def compute_gae(
    token_rewards: Tensor, values: Tensor, response_mask: Tensor, *, gamma: float, gae_lambda: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, a reverse loop over tokens, without gradient.

    Schulman et al. 2016 (arXiv 1506.02438) Eq. 16:
        delta_t = r_t + gamma * V_{t+1} - V_t        (V = 0 after the last valid token)
        A_t     = delta_t + gamma * gae_lambda * A_{t+1}
        R_t     = A_t + V_t                           (value targets, before any whitening)
    Rewards and values are zeroed at pads first, so a value at a pad never leaks into A; this
    assumes each row's valid tokens are a prefix, as `truncate_after_stop` makes them. Whitening
    the advantages (`masked_whiten`) is left to the caller.

    Args:
        token_rewards: (B, T), e.g. from `compute_token_rewards`. values: (B, T) rollout values.
        response_mask: (B, T). gamma: discount. gae_lambda: GAE's lambda.

    Returns:
        advantages (B, T), returns (B, T); both 0 at pads.
    """
    mask = response_mask.bool()
    rewards, values = torch.where(mask, token_rewards, 0), torch.where(mask, values, 0)
    next_value = running = torch.zeros_like(values[:, 0])
    reversed_advantages = []
    for t in reversed(range(values.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * gae_lambda * running
        reversed_advantages.append(running)
        next_value = values[:, t]
    advantages = torch.stack(reversed_advantages[::-1], dim=-1)
    return torch.where(mask, advantages, 0), torch.where(mask, advantages + values, 0)


# ------------------------------------------------------------------------ losses


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None = None,
    max_log_ratio: float = 20.0,
) -> tuple[Tensor, Metrics]:
    """PPO's clipped surrogate per token: -min(ratio * A, clip(ratio, 1 - lo, 1 + hi) * A).

    Schulman et al. 2017 (arXiv 1707.06347) Eq. 7. Separate low/high bounds are DAPO's
    Clip-Higher (Yu et al. 2025, arXiv 2503.14476, section 3.1). `dual_clip` = c caps the loss at
    -c * A where A < 0, so a huge ratio on a bad token cannot blow up a step (Ye et al. 2020,
    arXiv 1912.09729).

    Args:
        logprobs: (B, T), current policy, with grad. old_logprobs: (B, T), rollout policy.
        advantages: (B, T), or (B, 1) for one advantage per sequence (GRPO).
        response_mask: (B, T).
        clip_eps_low, clip_eps_high: the ratio is clipped to [1 - low, 1 + high].
        dual_clip: c > 1, or None for no dual clip.
        max_log_ratio: bound on |logprobs - old_logprobs| before exp, so the ratio stays finite.

    Returns:
        per_token_loss (B, T), 0 at pads (reduce it with `aggregate_loss`); metrics:
        "policy/clipfrac" (share of valid tokens where the clipped term is used),
        "policy/dual_clipfrac", "policy/approxkl" (1/2 mean (lp - old)^2), "policy/ratio_mean".
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    mask = response_mask.bool()
    log_ratio = (logprobs - old_logprobs).clamp(min=-max_log_ratio, max=max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + clip_eps_high)
    loss = torch.maximum(unclipped, clipped)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_clipped = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_clipped, cap, loss)
    with torch.no_grad():
        metrics = {
            "policy/clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "policy/dual_clipfrac": masked_mean(dual_clipped.float(), mask),
            "policy/approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "policy/ratio_mean": masked_mean(ratio, mask),
        }
    return torch.where(mask, loss, 0), metrics


def compute_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    response_mask: Tensor,
    *,
    clip_eps_value: float,
) -> tuple[Tensor, Metrics]:
    """Clipped value loss per token: 1/2 * max((V - R)^2, (V_clip - R)^2), where
    V_clip = V_old + clip(V - V_old, -clip_eps_value, clip_eps_value).

    OpenAI baselines ppo2; Huang et al. 2022, "The 37 Implementation Details of PPO", item 9.

    Args:
        values: (B, T), current critic, with grad. old_values: (B, T), rollout values.
        returns: (B, T), targets from `compute_gae`. response_mask: (B, T).
        clip_eps_value: clip range around the old values (0.2 TRL; 0.5 verl, OpenRLHF).

    Returns:
        per_token_loss (B, T), 0 at pads (reduce it with `aggregate_loss`, in the policy's mode);
        metrics: "value/clipfrac" (share of valid tokens where the clipped error is larger),
        "value/vpred_mean", "value/error" (mean (V - R)^2).
    """
    mask = response_mask.bool()
    values_clipped = old_values + (values - old_values).clamp(-clip_eps_value, clip_eps_value)
    error, error_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    loss = 0.5 * torch.maximum(error, error_clipped)
    with torch.no_grad():
        metrics = {
            "value/clipfrac": masked_mean((error_clipped > error).float(), mask),
            "value/vpred_mean": masked_mean(values, mask),
            "value/error": masked_mean(error, mask),
        }
    return torch.where(mask, loss, 0), metrics


AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]  # the modes of `aggregate_loss`


def aggregate_loss(
    per_token_loss: Tensor,
    response_mask: Tensor,
    mode: AggMode,
    global_normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a (B, T) per-token loss to a scalar.

    Modes (verl `agg_loss`): "token-mean" = sum(m * L) / sum(m), every token weighs the same
    (DAPO, arXiv 2503.14476, section 3.3); "seq-mean-token-mean" = mean over sequences of each
    one's token mean (the original GRPO); "seq-mean-token-sum" = mean over sequences of each
    one's token sum.

    Micro-batches (data parallelism, gradient accumulation) hold different token counts, so
    their own means do not add up to the batch mean. Pass `global_normalizer` = the count over
    the whole optimizer-step batch (valid tokens for "token-mean", sequences with a valid token
    otherwise): the micro-batch losses and gradients then sum to the whole batch's exactly.
    Under DDP, which averages gradients over W ranks, pass that count / W.

    Args:
        per_token_loss: (B, T). response_mask: (B, T). mode: one of `AggMode`.
        global_normalizer: None divides by this batch's own count.

    Returns:
        0-dim loss.
    """
    mask = response_mask.bool()
    loss = torch.where(mask, per_token_loss, 0)
    if mode == "token-mean":
        total, count = loss.sum(), mask.sum()
    elif mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        tokens, per_seq = mask.sum(dim=-1), loss.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            per_seq = per_seq / tokens.clamp(min=1)
        total, count = per_seq.sum(), (tokens > 0).sum()
    else:
        modes = get_args(AggMode)
        raise ValueError(f"unknown loss aggregation mode '{mode}'{did_you_mean(mode, modes)}; known: {', '.join(modes)}")
    return total / (count.clamp(min=1) if global_normalizer is None else global_normalizer)


# ------------------------------------------------------------------------ logits


def logprobs_from_logits(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probs of `labels` under softmax(logits / temperature), computed in fp32.

    Use the sampling temperature for the policy, old and reference alike (checklist section 1).

    Args:
        logits: (B, T, V), already shifted: logits[:, t] predicts labels[:, t]. labels: (B, T).

    Returns:
        (B, T).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # fp32: a bf16 log-softmax over a large vocabulary is off by ~1e-2, enough to move the ratio.
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(z), z = logits / temperature: logsumexp(z) - sum softmax(z) * z.

    Args:
        logits: (B, T, V). Returns: (B, T), in nats; reduce with `masked_mean`.
    """
    z = logits.float() / temperature
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


def logprobs_from_hidden(
    hidden: Tensor,
    labels: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    temperature: float = 1.0,
    *,
    entropy: bool = False,
    chunk_size: int = 256,
) -> tuple[Tensor, Tensor | None]:
    """`logprobs_from_logits` (and `entropy_from_logits`) from the last hidden states, `chunk_size`
    tokens at a time: the (B, T, V) fp32 logits never exist at once, only (chunk_size, V) ones.

    With grad enabled each chunk runs under activation checkpointing, so the backward recomputes
    its logits instead of keeping them: peak memory grows with chunk_size x V, not B x T x V (at
    V = 49152 a chunk of 256 tokens is 48 MiB per fp32 copy). The results equal the unchunked
    computation up to float summation order (test: tests/unit/test_algos.py).

    Args:
        hidden: (B, T, H), already shifted: hidden[:, t] predicts labels[:, t]. labels: (B, T).
        lm_head: hidden (N, H) -> logits (N, V), e.g. `model.get_output_embeddings()`; runs under
            the caller's autocast.
        temperature: as in `logprobs_from_logits`. entropy: also return the entropy.
        chunk_size: tokens per chunk (> 0).

    Returns:
        logprobs (B, T) fp32; entropy (B, T) fp32 in nats, or None.

    Raises:
        ValueError: temperature <= 0 or chunk_size <= 0.
    """
    if chunk_size <= 0 or temperature <= 0:
        raise ValueError(f"chunk_size and temperature must be > 0, got {chunk_size} and {temperature}")
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    pieces = []
    for start in range(0, flat_labels.shape[0], chunk_size):
        args = (flat_hidden[start:start + chunk_size], flat_labels[start:start + chunk_size], lm_head,
                temperature, entropy)
        # non-reentrant checkpoint: grads reach lm_head's weights even when `hidden` needs none
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if torch.is_grad_enabled()
                      else _chunk_logprobs(*args))
    logprobs = torch.cat([lp for lp, _ in pieces]).view(labels.shape)
    return logprobs, torch.cat([ent for _, ent in pieces]).view(labels.shape) if entropy else None


def _chunk_logprobs(hidden: Tensor, labels: Tensor, lm_head, temperature: float, entropy: bool):
    logits = lm_head(hidden)
    ent = entropy_from_logits(logits, temperature) if entropy else torch.zeros(())
    return logprobs_from_logits(logits, labels, temperature), ent


# ------------------------------------------------------------------------ KL coefficient


class FixedKLController:
    """A constant KL coefficient; `update` does nothing."""

    def __init__(self, kl_coef: float):
        self.kl_coef = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Moves the KL coefficient toward a target KL (Ziegler et al. 2019, arXiv 1909.08593, 2.2):

        error   = clip(current_kl / target_kl - 1, -clip_error, clip_error)
        kl_coef = kl_coef * (1 + error * n_steps / horizon)

    `n_steps` is the number of episodes (sequences) in the update; target 6, horizon 10000 in
    "The N Implementation Details of RLHF with PPO".
    """

    def __init__(self, kl_coef: float, target_kl: float, horizon: int, clip_error: float = 0.2):
        if target_kl <= 0 or horizon <= 0:
            raise ValueError(f"target_kl and horizon must be > 0, got {target_kl}, {horizon}")
        self.kl_coef, self.target_kl = kl_coef, target_kl
        self.horizon, self.clip_error = horizon, clip_error

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target_kl - 1.0, -self.clip_error), self.clip_error)
        self.kl_coef *= 1.0 + error * n_steps / self.horizon


# ------------------------------------------------------------------------ rollout helpers


def first_true_indices(bools: Tensor) -> Tensor:
    """Index of the first True in each row of `bools` (B, T), or T where there is none: (B,)."""
    length = bools.shape[-1]
    positions = torch.arange(length, device=bools.device)
    return torch.where(bools, positions, length).amin(dim=-1)


def truncate_after_stop(
    completion_ids: Tensor, stop_token_id: int | Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each completion after its first stop token; the stop token is an action and stays.

    Pass the generated tokens only: a stop token inside the prompt must not count.

    Args:
        completion_ids: (B, T) sampled ids.
        stop_token_id: one id, or several (e.g. EOS and <|im_end|>).
        pad_token_id: written after the stop token; must not be a stop id (checklist section 0).

    Returns:
        ids (B, T), padded after the stop token; response_mask (B, T) bool, True up to and
        including it (all True without one); has_stop (B,) bool, False for completions cut at
        the length limit (the caller may apply a missing-stop penalty to their scores).
    """
    stops = torch.as_tensor(stop_token_id, device=completion_ids.device).reshape(-1)
    if (stops == pad_token_id).any():
        raise ValueError(f"pad_token_id ({pad_token_id}) must differ from the stop token ids "
                         f"({stops.tolist()}): with pad == stop a padded row looks stopped")
    first_stop = first_true_indices(torch.isin(completion_ids, stops))
    positions = torch.arange(completion_ids.shape[-1], device=completion_ids.device)
    response_mask = positions <= first_stop.unsqueeze(-1)
    ids = torch.where(response_mask, completion_ids, pad_token_id)
    return ids, response_mask, first_stop < completion_ids.shape[-1]


# ------------------------------------------------------------------------ rollout batch


@dataclass
class RolloutBatch:
    """One rollout for a PPO or GRPO update: B sequences, Q prompt tokens, T response tokens.

    Attributes:
        query_ids: (B, Q), left-padded prompts. query_mask: (B, Q) bool, True on prompt tokens.
        response_ids: (B, T), from `truncate_after_stop`. response_mask: (B, T) bool.
        old_logprobs: (B, T), rollout policy, no grad. scores: (B,).
        ref_logprobs: (B, T), reference policy; None without a KL term.
        values: (B, T), rollout critic; None without a critic (GRPO).
        advantages, returns: (B, T), once computed; returns only with a critic.
    """

    query_ids: Tensor
    query_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    old_logprobs: Tensor
    scores: Tensor
    ref_logprobs: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    def __post_init__(self) -> None:
        batch, length = self.response_ids.shape
        for name, tensor in self._tensors().items():
            per_token = name not in ("query_ids", "query_mask", "scores")
            if tensor.shape[0] != batch or (per_token and tuple(tensor.shape) != (batch, length)):
                expected = f"({batch}, {length})" if per_token else f"batch size {batch}"
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(tensor.shape)}, "
                                 f"expected {expected}")

    def _tensors(self) -> dict[str, Tensor]:
        fields = (f.name for f in dataclasses.fields(self))
        return {name: t for name in fields if (t := getattr(self, name)) is not None}

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, index: Tensor | slice) -> RolloutBatch:
        """The sub-batch at `index` along the batch dim, e.g. one minibatch."""
        return dataclasses.replace(self, **{k: t[index] for k, t in self._tensors().items()})

    def to(self, device: torch.device | str) -> RolloutBatch:
        return dataclasses.replace(self, **{k: t.to(device) for k, t in self._tensors().items()})
