"""Direct preference optimisation over TRL's DPOTrainer (Rafailov et al., 2023).

The reference model is the `from` stage's model: with an adapter it is the same weights with the
adapter disabled (no second copy in memory); without one TRL keeps a frozen copy. TRL's loss
types (sigmoid, ipo, hinge, apo_zero, ...) and `beta` come through `args`.

    alignkit run recipes/quickstart/arith.yaml --stage dpo
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import DPOConfig

    return DPOConfig


@stage("dpo", config=_config, formats=("preference",), defaults=trainer_defaults,
       long_rows="truncates")
def run(ctx: StageContext) -> StageResult:
    from trl import DPOConfig, DPOTrainer

    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(DPOConfig)
    train = ctx.check_lengths(ctx.dataset(), tokenizer, args.max_length)  # TRL cuts long rows without a word
    trainer = DPOTrainer(
        model=ctx.load_model(),
        ref_model=None,  # adapter: disabled-adapter reference; full: TRL copies the start model
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=ctx.peft_config(),
        callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)
