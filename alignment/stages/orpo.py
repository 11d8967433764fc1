"""Odds-ratio preference optimisation over TRL's experimental ORPOTrainer (Hong et al., 2024).

Reference-free: the SFT loss on the chosen completion plus `beta` times a log-odds-ratio term that favours chosen
over rejected, so ORPO can start from the base model (no SFT stage needed) and keeps no reference model. Takes
the same pairs as `dpo`; `beta` (the paper's lambda) and TRL's other knobs come through `args`.

    stages: {orpo: {method: orpo, data: [pairs], args: {beta: 0.1}}}      # alignkit run RECIPE
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig


@stage("orpo", config=_config, formats=("preference",), defaults=trainer_defaults)
def run(ctx: StageContext) -> StageResult:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer = ctx.tokenizer()
    trainer = ORPOTrainer(
        model=ctx.load_model(), args=ctx.trl_config(ORPOConfig), train_dataset=ctx.dataset(),
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)
