"""Stage methods, registered by name, and what a stage is handed when it runs.

A stage module registers one function:

    @stage("dpo", config=lambda: trl.DPOConfig, formats=("preference",))
    def run(ctx: StageContext) -> StageResult: ...

`config` (lazy, so validation can check `args` without importing every trainer) is the TRL config
class that `args` is checked against and built into; `formats` are the data formats it accepts.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from alignment.recipe import BASE, ModelConfig, Recipe, StageConfig
from alignment.registry import Registry

STAGES: Registry[Callable] = Registry("stage method")


def stage(name: str, *, config: Optional[Callable[[], type]] = None, formats: tuple[str, ...] = (),
          check: Optional[Callable[[Recipe, str], list]] = None):
    """Register a stage function under `name` (see the module docstring)."""

    def decorator(fn):
        fn.config_class, fn.formats, fn.check = config, formats, check
        return STAGES.register(name)(fn)

    return decorator


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

    @property
    def spec(self) -> StageConfig:
        return self.recipe.stages[self.name]

    @property
    def model_cfg(self) -> ModelConfig:
        return self.recipe.stage_model(self.name)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        return self.stage_dir / "model"

    @property
    def metrics_file(self) -> Path:
        return self.stage_dir / "metrics.jsonl"

    # ------------------------------------------------------------ models and data

    def start_path(self) -> str:
        """Full weights this stage starts from: the recipe's model, or the `from` stage's artifact."""
        return stage_weights(self.recipe, self.run_dir, self.spec.from_)

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
        from transformers.trainer_utils import get_last_checkpoint

        if not self.checkpoint_dir.is_dir():
            return None
        return get_last_checkpoint(str(self.checkpoint_dir))

    def trl_config(self, cls, **defaults):
        """Build a TRL config: alignkit defaults < the recipe's `args` < run-directory paths."""
        import torch

        from alignment.models import torch_dtype

        # TRL casts QLoRA's trainable weights to bf16 (QLoRA paper); bf16 autocast keeps the
        # float32 activations of a CPU run compatible with them (e.g. a reward model's new head).
        bf16 = (torch_dtype(self.model_cfg.dtype) == torch.bfloat16 and torch.cuda.is_available()) or (
            self.model_cfg.quantization is not None and self.model_cfg.quantization.bits == 4)
        values = dict(
            logging_steps=1,
            save_strategy="steps",
            save_steps=max(1, int(self.spec.args.get("max_steps", 50) or 50) // 5),
            save_total_limit=2,
            seed=self.recipe.seed,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            gradient_checkpointing=self.model_cfg.gradient_checkpointing,
        )
        values.update(defaults)
        values.update(self.spec.args)
        values.update(output_dir=str(self.checkpoint_dir), report_to=[])
        return cls(**values)

    def callbacks(self) -> list:
        return [MetricsCallback(self.metrics_file), ProgressCallback(self.name)]

    def train(self, trainer) -> dict:
        """trainer.train(), resuming from the last checkpoint when there is one."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our ProgressCallback shows the logs
        resume = self.last_checkpoint()
        if resume:
            print(f"alignkit: resuming {self.name} from {Path(resume).name}", flush=True)
            truncate_metrics(self.metrics_file, int(Path(resume).name.split("-")[-1]))
        out = trainer.train(resume_from_checkpoint=resume)
        metrics = {k: v for k, v in (out.metrics or {}).items() if isinstance(v, (int, float))}
        return {**metrics, **reward_trend(self.metrics_file)}

    def save(self, trainer, tokenizer, head: str = "causal_lm") -> None:
        """Save the trained model as this stage's artifact (all ranks join; the main one writes)."""
        from alignment.models import ARTIFACT_FILE

        tmp = self.model_dir.with_name("model.tmp")
        trainer.save_model(str(tmp))  # gathers sharded weights; adapter only for peft models
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)
            meta = {"kind": "adapter" if self.model_cfg.adapter else "full", "base": self.start_path(), "head": head}
            (tmp / ARTIFACT_FILE).write_text(json.dumps(meta, indent=1))
            shutil.rmtree(self.model_dir, ignore_errors=True)
            os.replace(tmp, self.model_dir)
        trainer.accelerator.wait_for_everyone()


def stage_weights(recipe: Recipe, run_dir: Path, name: str) -> str:
    """A folder (or hub id) of full weights for `base` or a finished stage of this run."""
    from alignment.models import full_weights, resolve_model_path

    if name == BASE:
        return resolve_model_path(recipe.model.name_or_path)
    return str(full_weights(run_dir / name / "model"))


REWARD_KEYS = ("reward/mean", "reward")  # what RL stages log per step (ours, TRL's)


def reward_trend(path: Path) -> dict[str, float]:
    """Mean reward over the first and the last quarter of the logged steps: one step's reward is
    noisy (a handful of prompts), so the summary and the closing numbers compare quarters."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    key = next((k for k in REWARD_KEYS if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float))] if key else []
    if len(values) < 2:
        return {}
    n = max(1, len(values) // 4)
    return {"reward/first_quarter": sum(values[:n]) / n, "reward/last_quarter": sum(values[-n:]) / n}


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (a run cut off after its last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


# ---------------------------------------------------------------- trainer callbacks

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per logging step to STAGE/metrics.jsonl (read by the report)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


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
