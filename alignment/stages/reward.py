"""Reward model: a scalar head on the `from` model trained on preference pairs (Bradley-Terry),
over TRL's RewardTrainer.

The artifact is a sequence-classification model; later stages use it by stage name
(`rewards: [{name: reward_model, stage: rm}]`) and so do the `reward_score` / `win_rate` evals.

    alignkit run recipes/quickstart/arith.yaml --stage rm
"""
from __future__ import annotations

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _config():
    from trl import RewardConfig

    return RewardConfig


@stage("reward", config=_config, formats=("preference",), defaults=trainer_defaults,
       long_rows="drops")
def run(ctx: StageContext) -> StageResult:
    from trl import RewardConfig, RewardTrainer

    tokenizer = ctx.tokenizer()
    args = ctx.trl_config(RewardConfig)
    train = ctx.check_lengths(ctx.dataset(), tokenizer, args.max_length)  # TRL drops long rows without a word
    model = ctx.load_model(head="sequence_classification")
    model.config.pad_token_id = tokenizer.pad_token_id
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=ctx.peft_config(task_type="SEQ_CLS"),
        callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer, head="sequence_classification")
    return StageResult(metrics=metrics)
