"""Experiment tracking: what a stage writes to `STAGE/metrics.jsonl`, and the eval results, also sent to the
trackers the recipe names in `report_to` (top level, or per stage) -- through accelerate's tracker classes, so
the file formats and run layouts are the trackers' own.

One layer for every method: `StageContext.log_metrics` (TRL-backed stages through `StageCallback`, PPO directly)
and `evals.runner.run_evals` log here; TRL's own `report_to` stays off, so every tracker sees the keys of
`alignment/metrics.py`, the same in every stage. `metrics.jsonl` stays the record the report reads.

    runs/NAME/tracking/tensorboard/STAGE/   event files (`tensorboard --logdir runs/NAME/tracking/tensorboard`)
    runs/NAME/tracking/wandb/               wandb runs, offline unless WANDB_MODE says otherwise (`wandb sync`)
    runs/NAME/tracking/mlflow/              mlflow's file store, unless MLFLOW_TRACKING_URI names another
    trackio                                 trackio's own local store, project NAME
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def _tensorboard(project: str, run: str, folder: Path, first_step: int):
    from accelerate.tracking import TensorBoardTracker

    # purge_step: events at or after the first step logged now are dropped from the files -- those of a run cut
    # off after its last checkpoint (now resumed), or of an earlier run of a stage rerun from scratch
    return TensorBoardTracker(run, folder / "tensorboard", purge_step=first_step)


def _wandb(project: str, run: str, folder: Path, first_step: int):
    from accelerate.tracking import WandBTracker

    os.environ.setdefault("WANDB_MODE", "offline")  # no network is assumed; `wandb sync` uploads later
    (folder / "wandb").mkdir(parents=True, exist_ok=True)
    return WandBTracker(project, name=run, group=project, dir=str(folder / "wandb"))


def _trackio(project: str, run: str, folder: Path, first_step: int):
    from accelerate.tracking import TrackioTracker

    return TrackioTracker(project, name=run)


def _mlflow(project: str, run: str, folder: Path, first_step: int):
    from accelerate.tracking import MLflowTracker

    os.environ.setdefault("MLFLOW_TRACKING_URI", (folder / "mlflow").resolve().as_uri())
    return MLflowTracker(experiment_name=project, run_name=run)


# `report_to` name -> accelerate tracker of (project = recipe name, run = stage or "evals", run_dir/tracking,
# the first step this process logs)
# (`alignment.recipe.Tracker` names the same four; a unit test holds them together)
TRACKERS: dict[str, Callable] = {"tensorboard": _tensorboard, "wandb": _wandb, "trackio": _trackio, "mlflow": _mlflow}


class Trackers:
    """The trackers of one run (a stage, or the evals), started on construction.

    Args:
        names: `report_to` names (`alignment.recipe.Tracker`); none: nothing is started and `log` does nothing.
        run_dir: the run directory; trackers that write files write under `run_dir/tracking/`.
        project: the recipe's name (tensorboard: unused; wandb: project and group; mlflow: experiment).
        run: the stage's name, or `evals`.
        first_step: the first step this process logs (a resumed stage: the checkpoint's + 1).
        config: hyperparameters to record (flat: str, int, float, bool).

    Raises:
        ImportError: a named tracker's package is not installed (names the pip package).
    """

    def __init__(self, names: list[str], run_dir: Path, *, project: str, run: str, first_step: int = 0,
                 config: dict | None = None):
        self.trackers = []
        for name in names:
            try:
                tracker = TRACKERS[name](project, run, Path(run_dir) / "tracking", first_step)
                tracker.start()
            except ImportError as e:
                raise ImportError(f"report_to: {name} needs its package: pip install {name} ({e})") from e
            if config:
                tracker.store_init_configuration(config)
            self.trackers.append(tracker)

    def log(self, values: dict, step: int) -> None:
        """Numbers only (`{key: int | float}`; bools and others are left out) at `step`."""
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self.trackers:
            tracker.log(numbers, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def flat_config(values: dict, prefix: str = "") -> dict:
    """`{"args": {"lr": 1e-3}}` -> `{"args/lr": 1e-3}`; lists and None become text (trackers take scalars)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}/"))
        else:
            out[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return out


def missing_packages(names: list[str]) -> list[str]:
    """`report_to` names whose package (of the same name) is not installed, as 'NAME is not installed: pip install NAME'."""
    import importlib.util

    return [f"{name} is not installed: pip install {name}" for name in dict.fromkeys(names)
            if importlib.util.find_spec(name) is None]


def log_evals(recipe, run_dir: Path, results: dict[str, dict]) -> None:
    """Eval results (stage -> evals/STAGE.json, as `evals.run_evals` returns them) to the recipe's `report_to`
    trackers, run `evals`: `eval/<task>/<metric>` at step = the stage's place in `[base] + recipe.order()`
    (base 0), so each metric is a series across the pipeline."""
    from alignment.recipe import BASE

    if not recipe.report_to or not results:
        return
    order = [BASE] + recipe.order()
    steps = sorted((order.index(stage), stage) for stage in results if stage in order)
    trackers = Trackers(recipe.report_to, run_dir, project=recipe.name, run="evals", first_step=steps[0][0])
    try:
        for step, stage in steps:
            trackers.log({f"eval/{task}/{metric}": value
                          for task, entry in results[stage].get("tasks", {}).items()
                          for metric, value in (entry.get("metrics") or {}).items()}, step)
    finally:
        trackers.finish()
