"""Knowledge distillation over TRL's GKDTrainer (Agarwal et al., 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", arXiv 2306.13649).

The student (this stage's model, from `from:`) learns the `teacher:`'s next-token distribution on each
completion token under the generalized Jensen-Shannon divergence (eq. 1; `beta` 0 = forward KL, 1 = reverse
KL); with probability `lmbda` a batch's completions are sampled from the student itself (on-policy), else the
dataset's are used (`seq_kd: true`: the teacher's own samples). The teacher may have another size but must
share the student's tokenizer (checked by `alignkit validate`). TRL's GKDTrainer samples with the student's
`generate` and takes no `rollout_func`, so the rollout engines do not apply here.

    alignkit run recipes/quickstart/distill.yaml --stage distill
"""
from __future__ import annotations

import warnings

from alignment.stages import StageContext, StageResult, stage, trainer_defaults


def _gkd():
    """TRL 1.16's experimental GKD config and trainer (tests/stages/test_distill.py pins them; the trainer with the
    loss scaled as below), without TRL's warning that experimental APIs may change."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    class DistillTrainer(GKDTrainer):
        """GKDTrainer with its loss right on several processes. Given `num_items_in_batch` (with
        `average_tokens_across_devices`, the completion tokens of every rank), GKD's loss is this rank's token sum
        over that global count; DDP then averages the ranks' gradients, so transformers' `Trainer.compute_loss`
        and TRL's SFTTrainer multiply by the number of processes -- TRL 1.16's GKD does not, which makes its
        gradient and logged loss 1/N of one process's on N processes (measured: exactly half on 2)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if not (self.args.average_tokens_across_devices and num_items_in_batch is not None):
                return out
            scale = self.accelerator.num_processes
            return (out[0] * scale, out[1]) if return_outputs else out * scale

    return GKDConfig, DistillTrainer


def _config():
    return _gkd()[0]


def teacher_path(recipe, name: str, weights) -> str:
    """The teacher's weights: `weights(stage)` for an earlier stage (or base), else its folder / hub id."""
    from alignment.models import resolve_model_path
    from alignment.recipe import BASE

    teacher = recipe.stages[name].teacher
    return weights(teacher) if teacher in recipe.stages or teacher == BASE else resolve_model_path(teacher)


def _tokenizer_problem(student: str, teacher: str, trust_remote_code: bool = False) -> str | None:
    """Why `teacher` cannot teach `student` (paths or hub ids), or None: their tokenizers' vocabularies (token ->
    id) and their configs' vocab_size must agree -- tokenizer files and config.json only, no weights."""
    from transformers import AutoConfig

    from alignment.models import load_tokenizer

    va, vb = (load_tokenizer(p, trust_remote_code=trust_remote_code).get_vocab() for p in (student, teacher))
    if va != vb:
        differ = sorted(set(va.items()) ^ set(vb.items()), key=lambda kv: kv[1])[:3]
        return (f"the teacher's tokenizer differs from the student's ({len(vb)} vs {len(va)} tokens; e.g. "
                f"{', '.join(f'{t!r}={i}' for t, i in differ)}): distillation compares next-token distributions "
                f"over one vocabulary; use a teacher of the same model family (same tokenizer)")
    sizes = [AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code).get_text_config().vocab_size
             for p in (student, teacher)]
    if sizes[0] != sizes[1]:
        return (f"the teacher's vocab_size ({sizes[1]}) differs from the student's ({sizes[0]}): their logits "
                f"cannot be compared token by token")
    return None


def _check(recipe, name):
    """A teacher is given; one that is not a stage of this recipe (which shares base's tokenizer) loads and
    shares the student's tokenizer."""
    from alignment.models import resolve_model_path
    from alignment.recipe import BASE, Problem

    where = ("stages", name, "teacher")
    teacher = recipe.stages[name].teacher
    if teacher is None:
        return [Problem(where, "distill needs `teacher:`, an earlier stage or a model folder, e.g. teacher: sft")]
    if teacher in recipe.stages or teacher == BASE:
        return []  # every stage descends from base and saves base's tokenizer
    try:
        problem = _tokenizer_problem(resolve_model_path(recipe.model.name_or_path), resolve_model_path(teacher),
                                     recipe.model.trust_remote_code)
    except (OSError, ValueError) as err:
        problem = f"cannot read the teacher {teacher!r} (a stage of this recipe, a model folder or a hub id): {err}"
    return [Problem(where, problem)] if problem else []


def as_messages(row: dict) -> dict:
    """A `prompt`/`completion` row as the `messages` conversation GKD's collator reads (strings become a user
    and an assistant turn)."""
    turn = lambda value, role: value if isinstance(value, list) else [{"role": role, "content": value}]  # noqa: E731
    return {"messages": turn(row["prompt"], "user") + turn(row["completion"], "assistant")}


def _defaults(recipe, name):
    return {**trainer_defaults(recipe, name), "max_length": 1024}  # tokens per example (GKD's collator cuts the start)


@stage("distill", config=_config, formats=("messages", "prompt_completion"), check=_check, defaults=_defaults)
def run(ctx: StageContext) -> StageResult:
    from alignment.models import load_model

    GKDConfig, DistillTrainer = _gkd()

    tokenizer = ctx.tokenizer()
    train = ctx.dataset()
    if "messages" not in train.column_names:  # the collator reads `prompt` as text when present: replace it
        train = train.map(as_messages, remove_columns=train.column_names)
    # the teacher in the stage's dtype / quantization, frozen (no adapter)
    teacher = load_model(teacher_path(ctx.recipe, ctx.name, ctx.weights), ctx.model_cfg.model_copy(update={"adapter": None}))
    trainer = DistillTrainer(
        model=ctx.load_model(), teacher_model=teacher, args=ctx.trl_config(GKDConfig), train_dataset=train,
        processing_class=tokenizer, peft_config=ctx.peft_config(), callbacks=ctx.callbacks(),
    )
    metrics = ctx.train(trainer)
    ctx.save(trainer, tokenizer)
    return StageResult(metrics=metrics)
