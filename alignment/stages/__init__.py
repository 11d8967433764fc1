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

from transformers import TrainerCallback

from alignment.metrics import PROGRESS, rename
from alignment.recipe import BASE, ModelConfig, Recipe, RolloutConfig, StageConfig
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
        return build(self.recipe.data, self.spec.data, formats or fn.formats, seed=self.recipe.seed,
                     on_bad_rows=self.recipe.on_bad_rows)

    # ------------------------------------------------------------ online RL (grpo, ppo)

    @property
    def rollout(self) -> RolloutConfig:
        return self.spec.rollout or RolloutConfig()

    def reward_functions(self) -> tuple[list[Callable], list[float]]:
        """The stage's `rewards:` as (functions, weights), TRL's reward_funcs / reward_weights."""
        from rewards import combine_rewards

        return combine_rewards([{"name": r.name, "weight": r.weight, **(r.model_extra or {})} for r in self.spec.rewards])

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
        )

    # ------------------------------------------------------------ logging, progress, the fault hook

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append {"step", "time", **metrics} (numbers only; keys from alignment/metrics.py) to metrics.jsonl."""
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        with open(self.metrics_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def progress(self, total: int, completed: int = 0) -> "Progress":
        return Progress(self.name, total, completed)

    def fault_hook(self, step: int) -> None:
        """Called right after a checkpoint is saved. Test hook: ALIGNKIT_FAULT_KILL_AFTER_SAVE=N kills this
        process (SIGKILL) once `step` >= N -- how the resume tests cut a stage off mid-run."""
        kill_at = os.environ.get("ALIGNKIT_FAULT_KILL_AFTER_SAVE")
        if kill_at and step >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

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
        return [StageCallback(self)]

    def train(self, trainer) -> dict:
        """trainer.train(), resuming from the last checkpoint when there is one."""
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # our StageCallback shows the logs
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


def reward_trend(path: Path) -> dict[str, float]:
    """Mean reward over the first and the last quarter of the logged steps: one step's reward is
    noisy (a handful of prompts), so the summary and the closing numbers compare quarters."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    values = [r["reward/mean"] for r in rows if isinstance(r.get("reward/mean"), (int, float))]
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


# ---------------------------------------------------------------- progress and trainer callbacks


class Progress:
    """A rich progress bar over a stage's steps with the latest `metrics.PROGRESS` values; when stdout is not a
    terminal, a plain line at each tenth of the run instead."""

    def __init__(self, name: str, total: int, completed: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Bar(TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                       TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn())
        self.name, self.total, self.last = name, total, {}
        self.plain = not self.bar.console.is_terminal
        self.task = self.bar.add_task(name, total=total, completed=completed, info="")
        if not self.plain:
            self.bar.start()

    def update(self, step: int, metrics: Optional[dict] = None) -> None:
        """Move to `step`; with `metrics` (canonical keys), show them and maybe print a plain line."""
        self.last.update({k: v for k, v in (metrics or {}).items() if k in PROGRESS and isinstance(v, (int, float))})
        info = " ".join(f"{label} {self.last[k]:.4g}" for k, label in PROGRESS.items() if k in self.last)
        self.bar.update(self.task, completed=step, info=info)
        if self.plain and metrics is not None and (step % max(1, self.total // 10) == 0 or step == self.total):
            print(f"  {self.name} step {step}/{self.total} {info}", flush=True)

    def print(self, text: str) -> None:
        if self.plain:
            print(text, flush=True)
        else:
            self.bar.console.print(text, markup=False, highlight=False)

    def stop(self) -> None:
        if not self.plain:
            self.bar.stop()



class StageCallback(TrainerCallback):
    """A TRL trainer's logs, once renamed to our keys (`metrics.rename`), go to metrics.jsonl (rank 0) and the
    progress bar (`ctx.progress`, over optimizer steps); `ctx.fault_hook` runs after each checkpoint."""

    def __init__(self, ctx: StageContext):
        self.ctx, self.progress = ctx, None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = self.ctx.progress(state.max_steps, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        metrics = rename(self.ctx.spec.method, logs)
        self.ctx.log_metrics(state.global_step, metrics)
        self.progress.update(state.global_step, metrics)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        self.ctx.fault_hook(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
