"""Kahneman-Tversky optimisation over TRL's KTOTrainer (Ethayarajh et al., 2024).

Learns from unpaired feedback: rows of `prompt`, `completion`, `label` (true = desirable). A paired
dataset (`chosen` / `rejected`) becomes two unpaired rows per pair with `unpaired: true` on the
dataset in the recipe's `data:` section. Reference = the `from` stage's model, as for DPO.

    alignkit run recipes/quickstart/arith.yaml --stage kto
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import KTOConfig

    return KTOConfig


@stage("kto", config=_config, formats=("unpaired",), defaults=trainer_defaults,
       long_rows="truncates")
def run(ctx: StageContext) -> StageResult:
    from trl import KTOConfig, KTOTrainer

    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(KTOConfig)
    train = ctx.check_lengths(ctx.dataset(), tokenizer, args.max_length)  # TRL cuts long rows without a word
    trainer = KTOTrainer(
        model=ctx.load_model(),
        ref_model=None,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=ctx.peft_config(),
        callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)
