"""Nothing alignkit starts outlives what started it: `kill -9` of `alignkit run` takes its stage along and
an immediate rerun resumes; `kill -9` of a process running a vLLM server takes the server along."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from alignment import procs
from tests.helpers import manifest, metrics, write_recipe

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[-1].split()[1]) == pid:
            found.append(int(entry))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(procs.alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if procs.alive(p)]


def logged_steps(run_dir: Path) -> list[int]:
    try:
        return [row["step"] for row in metrics(run_dir, "sft") if "loss" in row]
    except (OSError, json.JSONDecodeError):  # not written yet, or a line half written
        return []


def test_killed_orchestrator_takes_its_stage_along_and_a_rerun_resumes(tmp_path, tiny_model_path):
    sft = {"method": "sft", "data": ["sft"],
           "args": {"learning_rate": 3.0e-3, "max_steps": 40, "per_device_train_batch_size": 8, "save_steps": 5}}
    recipe = write_recipe(tmp_path, tiny_model_path, {"sft": sft})
    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "t"
    command = [sys.executable, "-m", "alignment.cli", "run", str(recipe), "--run-dir", str(runs)]
    with open(tmp_path / "first.log", "wb") as log:
        orchestrator = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Step 6 logged: checkpoint-5 is complete and checkpoint-10 is four steps away.
        wait_for(lambda: max(logged_steps(run_dir), default=0) >= 6, 300, "step 6 of the stage")
        # the stage runs in the child that planned the run (`procs.WarmLauncher`), or a fresh `alignment.stage`
        stage = [pid for pid in children(orchestrator.pid) if "--serve-fd" in cmdline(pid) or "alignment.stage" in cmdline(pid)]
        assert len(stage) == 1, (tmp_path / "first.log").read_text()
        orchestrator.kill()
        orchestrator.wait()
        assert wait_gone(stage, timeout=3) == [], "the stage outlived its orchestrator"
    finally:
        orchestrator.kill()
        orchestrator.wait()

    rerun = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)  # at once
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "resuming sft" in rerun.stdout
    man = manifest(run_dir, "sft")
    assert man["status"] == "done" and man["resumed"] is True
    assert logged_steps(run_dir) == list(range(1, 41))  # one trainer: each step logged once


@pytest.mark.vllm
def test_vllm_server_dies_with_the_process_that_started_it(tiny_model_path):
    try:
        import vllm  # noqa: F401
    except Exception:
        pytest.skip("vllm does not import")
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from alignment.rollout import VLLMServerEngine
        engine = VLLMServerEngine({str(tiny_model_path)!r}, max_model_len=256)
        print(engine.process.pid, engine.socket, flush=True)
        time.sleep(600)
    """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        line = owner.stdout.readline()  # once the server answers; empty if the engine failed to start
        assert line, "the vLLM server did not start (its output is above)"
        server, socket_path = int(line.split()[0]), line.split()[1]
        assert procs.alive(server) and os.stat(os.path.dirname(socket_path)).st_mode & 0o077 == 0  # private
        group = [int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _pgid(int(p)) == server]
    finally:
        owner.kill()
        owner.wait()
    assert wait_gone(group, timeout=5) == [], "the vLLM server outlived the process that started it"


def _pgid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[2])
    except (OSError, IndexError, ValueError):
        return None
