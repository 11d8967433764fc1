"""The metrics vocabulary: every key a stage writes to STAGE/metrics.jsonl, declared once with its meaning,
unit and report panel (STYLE section 9: `group/name[/stat]`, snake_case).

Keys every Hugging Face Trainer logs keep HF's names (`loss`, `grad_norm`, `learning_rate`); the RL keys
follow STYLE section 9, and TRL's names for the same quantities are renamed where they enter
(`StageCallback` calls `rename`), from `TRL_NAMES`; the preference methods' own keys (`rewards/margins`,
...) have no second name and keep TRL's. A key a trainer logs that is not declared here (TRL adds some
between versions) is written under its own name; nothing reads it. The report, the CLI summary, the
progress bars and the benchmarks read declared names only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

# report panels, in the order the report shows them
PANELS = ("loss", "margin", "accuracy", "reward", "KL", "learning rate", "grad norm", "entropy", "length")


@dataclass(frozen=True)
class Metric:
    meaning: str
    unit: str
    panel: Optional[str] = None  # the report panel it is plotted on (one of PANELS); None: not plotted


# `<fn>` stands for a reward function's name, `<phase>` for a PPO phase
METRICS: dict[str, Metric] = {
    # every Trainer (and ppo's learning_rate, grad_norm)
    "loss": Metric("training loss of the optimizer step (the method's objective)", "loss", "loss"),
    "aux_loss": Metric("auxiliary loss (mixture-of-experts load balancing)", "loss", "loss"),
    "grad_norm": Metric("gradient norm before clipping, all trainable parameters", "L2 norm", "grad norm"),
    "learning_rate": Metric("learning rate of the step (the policy's, for ppo)", "lr", "learning rate"),
    "skipped_steps": Metric("optimizer steps skipped so far because the loss or gradients were not finite", "steps"),
    "epoch": Metric("passes over the training data so far", "epochs"),
    "num_tokens": Metric("training tokens seen so far", "tokens"),
    "entropy": Metric("mean entropy of the model's next-token distribution on the training tokens", "nats/token",
                      "entropy"),
    "mean_token_accuracy": Metric("share of training tokens the model predicts (argmax)", "share", "accuracy"),
    # a Trainer's closing line and the stage summary (manifest)
    "train_loss": Metric("mean training loss over the run", "loss"),
    "train_runtime": Metric("training wall time", "s"),
    "train_samples_per_second": Metric("training samples per second", "1/s"),
    "train_steps_per_second": Metric("optimizer steps per second", "1/s"),
    "total_flos": Metric("floating-point operations of the run", "flop"),
    "updates": Metric("ppo updates done", "updates"),
    "reward/first_quarter": Metric("reward/mean averaged over the first quarter of the logged steps", "score"),
    "reward/last_quarter": Metric("reward/mean averaged over the last quarter of the logged steps", "score"),
    # preference methods (TRL's names): dpo, kto
    "rewards/chosen": Metric("implicit reward beta * log(pi / pi_ref) of the chosen completions", "score", "reward"),
    "rewards/rejected": Metric("implicit reward of the rejected completions", "score", "reward"),
    "rewards/margins": Metric("rewards/chosen - rewards/rejected", "score", "margin"),
    "rewards/accuracies": Metric("share of pairs whose chosen implicit reward is higher", "share", "accuracy"),
    "logps/chosen": Metric("log-probability of the chosen completions", "nats"),
    "logps/rejected": Metric("log-probability of the rejected completions", "nats"),
    "logits/chosen": Metric("mean logit over the chosen completions' tokens", "logit"),
    "logits/rejected": Metric("mean logit over the rejected completions' tokens", "logit"),
    # reference-free preference methods (TRL's names): orpo, cpo / simpo (their rewards/* are beta * the policy's
    # own log-probs, length-normalised for simpo, not log-ratios to a reference)
    "nll_loss": Metric("SFT loss on the chosen completions (orpo; cpo's term weighted by cpo_alpha)", "nats/token",
                       "loss"),
    "log_odds_ratio": Metric("orpo: mean log sigmoid(log odds(chosen) - log odds(rejected))", "nats", "margin"),
    "log_odds_chosen": Metric("orpo: mean log odds(chosen) - log odds(rejected)", "nats", "margin"),
    # reward model (TRL's names)
    "accuracy": Metric("share of pairs the reward model ranks chosen above rejected", "share", "accuracy"),
    "margin": Metric("mean score(chosen) - score(rejected)", "score", "margin"),
    # TRL takes min / max over one micro-batch of every rank and averages them over the step's accumulation steps:
    # with gradient accumulation they are not the whole batch's (1 process x 2 accumulation steps reads other values
    # than 2 processes x 1; tests/stages/test_distributed_methods.py)
    "min_reward": Metric("lowest reward-model score of a micro-batch (all ranks'), mean over accumulation steps",
                         "score", "reward"),
    "mean_reward": Metric("mean reward-model score in the batch", "score", "reward"),
    "max_reward": Metric("highest reward-model score of a micro-batch (all ranks'), mean over accumulation steps",
                         "score", "reward"),
    # online RL: grpo, ppo
    "reward/mean": Metric("reward functions' weighted total per completion (ppo: before the EOS penalty and KL)",
                          "score", "reward"),
    "reward/std": Metric("its standard deviation over the rollout", "score", "reward"),
    "reward/<fn>/mean": Metric("one reward function's mean score (its None scores left out)", "score", "reward"),
    "reward/<fn>/std": Metric("one reward function's score standard deviation", "score", "reward"),
    "reward/<fn>/missing": Metric("scores the reward function lost since the last row (NaN, inf, not a number, raised): "
                                  "counted as None, 0 in the total", "count"),
    "reward/zero_std_frac": Metric("share of prompts whose completions all scored the same (no GRPO signal)",
                                   "share", "reward"),
    "zero_advantage/skipped_frac": Metric("grpo: share of rows left out of the forward/backward for an advantage "
                                          "of 0 (alignment.stages.grpo.SkipZeroAdvantageRows)", "share"),
    "kl/ref": Metric("KL(policy || reference) per sequence: the estimator summed over tokens, mean over sequences",
                     "nats/sequence", "KL"),
    "kl/ref_per_token": Metric("KL(policy || reference), mean over valid tokens (grpo's in-loss k3)", "nats/token",
                               "KL"),
    "kl/coef": Metric("the KL coefficient beta used in this update's rewards", "coefficient", "KL"),
    # online_dpo: each prompt's two samples judged by the rewards into a chosen / rejected pair
    "reward/pair_margin": Metric("mean reward of the judged-better sample minus the worse one", "score", "margin"),
    "reward/with_kl": Metric("reward - beta * KL(policy || reference) per sequence, mean: the objective", "score",
                             "reward"),
    "kl/penalty": Metric("-beta * KL(policy || reference) per sequence, mean", "score", "KL"),
    "response/neg_logprob": Metric("-log p(completion) under the policy, summed over tokens, mean over samples",
                                   "nats/sequence", "entropy"),
    "response/stopped_frac": Metric("share of completions that end with a stop token", "share"),
    "policy/loss": Metric("clipped surrogate loss, averaged over the update's minibatches", "loss", "loss"),
    "policy/clipfrac": Metric("share of valid tokens where the clipped ratio term was used", "share"),
    "policy/approxkl": Metric("1/2 mean (logprobs - old_logprobs)^2 over valid tokens", "nats"),
    "policy/ratio_mean": Metric("mean probability ratio; ~1", "ratio"),
    "policy/dual_clipfrac": Metric("share of valid tokens capped by the dual clip (only with dual_clip)", "share"),
    "policy/entropy": Metric("mean per-token entropy of the temperature-scaled policy on its samples", "nats/token",
                             "entropy"),
    "value/loss": Metric("clipped value loss, 1/2 (V - R)^2", "loss", "loss"),
    "value/clipfrac": Metric("share of valid tokens where the clipped value error was larger", "share"),
    "value/vpred_mean": Metric("mean value prediction", "score"),
    "value/error": Metric("mean (V - R)^2, unclipped", "score^2"),
    "value/explained_var": Metric("1 - Var(R - V) / Var(R) over valid tokens, rollout values", "share"),
    "adv/mean": Metric("mean GAE advantage before whitening", "score"),
    "adv/std": Metric("its standard deviation", "score"),
    "response/length_mean": Metric("response tokens per completion (stop token included)", "tokens", "length"),
    "response/length_min": Metric("shortest completion", "tokens", "length"),
    "response/length_max": Metric("longest completion", "tokens", "length"),
    "response/truncated_frac": Metric("share of completions cut at the token limit (no stop token)", "share"),
    "rollout/logprob_diff": Metric("mean |engine log-prob - trainer's log-prob| over valid tokens", "nats"),
    "rollout/tokens_per_sec": Metric("generated tokens per second of the generate phase", "tokens/s"),
    "timing/step": Metric("seconds per optimizer step (ppo: per update)", "s"),
    "timing/<phase>": Metric("seconds per ppo phase: generate, score, forward, advantages, train, sync", "s"),
}

# TRL's key -> ours, per stage method (one TRL name can mean different things: grpo's `kl` is per token,
# kto's per sequence). `<fn>` matches a reward function's name.
TRL_NAMES: dict[str, dict[str, str]] = {
    "grpo": {
        "reward": "reward/mean",
        "reward_std": "reward/std",
        "rewards/<fn>/mean": "reward/<fn>/mean",
        "rewards/<fn>/std": "reward/<fn>/std",
        "frac_reward_zero_std": "reward/zero_std_frac",
        "kl": "kl/ref_per_token",
        "entropy": "policy/entropy",
        "policy_loss": "policy/loss",
        "clip_ratio/region_mean": "policy/clipfrac",
        "completions/mean_length": "response/length_mean",
        "completions/min_length": "response/length_min",
        "completions/max_length": "response/length_max",
        "completions/clipped_ratio": "response/truncated_frac",
        "sampling/sampling_logp_difference/mean": "rollout/logprob_diff",
        "step_time": "timing/step",
    },
    "online_dpo": {
        "objective/scores": "reward/mean",
        "objective/scores_margin": "reward/pair_margin",
        "objective/rlhf_reward": "reward/with_kl",
        "objective/kl": "kl/ref",
        "objective/non_score_reward": "kl/penalty",
        "objective/entropy": "response/neg_logprob",
        "val/contain_eos_token": "response/stopped_frac",
        "beta": "kl/coef",
    },
    "kto": {"kl": "kl/ref"},
}
TRL_NAMES["rloo"] = TRL_NAMES["grpo"]  # TRL's RLOOTrainer logs with GRPOTrainer's code

# the progress bars' fields: key -> label, in this order
PROGRESS = {"loss": "loss", "reward/mean": "reward", "kl/ref": "kl", "rewards/margins": "margin",
            "accuracy": "accuracy"}


@lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("<fn>"), "(.+)").replace(re.escape("<phase>"), "(.+)"))


def describe(key: str) -> Optional[Metric]:
    """The declaration of `key` (a template such as `reward/<fn>/mean` matches its instances), or None."""
    if key in METRICS:
        return METRICS[key]
    return next((m for template, m in METRICS.items() if "<" in template and _pattern(template).fullmatch(key)),
                None)


def rename(method: str, logs: dict) -> dict:
    """`logs` with `method`'s TRL keys renamed to ours (others kept); order kept.

    >>> rename("grpo", {"reward": 0.5, "rewards/math/mean": 0.4, "loss": 0.1})
    {'reward/mean': 0.5, 'reward/math/mean': 0.4, 'loss': 0.1}
    """
    table = TRL_NAMES.get(method, {})
    out = {}
    for key, value in logs.items():
        new = table.get(key)
        if new is None:
            for template, ours in table.items():
                match = "<" in template and _pattern(template).fullmatch(key)
                if match:
                    new = ours.replace("<fn>", match.group(1))
                    break
        out[new or key] = value
    return out
