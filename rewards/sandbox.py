"""Run untrusted Python (model-written code) in a limited child process.

`run_python` never raises for anything the code does: a crash, timeout, memory or process limit
shows up in the returned `SandboxResult` (`ok` is False), so a reward built on it scores 0 and the
trainer goes on. Each run costs ~0.1 s of start-up. Isolation, each part best-effort where the
machine refuses it (the child then says so on stderr):

- `python -I` in a fresh temp dir (cwd and HOME) with a minimal environment: no trainer secrets;
- no network: a new network namespace (non-root: inside a user namespace), so nothing leaves and
  the trainer's localhost services are unreachable; plus a guard on Python's `socket` that
  refuses internet connects (alone, it can be bypassed through `_socket` or ctypes);
- as root: a fresh random uid keeping only CAP_DAC_READ_SEARCH (read-only, so an interpreter
  under a 0700 /root still imports). RLIMIT_NPROC applies (never to root), the code cannot
  signal the trainer, and every process of the run is found and killed at the end, even one
  that left the process group;
- rlimits: CPU seconds and address space per process, processes, output size, no core dumps;
- a wall-clock timeout that kills the whole process group.

The limits are set by a small bootstrap that runs in the child before the user's code, not in
`preexec_fn`: `preexec_fn` is unsafe in a threaded parent (the trainer is) and forces a full
`fork()` of a large trainer process, where a plain Popen can use `vfork`.

Example:
    >>> run_python("print(1 + 1)").stdout
    '2\\n'
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

MARKER = "alignkit-sandbox"  # in every sandbox process's argv, so leftovers are recognisable
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # far above real users and subuid ranges

# Runs in the child as `python -I -c _BOOTSTRAP MARKER <config json>`. Order matters: the network
# namespace needs root (or a user namespace), so it comes before the uid drop; RLIMIT_NPROC is
# set after the drop because it counts the processes of the new uid.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[2])
def _warn(msg):
    sys.stderr.write(f"alignkit-sandbox: {msg}\n")
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
netns = libc.unshare(flags) == 0
if not netns:
    _warn(f"no network namespace ({os.strerror(ctypes.get_errno())}); using the socket guard only")
if cfg["uid"] is not None and os.geteuid() == 0:
    # Become an unused uid (RLIMIT_NPROC never applies to root) but keep CAP_DAC_READ_SEARCH,
    # read-only, so an interpreter installed under a 0700 /root stays importable. Ambient, so
    # it survives exec of a subprocess; no_new_privs, so setuid binaries cannot regain root.
    class _CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class _CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    CAP_DAC_READ_SEARCH, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS = 2, 8, 38
    PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 47, 2
    try:
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        os.setgroups([])
        os.setgid(cfg["uid"])
        os.setuid(cfg["uid"])
        keep = 1 << CAP_DAC_READ_SEARCH
        caps = (_CapData * 2)(_CapData(keep, keep, keep))
        if libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), caps) != 0:  # _LINUX_CAPABILITY_VERSION_3
            _warn(f"capset failed ({os.strerror(ctypes.get_errno())})")
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    except OSError as e:
        _warn(f"could not drop root ({e}); the process limit does not apply")
def _limit(kind, soft, hard=None):
    try:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))
    except (ValueError, OSError) as e:
        _warn(f"rlimit {kind} not set ({e})")
_limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
_limit(resource.RLIMIT_FSIZE, cfg["max_output_bytes"])  # also bounds stdout/stderr (files)
_limit(resource.RLIMIT_CORE, 0)
if os.geteuid() != 0 and not netns:
    # Without a user namespace the limit would count all of this user's processes.
    _warn("no user namespace; the process limit is not set")
else:
    _limit(resource.RLIMIT_NPROC, cfg["max_procs"])
import socket
def _guard(method):
    def guarded(self, *args):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise PermissionError("network access is disabled in the alignkit sandbox")
        return method(self, *args)
    return guarded
for _name in ("connect", "connect_ex", "sendto", "sendmsg"):
    setattr(socket.socket, _name, _guard(getattr(socket.socket, _name)))
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one `run_python` call.

    `returncode` is negative for a signal (-9 killed, -24 CPU limit) and None when the process
    could not be started; `stdout`/`stderr` are cut at `max_output_bytes`.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        """The code ran to the end and exited 0 within its limits."""
        return self.returncode == 0 and not self.timed_out


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    cpu_s: int = 5,
    memory_mb: int = 512,
    max_procs: int = 16,
    max_output_bytes: int = 1 << 20,
    python: str = sys.executable,
) -> SandboxResult:
    """Run `code` as `__main__` in a sandboxed child; see the module docstring for the limits.

    Args:
        code: Python source.
        timeout_s: wall-clock seconds before the process group is killed.
        cpu_s: CPU seconds per process (RLIMIT_CPU).
        memory_mb: address space per process (RLIMIT_AS); numpy/torch imports need ~1 GB.
        max_procs: processes and threads of the run (RLIMIT_NPROC). Enforced as root (the
            child drops to a fresh uid) or in a user namespace; neither available: not set.
        max_output_bytes: cap on each of stdout, stderr and any file the code writes.
        python: interpreter to run (default: this one, so the same packages are importable).

    Returns:
        A `SandboxResult`; never raises for what the child does.
    """
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"{MARKER}-")
    uid = _UID_BASE + random.randrange(_UID_SPAN) if os.geteuid() == 0 else None
    timed_out = False
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
        config = {
            "uid": uid,
            "cpu_s": int(cpu_s),
            "memory_bytes": int(memory_mb) << 20,
            "max_procs": int(max_procs),
            "max_output_bytes": int(max_output_bytes),
        }
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            # BLAS thread pools reserve address space per core and count against RLIMIT_NPROC.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        # Output goes to unlinked temp files, not pipes: no reader threads, and the size is
        # capped by RLIMIT_FSIZE in the child instead of growing in the trainer's memory.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-c", _BOOTSTRAP, MARKER, json.dumps(config)],
                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True,
                )
            except OSError as e:
                return SandboxResult(None, "", f"could not start the sandbox: {e}", False,
                                     time.monotonic() - start)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill(proc, uid)  # also on KeyboardInterrupt: the child is in its own session
            return SandboxResult(
                returncode=proc.returncode,
                stdout=_read(out, max_output_bytes),
                stderr=_read(err, max_output_bytes),
                timed_out=timed_out,
                duration_s=time.monotonic() - start,
            )
    except Exception as e:  # noqa: BLE001 -- a sandbox failure must score 0, not stop training
        return SandboxResult(None, "", f"sandbox error: {type(e).__name__}: {e}", timed_out,
                             time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _read(f, limit: int) -> str:
    f.seek(0)
    return f.read(limit).decode("utf-8", errors="replace")


def _kill(proc: subprocess.Popen, uid: int | None) -> None:
    """Kill the child's process group, reap it, then any process left with the run's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group id is the child's pid (new session)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid is not None:
        _kill_uid(uid)


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every process whose real uid is `uid` (escapees that called setsid()).

    Repeats until a scan finds none: a process may fork while the scan runs, but RLIMIT_NPROC
    bounds how many there can be.
    """
    for _ in range(rounds):
        found = False
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
            except OSError:
                continue  # exited meanwhile
            zombie = fields.get("State", "").strip().startswith("Z")  # dead, awaiting its reaper
            if not zombie and int(fields.get("Uid", "-1 0").split()[0]) == uid:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                found = True
        if not found:
            return
