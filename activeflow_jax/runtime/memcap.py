"""Run a process inside a Linux memory cgroup with a hard cap (page cache counted).

"Same memory" comparisons (our engine against llama.cpp's mmap, DESIGN.md section 5) put each
process alone in one cgroup with the same cap: the kernel then charges the process's anonymous
memory *and* the page cache it causes to the cap, and reclaims (or kills) at the limit, as a
phone or laptop with that much free DRAM would. cgroup v1 (`memory.limit_in_bytes`) and v2
(`memory.max`) are both handled, whichever the machine mounts; creating one needs root.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from activeflow_jax.errors import ActiveFlowError

V1_ROOT = "/sys/fs/cgroup/memory"
V2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


class CgroupUnavailableError(ActiveFlowError):
    """No memory cgroup can be created here (not Linux, not root, or no memory controller)."""


@dataclasses.dataclass
class CappedRun:
    """What a command did inside its cgroup."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    cap_bytes: int
    peak_bytes: int | None  # the cgroup's high-water mark (anonymous memory + page cache)
    oom_killed: bool  # the kernel killed a process of the cgroup at the cap
    version: int  # cgroup version used (1 or 2)
    read_bytes: int = 0  # bytes the child (and its waited-for children) read from storage
    max_rss_bytes: int = 0  # the child's own peak RSS (not counting page cache)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _v2_root() -> str | None:
    for root in V2_ROOTS:
        controllers = _read(os.path.join(root, "cgroup.controllers"))
        if controllers is not None and "memory" in controllers.split():
            return root
    return None


def available() -> str | None:
    """None if a memory cgroup can be made here, else the reason in words."""
    if not os.path.isdir("/sys/fs/cgroup"):
        return "this is not Linux with cgroups (/sys/fs/cgroup is missing)"
    if os.geteuid() != 0:
        return "creating a memory cgroup needs root (run as root, or inside a container that grants it)"
    if os.path.isfile(os.path.join(V1_ROOT, "memory.limit_in_bytes")) and os.access(V1_ROOT, os.W_OK):
        return None
    root = _v2_root()
    if root is not None and os.access(root, os.W_OK):
        subtree = _read(os.path.join(root, "cgroup.subtree_control")) or ""
        if "memory" in subtree.split():
            return None
        try:
            _write(os.path.join(root, "cgroup.subtree_control"), "+memory")
            return None
        except OSError as exc:
            return f"cannot enable the memory controller under {root}: {exc}"
    return "no writable memory cgroup hierarchy (neither v1 memory.limit_in_bytes nor v2 memory.max)"


def drop_caches() -> bool:
    """Writes back dirty pages and drops the whole page cache (root only); False if not allowed."""
    try:
        os.sync()
        _write("/proc/sys/vm/drop_caches", "3")
        return True
    except OSError:
        return False


class MemoryCgroup:
    """A fresh memory cgroup with a cap; `run` starts commands inside it; removed on `close`."""

    def __init__(self, cap_bytes: int, name: str | None = None):
        reason = available()
        if reason is not None:
            raise CgroupUnavailableError(f"cannot cap memory with a cgroup: {reason}")
        if not isinstance(cap_bytes, int) or cap_bytes <= 0:
            raise ValueError(f"cap_bytes must be a positive int, got {cap_bytes!r}")
        self.cap_bytes = cap_bytes
        name = name or f"activeflow-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if os.path.isfile(os.path.join(V1_ROOT, "memory.limit_in_bytes")):
            self.version, self.path = 1, os.path.join(V1_ROOT, name)
            os.makedirs(self.path)
            # swap is off on our machines; where it is on, the memsw limit keeps the cap honest
            _write(os.path.join(self.path, "memory.limit_in_bytes"), str(cap_bytes))
            memsw = os.path.join(self.path, "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                try:
                    _write(memsw, str(cap_bytes))
                except OSError:
                    pass
        else:
            root = _v2_root()
            self.version, self.path = 2, os.path.join(root, name)
            os.makedirs(self.path)
            _write(os.path.join(self.path, "memory.max"), str(cap_bytes))
            if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                _write(os.path.join(self.path, "memory.swap.max"), "0")

    def _procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def peak_bytes(self) -> int | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        text = _read(os.path.join(self.path, name))
        return int(text) if text and text.strip().isdigit() else None

    def oom_kills(self) -> int:
        if self.version == 1:
            text = _read(os.path.join(self.path, "memory.oom_control")) or ""
        else:
            text = _read(os.path.join(self.path, "memory.events")) or ""
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def run(self, argv: list[str], *, timeout: float | None = None, env: dict | None = None,
            cwd: str | None = None) -> CappedRun:
        """Runs argv as a child placed in this cgroup before it executes (so every byte it and
        its children touch is charged); returns its output, time, the cgroup's peak and OOM kills."""
        procs = self._procs_file()
        kills_before = self.oom_kills()

        def enter() -> None:  # runs in the child between fork and exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        start = time.perf_counter()
        # outputs go to files and the child is reaped with wait4, whose rusage gives the bytes it
        # read from storage (ru_inblock, 512-byte units) and its own peak RSS
        with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
            proc = subprocess.Popen(argv, stdout=out_file, stderr=err_file, text=True, env=env, cwd=cwd,
                                    preexec_fn=enter)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer is not None:
                timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                if timer is not None:
                    timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            seconds = time.perf_counter() - start
            out_file.seek(0)
            err_file.seek(0)
            out, err = out_file.read(), err_file.read()
        if timer is not None and not timer.is_alive() and proc.returncode == -9 and seconds >= timeout:
            err += f"\n[killed after {timeout} s]"
        max_rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return CappedRun(proc.returncode, out, err, seconds, self.cap_bytes, self.peak_bytes(),
                         self.oom_kills() > kills_before, self.version, usage.ru_inblock * 512, max_rss)

    def close(self) -> None:
        for _ in range(50):  # the kernel refuses rmdir until the last task has left
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)

    def __enter__(self) -> "MemoryCgroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_capped(argv: list[str], cap_bytes: int, *, timeout: float | None = None, env: dict | None = None,
               cwd: str | None = None, cold: bool = True) -> CappedRun:
    """Runs argv alone in a new memory cgroup capped at cap_bytes; cold: drop caches first."""
    with MemoryCgroup(cap_bytes) as group:
        if cold:
            drop_caches()
        return group.run(argv, timeout=timeout, env=env, cwd=cwd)
