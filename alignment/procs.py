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
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import traceback
import warnings
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


@contextlib.contextmanager
def startup_without_gc():
    """A process's own start-up -- importing torch, transformers, TRL and peft, planning -- with Python's cyclic
    garbage collector paused, then every object alive frozen (`gc.freeze`: later collections skip them). The
    imports make ~550k objects that live as long as the process, and each full collection on the way scanned
    all made so far again (10, ~1.6 s of CPU a process here, 3 % of a 50 s SFT run; raw TRL pays it too); the
    imports done later (TRL's trainers load lazily) would scan them all again without the freeze. Reference
    counting frees what it can meanwhile. For a process's entry point only (the planning child, `alignment.stage`):
    frozen objects are never collected, so a caller whose earlier objects may still become cyclic garbage (a
    test, a library user) must not use it. CPython's docs suggest the same for long-lived start-up state
    (`gc.freeze`)."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


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


class Launcher:
    """Starts, waits for and stops the children of a run: `spawn`, `wait`, `stop` as the functions of this
    module; `close` when the run is over."""

    def spawn(self, command: list[str], **popen_kwargs) -> subprocess.Popen:
        return spawn(command, **popen_kwargs)

    def wait(self, proc: subprocess.Popen) -> int:
        return wait(proc)

    def stop(self, proc: subprocess.Popen) -> None:
        stop(proc)

    def close(self) -> None:
        pass

    def is_warm(self, proc: subprocess.Popen) -> bool:
        """Whether `proc` is a warm child that took a command (`WarmLauncher`) rather than a fresh interpreter."""
        return False


class WarmLauncher(Launcher):
    """A `Launcher` holding one `spawn`ed Python child that has already paid its start-up (the imports of
    torch, transformers and TRL: ~13 s of CPU on a 2-core machine) and now waits in `serve_one`. The first
    `python -m MODULE ARGS` command this launcher is asked to start (same interpreter, the parent's
    environment, no other Popen argument than `pass_fds`) runs in that child instead of a new interpreter:
    the child receives the command and the descriptors to keep open (the run lock) over `sock`, a Unix
    socket pair. Any other command, and every later one, starts fresh; a command that the warm child cannot
    take lets it go first (`close`), so it never sits beside a stage holding memory.

    Args:
        proc: the waiting child, as `spawn` returned it (its watchdog guards it like any other).
        sock: this side of the socket pair whose other end the child serves.
        relays: threads copying the child's output pipes (if any): joined once the child has ended.
    """

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, relays: list = ()):
        self._waiting: subprocess.Popen | None = proc  # until it takes a command or is let go
        self._child, self._sock, self._relays = proc, sock, list(relays)
        self._served = False

    def spawn(self, command: list[str], **popen_kwargs) -> subprocess.Popen:
        if self._waiting is not None and command[:2] == [sys.executable, "-m"] and set(popen_kwargs) <= {"pass_fds"}:
            request = json.dumps({"argv": command[2:], "cwd": os.getcwd()}).encode()
            try:
                socket.send_fds(self._sock, [request], list(popen_kwargs.get("pass_fds", ())))
            except OSError:  # the child is gone (it died after planning): start the command fresh instead
                self.close()
                return spawn(command, **popen_kwargs)
            self._sock.close()
            self._waiting, self._served = None, True
            return self._child
        self.close()
        return spawn(command, **popen_kwargs)

    def wait(self, proc: subprocess.Popen) -> int:
        code = wait(proc)
        self._join(proc)
        return code

    def stop(self, proc: subprocess.Popen) -> None:
        stop(proc)
        self._join(proc)

    def close(self) -> None:
        """Let the warm child go if it is still waiting: it exits 0 when its socket closes."""
        if self._waiting is not None:
            self._waiting = None
            self._sock.close()
            self.wait(self._child)

    def is_warm(self, proc: subprocess.Popen) -> bool:
        return self._served and proc is self._child

    def _join(self, proc: subprocess.Popen) -> None:
        if proc is self._child:
            for thread in self._relays:
                thread.join()


def serve_one(sock: socket.socket) -> int:
    """The warm child's side of `WarmLauncher`: wait on `sock` for one command, `[MODULE, *ARGS]`, and run it
    in this process as `python -m MODULE ARGS` would (`runpy`, `sys.argv`, the working directory given; stdout
    line-buffered, as the command's output is relayed live), holding the descriptors that came with it open
    meanwhile. Returns its exit status: 0 when the socket closes without a command; a `SystemExit`'s code;
    130 on Ctrl-C; 1, with the traceback on stderr, for any other exception."""
    msg, _fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 16)  # the fds stay open until this process ends
    sock.close()
    if not msg:
        return 0
    request = json.loads(msg)
    module, *args = request["argv"]
    os.chdir(request["cwd"])
    sys.argv = [module, *args]
    sys.stdout.reconfigure(line_buffering=True)
    try:
        with warnings.catch_warnings():  # planning imported the module already (alignment.stage): runpy's warning
            warnings.filterwarnings("ignore", "'.*' found in sys.modules after import of package", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # as the interpreter reports an uncaught exception
        traceback.print_exc()
        return 1
    return 0


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
            if any(_fd_target(f"/proc/{pid}/fd/{fd}") == target for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append(int(pid))
    return found


def _fd_target(link: str) -> str | None:
    """What a /proc/PID/fd/N link points to; None for a descriptor closed meanwhile (listing the folder opens one)."""
    try:
        return os.readlink(link)
    except FileNotFoundError:
        return None


def describe(pid: int) -> str:
    """`pid (command line)`, cut to 80 characters; `pid` alone when it cannot be read."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return str(pid)
    return f"{pid} ({cmdline[:80]})"
