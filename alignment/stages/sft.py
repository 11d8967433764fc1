"""Supervised fine-tuning: next-token loss on demonstrations, over TRL's SFTTrainer.

Data: `messages` (chat), `prompt`/`completion` (loss on the completion only, TRL's default) or
plain `text`. Adapters (LoRA / DoRA / rsLoRA) and QLoRA come from the recipe's `model` section.

    alignkit run recipes/quickstart/arith.yaml --stage sft
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import SFTConfig

    return SFTConfig


def _defaults(recipe, name):
    return {**trainer_defaults(recipe, name), "max_length": 1024}  # tokens per example; longer ones are cut


@stage("sft", config=_config, formats=("messages", "prompt_completion", "text"), defaults=_defaults,
       long_rows="truncates")
def run(ctx: StageContext) -> StageResult:
    from trl import SFTConfig, SFTTrainer

    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(SFTConfig)
    # TRL truncates and then silently drops the rows left without a completion token: count and say so
    train = ctx.check_lengths(ctx.dataset(), tokenizer, args.max_length)
    trainer = SFTTrainer(
        model=ctx.load_model(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=ctx.peft_config(),
        callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)
