"""Process lifetime: a spawned group dies with its parent however the parent dies; the run lock is held
by every process that writes the run directory, and taken over (saying so) once all of them are gone."""
from __future__ import annotations

import doctest
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from alignment import pipeline, procs
from alignment.pipeline import RunLocked, run_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_docstring_examples():
    assert doctest.testmod(procs).failed == 0


def wait_gone(pids: list[int], timeout: float = 5) -> list[int]:
    """The pids still alive after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(procs.alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if procs.alive(p)]


@pytest.mark.parametrize("how", ["sigkill", "exception"])
def test_spawned_group_dies_with_its_parent(how):
    # The parent spawns `sh`, which starts a grandchild in the same group, prints both pids, then the
    # parent dies: by SIGKILL from outside, or by an uncaught exception (no cleanup runs either way).
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from alignment import procs
        child = procs.spawn(["sh", "-c", "sleep 600 & echo $$ $!; wait"], stdout=subprocess.PIPE)
        print(child.stdout.readline().decode().strip(), flush=True)
        if {how == "exception"}:
            raise SystemExit("boom")
        time.sleep(600)
    """)], stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2 and all(procs.alive(p) for p in pids)
    if how == "sigkill":
        parent.kill()
    parent.wait()
    assert wait_gone(pids, timeout=3) == []


def test_stop_ends_the_whole_group_and_the_watchdog():
    child = procs.spawn(["sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE)
    grandchild = int(child.stdout.readline())
    watchdog = procs._watchdogs[child.pid]
    procs.stop(child, grace_s=5)
    child.stdout.close()
    assert child.returncode == -signal.SIGTERM
    assert wait_gone([grandchild, watchdog.pid]) == [] and watchdog.returncode is not None


def _holder(lock: os.PathLike) -> subprocess.Popen:
    """A process holding an flock on `lock` (as a stage that inherited the orchestrator's lock does)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, time
        fh = open({str(lock)!r}, "a+")
        fcntl.flock(fh, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"locked\n"
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_run_lock_refuses_while_a_stage_of_a_dead_run_lives(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text(str(_dead_pid()))  # its orchestrator is gone ...
    stage = _holder(run_dir / ".lock")  # ... but a stage of it still holds the lock
    monkeypatch.setattr(pipeline, "TAKEOVER_WAIT_S", 0.5)
    try:
        with pytest.raises(RunLocked, match=rf"held by pid {stage.pid} \(.*python"):
            with run_lock(run_dir):
                pass
    finally:
        stage.kill()
        stage.wait()


def test_run_lock_takes_over_once_the_dead_runs_processes_are_gone(tmp_path, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = _dead_pid()
    (run_dir / ".lock").write_text(str(dead))
    stage = _holder(run_dir / ".lock")
    killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {stage.pid}"])  # its watchdog, in effect
    start = time.monotonic()
    with run_lock(run_dir):
        assert time.monotonic() - start >= 0.9  # waited for the stage rather than running beside it
        assert (run_dir / ".lock").read_text() == str(os.getpid())
    killer.wait()
    stage.wait()
    assert f"(pid {dead}) ended without releasing its lock" in capfd.readouterr().err
    assert (run_dir / ".lock").read_text() == ""  # released cleanly: the next run takes nothing over


def test_run_lock_is_inherited_by_launched_stages(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        fd = pipeline._held_locks[run_dir.resolve()]
        child = procs.spawn(["sleep", "600"], pass_fds=[fd])
    # The orchestrator let go; its stage still holds the lock, so a second run cannot take it.
    with open(run_dir / ".lock", "a+") as fh:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    procs.stop(child, grace_s=5)
    with open(run_dir / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def warm_launcher(tmp_path) -> procs.WarmLauncher:
    """A `WarmLauncher` over a light child (no imports to pay) that serves one command, as `alignkit run`'s
    planning child does."""
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    child = procs.spawn([sys.executable, "-c", "import socket, sys; from alignment import procs; "
                         f"sys.exit(procs.serve_one(socket.socket(fileno={theirs.fileno()})))"],
                        pass_fds=[theirs.fileno()], cwd=tmp_path)
    theirs.close()
    return procs.WarmLauncher(child, ours)


def test_the_warm_child_runs_the_first_python_module_command_holding_the_lock(tmp_path):
    (tmp_path / "mod_exits.py").write_text("import sys, time\ntime.sleep(3)\nsys.exit(int(sys.argv[1]))\n")
    launcher, run_dir = warm_launcher(tmp_path), tmp_path / "run"
    with run_lock(run_dir):
        fd = pipeline._held_locks[run_dir.resolve()]
        os.chdir(tmp_path)  # the command's module is found from the working directory, as `python -m` finds it
        try:
            proc = launcher.spawn([sys.executable, "-m", "mod_exits", "3"], pass_fds=[fd])
        finally:
            os.chdir(REPO)
        assert launcher.is_warm(proc)
        deadline = time.monotonic() + 10  # the child takes the command once it is up (it imports alignment.procs)
        while proc.pid not in procs.holders(run_dir / ".lock") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.pid in procs.holders(run_dir / ".lock")  # the lock came along with the command
    assert launcher.wait(proc) == 3
    later = launcher.spawn([sys.executable, "-m", "mod_exits", "0"], cwd=tmp_path)  # one command only: fresh now
    assert not launcher.is_warm(later) and later.pid != proc.pid and launcher.wait(later) == 0


def test_another_command_lets_the_warm_child_go_first(tmp_path):
    launcher = warm_launcher(tmp_path)
    waiting = launcher._child
    proc = launcher.spawn(["sleep", "0.1"])
    assert waiting.returncode == 0 and not procs.alive(waiting.pid)  # gone before the command started
    assert not launcher.is_warm(proc) and launcher.wait(proc) == 0
    launcher.close()  # nothing left to let go


def test_a_warm_child_that_died_is_replaced_by_a_fresh_start(tmp_path):
    launcher = warm_launcher(tmp_path)
    launcher._child.kill()
    launcher._child.wait()
    proc = launcher.spawn([sys.executable, "-m", "json.tool", "--help"], pass_fds=[])
    assert not launcher.is_warm(proc) and launcher.wait(proc) == 0


def test_startup_without_gc_pauses_collection_then_freezes_what_lived():
    """In a process of its own (the helper freezes every live object): no collection runs inside the block, the
    collector is back on after it -- an exception too -- and what lived through the block is frozen."""
    script = textwrap.dedent("""
        import gc
        from alignment.procs import startup_without_gc

        runs = []
        gc.callbacks.append(lambda phase, info: runs.append(info["generation"]) if phase == "start" else None)
        with startup_without_gc():
            kept = [[i] for i in range(300_000)]  # far past gen 0's threshold: collections would run
            assert not gc.isenabled()
        assert runs == [] and gc.isenabled() and gc.get_freeze_count() >= len(kept)
        try:
            with startup_without_gc():
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        assert gc.isenabled()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
