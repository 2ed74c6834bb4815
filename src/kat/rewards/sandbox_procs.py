"""Process bookkeeping of the code sandbox (kat.rewards.sandbox): the processes of a per-run uid, killing them
all, pidfds of the sandboxed child, and waiting for it without reaping."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time

log = logging.getLogger("kat.rewards.sandbox")


def pids_of_uid(uid: int) -> list[int]:
    """Pids of live processes whose real uid is ``uid`` (a /proc scan; zombies excluded)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                status = f.read()
        except OSError:
            continue
        state = uid_line = None
        for line in status.splitlines():
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uid_line = line.split()
                break
        if uid_line and int(uid_line[1]) == uid and state != "Z":
            out.append(int(name))
    return out


def kill_uid(uid: int, wait_s: float = 2.0) -> bool:
    """SIGKILL every process of ``uid`` until none is left (at most ``wait_s``); True when none is.

    Only used with the per-run uid, which nothing else on the machine uses (a fork bomb is bounded by
    ``RLIMIT_NPROC``, so the loop converges).
    """
    end = time.monotonic() + wait_s
    while True:
        pids = pids_of_uid(uid)
        if not pids:
            return True
        if time.monotonic() > end:
            log.warning("sandbox uid %d still has processes %s after SIGKILL", uid, pids[:10])
            return False
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.002)


def world_traversable(path: str) -> bool:
    """Whether every directory on the way to ``path`` is searchable by others (o+x)."""
    p = os.path.realpath(path)
    while True:
        try:
            if not os.stat(p).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(p)
        if parent == p:
            return True
        p = parent


def count_uid_processes(uid: int) -> int:
    return len(pids_of_uid(uid))


def pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def inner_pidfd(info: bytes, bwrap_pid: int) -> int | None:
    """pidfd of the sandbox's pid 1 named in bwrap's info JSON, if it is still bwrap's child."""
    try:
        child = int(json.loads(info.decode())["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None
    fd = pidfd_open(child)
    if fd is None:
        return None
    try:  # the pidfd pins the process; make sure it is not a recycled pid
        with open(f"/proc/{child}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = -1
    if ppid != bwrap_pid:
        os.close(fd)
        return None
    return fd


def wait_exit(proc: subprocess.Popen, pidfd: int | None, deadline: float) -> bool:
    """Wait until ``proc`` exits (not reaping it) or the deadline passes; True when it exited."""
    if pidfd is not None:
        left = max(0.0, deadline - time.monotonic())
        import select

        r, _, _ = select.select([pidfd], [], [], left)
        return bool(r)
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        time.sleep(0.002)
    return False
