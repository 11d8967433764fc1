"""`alignkit eval` and `alignkit report`, as typer-compatible functions that `alignment.cli`
registers (`app.command("eval")(eval_cmd)`), and the eval table `alignkit run` prints at its end.

    alignkit eval RECIPE [--stage S] [--task T]
    alignkit eval --model PATH --task accuracy --data FILE [--arg k=4 --arg backend=hf]
    alignkit report runs/NAME
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from alignment.console import Console
from alignment.recipe import BASE

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 2):
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


TONE_STYLE = {"good": "green", "bad": "red", "neutral": "dim"}


def print_eval_table(results: dict[str, dict], console: Console, order: Optional[list[str]] = None) -> None:
    """Base vs each stage: one row per task metric (main metric in bold), deltas against base colored
    by the metric's direction. `results`: stage -> evals JSON, as `run_evals` returns."""
    from evals.table import build_eval_table

    table = build_eval_table(results, order)
    if not table.tasks:
        return
    out = Table(title="evals", title_justify="left")
    out.add_column("task")
    out.add_column("metric")
    for s in table.stages:
        out.add_column(s, justify="right")
    for row in table.rows:
        cells = [f"[dim]{c.text}[/]" if c.skipped else
                 c.text + (f" [{TONE_STYLE[c.tone]}]{c.delta_text}[/]" if c.delta_text is not None else "")
                 for c in row.cells]
        name = f"[bold]{row.metric}[/]" if row.main else row.metric
        out.add_row(row.task if row.first else "", name, *cells, end_section=row.last)
    console.print(out)
    for t, why, stages in table.skipped:  # why, once per task and reason
        console.print(f"[dim]{t} on {', '.join(stages)}: skipped: {escape(why)}[/]")


def _parse_args(pairs: Optional[list[str]]) -> dict:
    import yaml

    args = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            _fail(f"--arg takes key=value (got {pair!r})")
        args[key.strip()] = yaml.safe_load(value)  # "4" -> 4, "[1, 4]" -> [1, 4]
    return args


def eval_cmd(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML: run its evals on base and every finished stage", show_default=False),
    stage: Optional[str] = typer.Option(None, "--stage", help="only this stage (and base)"),
    model: Optional[str] = typer.Option(None, "--model", help="evaluate this model folder (or hub id) instead of a recipe"),
    task: Optional[str] = typer.Option(None, "--task", help="with --model: the task to run; with a recipe: only its evals of this task"),
    data: Optional[Path] = typer.Option(None, "--data", help="with --model: the dataset file (.jsonl/.json/.parquet/.csv)"),
    run_dir: Path = typer.Option(Path("runs"), "--run-dir", help="parent folder of run directories"),
    arg: Optional[list[str]] = typer.Option(None, "--arg", help="with --model: a task argument key=value (repeatable)"),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt", help="with --model --data: a system message put first in every conversation without "
        "one, as a recipe data set's `system_prompt` (\"\" for an empty one: not the chat template's default)"),
    force: bool = typer.Option(False, "--force", help="re-evaluate even where a cached result matches"),
):
    """Evaluate a recipe's stages (results in runs/NAME/evals/), or one model on one task."""
    if (recipe is None) == (model is None):
        _fail("give a RECIPE, or --model PATH --task TASK --data FILE (not both)")
    if model is not None:
        _eval_model(model, task, data, _parse_args(arg), system_prompt)
        return
    if arg:
        _fail("--arg is for --model; a recipe's eval arguments live under its evals[i].args")
    if system_prompt is not None:
        _fail("--system-prompt is for --model; a recipe's data sets take `system_prompt` under data.NAME")
    _eval_recipe(recipe, stage, task, run_dir, force)


def _eval_recipe(path: Path, stage: Optional[str], task: Optional[str], run_dir: Path, force: bool) -> None:
    from alignment.data import DataError
    from alignment.recipe import RecipeError
    from alignment.registry import did_you_mean
    from alignment.validate import load_recipe
    from evals.runner import EvalError, run_evals

    try:
        recipe = load_recipe(path)
    except RecipeError as e:
        _fail(str(e))
    if stage is not None and stage not in recipe.stages and stage != BASE:
        _fail(f"no stage '{stage}' in {path}{did_you_mean(stage, recipe.stages)}; stages: {', '.join(recipe.stages)}")
    if not recipe.evals:
        _fail(f"{path} has no `evals:`; add e.g. `evals: [{{task: accuracy, data: test}}]`")
    target = Path(run_dir).resolve() / recipe.name
    try:
        results = run_evals(recipe, target, stages=[stage] if stage else None, console=console,
                            tasks=[task] if task else None, force=force)
    except (EvalError, DataError) as e:
        _fail(str(e), 1)
    print_eval_table(results, console, [BASE] + recipe.order())
    console.print(f"results: [bold]{target / 'evals'}[/]  ·  report: alignkit report {target}")


def _eval_model(model: str, task: Optional[str], data: Optional[Path], args: dict,
                system_prompt: Optional[str] = None) -> None:
    from alignment.data import DataError, DataReport, load
    from alignment.models import resolve_model_path
    from alignment.recipe import DatasetConfig
    from alignment.rundir import full_weights
    from evals.base import CONTEXT_ARGS, DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, TASKS, EvalContext, check_task_args

    if task is None:
        _fail(f"--model needs --task (one of: {', '.join(TASKS.names())})")
    problems = check_task_args(task, args, has_data=data is not None)
    if problems:
        _fail("; ".join(p.replace("add `data: NAME` naming one under data:", "pass --data FILE") for p in problems))
    if system_prompt is not None and data is None:
        _fail("--system-prompt needs --data FILE: it goes into that file's conversations")
    report = DataReport()
    try:
        rows = load(data.name, DatasetConfig(path=str(data.resolve()), system_prompt=system_prompt),
                    report=report).rows if data else []
    except DataError as e:
        _fail(str(e))
    for line in report.lines():  # rows changed on the way in (retyped numbers, the system prompt): counted
        console.print(f"data: {escape(line)}", soft_wrap=True)
    path = str(full_weights(Path(model))) if Path(model).is_dir() else resolve_model_path(model)
    ctx = EvalContext(model_path=path, rows=rows, stage="model", dtype=_auto_dtype(), console=console,
                      backend=args.get("backend", DEFAULT_BACKEND), batch_size=args.get("batch_size", DEFAULT_BATCH_SIZE))
    try:
        result = TASKS.get(task)(ctx, **{k: v for k, v in args.items() if k not in CONTEXT_ARGS})
    except (ValueError, KeyError) as e:
        _fail(f"{task} on {model}: {e}", 1)
    finally:
        ctx.session.release()
    print_eval_table({"model": {"stage": "model", "tasks": {task: result.to_json()}}}, console, ["model"])
    for sample in result.samples[:3]:
        mark = {True: "[green]✓[/]", False: "[red]✗[/]"}.get(sample.get("correct"), "·")
        console.print(f"{mark} [dim]{escape(repr(sample.get('prompt', '')))}[/] → {escape(repr(sample.get('completion', '')))}")


def _auto_dtype() -> str:
    from alignment.models import torch_dtype

    return str(torch_dtype("auto")).removeprefix("torch.")


def report_cmd(run_dir: Path = typer.Argument(..., help="run directory (runs/NAME)", show_default=False)):
    """Write runs/NAME/report/: index.html (one self-contained file) and report.md with its plots."""
    from evals.report import write_report

    try:
        index = write_report(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    console.print(f"[green]✓[/] report: [bold]{index}[/]")
    console.print(f"  markdown: {index.parent / 'report.md'}")
