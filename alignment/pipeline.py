"""The orchestrator: stage DAG, fingerprints, skip / resume, launching stages (files: `alignment.rundir`).

Each stage runs in a child process (`python -m alignment.stage`, or one per rank under
`torch.distributed.run` / `accelerate launch`: `Pipeline.command`) so stages keep their memory apart
and a kill means the same thing everywhere. From `alignkit run`, the first of them runs in the child that
planned the run (`procs.WarmLauncher`): it has imported torch, transformers and TRL already. A stage is skipped when its manifest says done with the
same fingerprint, resumed from its last checkpoint when it was cut off under the same fingerprint,
and rerun from scratch when its fingerprint changed.

On several machines (`Machines`) every machine runs one orchestrator over the same shared run
directory. Machine rank 0 owns it: the lock, recipe.yaml, the manifests. The others only launch
their share of each stage's ranks: they compute the same stage list from the same recipe and
manifests (a stage can only finish with every machine taking part, so their views agree), and each
launch meets rank 0's in the launcher's rendezvous.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from alignment.recipe import BASE, Recipe, dump_recipe, parse_resolved, stage_dependencies
from alignment.rundir import RunDir
from alignment.stage import INPUT_ERROR_EXIT

VERSIONED = ("torch", "transformers", "trl", "peft")


class RunLocked(RuntimeError):
    """Another alignkit process holds this run directory."""


class StageFailed(RuntimeError):
    """A stage's child process exited non-zero; `exit_code` is what `alignkit run` exits with: 1, or 2 when the
    stage refused its recipe or data (a rerun would stop the same way)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------- lock


TAKEOVER_WAIT_S = 10.0  # how long a rerun waits for the stages of a dead run to be stopped by their watchdogs
_held_locks: dict[Path, int] = {}  # run dir -> the lock's descriptor, passed to the stages we launch (pass_fds)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold run_dir/.lock for the whole run; a second run on the same directory is refused.

    The lock (an flock) is shared with every stage process `_launch` starts, so it is held while any
    process that writes the run directory lives, even after its orchestrator died. The file names the
    orchestrator's pid and is emptied on a clean exit. When that pid is dead but the lock is held, the
    rerun waits up to `TAKEOVER_WAIT_S` for the dead run's stages to go (their watchdogs kill them),
    then takes the lock over and says so.

    Raises:
        RunLocked: a live run (or a stage of one) holds the lock; names its pids.
    """
    from alignment.procs import alive, describe, holders

    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lock_file
    fh = open(path, "a+")
    fh.seek(0)
    previous = fh.read().strip()
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if (previous.isdigit() and alive(int(previous))) or time.monotonic() > deadline:
                held_by = ", ".join(describe(pid) for pid in holders(path) if pid != os.getpid()) or previous or "?"
                fh.close()
                raise RunLocked(f"another alignkit run is using {run_dir} (held by pid {held_by}); "
                                f"wait for it to finish or stop it") from None
            time.sleep(0.2)
    if previous and previous != str(os.getpid()):
        print(f"alignkit: the previous run on {run_dir} (pid {previous}) ended without releasing its lock and none "
              f"of its processes is left; taking the lock over", file=sys.stderr)
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    _held_locks[run_dir.resolve()] = fh.fileno()
    try:
        yield
    finally:
        del _held_locks[run_dir.resolve()]
        fh.truncate(0)  # a clean exit: the next run need not take anything over
        fh.close()  # no LOCK_UN: that would also release it for a stage still holding the shared descriptor


# ---------------------------------------------------------------- fingerprints


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def stage_inputs(recipe: Recipe, name: str, fingerprints: dict[str, str]) -> dict:
    """Everything that determines a stage's result; its hash is the stage's fingerprint. `args` are the
    effective ones (registered defaults included), so changing a default reruns the stage. A stage from `base`
    records its model's contents (`models.model_digest`: config, tokenizer, weights), not its location."""
    from alignment.data import dataset_digest
    from alignment.models import model_digest
    from alignment.stages import effective_args

    st = recipe.stages[name]
    dropped = recipe.decontaminate is not None and recipe.decontaminate.action == "drop"
    model, digest = recipe.stage_model(name), model_digest(recipe.model.name_or_path)
    return {
        **({"decontaminate": {"ngram": recipe.decontaminate.ngram,  # what is dropped depends on the eval sets too
                              "evals": {n: dataset_digest(recipe.data[n]) for n in sorted({e.data for e in recipe.evals if e.data})}}}
           if dropped else {}),
        "method": st.method,
        "from": st.from_,
        "from_fingerprint": fingerprints.get(st.from_) if st.from_ != BASE else digest,
        "model": model.model_dump(mode="json", exclude={"name_or_path"} if digest != model.name_or_path else None),
        "data": {r.name: {"weight": r.weight, "digest": dataset_digest(recipe.data[r.name])} for r in st.data},
        "args": effective_args(recipe, name),
        "rewards": [r.model_dump(mode="json") for r in st.rewards],
        "rollout": st.rollout.model_dump(mode="json") if st.rollout else None,
        "depends_on": {d: fingerprints.get(d) for d in stage_dependencies(st, recipe.stages)},
        **({"teacher": st.teacher} if st.teacher else {}),  # a teacher folder's name; a stage's is in depends_on
        "seed": recipe.seed,
        "versions": {k: v.split(".")[0] for k, v in versions().items()},
    }


def fingerprint(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two input dicts (to say why a stage is stale)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


# ---------------------------------------------------------------- machines


@dataclass(frozen=True)
class Machines:
    """Where this orchestrator sits in a multi-machine run (accelerate's `--num_machines`, `--machine_rank`,
    `--main_process_ip`, `--main_process_port`; torchrun's `--nnodes`, `--node_rank`, `--master_addr`,
    `--master_port`). One machine by default; machine rank 0 owns the run directory."""

    num: int = 1
    rank: int = 0
    main_ip: Optional[str] = None
    main_port: int = 29500  # accelerate's and torchrun's default

    def __post_init__(self):
        if self.num < 1 or not 0 <= self.rank < self.num:
            raise ValueError(f"machine rank {self.rank} is outside 0..{self.num - 1} (--num-machines {self.num})")
        if self.num > 1 and not self.main_ip:
            raise ValueError(f"{self.num} machines need --main-process-ip: the address of machine rank 0")

    @classmethod
    def from_env(cls, env: dict[str, str], *, num: Optional[int] = None, rank: Optional[int] = None,
                 main_ip: Optional[str] = None, main_port: Optional[int] = None) -> "Machines":
        """Given values, else Slurm's (SLURM_NNODES, SLURM_NODEID, the first host of SLURM_JOB_NODELIST),
        else one machine. Raises ValueError for an inconsistent combination."""
        slurm_num = int(env.get("SLURM_NNODES", "1"))
        num = num if num is not None else slurm_num
        if rank is None:
            rank = int(env.get("SLURM_NODEID", "0")) if "SLURM_NNODES" in env else 0
        if main_ip is None and env.get("SLURM_JOB_NODELIST") and num > 1:
            main_ip = first_host(env["SLURM_JOB_NODELIST"])
        return cls(num, rank, main_ip, main_port or cls.main_port)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: "gpu[07-09,12],cpu1" -> "gpu07" (what `scontrol show hostnames`
    prints first)."""
    head = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if head is None:
        raise ValueError(f"cannot read a host from SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = head.groups()
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "")


# ---------------------------------------------------------------- plan and run


@dataclass
class StageStatus:
    name: str
    method: str
    fingerprint: str
    state: str  # done | resume | stale | new
    reason: str = ""
    inputs: dict = field(default_factory=dict)


class Pipeline:
    """The stages of a recipe in one run directory. `plan` computes what needs torch and TRL (each stage's inputs,
    with the registered defaults, and its launch command); a pipeline made `from_plan` runs the stages without
    importing either: `alignkit run` plans in a short-lived child, so the process that waits on the stages stays
    light."""

    def __init__(self, recipe: Recipe, run_root: Path | str = "runs", *, console=None, machines: Machines = Machines(),
                 launcher=None):
        from rich.console import Console

        from alignment.procs import Launcher

        self.recipe, self.machines = recipe, machines
        self.launcher = launcher or Launcher()  # starts the stages' children: `procs.WarmLauncher` from `alignkit run`
        self.warm_started: dict[str, bool] = {}  # stage -> whether it ran in the launcher's warm child
        self.run_dir = Path(run_root).resolve() / recipe.name
        self.rundir = RunDir(self.run_dir)
        self.console = console or Console(highlight=False)
        self._planned: Optional[dict] = None  # `from_plan`: {"inputs": {stage: inputs}, "commands": {stage: argv}}

    def plan(self) -> dict:
        """What running needs that imports torch and TRL, as JSON: the resolved recipe, each stage's inputs
        (`stage_inputs`, in order) and launch command (`command`), the run root and the machines."""
        inputs = self.inputs()
        return {"recipe": dump_recipe(self.recipe), "run_root": str(self.run_dir.parent), "machines": asdict(self.machines),
                "inputs": json.loads(json.dumps(inputs, default=str)),  # as `fingerprint` hashes them
                "commands": {name: self.command(name) for name in inputs}}

    @classmethod
    def from_plan(cls, plan: dict, *, console=None, launcher=None) -> "Pipeline":
        """A pipeline that takes its stages' inputs and commands from `plan` (`Pipeline.plan`): it does not import
        torch, transformers or TRL. Whether each stage is done is still read from the run directory when asked."""
        pipe = cls(parse_resolved(plan["recipe"]), plan["run_root"], console=console, machines=Machines(**plan["machines"]),
                   launcher=launcher)
        pipe._planned = plan
        return pipe

    def inputs(self) -> dict[str, dict]:
        """Each stage's inputs (`stage_inputs`), in the recipe's order."""
        if self._planned is not None:
            return self._planned["inputs"]
        fps: dict[str, str] = {}
        out = {}
        for name in self.recipe.order():
            out[name] = stage_inputs(self.recipe, name, fps)
            fps[name] = fingerprint(out[name])
        return out

    def status(self) -> list[StageStatus]:
        """Each stage in order, with its fingerprint and whether it is done, resumable or to run."""
        out = []
        for name, inputs in self.inputs().items():
            fp = fingerprint(inputs)
            man = self.rundir.read_manifest(name)
            method = self.recipe.stages[name].method
            if man is None:
                out.append(StageStatus(name, method, fp, "new", inputs=inputs))
            elif man.get("fingerprint") != fp:
                why = ", ".join(changed_keys(man.get("inputs", {}), inputs)) or "inputs"
                out.append(StageStatus(name, method, fp, "stale", f"changed: {why}", inputs))
            elif self.rundir.done(name):
                out.append(StageStatus(name, method, fp, "done", inputs=inputs))
            else:
                out.append(StageStatus(name, method, fp, "resume", man.get("status", ""), inputs))
        return out

    def run(self, only: Optional[str] = None, force: bool = False) -> list[dict]:
        """Run the recipe (or `only` and the stages it needs); returns one summary row per stage. On a machine
        of rank > 0, launch this machine's ranks of the same stages instead (`follow`)."""
        wanted = self.recipe.ancestors(only) if only else self.recipe.order()
        forced = {only} if (force and only) else (set(wanted) if force else set())
        if self.machines.rank > 0:
            return self.follow(wanted, forced)
        with run_lock(self.run_dir):
            self.rundir.write_recipe(self.recipe)
            rows = []
            for st in self.status():
                if st.name not in wanted:
                    continue
                rows.append(self._run_stage(st, st.name in forced))
            return rows

    def follow(self, wanted: list[str], forced: set[str], timeout_s: float = 600) -> list[dict]:
        """Machine rank > 0: launch this machine's ranks of each stage machine rank 0 runs, in the same order,
        without the lock and without writing to the run directory. Waits up to `timeout_s` for rank 0 to write
        this recipe into the (shared) run directory.

        Raises:
            StageFailed: rank 0 did not write the recipe in time, or this machine's share of a stage failed.
        """
        from alignment.recipe import dump_recipe

        deadline, expected = time.monotonic() + timeout_s, dump_recipe(self.recipe)
        while not (self.rundir.recipe_file.exists() and self.rundir.recipe_file.read_text() == expected):
            if time.monotonic() > deadline:
                raise StageFailed(f"machine rank 0 did not write this recipe to {self.rundir.recipe_file} within "
                                  f"{timeout_s:.0f}s: is the run directory shared and the same recipe given to every machine?")
            time.sleep(1)
        rows = []
        for st in self.status():
            if st.name not in wanted:
                continue
            row = {"stage": st.name, "method": st.method, "seconds": 0.0, "metrics": {}}
            if st.state == "done" and st.name not in forced:
                self.console.print(f"[green]✓[/] {st.name} ({st.method}): done, skipped")
                rows.append({**row, "status": "skipped"})
                continue
            self.console.print(f"[bold cyan]▶[/] {st.name} ({st.method}): machine {self.machines.rank} of {self.machines.num}")
            start = time.time()
            code = self._launch(st.name)
            seconds = round(time.time() - start, 1)
            if code != 0:
                raise StageFailed(f"stage '{st.name}' failed on machine {self.machines.rank} (exit code {code}) after {seconds}s")
            rows.append({**row, "status": f"ran (machine {self.machines.rank})", "seconds": seconds})
        return rows

    def _run_stage(self, st: StageStatus, force: bool) -> dict:
        rundir, stage_dir = self.rundir, self.rundir.stage_dir(st.name)
        row = {"stage": st.name, "method": st.method, "seconds": 0.0, "metrics": {}}
        if st.state == "done" and not force:
            man = rundir.read_manifest(st.name) or {}
            self.console.print(f"[green]✓[/] {st.name} ({st.method}): done, skipped [dim](fingerprint {st.fingerprint})[/]")
            return {**row, "status": "skipped", "metrics": man.get("metrics", {})}
        if st.state == "stale" or force:
            why = "forced" if force else st.reason
            self.console.print(f"[yellow]↻[/] {st.name}: rerunning from scratch ({why})")
            shutil.rmtree(stage_dir, ignore_errors=True)
        resumed = st.state == "resume" and not force and bool(rundir.checkpoints(st.name))
        stage_dir.mkdir(parents=True, exist_ok=True)
        rundir.clear_result(st.name)
        manifest = {
            "stage": st.name, "method": st.method, "status": "running", "fingerprint": st.fingerprint,
            "inputs": st.inputs, "versions": versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "resumed": resumed,
        }
        rundir.write_manifest(st.name, manifest)
        verb = "resuming" if resumed else "running"
        self.console.print(f"[bold cyan]▶[/] {verb} {st.name} ({st.method}, from {self.recipe.stages[st.name].from_})")
        start = time.time()
        try:
            code = self._launch(st.name)
        except BaseException:  # Ctrl-C, or this process failing: the manifest must not go on saying running
            manifest.update(status="failed", seconds=round(time.time() - start, 1), error="interrupted")
            with contextlib.suppress(OSError):
                rundir.write_manifest(st.name, manifest)
            raise
        seconds = round(time.time() - start, 1)
        result = rundir.read_result(st.name)
        refused = rundir.read_error(st.name) if code == INPUT_ERROR_EXIT else None
        if refused is not None:  # the recipe or data: nothing a rerun could resume
            manifest.update(status="failed", exit_code=code, seconds=seconds, error=refused)
            rundir.write_manifest(st.name, manifest)
            raise StageFailed(f"stage '{st.name}' stopped: {refused}", exit_code=INPUT_ERROR_EXIT)
        if code != 0 or result is None or not rundir.model_dir(st.name).is_dir():
            manifest.update(status="failed", exit_code=code, seconds=seconds)
            rundir.write_manifest(st.name, manifest)
            saved = rundir.checkpoints(st.name)
            again = (f"`alignkit run` again resumes it from {saved[-1].name}" if saved else
                     "it saved no checkpoint: `alignkit run` again starts it over (if the error above is about the "
                     "recipe or the data, fix that first)")
            raise StageFailed(f"stage '{st.name}' failed (exit code {code}) after {seconds}s; see the output above. {again}")
        manifest.update(status="done", seconds=seconds, warm_start=self.warm_started.get(st.name, False),
                        finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                        metrics=result["metrics"], info=result["info"], trainer_config=result["trainer_config"],
                        artifact=str(rundir.model_dir(st.name)))
        rundir.write_manifest(st.name, manifest)
        self.console.print(f"[green]✓[/] {st.name} done in {seconds}s → {rundir.model_dir(st.name)}")
        return {**row, "status": "resumed" if resumed else "ran", "seconds": seconds, "metrics": result["metrics"]}

    def command(self, name: str) -> list[str]:
        """The child command of stage `name` on this machine.

        - neither `launch.num_processes` nor `launch.accelerate_config`, one machine: `python -m alignment.stage`;
        - an accelerate config file, or CUDA: `accelerate launch` (DDP / FSDP2 / DeepSpeed as the file says;
          without a file, DDP over this machine's GPUs);
        - otherwise (CPU): `torch.distributed.run` with `num_processes` ranks per machine; accelerate (under the
          trainers) reads the launcher's environment and picks gloo. accelerate's own CPU launcher does not form a
          process group without MPI, which is why CPU goes through torchrun.

        `num_processes` counts this machine's processes; accelerate is given the total over all machines.
        A pipeline made `from_plan` returns the planned command.
        """
        if self._planned is not None:
            return self._planned["commands"][name]
        import torch

        launch, machines = self.recipe.stage_launch(name), self.machines
        entry = ["-m", "alignment.stage", str(self.run_dir), name]
        if not launch.accelerate_config and not launch.num_processes and machines.num == 1:
            return [sys.executable, *entry]
        if launch.accelerate_config or torch.cuda.is_available():
            cmd = [sys.executable, "-m", "accelerate.commands.launch"]
            if launch.accelerate_config:
                cmd += ["--config_file", launch.accelerate_config]
            if launch.num_processes:
                total = launch.num_processes * machines.num
                cmd += ["--num_processes", str(total)] + (["--multi_gpu"] if total > 1 and not launch.accelerate_config else [])
            if machines.num > 1:
                cmd += ["--num_machines", str(machines.num), "--machine_rank", str(machines.rank),
                        "--main_process_ip", machines.main_ip, "--main_process_port", str(machines.main_port)]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(launch.num_processes or 1)]
            if machines.num == 1:
                cmd += ["--standalone"]  # a free local port for the rendezvous
            else:
                cmd += ["--nnodes", str(machines.num), "--node_rank", str(machines.rank),
                        "--master_addr", machines.main_ip, "--master_port", str(machines.main_port)]
        return cmd + list(launch.extra_args) + entry

    def _launch(self, name: str) -> int:
        """Run the stage's child and wait for it. The child (and all it starts) holds the run lock and dies
        with this process, however this process ends (`alignment.procs`); Ctrl-C stops it, then re-raises."""
        lock = _held_locks.get(self.run_dir.resolve())  # none on machines of rank > 0
        proc = self.launcher.spawn(self.command(name), pass_fds=[lock] if lock is not None else [])
        self.warm_started[name] = self.launcher.is_warm(proc)
        try:
            return self.launcher.wait(proc)
        except KeyboardInterrupt:
            self.launcher.stop(proc)  # the whole child group (accelerate spawns workers), then report as cut off
            raise
