"""Stage methods, registered by name, and what a stage is handed when it runs.

A stage module registers one function:

    @stage("dpo", config=lambda: trl.DPOConfig, formats=("preference",), defaults=trainer_defaults)
    def run(ctx: StageContext) -> StageResult: ...

`config` (lazy, so validation can check `args` without importing every trainer) is the TRL config
class that `args` is checked against and built into; `formats` are the data formats it accepts;
`defaults` are the method's values for config fields the recipe leaves out (a dict, or a function of
the recipe and stage name for derived ones), so `effective_args` -- what the config is built from,
and what the stage's fingerprint hashes -- is computed in one place; `generates` gives the stage a
`rollout:` section (filled with its defaults when the recipe has none); `long_rows` ("truncates" or "drops",
`alignment.data.LONG_ROWS`) says what its trainer does with a row longer than the config's `max_length`, so the rows
it affects are counted and told (`StageContext.check_lengths`, and `validate` before any model loads).
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from transformers import TrainerCallback

from alignment.data import DataReport
from alignment.metrics import PROGRESS, rename
from alignment.recipe import ModelConfig, Recipe, RolloutConfig, StageConfig
from alignment.registry import Registry
from alignment.rundir import RunDir

STAGES: Registry[Callable] = Registry("stage method")
FAULT_ENV = "ALIGNKIT_FAULT_KILL_AT"  # test hook: kill the stage process at a point (`StageContext.fault_point`)


Defaults = Union[dict[str, Any], Callable[[Recipe, str], dict[str, Any]]]


def stage(name: str, *, config: Optional[Callable[[], type]] = None, formats: tuple[str, ...] = (),
          check: Optional[Callable[[Recipe, str], list]] = None, defaults: Optional[Defaults] = None,
          generates: bool = False, upgrade: Optional[Callable[[Recipe, str], list]] = None,
          long_rows: Optional[str] = None):
    """Register a stage function under `name` (see the module docstring). `upgrade(recipe, name)` rewrites
    argument names the method used to take into today's, in the recipe, and returns one `Problem` (a warning: key
    path and what it became) per rewrite."""

    def decorator(fn):
        fn.config_class, fn.formats, fn.check = config, formats, check
        fn.defaults, fn.generates, fn.upgrade, fn.long_rows = defaults or {}, generates, upgrade, long_rows
        return STAGES.register(name)(fn)

    return decorator


def effective_args(recipe: Recipe, name: str) -> dict[str, Any]:
    """The stage's trainer arguments: its method's registered defaults, overridden by the recipe's `args`.
    `StageContext.trl_config` builds the config from them and the stage's fingerprint hashes them. `bf16: auto`
    becomes `alignment.models.bf16_supported()` (bf16 autocast only where the device computes it natively)."""
    spec = recipe.stages[name]
    defaults = STAGES.get(spec.method).defaults
    args = {**(defaults(recipe, name) if callable(defaults) else defaults), **spec.args}
    if args.get("bf16") == "auto":  # bf16 autocast only where it is native: emulated, it is slower than fp32
        from alignment.models import bf16_supported

        args["bf16"] = bf16_supported()
    return args


def trainer_defaults(recipe: Recipe, name: str) -> dict[str, Any]:
    """alignkit's defaults for every TRL trainer config (transformers' TrainingArguments fields): log every
    step, a checkpoint every fifth of the run (of 50 steps when `max_steps` is not set), keep two."""
    args = recipe.stages[name].args
    return dict(
        logging_steps=1,
        save_strategy="steps",
        save_steps=max(1, int(args.get("max_steps", 50) or 50) // 5),
        save_total_limit=2,
        seed=recipe.seed,
        disable_tqdm=True,
        gradient_checkpointing=recipe.stage_model(name).gradient_checkpointing,
    )


def trainer_kwargs(recipe: Recipe, name: str, output_dir: Path) -> dict[str, Any]:
    """What a stage's TRL config is built from: this machine's precision and device < `effective_args`
    (registered defaults < the recipe's `args`) < run-directory paths. `validate` builds the same config, so
    what the trainer would refuse at construction is refused before any model loads."""
    import torch

    from alignment.models import torch_dtype

    model = recipe.stage_model(name)
    # TRL casts QLoRA's trainable weights to bf16 (QLoRA paper); bf16 autocast keeps the
    # float32 activations of a CPU run compatible with them (e.g. a reward model's new head).
    bf16 = (torch_dtype(model.dtype) == torch.bfloat16 and torch.cuda.is_available()) or (
        model.quantization is not None and model.quantization.bits == 4)
    return {"bf16": bf16, "use_cpu": not torch.cuda.is_available(), **effective_args(recipe, name),
            "output_dir": str(output_dir), "report_to": []}


def load_stages() -> None:
    """Import every module of this package so each registers its method."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


class StageInputError(ValueError):
    """A stage cannot go on because of its recipe, data or rewards, not a crash: a rerun would stop the same way
    (e.g. every reward missing for `max_missing_reward_steps` steps). The stage's process exits 2, saying why."""


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # final numbers for the manifest / summary
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the rollout backend chosen


@dataclass
class StageContext:
    """Everything a stage needs: its config, paths in the run directory, and shared helpers."""

    recipe: Recipe
    name: str
    run_dir: Path
    trainer_config: dict[str, Any] = field(default_factory=dict)  # the built config, for the manifest
    reward_funcs: list = field(default_factory=list)  # set by `reward_functions`
    trackers: Any = None  # alignment.tracking.Trackers of `report_to`, started by the first `log_metrics`
    data_report: DataReport = field(default_factory=DataReport)  # rows `dataset` dropped, kept with a warning, ...
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient (`skip_nonfinite`)
    missing_reward_steps: int = 0  # steps in a row in which every reward lost every score (`check_rewards`)
    resumed_at: int = 0  # the checkpoint step `train` resumed from (0: from scratch)

    @property
    def spec(self) -> StageConfig:
        return self.recipe.stages[self.name]

    @property
    def model_cfg(self) -> ModelConfig:
        return self.recipe.stage_model(self.name)

    @property
    def args(self) -> dict[str, Any]:
        """`effective_args`: the method's registered defaults, overridden by the recipe's `args`."""
        return effective_args(self.recipe, self.name)

    @property
    def world_size(self) -> int:
        """How many processes run this stage (`WORLD_SIZE`, set by torch.distributed.run / accelerate launch)."""
        return int(os.environ.get("WORLD_SIZE", "1"))

    @property
    def is_main_process(self) -> bool:
        """Whether this is global rank 0 (`RANK` from the launcher; True in a plain single process): the one
        process that writes the artifact, result.json, metrics.jsonl and the progress output. The launcher's
        environment is what accelerate's `PartialState` reads, so this agrees with `trainer.accelerator`."""
        return int(os.environ.get("RANK", "0")) == 0

    @functools.cached_property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.rundir.checkpoint_dir(self.name)

    # ------------------------------------------------------------ models and data

    def weights(self, name: str) -> str:
        """Full weights of `base` or a finished stage of this run."""
        return self.rundir.weights(self.recipe, name)

    def start_path(self) -> str:
        """Full weights this stage starts from: the recipe's model, or the `from` stage's artifact."""
        return self.weights(self.spec.from_)

    def tokenizer(self):
        from alignment.models import load_tokenizer

        return load_tokenizer(self.start_path(), trust_remote_code=self.model_cfg.trust_remote_code)

    def load_model(self, head: str = "causal_lm", **kwargs):
        from alignment.models import load_model

        return load_model(self.start_path(), self.model_cfg, head=head, **kwargs)

    def peft_config(self, task_type: str = "CAUSAL_LM"):
        from alignment.models import peft_config

        return peft_config(self.model_cfg.adapter, task_type)

    def dataset(self, formats: Optional[tuple[str, ...]] = None):
        from alignment.data import build
        from alignment.decontam import row_filter

        fn = STAGES.get(self.spec.method)
        dataset = build(self.recipe.data, self.spec.data, formats or fn.formats, seed=self.recipe.seed,
                        on_bad_rows=self.recipe.on_bad_rows, report=self.data_report, contaminated=row_filter(self.recipe),
                        decontaminate=self.recipe.decontaminate.action if self.recipe.decontaminate else None)
        self.fault_point("data")
        return dataset

    def check_lengths(self, dataset, tokenizer, max_length: Optional[int]):
        """`alignment.data.check_truncation` of this stage's data: the rows its trainer's `max_length` cuts or leaves
        out (the method's `long_rows`) counted, told with file:line and handled by `on_bad_rows`.

        Returns:
            `dataset`, without the rows that keep no completion token under `on_bad_rows: drop`.
        """
        from alignment.data import check_truncation

        fn = STAGES.get(self.spec.method)
        return check_truncation(dataset, tokenizer, max_length, self.recipe.data, self.spec.data, fn.formats,
                                on_bad_rows=self.recipe.on_bad_rows, report=self.data_report, long_rows=fn.long_rows)

    # ------------------------------------------------------------ online RL (grpo, rloo, online_dpo, ppo)

    @property
    def rollout(self) -> RolloutConfig:
        return self.spec.rollout  # filled for generating methods when the recipe is loaded (validate.load_recipe)

    def reward_functions(self) -> tuple[list[Callable], list[float]]:
        """The stage's `rewards:` as (functions, weights), TRL's reward_funcs / reward_weights."""
        from rewards import combine_rewards

        funcs, weights = combine_rewards([{"name": r.name, "weight": r.weight, **(r.model_extra or {})}
                                          for r in self.spec.rewards])
        self.reward_funcs = funcs  # `log_metrics` adds their `reward/<fn>/missing` counts to each row
        return funcs, weights

    def rollout_engine(self, policy, tokenizer, *, seed: int):
        """The `rollout:` engine, started from this stage's start weights and given `policy`'s (the live
        model, a PeftModel or 4-bit one included); it generates in the policy's dtype (float32 when quantized)."""
        from alignment.rollout import make_engine

        cfg = self.rollout
        return make_engine(
            cfg.backend, self.start_path(), tokenizer=tokenizer, model=policy,
            dtype=str(policy.dtype).removeprefix("torch.") if self.model_cfg.quantization is None else "float32",
            max_model_len=cfg.max_model_len, seed=seed,
            **({"url": cfg.url} if cfg.url else {}),
            **({"gpu_memory_utilization": cfg.gpu_memory_utilization} if cfg.backend != "hf" else {}),
            **({"enforce_eager": cfg.enforce_eager} if cfg.enforce_eager is not None else {}),
        )

    def trainer_rollouts(self, tokenizer, *, seed: int):
        """Generation for a TRL trainer (grpo's `rollout_func`, rloo's backend) from the `rollout:` engine,
        started from the trainer's live policy and synced after each optimizer step (`rollout.TrainerRollouts`)."""
        from alignment.rollout import SamplingConfig, TrainerRollouts

        cfg = self.rollout
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, n=1)
        return TrainerRollouts(lambda policy: self.rollout_engine(policy, tokenizer, seed=seed), sampling, tokenizer)

    # ------------------------------------------------------------ logging, progress, the fault hook

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append {"step", "time", **metrics} (numbers only; keys from alignment/metrics.py) to metrics.jsonl, and
        send them to the stage's `report_to` trackers (`alignment.tracking`); only the main process writes (other
        ranks' calls do nothing)."""
        from rewards import missing_metrics

        if not self.is_main_process:
            return
        values = {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | missing_metrics(self.reward_funcs)
        if self.skipped_steps:
            values["skipped_steps"] = self.skipped_steps
        self.rundir.append_metrics(self.name, step, values)
        if self.trackers is None:  # started at the first row: its step tells tensorboard what to purge on a resume
            from alignment.tracking import Trackers, flat_config

            config = flat_config({"method": self.spec.method, "from": self.spec.from_, "args": self.args})
            self.trackers = Trackers(self.recipe.stage_report_to(self.name), self.run_dir, project=self.recipe.name,
                                     run=self.name, first_step=step, config=config)
        self.trackers.log(values, step)

    def finish_tracking(self) -> None:
        """Close the `report_to` trackers `log_metrics` started (flush files, end wandb / mlflow runs)."""
        if self.trackers is not None:
            self.trackers.finish()

    def skip_nonfinite(self, parameters, step: int) -> bool:
        """Before an optimizer step (after the Trainer's clipping): when the gradients' total norm is not finite (a
        NaN or inf gradient, from a non-finite loss), drop every gradient (`grad = None`: the optimizer leaves those
        weights and their moments alone), count it in `skipped_steps` (logged with each row) and say so. One fused
        norm over all gradients (`torch.nn.utils.get_total_norm`, as `clip_grad_norm_`): ~2 ms a step for a LoRA's
        400 tensors, where a check per tensor took ~25. Returns whether the step is skipped."""
        import torch

        grads = [p.grad for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if bool(torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)):  # DTensor: FSDP2
            return False
        for p in parameters:
            p.grad = None
        self.skipped_steps += 1
        print(f"alignkit: {self.name} step {step}: the loss or gradients are not finite; step skipped "
              f"({self.skipped_steps} so far)", flush=True)
        return True

    def check_rewards(self, step: int) -> None:
        """After a step: count steps in a row in which every reward lost every score (`rewards.lost_everything`);
        say so, and stop the stage after the stage's `max_missing_reward_steps` of them.

        Raises:
            StageInputError: names the rewards and the step (the last checkpoint is kept).
        """
        from rewards import lost_everything

        lost = lost_everything(self.reward_funcs)
        if lost is None:
            return
        self.missing_reward_steps = self.missing_reward_steps + 1 if lost else 0
        if not lost:
            return
        names = ", ".join(f"'{fn.__name__}'" for fn in self.reward_funcs)
        limit = self.spec.max_missing_reward_steps
        print(f"alignkit: {self.name} step {step}: every reward ({names}) lost every score (NaN, inf, not a number "
              f"or raised): the step trains on nothing ({self.missing_reward_steps}/{limit} in a row)", flush=True)
        if self.missing_reward_steps >= limit:
            raise StageInputError(f"every reward ({names}) lost every score for {limit} steps in a row, up to step "
                                  f"{step}; fix the reward function(s) (see reward/<fn>/missing in metrics.jsonl), or "
                                  f"raise `max_missing_reward_steps` under stages.{self.name}")

    def progress(self, total: int, completed: int = 0) -> "Progress":
        """The stage's progress output; silent on every rank but the main one."""
        return Progress(self.name, total, completed, enabled=self.is_main_process)

    def fault_hook(self, step: int) -> None:
        """Called right after a checkpoint is saved. Test hook: ALIGNKIT_FAULT_KILL_AFTER_SAVE=N kills this
        process (SIGKILL) once `step` >= N -- how the resume tests cut a stage off mid-run; with
        ALIGNKIT_FAULT_RANK=R only global rank R is killed (one rank of a multi-process stage); see also
        `fault_point`."""
        kill_at, rank = os.environ.get("ALIGNKIT_FAULT_KILL_AFTER_SAVE"), os.environ.get("ALIGNKIT_FAULT_RANK")
        if rank is not None and rank != os.environ.get("RANK", "0"):
            return
        if kill_at and step >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        self.fault_point("save", step)

    def fault_point(self, point: str, step: Optional[int] = None) -> None:
        """Test hook of the fault suite: `FAULT_ENV=POINT[@N]` kills this process (SIGKILL) at `point` (at step >= N):
        `data` once the dataset is built, `save` while checkpoint N is being saved (it is left without its last
        file, trainer_state.json, as a kill there leaves it), `artifact` with the weights saved but the artifact
        not yet complete."""
        from alignment.rundir import CHECKPOINT_STATE

        name, _, at = os.environ.get(FAULT_ENV, "").partition("@")
        if name != point or (at and (step is None or step < int(at))):
            return
        if point == "save":
            (self.rundir.checkpoint(self.name, step) / CHECKPOINT_STATE).unlink(missing_ok=True)
        os.kill(os.getpid(), signal.SIGKILL)

    # ------------------------------------------------------------ TRL glue

    def last_checkpoint(self) -> Optional[str]:
        """The newest complete checkpoint. Newer ones cut off while being saved are removed, saying so, so the
        resumed run writes them again from scratch."""
        found = self.rundir.checkpoints(self.name)
        last = int(found[-1].name.split("-")[-1]) if found else -1
        for partial in self.rundir.checkpoints(self.name, complete=False):
            if self.is_main_process and partial not in found and int(partial.name.split("-")[-1]) > last:
                print(f"alignkit: {partial.name} of {self.name} is incomplete (cut off while saving); "
                      f"{'resuming from ' + found[-1].name if found else 'starting over'}", flush=True)
                shutil.rmtree(partial, ignore_errors=True)
        return str(found[-1]) if found else None

    def trl_config(self, cls):
        """Build the stage's TRL config (`trainer_kwargs`); records its values in `trainer_config`."""
        config = cls(**trainer_kwargs(self.recipe, self.name, self.checkpoint_dir))
        self.trainer_config = config.to_dict()
        return config

    def callbacks(self) -> list:
        return [StageCallback(self)]

    def train(self, trainer) -> dict:
        """trainer.train(), resuming from the last checkpoint when there is one. A checkpoint of the last step
        (the run was cut off after it, e.g. while writing the artifact) only has its weights loaded: transformers'
        Trainer (5.19) resumed there trains one step beyond `max_steps`."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our StageCallback shows the logs
        resume = self.last_checkpoint()
        step = int(Path(resume).name.split("-")[-1]) if resume else 0
        last = 0 < trainer.args.max_steps <= step
        if resume and self.is_main_process:
            print(f"alignkit: resuming {self.name} from {Path(resume).name}"
                  f"{' (its last step: only its weights are loaded)' if last else ''}", flush=True)
            self.rundir.truncate_metrics(self.name, step)
        self.resumed_at = step
        if last:
            trainer._load_from_checkpoint(resume)
            rows = self.rundir.read_metrics(self.name)
            return {**stage_train_loss(rows, step), **reward_trend(rows)}
        out = trainer.train(resume_from_checkpoint=resume)
        metrics = {k: v for k, v in (out.metrics or {}).items() if isinstance(v, (int, float))}
        rows = self.rundir.read_metrics(self.name)
        return {**metrics, **stage_train_loss(rows, step, metrics, trainer.state.global_step), **reward_trend(rows)}

    def _artifact(self, head: str, main: bool = True):
        kind = "adapter" if self.model_cfg.adapter else "full"
        return self.rundir.artifact_writer(self.name, kind=kind, base=self.start_path(), head=head, main=main)

    def save(self, trainer, tokenizer, head: str = "causal_lm") -> None:
        """Save a TRL trainer's model as this stage's artifact (all ranks join; the main one writes)."""
        main = trainer.accelerator.is_main_process
        with self._artifact(head, main) as tmp:
            trainer.save_model(str(tmp))  # gathers sharded weights; adapter only for peft models
            if main:
                tokenizer.save_pretrained(tmp)
                self.fault_point("artifact")
        trainer.accelerator.wait_for_everyone()

    def save_model(self, model, tokenizer, head: str = "causal_lm") -> None:
        """Save an unsharded model (adapter or full weights) as this stage's artifact; only the main process
        writes (other ranks' calls do nothing: the caller keeps the ranks in step)."""
        if not self.is_main_process:
            return
        with self._artifact(head) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            self.fault_point("artifact")


def stage_train_loss(rows: list[dict], resumed_at: int, session: Optional[dict] = None,
                     global_step: int = 0) -> dict[str, float]:
    """`{"train_loss": mean training loss over every step of the stage}` for a stage resumed at step `resumed_at`
    ({} when it was not resumed, or nothing is known). transformers' Trainer's `train_loss` (in `session`, the
    closing row's totals) is the mean over the steps this process ran (`resumed_at`+1 .. `global_step`); the steps
    before come from the logged `loss` rows up to `resumed_at` (`RunDir.read_metrics`), each the mean over the
    steps since the row before it (the Trainer's logging window), so weighted by that many steps. Steps before the
    resume that no row covers (logged after the checkpoint, then cut off) are left out of the mean."""
    if resumed_at <= 0:
        return {}
    total, covered, last = 0.0, 0, 0
    for row in sorted((r for r in rows if isinstance(r.get("loss"), (int, float)) and 0 < r["step"] <= resumed_at),
                      key=lambda r: r["step"]):
        total, covered, last = total + row["loss"] * (row["step"] - last), covered + row["step"] - last, row["step"]
    ran = global_step - resumed_at
    if session is not None and isinstance(session.get("train_loss"), (int, float)) and ran > 0:
        total, covered = total + session["train_loss"] * ran, covered + ran
    return {"train_loss": total / covered} if covered else {}


def reward_trend(rows: list[dict]) -> dict[str, float]:
    """Mean reward over the first and the last quarter of the logged rows (`RunDir.read_metrics`): one
    step's reward is noisy (a handful of prompts), so the summary and the closing numbers compare quarters."""
    values = [r["reward/mean"] for r in rows if isinstance(r.get("reward/mean"), (int, float))]
    if len(values) < 2:
        return {}
    n = max(1, len(values) // 4)
    return {"reward/first_quarter": sum(values[:n]) / n, "reward/last_quarter": sum(values[-n:]) / n}


# ---------------------------------------------------------------- progress and trainer callbacks


class Progress:
    """A rich progress bar over a stage's steps with the latest `metrics.PROGRESS` values; when stdout is not a
    terminal, a plain line at each tenth of the run instead."""

    def __init__(self, name: str, total: int, completed: int = 0, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn())
        self.name, self.total, self.last, self.enabled = name, total, {}, enabled
        self.printed: Optional[int] = None  # the step of the last plain line
        self.plain = not self.bar.console.is_terminal
        self.task = self.bar.add_task(name, total=total, completed=completed, info="")
        if not self.plain and enabled:
            self.bar.start()

    def update(self, step: int, metrics: Optional[dict] = None) -> None:
        """Move to `step`; with `metrics` (canonical keys), show them and maybe print a plain line: one per step
        at most, for a row that brings a `PROGRESS` value (not for the trainer's closing row of `train_*` totals,
        logged at the last step again)."""
        if not self.enabled:
            return
        shown = {k: v for k, v in (metrics or {}).items() if k in PROGRESS and isinstance(v, (int, float))}
        self.last.update(shown)
        info = " ".join(f"{label} {self.last[k]:.4g}" for k, label in PROGRESS.items() if k in self.last)
        self.bar.update(self.task, completed=step, info=info)
        if self.plain and shown and step != self.printed and (step % max(1, self.total // 10) == 0 or step == self.total):
            self.printed = step
            print(f"  {self.name} step {step}/{self.total} {info}", flush=True)

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.plain:
            print(text, flush=True)
        else:
            self.bar.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        if not self.plain and self.enabled:
            self.bar.stop()



class StageCallback(TrainerCallback):
    """A TRL trainer's logs, once renamed to our keys (`metrics.rename`), go to metrics.jsonl (rank 0) and the
    progress bar (`ctx.progress`, over optimizer steps); `ctx.fault_hook` runs after each checkpoint; a step with a
    non-finite gradient is skipped (`ctx.skip_nonfinite`) and steps whose rewards were all lost are counted
    (`ctx.check_rewards`)."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.progress, self.trainable = ctx, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = self.ctx.progress(state.max_steps, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = rename(self.ctx.spec.method, logs)
        if "train_loss" in metrics:  # the closing row: over every step of a resumed stage, not only this process's
            metrics |= stage_train_loss(self.ctx.rundir.read_metrics(self.ctx.name), self.ctx.resumed_at, metrics,
                                        state.global_step)
        self.ctx.log_metrics(state.global_step, metrics)
        self.progress.update(state.global_step, metrics)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.trainable is None:  # the same tensors every step: listing ~3,000 of them took ~13 ms a step
            self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.ctx.skip_nonfinite(self.trainable, state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step)
        self.ctx.check_rewards(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.ctx.fault_hook(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
