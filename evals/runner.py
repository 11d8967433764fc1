"""Run a recipe's evals on base and every finished stage; cache results in `runs/NAME/evals/STAGE.json`.

A task's result is reused while its key is unchanged: the hash of the evaluated model's fingerprint
(the stage manifest's; base: the model name), of every other model the task reads (reference,
reward stage, baseline), the eval entry (task, data, args) and the dataset's digest.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from alignment.recipe import BASE, EvalConfig, Recipe
from alignment.rundir import RunDir
from alignment.tracking import log_evals
from evals.base import CONTEXT_ARGS, DEFAULT_BACKEND, DEFAULT_BATCH_SIZE, TASKS, EvalContext, Session, check_task_args

EVALS_VERSION = 1  # bump when a task's numbers change meaning, to invalidate cached results
MAX_SAMPLES = 8  # generations kept per task for the report


class EvalError(ValueError):
    """A bad eval entry, or an eval that failed on a stage (names both)."""


def eval_names(evals: list[EvalConfig]) -> list[str]:
    """One unique name per eval entry: the task, then `task/data`, then `task/data#i`."""
    names = []
    for i, ev in enumerate(evals):
        same_task = [e for e in evals if e.task == ev.task]
        name = ev.task if len(same_task) == 1 else f"{ev.task}/{ev.data}"
        if sum(1 for e in same_task if f"{e.task}/{e.data}" == name) > 1:
            name = f"{name}#{i}"
        names.append(name)
    return names


def check_evals(recipe: Recipe) -> list[str]:
    """Every problem with the recipe's eval entries (unknown tasks or args, missing data)."""
    problems = []
    for i, ev in enumerate(recipe.evals):
        problems += [f"evals[{i}]: {p}" for p in check_task_args(ev.task, ev.args, has_data=ev.data is not None)]
    return problems


def eval_stages(recipe: Recipe, ev: EvalConfig) -> list[str]:
    """The stages an eval entry covers, base first: its `stages`, or base and every generative stage."""
    listed = ev.stages or [s for s in recipe.order() if recipe.stages[s].method != "reward"]
    return [BASE] + [s for s in recipe.order() if s in listed]


def _fingerprint(recipe: Recipe, run_dir: Path, stage: str) -> Optional[str]:
    if stage == BASE:
        return f"{recipe.model.name_or_path}@{recipe.model.revision or 'main'}"
    man = RunDir(run_dir).done(stage)
    return man.get("fingerprint") if man else None


def eval_key(recipe: Recipe, run_dir: Path, stage: str, ev: EvalConfig) -> str:
    """What a cached result depends on (see the module docstring), hashed."""
    from alignment.data import dataset_digest

    deps = {BASE: _fingerprint(recipe, run_dir, BASE)}
    if stage != BASE:
        deps["from"] = _fingerprint(recipe, run_dir, recipe.stages[stage].from_)
    for value in ev.args.values():  # reward_stage, reference, baseline: stage names as values
        if isinstance(value, str) and value in recipe.stages:
            deps[value] = _fingerprint(recipe, run_dir, value)
    key = {"version": EVALS_VERSION, "model": _fingerprint(recipe, run_dir, stage), "deps": deps, "seed": recipe.seed,
           "task": ev.task, "data": ev.data, "args": ev.args,
           "digest": dataset_digest(recipe.data[ev.data]) if ev.data else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_evals(recipe: Recipe, run_dir: Path, stages: Optional[list[str]] = None, console=None,
              *, tasks: Optional[list[str]] = None, force: bool = False) -> dict[str, dict]:
    """Evaluate base and each finished stage on the recipe's evals; write `evals/STAGE.json`.

    Args:
        recipe: the recipe (its `evals:` list).
        run_dir: the run directory (`runs/NAME`).
        stages: only these stages (base is always evaluated: every delta is against it).
        console: rich console for progress; default: a new one.
        tasks: only the eval entries of these tasks (the others' cached results are kept).
        force: re-evaluate even where a cached result matches.

    Returns:
        stage -> the JSON written for it: `{"stage", "model", "tasks": {name: {"metrics", "samples", ...}}}`.

    Raises:
        EvalError: a bad eval entry (all listed), or a task that failed (names task and stage).
    """
    from alignment.console import Console

    from alignment.data import load
    from alignment.models import read_artifact, torch_dtype

    console = console or Console(highlight=False)
    rundir = RunDir(run_dir)
    problems = check_evals(recipe)
    if problems:
        raise EvalError("bad evals in the recipe:\n  " + "\n  ".join(problems))
    if not recipe.evals:
        return {}
    names = eval_names(recipe.evals)
    plan: dict[str, list[int]] = {}  # stage -> eval entries, in stage order
    for i, ev in enumerate(recipe.evals):
        for st in eval_stages(recipe, ev):
            if stages is None or st == BASE or st in stages:
                plan.setdefault(st, []).append(i)
    if tasks is not None:
        unknown = sorted(set(tasks) - {ev.task for ev in recipe.evals})
        if unknown:
            raise EvalError(f"the recipe has no eval of task {', '.join(unknown)}; its evals: {', '.join(names)}")
    dtype = str(torch_dtype(recipe.model.dtype)).removeprefix("torch.")
    rows_of: dict[str, list[dict]] = {}
    session = Session()
    base_path = rundir.weights(recipe, BASE)
    results: dict[str, dict] = {}
    for st in [BASE] + recipe.order():
        if st not in plan:
            continue
        if st != BASE and rundir.done(st) is None:
            console.print(f"[yellow]–[/] evals on {st}: skipped, the stage is not done")
            continue
        if st != BASE and read_artifact(rundir.model_dir(st))["head"] != "causal_lm":
            console.print(f"[yellow]–[/] evals on {st}: skipped, a {recipe.stages[st].method} model does not generate")
            continue
        model_path = rundir.weights(recipe, st)
        cached = (rundir.read_evals(st) or {}).get("tasks", {})
        out = {"stage": st, "model": model_path, "fingerprint": _fingerprint(recipe, run_dir, st), "tasks": {}}
        for i in plan[st]:
            ev, name = recipe.evals[i], names[i]
            if tasks is not None and ev.task not in tasks:  # not asked for now: keep what is cached
                if name in cached:
                    out["tasks"][name] = cached[name]
                continue
            key = eval_key(recipe, run_dir, st, ev)
            if not force and cached.get(name, {}).get("key") == key:
                out["tasks"][name] = cached[name]
                console.print(f"[green]✓[/] eval {st} · {name}: cached [dim]({key})[/]")
                continue
            if ev.data and ev.data not in rows_of:
                rows_of[ev.data] = load(ev.data, recipe.data[ev.data]).rows
            reference = None if st == BASE else rundir.weights(recipe, recipe.stages[st].from_)
            ctx = EvalContext(
                model_path=model_path, rows=rows_of.get(ev.data, []), stage=st, reference_path=reference,
                base_path=base_path, resolve=lambda s: _resolve(recipe, run_dir, s), dtype=dtype,
                backend=ev.args.get("backend", DEFAULT_BACKEND), batch_size=ev.args.get("batch_size", DEFAULT_BATCH_SIZE),
                seed=recipe.seed, console=console, session=session)
            task_args = {k: v for k, v in ev.args.items() if k not in CONTEXT_ARGS}
            start = time.time()
            try:
                result = TASKS.get(ev.task)(ctx, **task_args)
            except Exception as e:
                session.release()
                raise EvalError(f"eval '{name}' on stage '{st}' failed: {type(e).__name__}: {e}") from e
            entry = {"task": ev.task, "data": ev.data, "key": key, **result.to_json(MAX_SAMPLES),
                     "seconds": round(time.time() - start, 2)}
            out["tasks"][name] = entry
            rundir.write_evals(st, out)  # after each task: a crash keeps what is done
            console.print(f"[cyan]●[/] eval {st} · {name}: {_headline(entry)} [dim]({entry['seconds']}s)[/]")
        rundir.write_evals(st, out)
        results[st] = out
        session.release()
    log_evals(recipe, run_dir, results)
    return results


def _resolve(recipe: Recipe, run_dir: Path, name: str) -> str:
    """A stage of this run (finished) or a folder -> full weights."""
    rundir = RunDir(run_dir)
    if name == BASE or name in recipe.stages:
        if name != BASE and rundir.done(name) is None:
            raise EvalError(f"stage '{name}' is not done; run it first (alignkit run RECIPE --stage {name})")
        return rundir.weights(recipe, name)
    if Path(name).is_dir():
        return str(Path(name).resolve())
    from alignment.registry import did_you_mean

    raise EvalError(f"'{name}' is neither a stage of this recipe{did_you_mean(name, recipe.stages)} nor a model folder")


def _headline(entry: dict) -> str:
    from rich.markup import escape

    if entry.get("skipped"):
        return f"skipped ({escape(entry['skipped'])})"
    main = entry.get("main")
    value = entry["metrics"].get(main) if main else None
    return f"{main} {value:.4g}" if isinstance(value, float) else "done"
