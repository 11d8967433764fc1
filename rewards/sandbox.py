"""Run untrusted Python (model-written code) in a limited child process.

`run_python` never raises for anything the code does: a crash, timeout, memory or process limit
or a refused file access shows up in the returned `SandboxResult` (`ok` is False), so a reward built
on it scores 0 and the trainer goes on. Each run costs ~0.1 s of start-up. Isolation (Linux):

- `python -I` with a minimal environment (no trainer secrets), cwd, HOME and TMPDIR a fresh work
  dir, the only writable place;
- its own mount, network and IPC namespaces (non-root: inside a user namespace): the filesystem it
  sees is an empty read-only root holding read-only binds of the interpreter's prefixes, /usr,
  /lib*, /bin, /sbin, `/etc/ld.so.cache` and /dev/{null,zero,random,urandom}, plus the work dir.
  No /proc, /sys, /home, /root, shared /tmp, /dev/shm or /var/tmp; no network, not even loopback;
  no SysV shared memory with the trainer;
- every capability dropped (bounding, ambient, effective, permitted, inheritable), no_new_privs;
  as root, also a fresh random uid, so RLIMIT_NPROC applies (never to root), the code cannot signal
  the trainer, and every process of the run is found and killed at the end, even one that left
  the process group;
- rlimits: CPU seconds and address space per process, processes, output size, no core dumps;
- a wall-clock timeout that kills the whole process group.

Where the machine refuses a namespace or mount (e.g. a container without CAP_SYS_ADMIN and without
user namespaces), `run_python` raises `SandboxUnavailable` instead of running the code unboxed.

The limits are set by a small bootstrap that runs in the child before the user's code, not in
`preexec_fn`: `preexec_fn` is unsafe in a threaded parent (the trainer is) and forces a full
`fork()` of a large trainer process, where a plain Popen can use `vfork`.

Example:
    >>> run_python("print(1 + 1)").stdout
    '2\\n'
"""
from __future__ import annotations

import contextlib
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
from functools import cache

MARKER = "alignkit-sandbox"  # in every sandbox process's argv, so leftovers are recognisable
_UID_BASE, _UID_SPAN = 2_000_000_000, 100_000_000  # far above real users and subuid ranges
_REFUSED = 125  # the bootstrap's exit code when it cannot build the box
# What the box may read besides the interpreter's own prefixes (added by the child).
_READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc/ld.so.cache",
              "/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


class SandboxUnavailable(RuntimeError):
    """This machine cannot build the sandbox (a namespace or mount was refused)."""

# Runs in the child as `python -I -c _BOOTSTRAP MARKER <config json>` (as the trainer's user) before
# the user's code. Order matters: namespaces and mounts need privilege (root, or a fresh user
# namespace), so they come first; then every capability goes; RLIMIT_NPROC comes after the uid drop
# because it counts the processes of the new uid. A step that fails ends the child with exit
# code `_REFUSED` before main.py is read: the code never runs less isolated than described.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[2])
libc = ctypes.CDLL(None, use_errno=True)
def _check(ok, what):
    if not ok:
        sys.stderr.write(f"alignkit-sandbox: cannot {what} ({os.strerror(ctypes.get_errno())}); not running\n")
        os._exit(cfg["refused"])
def _mount(src, dst, fstype, flags, data=None):
    _check(libc.mount(src, dst.encode(), fstype, flags, data) == 0, f"mount {dst}")
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x8000000, 0x10000000, 0x40000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8  # the same bits as statvfs's ST_*
uid, gid = os.getuid(), os.getgid()
flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWNET
_check(libc.unshare(flags if uid == 0 else flags | CLONE_NEWUSER) == 0, "create namespaces")
if uid != 0:  # keep our own ids inside the new user namespace
    for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(line)
# The new root: an empty read-only tmpfs holding read-only binds of the interpreter, its libraries
# and a few devices, and the work dir as the one writable place (no /proc, /sys, /home, /tmp, ...).
_mount(None, "/", None, MS_REC | MS_PRIVATE)
root, bound = cfg["root"], []
_mount(b"tmpfs", root, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
def _expose(path, writable=False):
    real = "/"  # walk the path, recreating its symlinks inside the new root
    for part in path.strip("/").split("/"):
        host = os.path.join(real, part)
        if os.path.islink(host):
            os.makedirs(root + real, exist_ok=True)
            if not os.path.lexists(root + host):
                os.symlink(os.readlink(host), root + host)
            host = os.path.realpath(host)
        real = host
    if any(real == b or real.startswith(b.rstrip("/") + "/") for b in bound):
        return
    inner = root + real
    if os.path.isdir(real):
        os.makedirs(inner, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(inner), exist_ok=True)
        open(inner, "a").close()
    _mount(real.encode(), inner, None, MS_BIND | MS_REC)
    keep = os.statvfs(real).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)  # locked in a user namespace
    _mount(None, inner, None, MS_REMOUNT | MS_BIND | MS_NOSUID | keep | (0 if writable else MS_RDONLY))
    bound.append(real)
_expose(cfg["workdir"], writable=True)
for path in (*cfg["read_only"], sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix):
    if os.path.lexists(path):
        _expose(path)
_mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, b"mode=0755,size=1m")
os.chdir(root)
os.chroot(".")
os.chdir(cfg["workdir"])
# Drop every capability: the bounding set and ambient ones, then effective/permitted/inheritable;
# no_new_privs, so no setuid binary or file capability regains any.
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 24, 38, 47, 4
cap = 0
while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
    cap += 1
_check(cap > 0, "drop the capability bounding set")
_check(libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == 0, "clear ambient capabilities")
if cfg["uid"] is not None:  # root: become an unused uid (RLIMIT_NPROC never applies to root)
    os.setgroups([])
    os.setgid(cfg["uid"])
    os.setuid(cfg["uid"])
class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
_check(libc.capset(ctypes.byref(_CapHeader(0x20080522, 0)), (_CapData * 2)()) == 0, "clear capabilities")
_check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0, "set no_new_privs")
def _limit(kind, soft, hard=None):
    try:
        resource.setrlimit(kind, (soft, soft if hard is None else hard))
    except (ValueError, OSError):
        _check(False, f"set rlimit {kind}")
_limit(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU at soft, SIGKILL at hard
_limit(resource.RLIMIT_AS, cfg["memory_bytes"])
_limit(resource.RLIMIT_FSIZE, cfg["max_output_bytes"])  # also bounds stdout/stderr (files)
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, cfg["max_procs"])  # per uid: a fresh one, or this user namespace's
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
        max_procs: processes and threads of the run (RLIMIT_NPROC): of a fresh uid as root, of
            the child's user namespace otherwise.
        max_output_bytes: cap on each of stdout, stderr and any file the code writes.
        python: interpreter to run (default: this one, so the same packages are importable).

    Returns:
        A `SandboxResult`; never raises for what the child does.

    Raises:
        SandboxUnavailable: this machine cannot build the box (checked once per interpreter, with
            trusted code, so a program cannot fake it).
    """
    reason = isolation_error(python)
    if reason is not None:
        raise SandboxUnavailable(reason)
    return _run(code, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb, max_procs=max_procs,
                max_output_bytes=max_output_bytes, python=python)


@cache
def isolation_error(python: str = sys.executable) -> str | None:
    """Why this machine cannot build the sandbox for `python` (the bootstrap's message), or None."""
    result = _run("pass", timeout_s=30, cpu_s=30, memory_mb=512, max_procs=16, max_output_bytes=1 << 16,
                  python=python)
    if result.returncode == _REFUSED or result.returncode is None:
        return result.stderr.strip() or "the sandbox did not start"
    return None


def _run(code: str, *, timeout_s: float, cpu_s: int, memory_mb: int, max_procs: int,
         max_output_bytes: int, python: str) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix=f"{MARKER}-")
    root = tempfile.mkdtemp(prefix=f"{MARKER}-root-")  # mount point of the child's new root
    uid = _UID_BASE + random.randrange(_UID_SPAN) if os.geteuid() == 0 else None
    timed_out = False
    try:
        with open(os.path.join(workdir, "main.py"), "w") as f:
            f.write(code)
        if uid is not None:
            os.chown(workdir, uid, uid)
        config = {
            "root": root,
            "workdir": workdir,
            "read_only": _READ_ONLY,
            "refused": _REFUSED,
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
        with contextlib.suppress(OSError):
            os.rmdir(root)  # never rmtree: were the child's mounts ever visible here, it would recurse into them


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
