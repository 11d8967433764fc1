"""Process lifetime: children that cannot outlive the process that started them, and who holds a file.

`spawn` starts a command in its own session (so `stop` reaches everything it starts: accelerate's
workers, vLLM's engine core) plus a small watchdog, in a session of its own, that SIGKILLs that whole
process group as soon as the starting process is gone — however it went: an exception, Ctrl-C,
`kill -9`, the OOM killer. The pipeline launches stages with it and `VLLMServerEngine` its server.

A watchdog rather than `PR_SET_PDEATHSIG`: the death signal reaches only the direct child (not its
workers), fires when the *thread* that forked exits rather than the process, and needs a
`preexec_fn`, which is unsafe in a threaded parent. What is not covered: a process that leaves the
group (`setsid`) on purpose, and a `kill -9` that lands between the child's start and its
watchdog's (a few milliseconds).

Example:
    >>> proc = spawn([sys.executable, "-c", "print('hi')"], stdout=subprocess.DEVNULL)
    >>> wait(proc)
    0
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

WATCH_INTERVAL_S = 0.2  # how soon a watchdog notices that its parent died

# Runs as `python -I -S -c _WATCHDOG PARENT_PID GROUP INTERVAL [WATCHED_PID]`: it guards while its parent
# lives (and, given WATCHED_PID, while that process lives, not a zombie). It polls rather than waits: neither
# is ours to wait on. Its own session keeps the terminal's Ctrl-C away, so the stage's cleanup runs first.
_WATCHDOG = r"""
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
watched = int(sys.argv[4]) if len(sys.argv) > 4 else None

def watched_alive():
    try:
        with open(f"/proc/{watched}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False

while os.getppid() == parent and (watched is None or watched_alive()):
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        sys.exit(0)  # the group ended and was reaped: nothing left to guard
    except PermissionError:
        pass  # a member changed its uid: the group still lives
    time.sleep(float(sys.argv[3]))
try:
    os.killpg(group, signal.SIGKILL)
except ProcessLookupError:
    pass
"""

_watchdogs: dict[int, subprocess.Popen] = {}  # child pid -> its watchdog


def spawn(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """`subprocess.Popen(command, **popen_kwargs)` in a new session, guarded by a watchdog.

    The child's process group (id = its pid) is SIGKILLed within `WATCH_INTERVAL_S` of this process
    ending. Stop it with `stop`, or `wait` for it; both also retire the watchdog.

    Raises:
        OSError: as `subprocess.Popen` (the command cannot be started).
    """
    proc = subprocess.Popen(command, start_new_session=True, **popen_kwargs)
    _watchdogs[proc.pid] = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(proc.pid), str(WATCH_INTERVAL_S)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
    )
    return proc


def guard_own_group(watched: int) -> None:
    """Make this process's group die (SIGKILL) within `WATCH_INTERVAL_S` of process `watched` ending.

    For a process that another launcher started in a session of its own -- `torch.distributed.run` (and
    `accelerate launch`, which runs it) start each rank so -- out of reach of the watchdog `spawn` gave the
    launcher: the rank guards itself against the launcher's death (`watched` = the launcher's pid).
    """
    subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(os.getpgrp()), str(WATCH_INTERVAL_S),
         str(watched)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True,
    )


def wait(proc: subprocess.Popen) -> int:
    """Wait for a `spawn`ed child, then kill what is left of its group; its return code."""
    code = proc.wait()
    _retire(proc)
    return code


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM a `spawn`ed child's whole group, SIGKILL it after `grace_s` seconds, reap it."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    _retire(proc)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def _retire(proc: subprocess.Popen) -> None:
    """Kill stragglers of the child's group (workers whose leader exited) and the watchdog."""
    _signal_group(proc, signal.SIGKILL)
    watchdog = _watchdogs.pop(proc.pid, None)
    if watchdog is not None:
        watchdog.kill()
        watchdog.wait()


def alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, dead but not yet reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # the state follows the parenthesised name


def holders(path: Path) -> list[int]:
    """Pids of the processes with `path` open (from /proc/*/fd; those we may not inspect are missed)."""
    target = os.path.realpath(path)
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # exited meanwhile, or not ours to read
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(int(pid))
    return found


def describe(pid: int) -> str:
    """`pid (command line)`, cut to 80 characters; `pid` alone when it cannot be read."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return str(pid)
    return f"{pid} ({cmdline[:80]})"
