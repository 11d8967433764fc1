"""Stage methods, registered by name, and what a stage is handed when it runs.

A stage module registers one function:

    @stage("dpo", config=lambda: trl.DPOConfig, formats=("preference",), defaults=trainer_defaults)
    def run(ctx: StageContext) -> StageResult: ...

`config` (lazy, so validation can check `args` without importing every trainer) is the TRL config
class that `args` is checked against and built into; `formats` are the data formats it accepts;
`defaults` are the method's values for config fields the recipe leaves out (a dict, or a function of
the recipe and stage name for derived ones), so `effective_args` -- what the config is built from,
and what the stage's fingerprint hashes -- is computed in one place; `generates` gives the stage a
`rollout:` section (filled with its defaults when the recipe has none).
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from alignment.recipe import ModelConfig, Recipe, StageConfig
from alignment.registry import Registry
from alignment.rundir import RunDir

STAGES: Registry[Callable] = Registry("stage method")


Defaults = Union[dict[str, Any], Callable[[Recipe, str], dict[str, Any]]]


def stage(name: str, *, config: Optional[Callable[[], type]] = None, formats: tuple[str, ...] = (),
          check: Optional[Callable[[Recipe, str], list]] = None, defaults: Optional[Defaults] = None,
          generates: bool = False):
    """Register a stage function under `name` (see the module docstring)."""

    def decorator(fn):
        fn.config_class, fn.formats, fn.check = config, formats, check
        fn.defaults, fn.generates = defaults or {}, generates
        return STAGES.register(name)(fn)

    return decorator


def effective_args(recipe: Recipe, name: str) -> dict[str, Any]:
    """The stage's trainer arguments: its method's registered defaults, overridden by the recipe's `args`.
    `StageContext.trl_config` builds the config from them and the stage's fingerprint hashes them."""
    spec = recipe.stages[name]
    defaults = STAGES.get(spec.method).defaults
    return {**(defaults(recipe, name) if callable(defaults) else defaults), **spec.args}


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


def load_stages() -> None:
    """Import every module of this package so each registers its method."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


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

        fn = STAGES.get(self.spec.method)
        return build(self.recipe.data, self.spec.data, formats or fn.formats, seed=self.recipe.seed)

    # ------------------------------------------------------------ TRL glue

    def last_checkpoint(self) -> Optional[str]:
        found = self.rundir.checkpoints(self.name)
        return str(found[-1]) if found else None

    def trl_config(self, cls):
        """Build the stage's TRL config: this machine's precision and device < `effective_args` (registered
        defaults < the recipe's `args`) < run-directory paths. Records its values in `trainer_config`."""
        import torch

        from alignment.models import torch_dtype

        # TRL casts QLoRA's trainable weights to bf16 (QLoRA paper); bf16 autocast keeps the
        # float32 activations of a CPU run compatible with them (e.g. a reward model's new head).
        bf16 = (torch_dtype(self.model_cfg.dtype) == torch.bfloat16 and torch.cuda.is_available()) or (
            self.model_cfg.quantization is not None and self.model_cfg.quantization.bits == 4)
        values = dict(bf16=bf16, use_cpu=not torch.cuda.is_available())
        values.update(self.args)
        values.update(output_dir=str(self.checkpoint_dir), report_to=[])
        config = cls(**values)
        self.trainer_config = config.to_dict()
        return config

    def callbacks(self) -> list:
        return [MetricsCallback(self), ProgressCallback(self.name)]

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one row {"step", "time", **metrics} (numbers only) to the stage's metrics (rank 0 calls it)."""
        self.rundir.append_metrics(self.name, step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def train(self, trainer) -> dict:
        """trainer.train(), resuming from the last checkpoint when there is one."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our ProgressCallback shows the logs
        resume = self.last_checkpoint()
        if resume:
            print(f"alignkit: resuming {self.name} from {Path(resume).name}", flush=True)
            self.rundir.truncate_metrics(self.name, int(Path(resume).name.split("-")[-1]))
        out = trainer.train(resume_from_checkpoint=resume)
        metrics = {k: v for k, v in (out.metrics or {}).items() if isinstance(v, (int, float))}
        return {**metrics, **reward_trend(self.rundir.read_metrics(self.name))}

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
        trainer.accelerator.wait_for_everyone()

    def save_model(self, model, tokenizer, head: str = "causal_lm") -> None:
        """Save a model trained in this one process (adapter or full weights) as this stage's artifact."""
        with self._artifact(head) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)


REWARD_KEYS = ("reward/mean", "reward")  # what RL stages log per step (ours, TRL's)


def reward_trend(rows: list[dict]) -> dict[str, float]:
    """Mean reward over the first and the last quarter of the logged rows (`RunDir.read_metrics`): one
    step's reward is noisy (a handful of prompts), so the summary and the closing numbers compare quarters."""
    key = next((k for k in REWARD_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))] if key else []
    if len(values) < 2:
        return {}
    n = max(1, len(values) // 4)
    return {"reward/first_quarter": sum(values[:n]) / n, "reward/last_quarter": sum(values[-n:]) / n}


# ---------------------------------------------------------------- trainer callbacks

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object


class MetricsCallback(TrainerCallback):
    """Appends one row per logging step to the stage's metrics (read by the report)."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.ctx.log_metrics(state.global_step, logs)


class ProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps with the latest loss; plain lines when not a TTY.

    Test hook: ALIGNKIT_FAULT_KILL_AFTER_SAVE=N kills this process (SIGKILL) right after the
    checkpoint at step >= N is saved -- how the resume tests cut a stage off mid-run.
    """

    def __init__(self, name: str):
        self.name, self.progress, self.task, self.last = name, None, None, {}

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{self.name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
        )
        self.plain = not self.progress.console.is_terminal
        self.task = self.progress.add_task(self.name, total=state.max_steps, completed=state.global_step, info="")
        if not self.plain:
            self.progress.start()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        self.last.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        keys = [k for k in ("loss", "reward", "rewards/margins", "accuracy") if k in self.last]
        info = " ".join(f"{k.split('/')[-1]} {self.last[k]:.4g}" for k in keys)
        self.progress.update(self.task, completed=state.global_step, info=info)
        every = max(1, state.max_steps // 10)
        if self.plain and (state.global_step % every == 0 or state.global_step == state.max_steps):
            print(f"  {self.name} step {state.global_step}/{state.max_steps} {info}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_save(self, args, state, control, **kwargs):
        kill_at = os.environ.get("ALIGNKIT_FAULT_KILL_AFTER_SAVE")
        if kill_at and state.global_step >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None and not self.plain:
            self.progress.stop()
