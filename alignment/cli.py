"""`alignkit` command line: run, validate, plan, list.

Exit codes: 0 ok, 1 a stage failed or the run directory is busy, 2 bad recipe or data.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from alignment.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Post-training pipelines from one recipe YAML.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)

RecipeArg = typer.Argument(..., help="recipe YAML file", show_default=False)
RunDirOpt = typer.Option("runs", "--run-dir", help="parent folder of run directories")


def _load(path: Path, *, check_data: bool = False, offline: bool = False):
    """Load a recipe; on a bad recipe or bad data print one clear error and exit 2."""
    from alignment.data import DataError
    from alignment.recipe import RecipeError
    from alignment.validate import check_inputs, load_recipe

    from rewards import add_recipe_folder

    add_recipe_folder(path.parent)  # user rewards beside the recipe import, here and in stage processes
    try:
        recipe = load_recipe(path)
        if check_data:  # every row, the model folder, the chat template, what max_length cuts: no model loads
            for line in check_inputs(recipe, path, offline=offline).lines():
                console.print(f"data: {line}", style="yellow", markup=False, soft_wrap=True)
            for name in hub_datasets(recipe) if offline else []:
                console.print(f"data: dataset '{name}' is the hub dataset {recipe.data[name].path}: rows not checked "
                              f"(--offline)", style="yellow", markup=False, soft_wrap=True)
        return recipe
    except (RecipeError, DataError) as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


def hub_datasets(recipe) -> list[str]:
    """Names of the hub datasets the recipe's stages use (`--offline` names them instead of loading them)."""
    from alignment.data import is_hub

    used = dict.fromkeys(ref.name for st in recipe.stages.values() for ref in st.data)
    return [name for name in used if is_hub(recipe.data[name])]


@app.command()
def run(
    recipe: Path = RecipeArg,
    stage: Optional[str] = typer.Option(None, "--stage", help="run only this stage (and the stages it needs)"),
    force: bool = typer.Option(False, "--force", help="rerun even if done (with --stage: only that stage)"),
    run_dir: Path = RunDirOpt,
    gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", help="device memory in GiB to check against; default: the GPU's"),
    no_memory_check: bool = typer.Option(False, "--no-memory-check", help="run a stage even if its estimate does not fit"),
    num_machines: Optional[int] = typer.Option(None, "--num-machines", help="machines in this run (default: SLURM_NNODES, else 1); every machine runs `alignkit run` on the same shared run directory"),
    machine_rank: Optional[int] = typer.Option(None, "--machine-rank", help="this machine's rank, 0 = the one that owns the run directory (default: SLURM_NODEID, else 0)"),
    main_process_ip: Optional[str] = typer.Option(None, "--main-process-ip", help="address of machine rank 0 (default: the first host of SLURM_JOB_NODELIST)"),
    main_process_port: Optional[int] = typer.Option(None, "--main-process-port", help="rendezvous port on machine rank 0 (default 29500)"),
    plan_to: Optional[Path] = typer.Option(None, "--plan-to", hidden=True, help="only check and plan, into this JSON file"),
    serve_fd: Optional[int] = typer.Option(None, "--serve-fd", hidden=True, help="then run the command sent on this socket"),
):
    """Run every stage of RECIPE in order, skipping stages already done and resuming cut-off ones."""
    from alignment import procs
    from alignment.pipeline import Pipeline, RunLocked, StageFailed
    from alignment.rundir import DiskFull

    from rewards import add_recipe_folder

    planning = (recipe, stage, force, run_dir, gpu_mem, no_memory_check, num_machines, machine_rank, main_process_ip,
                main_process_port)
    if plan_to is not None:  # the child of `_plan_in_child`: plan, say so, then serve the run's first command
        with procs.startup_without_gc():  # a process of its own: torch, transformers and TRL import here
            plan = _plan_run(*planning)
        plan_to.write_text(json.dumps(plan))
        if serve_fd is not None:
            import socket

            sock = socket.socket(fileno=serve_fd)
            sock.send(b"planned")
            raise typer.Exit(procs.serve_one(sock))
        return
    add_recipe_folder(recipe.parent)  # user rewards beside the recipe import in the stage processes
    if "torch" in sys.modules:  # a caller that holds torch already (a library user, the tests): nothing to keep light
        plan, launcher = _plan_run(*planning), procs.Launcher()
    else:
        options = [str(recipe), "--run-dir", str(run_dir)] + (["--stage", stage] if stage else []) + (["--force"] if force else [])
        options += ([] if gpu_mem is None else ["--gpu-mem", repr(gpu_mem)]) + (["--no-memory-check"] if no_memory_check else [])
        for flag, value in (("--num-machines", num_machines), ("--machine-rank", machine_rank),
                            ("--main-process-ip", main_process_ip), ("--main-process-port", main_process_port)):
            options += [] if value is None else [flag, str(value)]
        plan, launcher = _plan_in_child(options)
    try:
        pipe = Pipeline.from_plan(plan, console=console, launcher=launcher)
        rec, machines = pipe.recipe, pipe.machines
        console.print(f"[bold]alignkit[/] {rec.name}: {' → '.join(rec.ancestors(stage) if stage else rec.order())}  [dim]run dir {pipe.run_dir}[/]")
        try:
            rows = pipe.run(only=stage, force=force)
        except RunLocked as e:
            err.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(1) from None
        except StageFailed as e:
            err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except DiskFull as e:
            err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: `alignkit run` again resumes from the last checkpoint")
            raise typer.Exit(130) from None
        _summary(rows, pipe.run_dir)
        if machines.rank > 0:
            return  # evals and the report are machine rank 0's
        if rec.evals:
            stages = rec.ancestors(stage) if stage else []
            proc = launcher.spawn([sys.executable, "-m", "evals", str(pipe.run_dir), *stages])
            try:
                code = launcher.wait(proc)
            except KeyboardInterrupt:
                launcher.stop(proc)
                err.print("[yellow]interrupted[/] during the evals: `alignkit run` again runs them")
                raise typer.Exit(130) from None
            if code != 0:
                raise typer.Exit(1)
        elif stage is None:
            from evals import write_report

            console.print(f"report: [bold]{write_report(pipe.run_dir)}[/]")
        _print_alarms(rec, pipe.run_dir)
    finally:
        launcher.close()


def _plan_run(recipe: Path, stage, force, run_dir, gpu_mem, no_memory_check, num_machines, machine_rank, main_ip,
              main_port) -> dict:
    """`run`'s checks, which import torch and TRL (`_load`, the stage name, the machines, `Pipeline.plan`, then
    `_check_launches` and `_check_memory` of the stages that will run); a problem prints one error and exits 2."""
    import os

    from alignment.pipeline import Machines, Pipeline

    rec = _load(recipe, check_data=True)
    if stage is not None and stage not in rec.stages:
        from alignment.registry import did_you_mean

        err.print(f"[bold red]error:[/] no stage '{stage}' in {recipe}{did_you_mean(stage, rec.stages)}; stages: {', '.join(rec.stages)}")
        raise typer.Exit(2)
    try:
        machines = Machines.from_env(dict(os.environ), num=num_machines, rank=machine_rank, main_ip=main_ip,
                                     main_port=main_port)
    except ValueError as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    plan = Pipeline(rec, run_dir, console=console, machines=machines).plan()
    pipe = Pipeline.from_plan(plan)
    wanted = set(rec.ancestors(stage) if stage else rec.order())
    todo = [s.name for s in pipe.status() if s.name in wanted and (force or s.state != "done")]
    _check_launches(recipe, rec, todo)
    if not no_memory_check:
        _check_memory(pipe, recipe.parent, todo, gpu_mem)
    return plan


def _plan_in_child(options: list[str]):
    """`alignkit run OPTIONS --plan-to FILE` in a child process (`_plan_run`), its output relayed to this
    process's, so that this process never imports torch, transformers or TRL (~0.5 GiB RSS). The child,
    having paid for those imports, then waits to run the run's first `python -m` command (the first stage, or
    the evals) in their place: returns the plan and the `procs.WarmLauncher` that hands it that command. A
    child that fails ends this command with its exit code (1 if a signal killed it)."""
    import os
    import socket
    import tempfile

    from alignment import procs

    env = dict(os.environ, COLUMNS=str(console.width), **({"FORCE_COLOR": "1"} if console.is_terminal else {}))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, tempfile.TemporaryDirectory(prefix="alignkit-plan-") as tmp:
        out = Path(tmp) / "plan.json"
        proc = procs.spawn([sys.executable, "-m", "alignment.cli", "run", *options, "--plan-to", str(out),
                            "--serve-fd", str(theirs.fileno())], env=env, pass_fds=[theirs.fileno()],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        theirs.close()
        relays = [_relay(proc.stdout, sys.stdout), _relay(proc.stderr, sys.stderr)]
        try:
            planned = ours.recv(16)  # b"" when the child ended without planning
        except KeyboardInterrupt:
            procs.stop(proc)
            raise
        if not planned:
            code = procs.wait(proc)
            for thread in relays:
                thread.join()
            raise typer.Exit(code if code > 0 else 1)
        plan = json.loads(out.read_text())
        return plan, procs.WarmLauncher(proc, ours.dup(), relays)


def _relay(source, sink):
    """A thread copying the pipe `source` to the text stream `sink` as it comes (progress bars included)."""
    import codecs
    import os
    import threading

    def copy():
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(source.fileno(), 65536):
            sink.write(decoder.decode(chunk))
            sink.flush()
        source.close()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def _print_alarms(recipe, run_dir: Path) -> None:
    """The reward-hacking alarms (`evals.alarm`), after the evals that they read."""
    from rich.markup import escape

    from evals.alarm import reward_hacking_alarms

    for alarm in reward_hacking_alarms(recipe, run_dir):
        console.print(f"[bold red]warning:[/] {escape(alarm.message)}", soft_wrap=True)


def _check_launches(path: Path, rec, todo: list[str]) -> None:
    """Refuse (exit 2) a stage that will run with a launch only GPUs run (`validate.gpu_only_launches`: FSDP on
    a machine without CUDA), naming the recipe's file:line and key."""
    from alignment.recipe import RecipeError
    from alignment.validate import gpu_only_launches

    problems = gpu_only_launches(path, rec, todo)
    if problems:
        err.print(f"[bold red]error:[/] {RecipeError(str(path), problems)}", markup=True, soft_wrap=True)
        raise typer.Exit(2)


def _check_memory(pipe, recipe_dir: Path, todo: list[str], gpu_mem: Optional[float]) -> None:
    """Refuse (exit 2) before any model loads when a stage that will run (`todo`) does not fit the device
    (`alignment.memory.check_fits`: --gpu-mem, else the GPU's memory; no GPU and no --gpu-mem: no check)."""
    from alignment.memory import DoesNotFit, PlanError, check_fits

    try:
        check_fits(pipe.recipe, recipe_dir, todo, gpu_mem)
    except (DoesNotFit, PlanError) as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None


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
def validate(recipe: Path = RecipeArg,
             offline: bool = typer.Option(False, "--offline", help="do not load hub datasets (local files are still checked)")):
    """Check RECIPE: schema, TRL args, stage references, data files and columns, reward names."""
    rec = _load(recipe, check_data=True, offline=offline)
    _print_overlap(rec)
    from alignment.validate import gpu_only_launches

    for p in gpu_only_launches(recipe, rec, rec.order()):  # valid for GPUs; `run` on this machine refuses it
        console.print(f"note: {recipe}:{p.line}: {'.'.join(map(str, p.path))}: {p.message} (`alignkit run` here refuses it)",
                      style="yellow", markup=False, soft_wrap=True)
    from alignment.data import is_hub

    used = {r.name for st in rec.stages.values() for r in st.data if not (offline and is_hub(rec.data[r.name]))}
    console.print(f"[green]✓[/] {recipe}: {len(rec.stages)} stage(s) ({' → '.join(rec.order())}), "
                  f"{len(used)} training dataset(s) checked row by row")


def _print_overlap(recipe) -> None:
    """The n-gram overlap of every training set with every eval set (`alignment.decontam`), by row."""
    from alignment.data import DataError
    from alignment.decontam import overlap_report, report_lines

    try:
        n, pairs = overlap_report(recipe)
    except DataError as e:
        console.print(f"decontamination: not checked ({e})", style="yellow", markup=False, soft_wrap=True)
        return
    for line in report_lines(n, pairs, recipe.decontaminate.action if recipe.decontaminate else None):
        style = "yellow" if any(p.rows for p in pairs) else None
        console.print(f"decontamination: {line}", style=style, markup=False, soft_wrap=True)


@app.command()
def plan(recipe: Path = RecipeArg, run_dir: Path = RunDirOpt,
         gpus: Optional[int] = typer.Option(None, "--gpus", help="devices per stage launched with an accelerate config"),
         gpu_mem: Optional[float] = typer.Option(None, "--gpu-mem", help="memory per device in GiB: say what fits"),
         as_json: bool = typer.Option(False, "--json", help="print the memory plan as JSON (GiB) and nothing else")):
    """Show the stage DAG, what is already done in the run directory, and peak memory per device per stage."""
    import json

    from alignment.memory import PlanError, plan_recipe
    from alignment.pipeline import Pipeline

    rec = _load(recipe)
    try:
        mem = plan_recipe(rec, recipe.parent, gpus=gpus, gpu_mem_gib=gpu_mem)
    except PlanError as e:
        err.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from None
    pipe = Pipeline(rec, run_dir, console=console)
    if as_json:  # the table's facts per stage, and the memory estimate's parts
        print(json.dumps({"recipe": rec.name, "run_dir": str(pipe.run_dir), "gpus": gpus, "gpu_mem_gib": gpu_mem, "stages": {
            st.name: {"method": st.method, "from": rec.stages[st.name].from_, "data": [r.name for r in rec.stages[st.name].data],
                      "state": st.state, "reason": st.reason, "fingerprint": st.fingerprint, **mem[st.name].estimate.gib(),
                      "fits": mem[st.name].fits, "suggestions": mem[st.name].suggestions}
            for st in pipe.status()}}, indent=1))
        return
    console.print(f"{rec.name} → {pipe.run_dir}", style="italic", markup=False, soft_wrap=True)  # a title wraps
    table = Table()
    for col in ("stage", "method", "from", "data", "adapter", "quant", "memory/device", "state", "fingerprint"):
        table.add_column(col)
    style = {"done": "green", "resume": "yellow", "stale": "yellow", "new": "cyan"}
    for st in pipe.status():
        spec, model, est = rec.stages[st.name], rec.stage_model(st.name), mem[st.name]
        state = {"done": "done (skip)", "resume": "resume", "stale": "stale: rerun", "new": "to run"}[st.state]
        fit = {None: "", True: " [green]fits[/]", False: " [red]too big[/]"}[est.fits]
        table.add_row(st.name, st.method, spec.from_, ", ".join(r.name for r in spec.data) or "-",
                      model.adapter.method if model.adapter else "full",
                      f"{model.quantization.bits}-bit" if model.quantization else "-",
                      f"{est.estimate.peak / 2**30:.1f} GiB{fit}",
                      f"[{style[st.state]}]{state}[/]" + (f" [dim]({st.reason})[/]" if st.reason else ""), st.fingerprint)
    console.print(table)
    for name, est in mem.items():
        parts = ", ".join(f"{k} {v:.2f}" for k, v in est.estimate.gib()["parts_gib"].items() if v)
        console.print(f"  {name} ({est.estimate.sharding}): {parts} GiB", markup=False, soft_wrap=True)
        for fix in est.suggestions:
            console.print(f"    would fit with {fix}", style="yellow", markup=False, soft_wrap=True)
    _print_overlap(rec)


@app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="run directory (runs/NAME)", show_default=False),
    out: Path = typer.Option(..., "--out", help="new folder for the model (must not exist, or be empty)"),
    stage: Optional[str] = typer.Option(None, "--stage", help="the stage to export; default: the last one"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the base model's) | bf16 | fp16 | fp32"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", help="then upload to this hub repo (user/name)"),
    check: bool = typer.Option(True, "--check/--no-check", help="reload through the rollout engine and compare greedy answers"),
    backend: str = typer.Option("auto", "--backend", help="rollout engine of the check: auto (vllm where it imports) | hf | vllm"),
):
    """Export a finished stage as full weights (adapters merged, safetensors), tokenizer, generation config and a
    model card; optionally push it to the hub."""
    from alignment.export import ExportError, export

    try:
        export(run_dir, out, stage=stage, dtype=dtype, check=check, backend=backend, push_to_hub=push_to_hub,
               log=lambda line: console.print(line, markup=False, highlight=False))
    except ExportError as e:
        err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"[green]✓[/] exported: [bold]{out}[/]")


@app.command("list")
def list_():
    """List what a recipe can name, from the registries: stage methods (with their data formats), rewards,
    eval tasks, KL estimators, rollout backends, trackers and bundled models."""
    from typing import get_args

    from alignment.algos import KL_ESTIMATORS
    from alignment.models import BUNDLED
    from alignment.recipe import Backend, Tracker
    from alignment.stages import STAGES, load_stages
    from evals import TASKS
    from rewards import REWARDS

    load_stages()
    console.print("[bold]stage methods[/] (data formats):")
    for name in STAGES.names():
        console.print(f"  {name:<8} {', '.join(STAGES.get(name).formats)}")
    for title, names in (("rewards", REWARDS.names()), ("eval tasks", TASKS.names()),
                         ("KL estimators", KL_ESTIMATORS.names()), ("rollout backends", get_args(Backend)),
                         ("trackers (report_to)", get_args(Tracker)),
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
