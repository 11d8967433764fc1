"""Contrastive preference optimisation over TRL's experimental CPOTrainer (Xu et al., 2024), and SimPO
(Meng et al., 2024) as its `loss_type: simpo`.

Reference-free: a DPO-style loss on the policy's own (length-normalised, for SimPO) log-probabilities plus
`cpo_alpha` times the SFT loss on the chosen completion; no reference model is kept. Takes the same pairs as `dpo`.
`cpo` defaults to TRL's sigmoid loss with cpo_alpha 1.0; `simpo` is the same stage with SimPO's defaults
(`loss_type: simpo`, `cpo_alpha: 0.0`: no SFT term, the paper's setting; `simpo_gamma` and `beta` through `args`).

    stages: {simpo: {method: simpo, data: [pairs], args: {beta: 2.0, simpo_gamma: 0.5}}}   # alignkit run RECIPE
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl.experimental.cpo import CPOConfig

    return CPOConfig


@stage("cpo", config=_config, formats=("preference",), defaults=trainer_defaults)
def run(ctx: StageContext) -> StageResult:
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    tokenizer = ctx.tokenizer()
    trainer = CPOTrainer(
        model=ctx.load_model(), args=ctx.trl_config(CPOConfig), train_dataset=ctx.dataset(),
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)


def _simpo_defaults(recipe, name):
    return {**trainer_defaults(recipe, name), "loss_type": "simpo", "cpo_alpha": 0.0}


@stage("simpo", config=_config, formats=("preference",), defaults=_simpo_defaults)
def run_simpo(ctx: StageContext) -> StageResult:
    """`cpo` with SimPO's defaults (the recipe's `args` still override them)."""
    return run(ctx)
