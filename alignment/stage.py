"""Child-process entry of one stage: `python -m alignment.stage RUN_DIR STAGE`.

The orchestrator (pipeline.py) starts it plainly, or once per rank under `torch.distributed.run` or
`accelerate launch`; it reads the resolved recipe from the run directory, runs the registered method
and, on the main process (global rank 0), writes STAGE/result.json. The manifest stays the
orchestrator's to write.
A stage that refuses its recipe, data or rewards (`DataError`, `RecipeError`, `StageInputError`, `RewardError`)
prints one line, writes STAGE/error.json and exits 2: the orchestrator then fails the run with exit 2 and no advice
to rerun.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


INPUT_ERROR_EXIT = 2  # the stage refused its recipe or data (the CLI's exit code for those); 1: anything else


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m alignment.stage RUN_DIR STAGE", file=sys.stderr)
        return 2
    run_dir, name = Path(argv[0]), argv[1]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "TORCHELASTIC_RUN_ID" in os.environ and os.getpgrp() == os.getpid():
        from alignment.procs import guard_own_group

        # torch.distributed.run starts each rank in a session of its own, out of reach of the watchdog that
        # guards the launcher: the rank (and all it starts) must die with the launcher all the same
        guard_own_group(os.getppid())

    from alignment.procs import startup_without_gc

    with startup_without_gc():  # this process's own start-up (also run by a planning child that imported all)
        import transformers

        from alignment.data import DataError
        from alignment.recipe import RecipeError
        from alignment.rundir import RunDir
        from alignment.stages import StageInputError
        from alignment.stages import STAGES, StageContext, load_stages

    from rewards import RewardError

    INPUT_ERRORS = (DataError, RecipeError, StageInputError, RewardError)
    transformers.logging.set_verbosity_warning()
    recipe = RunDir(run_dir).read_recipe()
    load_stages()
    transformers.set_seed(recipe.seed + int(os.environ.get("RANK", 0)) * 100003)
    ctx = StageContext(recipe=recipe, name=name, run_dir=run_dir)
    _install_reward_model_loader(run_dir)
    _install_judge_resolver(ctx)
    ctx.rundir.stage_dir(name).mkdir(parents=True, exist_ok=True)
    try:
        result = STAGES.get(recipe.stages[name].method)(ctx)
    except INPUT_ERRORS as err:  # the recipe or data: a rerun would fail the same way
        print(f"alignkit: error: stage '{name}': {err}", file=sys.stderr, flush=True)
        ctx.rundir.write_error(name, str(err))
        return INPUT_ERROR_EXIT
    finally:
        ctx.finish_tracking()
    if ctx.is_main_process:
        data = {"data_report": ctx.data_report.to_dict()} if ctx.data_report.counts else {}  # -> the manifest, the report
        ctx.rundir.write_result(name, {"metrics": result.metrics,
                                       "info": {**result.info, **data, "world_size": ctx.world_size},
                                       "trainer_config": ctx.trainer_config})
    return 0


def _install_reward_model_loader(run_dir: Path) -> None:
    """`rewards: [{name: reward_model, stage: rm}]` scores with this run's `rm` artifact."""
    from alignment.models import RewardScorer
    from alignment.rundir import RunDir
    from rewards.model import set_stage_model_loader

    rundir = RunDir(run_dir)
    set_stage_model_loader(lambda stage: RewardScorer.load(rundir.model_dir(stage)))


def _install_judge_resolver(ctx) -> None:
    """`rewards: [{name: judge, model: sft}]` asks this run's `sft` artifact (full weights); other names are folders."""
    from alignment.recipe import BASE
    from rewards.judge import set_stage_resolver

    set_stage_resolver(lambda name: ctx.weights(name) if name in ctx.recipe.stages or name == BASE else None)


if __name__ == "__main__":
    sys.exit(main())
