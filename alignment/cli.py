"""`alignkit` command line: run, validate, plan, list.

Exit codes: 0 ok, 1 a stage failed or the run directory is busy, 2 bad recipe or data.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training pipelines from one recipe YAML.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

RecipeArg = typer.Argument(..., help="recipe YAML file", show_default=False)
RunDirOpt = typer.Option("runs", "--run-dir", help="parent folder of run directories")


def _load(path: Path, *, check_data: bool = False):
    """Load a recipe; on a bad recipe or bad data print one clear error and exit 2."""
    from alignment.data import DataError
    from alignment.recipe import RecipeError
    from alignment.validate import load_recipe

    from rewards import add_recipe_folder

    add_recipe_folder(path.parent)  # user rewards beside the recipe import, here and in stage processes
    try:
        recipe = load_recipe(path)
        if check_data:
            check_data_of(recipe)
        return recipe
    except (RecipeError, DataError) as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


def check_data_of(recipe) -> None:
    """Load every dataset a stage uses, check all rows against the stage's formats (`on_bad_rows`)
    and print what would be dropped, retyped or split (`alignment.data.DataReport`)."""
    from alignment.data import DataError, DataReport, check, load
    from alignment.stages import STAGES
    from rewards import build_reward

    report, seen = DataReport(), set()
    for name, st in recipe.stages.items():
        fn = STAGES.get(st.method)
        for ref in st.data:
            into = DataReport() if ref.name in seen else report  # a dataset two stages use is reported once
            seen.add(ref.name)
            loaded = load(ref.name, recipe.data[ref.name], on_bad_rows=recipe.on_bad_rows, report=into)
            check(loaded, fn.formats, on_bad_rows=recipe.on_bad_rows, report=into)
            for r in st.rewards:  # TRL-style column parameters, `fn(prompts, completions, answer, **kw)`
                absent = [c for c in build_reward(r.model_dump()).columns if c not in loaded.rows[0]]
                if absent:
                    raise DataError(f"{loaded.where(0)}: reward '{r.name}' of stage '{name}' reads column(s) {absent}, "
                                    f"which dataset '{ref.name}' does not have (columns: {sorted(loaded.rows[0])})")
    for line in report.lines():
        console.print(f"data: {line}", style="yellow", markup=False, soft_wrap=True)


@app.command()
def run(
    recipe: Path = RecipeArg,
    stage: Optional[str] = typer.Option(None, "--stage", help="run only this stage (and the stages it needs)"),
    force: bool = typer.Option(False, "--force", help="rerun even if done (with --stage: only that stage)"),
    run_dir: Path = RunDirOpt,
    num_machines: Optional[int] = typer.Option(None, "--num-machines", help="machines in this run (default: SLURM_NNODES, else 1); every machine runs `alignkit run` on the same shared run directory"),
    machine_rank: Optional[int] = typer.Option(None, "--machine-rank", help="this machine's rank, 0 = the one that owns the run directory (default: SLURM_NODEID, else 0)"),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="address of machine rank 0 (default: the first host of SLURM_JOB_NODELIST)"),
    main_process_port: Optional[int] = typer.Option(None, "--main-process-port", help="rendezvous port on machine rank 0 (default 29500)"),
):
    """Run every stage of RECIPE in order, skipping stages already done and resuming cut-off ones."""
    import os

    from alignment.pipeline import Machines, Pipeline, RunLocked, StageFailed

    rec = _load(recipe, check_data=True)
    if stage is not None and stage not in rec.stages:
        from alignment.registry import did_you_mean

        err.print(f"[bold red]error:[/] no stage '{stage}' in {recipe}{did_you_mean(stage, rec.stages)}; stages: {', '.join(rec.stages)}")
        raise typer.Exit(2)
    try:
        machines = Machines.from_env(dict(os.environ), num=num_machines, rank=machine_rank, main_ip=main_process_ip,
                                     main_port=main_process_port)
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    pipe = Pipeline(rec, run_dir, console=console, machines=machines)
    console.print(f"[bold]alignkit[/] {rec.name}: {' → '.join(rec.ancestors(stage) if stage else rec.order())}  [dim]run dir {pipe.run_dir}[/]")
    try:
        rows = pipe.run(only=stage, force=force)
    except RunLocked as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    except StageFailed as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: `alignkit run` again resumes from the last checkpoint")
        raise typer.Exit(130) from None
    _summary(rows, pipe.run_dir)
    if machines.rank > 0:
        return  # evals and the report are machine rank 0's
    if rec.evals:
        stages = rec.ancestors(stage) if stage else []
        code = subprocess.call([sys.executable, "-m", "evals", str(pipe.run_dir), *stages])
        if code != 0:
            raise typer.Exit(1)
    elif stage is None:
        from evals import write_report

        console.print(f"report: [bold]{write_report(pipe.run_dir)}[/]")


SUMMARY_METRICS = ("reward/mean", "train_loss")  # alignment/metrics.py names; the first a stage reports


def _headline(metrics: dict) -> str:
    """RL stages: reward over the first -> last quarter of steps; others: their final loss."""
    if isinstance(metrics.get("reward/first_quarter"), (int, float)):
        return f"reward {metrics['reward/first_quarter']:.3g} → {metrics['reward/last_quarter']:.3g}"
    key = next((k for k in SUMMARY_METRICS if isinstance(metrics.get(k), (int, float))), None)
    return f"{key} {metrics[key]:.4g}" if key else "-"


def _summary(rows: list[dict], run_dir: Path) -> None:
    from alignment.rundir import RunDir

    table = Table(title="summary", title_justify="left")
    for col in ("stage", "method", "status", "time", "final", "artifact"):
        table.add_column(col)
    for r in rows:
        final = _headline(r["metrics"])
        table.add_row(r["stage"], r["method"], r["status"], f"{r['seconds']:.0f}s" if r["seconds"] else "-",
                      final, str(RunDir(run_dir).model_dir(r["stage"])))
    console.print(table)
    console.print(f"run directory: [bold]{run_dir}[/]")


@app.command()
def validate(recipe: Path = RecipeArg):
    """Check RECIPE: schema, TRL args, stage references, data files and columns, reward names."""
    rec = _load(recipe, check_data=True)
    used = {r.name for st in rec.stages.values() for r in st.data}
    console.print(f"[green]✓[/] {recipe}: {len(rec.stages)} stage(s) ({' → '.join(rec.order())}), "
                  f"{len(used)} training dataset(s) checked row by row")


@app.command()
def plan(recipe: Path = RecipeArg, run_dir: Path = RunDirOpt):
    """Show the stage DAG and what is already done in the run directory."""
    from alignment.pipeline import Pipeline

    rec = _load(recipe)
    pipe = Pipeline(rec, run_dir, console=console)
    table = Table(title=f"{rec.name} → {pipe.run_dir}", title_justify="left")
    for col in ("stage", "method", "from", "data", "adapter", "quant", "state", "fingerprint"):
        table.add_column(col)
    style = {"done": "green", "resume": "yellow", "stale": "yellow", "new": "cyan"}
    for st in pipe.status():
        spec, model = rec.stages[st.name], rec.stage_model(st.name)
        state = {"done": "done (skip)", "resume": "resume", "stale": "stale: rerun", "new": "to run"}[st.state]
        table.add_row(st.name, st.method, spec.from_, ", ".join(r.name for r in spec.data) or "-",
                      model.adapter.method if model.adapter else "full",
                      f"{model.quantization.bits}-bit" if model.quantization else "-",
                      f"[{style[st.state]}]{state}[/]" + (f" [dim]({st.reason})[/]" if st.reason else ""), st.fingerprint)
    console.print(table)


@app.command("list")
def list_():
    """List what a recipe can name, from the registries: stage methods (with their data formats), rewards,
    eval tasks, KL estimators, rollout backends and bundled models."""
    from typing import get_args

    from alignment.algos import KL_ESTIMATORS
    from alignment.models import BUNDLED
    from alignment.recipe import Backend
    from alignment.stages import STAGES, load_stages
    from evals import TASKS
    from rewards import REWARDS

    load_stages()
    console.print("[bold]stage methods[/] (data formats):")
    for name in STAGES.names():
        console.print(f"  {name:<8} {', '.join(STAGES.get(name).formats)}")
    for title, names in (("rewards", REWARDS.names()), ("eval tasks", TASKS.names()),
                         ("KL estimators", KL_ESTIMATORS.names()), ("rollout backends", get_args(Backend)),
                         ("bundled models", ["bundled:" + n for n in BUNDLED])):
        console.print(f"[bold]{title}[/]: {', '.join(names)}")


def _register_eval_commands() -> None:
    from evals.cli import eval_cmd, report_cmd

    app.command("eval", help="Evaluate a run's stages (or any model) on the recipe's eval tasks.")(eval_cmd)
    app.command("report", help="Write report/index.html and report.md for a run directory.")(report_cmd)


_register_eval_commands()


def main() -> None:
    sys.exit(app())


if __name__ == "__main__":
    main()
