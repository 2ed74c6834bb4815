"""Run untrusted Python (a generated program plus its unit tests) in a bubblewrap sandbox.

One sandbox per program (docs/verifiers.md, Code). Layers, outside in:

1. **bubblewrap**, started as root *without* a user namespace: ``--ro-bind / /`` (the whole host
   read-only), private tmpfs on ``/tmp`` (the work dir ``/tmp/work``) and ``/dev/shm`` (size-capped),
   fresh ``/dev`` and ``/proc``, tmpfs over the directories in ``hide`` (``/root``, ``/home``, ...;
   the interpreter's own prefix is bound back read-only when it lives under one of them),
   ``--unshare-ipc --unshare-pid --unshare-net --unshare-uts --unshare-cgroup-try`` (no network: the
   new net namespace has only its own loopback), ``--die-with-parent``, ``--new-session`` (no TTY
   ioctl injection), ``--as-pid-1``, ``--clearenv`` and a minimal environment (``PATH``, ``HOME``,
   ``LANG``, ``PYTHONDONTWRITEBYTECODE``, one BLAS/OpenMP thread).
   *Why not* ``--unshare-all``: it adds a user namespace whose sandbox uid maps to host root, and
   ``RLIMIT_NPROC`` is never enforced for host root (checked here: 60 forks with a limit of 16), so a
   fork bomb would not be contained. Without the user namespace we drop privileges ourselves (3).
   *Why* ``--as-pid-1``: bwrap's own init reports the program's exit and bwrap returns while that
   init still waits for background processes; it is then orphaned and ends as a zombie of the
   host's pid 1. Our harness is pid 1 instead (2), so the namespace is empty when bwrap returns.
2. **The harness** (``HARNESS`` below, ``python -I -B -S -c``; ``-S``: no ``site``/``.pth``
   processing, the trainer's site-packages directories are appended to ``sys.path`` instead, which
   halves start-up) reads its payload from stdin (a memfd, ``marshal``-encoded: program, tests,
   limits, uid, a random token) and points stdin at ``/dev/null``. As pid 1 it forks: the parent
   stays root and only reaps until the program's process exits, then exits with its status (the
   kernel then kills everything left in the namespace); the program runs in the child, which is
   therefore not pid 1 (no signal immunity) and cannot signal its parent. The child sets rlimits
   (``RLIMIT_CPU``, ``RLIMIT_AS``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``,
   ``RLIMIT_CORE=0``; never ``RLIMIT_STACK``, evalplus PR #225), then
3. **drops root** to an unprivileged uid/gid (``setgroups([])``, ``setgid``, ``setuid``; default: a
   random uid in 60000-60999 per run, so ``RLIMIT_NPROC``, which counts per uid, is not shared with
   other sandboxes or system daemons, and leftover processes are easy to find). It refuses to run
   the program if it is still root.
4. It compiles ``program + "\\n\\n" + tests`` as one module (``__name__ == "__main__"``), executes
   it, flushes, and writes ``"\\n" + token + "\\n"`` with ``os.write`` and ``os._exit(0)``.
   **A run passes only when that token line is in stdout and the exit status is 0**: ``sys.exit(0)``
   or ``os._exit(0)`` before the tests end print no token. The token is not in any file or argv of
   the sandbox; a program that searches the harness's memory (frames, ``gc``) could still find it:
   the token defeats early exits, not in-process introspection (see docs/verifiers.md).
5. **From outside**: a wall-clock deadline over the whole run (sandbox start-up included); stdout
   and stderr are read with ``select`` and their total is capped (``output_limit_bytes``, a flood is
   killed and fails). After a timeout or flood the sandbox's pid 1 (its pid from ``--info-fd``,
   held as a pidfd) is SIGKILLed first, so bwrap reaps it and exits; then bwrap's process group
   (``start_new_session``) is SIGKILLed and bwrap reaped (``wait``; before reaping, the pid cannot
   be recycled), and any process still owned by the run's uid is killed before returning.

Where bubblewrap cannot run (probed once per configuration, cached), :func:`check_available` raises
:class:`SandboxUnavailableError` unless ``allow_unsandboxed=True``; then the same harness runs as a
plain subprocess in a temporary directory: rlimits, ``unshare(CLONE_NEWNET)`` when permitted, the uid
drop when root and the interpreter is readable by others (after the run every process of that uid is
killed), else weaker (documented in docs/verifiers.md).
"""
from __future__ import annotations

import logging
import marshal
import os
import random
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from typing import Mapping

from kat.rewards.sandbox_procs import (count_uid_processes, inner_pidfd, kill_uid, pidfd_open, wait_exit,
                                       world_traversable)

log = logging.getLogger(__name__)

# Exit status the harness uses when it could not set up (limits, privilege drop).
HARNESS_SETUP_FAILED = 112

HARNESS = r'''
import os, sys
def _kat_sandbox():
    import marshal, resource
    data = marshal.loads(sys.stdin.buffer.read())
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    if data["init"]:
        # pid 1 of the sandbox stays root and only reaps: the program runs in a child, so it is
        # neither pid 1 (signal immunity) nor able to signal its parent; when the program's process
        # exits, so does pid 1, and the kernel kills whatever else is left in the namespace.
        child = os.fork()
        if child:
            data = None
            while True:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    os._exit(%(setup_failed)d)
                except InterruptedError:
                    continue
                if pid == child:
                    code = os.waitstatus_to_exitcode(status)
                    os._exit(code if code >= 0 else 128 - code)
    try:
        if data["unshare_net"]:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
                libc.unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET (unprivileged)
        for name, soft, hard in data["limits"]:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        uid = data["uid"]
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        if data["require_unprivileged"] and (os.getuid() == 0 or os.geteuid() == 0):
            raise PermissionError("still running as root")
    except Exception as e:
        sys.stderr.write("kat-sandbox: set-up failed: %s: %s\n" % (type(e).__name__, e))
        sys.stderr.flush()
        os._exit(%(setup_failed)d)
    sys.path.extend(data["sys_path"])
    token = data["token"]
    code = compile(data["source"], "solution.py", "exec")
    data = None
    sys.argv = ["solution.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__, "__file__": "solution.py"})
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass
    os.write(1, ("\n" + token + "\n").encode())
    os._exit(0)
_kat_sandbox()
'''.replace("%(setup_failed)d", str(HARNESS_SETUP_FAILED))


class SandboxUnavailableError(RuntimeError):
    """bubblewrap cannot run here and unsandboxed execution was not allowed."""


@dataclass(frozen=True)
class SandboxConfig:
    """Settings of the code sandbox (Hydra: ``reward.code.*``). Limits apply per program."""

    timeout_s: float | None = None  # wall-clock limit; None: the caller's timeout_s (grade's, default 5 s)
    memory_mb: int = 1024  # RLIMIT_AS of the program
    cpu_s: float | None = None  # RLIMIT_CPU; None: ceil(timeout) + 1
    fsize_mb: int = 8  # RLIMIT_FSIZE: largest file the program may write
    nofile: int = 64  # RLIMIT_NOFILE
    nproc: int = 32  # RLIMIT_NPROC: processes + threads of the sandbox uid
    output_limit_bytes: int = 1 << 20  # stdout + stderr; more is a flood: killed, fails
    tmpfs_mb: int = 64  # size of the private /tmp and of /dev/shm
    uid: int | None = None  # uid/gid to drop to; None: random in uid_range per run
    uid_range: tuple = (60000, 60999)  # inclusive range for random uids
    hide: tuple = ("/root", "/home", "/run", "/mnt", "/media", "/srv", "/var/tmp")  # tmpfs over these
    python: str | None = None  # interpreter inside the sandbox; None: sys.executable
    bwrap: str = "bwrap"  # bubblewrap executable (name on PATH or absolute path)
    site_packages: bool = True  # put the trainer's site-packages on the program's sys.path (.pth files not run)
    allow_unsandboxed: bool = False  # without bubblewrap, run with rlimits only instead of refusing

    def __post_init__(self):
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"reward.code.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "fsize_mb", "nofile", "nproc", "output_limit_bytes", "tmpfs_mb"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"reward.code.{name} must be > 0, got {getattr(self, name)}")
        lo, hi = self.uid_range
        if not 0 < int(lo) <= int(hi):
            raise ValueError(f"reward.code.uid_range must be (lo, hi) with 0 < lo <= hi, got {self.uid_range}")
        if self.uid is not None and int(self.uid) <= 0:
            raise ValueError(f"reward.code.uid must be a non-root uid, got {self.uid}")

    @classmethod
    def coerce(cls, cfg: "SandboxConfig | Mapping | None") -> "SandboxConfig":
        """Accept a SandboxConfig, a mapping (e.g. Hydra's ``reward.code`` DictConfig) or None."""
        if cfg is None:
            return _DEFAULT
        if isinstance(cfg, SandboxConfig):
            return cfg
        if isinstance(cfg, Mapping):  # reward.code: its schema (kat.rl.config.CodeRewardConfig) checks the keys
            kw = {k: cfg[k] for k in cfg}
            for k in ("uid_range", "hide"):
                if k in kw and kw[k] is not None:
                    kw[k] = tuple(kw[k])
            return cls(**kw)
        raise TypeError(f"code config must be SandboxConfig, a mapping or None, got {type(cfg).__name__}")

    def replace(self, **kw) -> "SandboxConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(kw)
        return SandboxConfig(**d)


_DEFAULT = SandboxConfig()


@dataclass
class ExecResult:
    """Outcome of one sandboxed run.

    ``reason``: ``"passed"``, ``"failed"`` (non-zero exit or no token: an assertion, an exception,
    an early exit), ``"timeout"``, ``"output_limit"``, ``"sandbox_error"`` (the sandbox or harness
    could not set up). ``stdout_tail``/``stderr_head`` are for diagnostics only (token removed).
    """

    passed: bool
    reason: str
    returncode: int | None
    timed_out: bool
    elapsed_s: float
    stdout_tail: str
    stderr_head: str
    sandboxed: bool
    uid: int | None


def _python(cfg: SandboxConfig) -> str:
    return cfg.python or sys.executable


def _site_paths(cfg: SandboxConfig) -> list[str]:
    """site-packages directories of the running interpreter (only when it is the sandbox's)."""
    if not cfg.site_packages or (cfg.python and os.path.realpath(cfg.python) != os.path.realpath(sys.executable)):
        return []
    import site

    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _bwrap_path(cfg: SandboxConfig) -> str | None:
    return shutil.which(cfg.bwrap)


def _sandbox_env(home: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _reexpose(paths: set[str], roots: list[str]) -> list[str]:
    """bwrap arguments that bind each of ``paths`` read-only back into the fresh ``roots`` that hide it."""
    args: list[str] = []
    made: set[str] = set()
    for p in sorted(paths):
        root = next((h for h in roots if _under(p, h)), None)
        if root is None or p == root or not os.path.isdir(p):
            continue
        rel = os.path.relpath(p, root).split(os.sep)
        d = root
        for part in rel[:-1]:
            d = os.path.join(d, part)
            if d not in made:
                args += ["--perms", "0755", "--dir", d]
                made.add(d)
        args += ["--ro-bind", p, p]
    return args


def bwrap_argv(cfg: SandboxConfig, bwrap: str) -> list[str]:
    """The full bubblewrap command line (ends with the interpreter running the harness)."""
    python = _python(cfg)
    hidden = [os.path.realpath(h) for h in cfg.hide if os.path.isdir(h)]
    hidden = [h for h in hidden if h not in ("/", "/tmp", "/proc", "/dev", "/usr", "/etc", "/bin", "/lib")]
    args = [bwrap, "--ro-bind", "/", "/"]
    for h in hidden:
        args += ["--tmpfs", h]
    # re-expose the interpreter (venv and base installation) when it lives under a hidden directory
    expose = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    expose.add(os.path.dirname(os.path.realpath(python)))
    expose.add(os.path.dirname(os.path.abspath(python)))
    args += _reexpose(expose, hidden)
    tmp_bytes = str(int(cfg.tmpfs_mb) * 1024 * 1024)
    args += [
        "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/tmp",
        "--perms", "1777", "--dir", "/tmp/work",
    ]
    # an interpreter under /tmp (a venv in a scratch checkout) must survive the fresh /tmp as well
    args += _reexpose(expose, ["/tmp"])
    args += [
        "--dev", "/dev",
        "--perms", "1777", "--size", tmp_bytes, "--tmpfs", "/dev/shm",
        "--proc", "/proc",
        "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--as-pid-1",
        "--chdir", "/tmp/work",
        "--clearenv",
    ]
    for k, v in _sandbox_env("/tmp/work").items():
        args += ["--setenv", k, v]
    args += ["--", python, "-I", "-B", "-S", "-c", HARNESS]
    return args


def _limits(cfg: SandboxConfig, timeout_s: float, nproc_extra: int = 0) -> list:
    import math

    cpu = int(math.ceil(cfg.cpu_s if cfg.cpu_s is not None else timeout_s + 1))
    mb = 1024 * 1024
    return [
        ["RLIMIT_CPU", cpu, cpu + 1],
        ["RLIMIT_AS", int(cfg.memory_mb) * mb, int(cfg.memory_mb) * mb],
        ["RLIMIT_FSIZE", int(cfg.fsize_mb) * mb, int(cfg.fsize_mb) * mb],
        ["RLIMIT_NOFILE", int(cfg.nofile), int(cfg.nofile)],
        ["RLIMIT_NPROC", int(cfg.nproc) + nproc_extra, int(cfg.nproc) + nproc_extra],
        ["RLIMIT_CORE", 0, 0],
    ]


def _payload_fd(payload: dict) -> int:
    # marshal (format 4, Python >= 3.4): loading it costs the harness no import, unlike json (~7 ms)
    data = marshal.dumps(payload, 4)
    try:
        fd = os.memfd_create("kat-sandbox-payload", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        f = tempfile.TemporaryFile()
        fd = os.dup(f.fileno())
        f.close()
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _pick_uid(cfg: SandboxConfig) -> int:
    if cfg.uid is not None:
        return int(cfg.uid)
    lo, hi = (int(x) for x in cfg.uid_range)
    return random.SystemRandom().randint(lo, hi)


# ---------------------------------------------------------------------- availability probe
_probe_cache: dict[tuple, tuple[bool, str]] = {}
_probe_lock = threading.Lock()
_warned_unsandboxed = False


def probe(cfg: SandboxConfig | Mapping | None = None) -> tuple[bool, str]:
    """Whether bubblewrap runs the harness here: ``(ok, detail)``; cached per bwrap/python/uid."""
    cfg = SandboxConfig.coerce(cfg)
    key = (cfg.bwrap, _python(cfg), cfg.uid, tuple(cfg.uid_range), tuple(cfg.hide))
    with _probe_lock:
        if key in _probe_cache:
            return _probe_cache[key]
        bwrap = _bwrap_path(cfg)
        if bwrap is None:
            res = (False, f"bubblewrap executable {cfg.bwrap!r} not found on PATH")
        else:
            r = _run(cfg, "ok = 1\n", "assert ok == 1\n", timeout_s=30.0, bwrap=bwrap)
            if r.passed:
                res = (True, f"bubblewrap {bwrap} ok ({r.elapsed_s * 1000:.0f} ms)")
            else:
                res = (False, f"bubblewrap {bwrap} failed ({r.reason}, exit {r.returncode}): "
                              f"{r.stderr_head.strip()[:500]}")
        _probe_cache[key] = res
        return res


def check_available(cfg: SandboxConfig | Mapping | None = None) -> bool:
    """True when code can run in bubblewrap; False when only the allowed unsandboxed path remains.

    Raises :class:`SandboxUnavailableError` (with the probe's reason and the fixes) otherwise.
    """
    cfg = SandboxConfig.coerce(cfg)
    ok, detail = probe(cfg)
    if ok:
        return True
    if cfg.allow_unsandboxed:
        global _warned_unsandboxed
        if not _warned_unsandboxed:
            log.warning("code rewards run WITHOUT a sandbox (rlimits only): %s", detail)
            _warned_unsandboxed = True
        return False
    raise SandboxUnavailableError(
        f"code rewards need the bubblewrap sandbox, which cannot run here: {detail}. Fix: install "
        "bubblewrap (apt-get install bubblewrap) and run as root or in a container that allows mount/pid/"
        "net namespaces (Docker: --cap-add SYS_ADMIN --security-opt seccomp=unconfined, or --privileged); "
        "or accept the weaker rlimit-only fallback with reward.code.allow_unsandboxed=true "
        "(run_tests(..., config=SandboxConfig(allow_unsandboxed=True)))."
    )


# ---------------------------------------------------------------------- running
def run_python(program: str, tests: str, *, timeout_s: float, config: SandboxConfig | Mapping | None = None
               ) -> ExecResult:
    """Run ``program`` then ``tests`` in the sandbox (or the allowed fallback) within ``timeout_s``."""
    cfg = SandboxConfig.coerce(config)
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if check_available(cfg):
        return _run(cfg, program, tests, timeout_s=timeout_s, bwrap=_bwrap_path(cfg))
    return _run(cfg, program, tests, timeout_s=timeout_s, bwrap=None)


def _run(cfg: SandboxConfig, program: str, tests: str, *, timeout_s: float, bwrap: str | None) -> ExecResult:
    token = "KAT-PASS-" + secrets.token_hex(16)
    uid: int | None = _pick_uid(cfg)
    workdir = None
    nproc_extra = 0
    require_unprivileged = True
    pass_fds: tuple = ()
    info_r = info_w = None
    if bwrap is not None:
        info_r, info_w = os.pipe()
        argv = _bwrap_argv_cached(cfg, bwrap)
        argv = [argv[0], "--info-fd", str(info_w)] + argv[1:]
        pass_fds = (info_w,)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        cwd = None
        unshare_net = False
    else:
        workdir = tempfile.mkdtemp(prefix="kat-code-")
        argv = [_python(cfg), "-I", "-B", "-S", "-c", HARNESS]
        env = _sandbox_env(workdir)
        cwd = workdir
        unshare_net = True
        is_root = os.geteuid() == 0
        import sysconfig

        if is_root and world_traversable(sysconfig.get_paths()["stdlib"]) and world_traversable(_python(cfg)):
            os.chmod(workdir, 0o777)
        else:
            uid = None
            require_unprivileged = False
            if not is_root:  # RLIMIT_NPROC counts every process of our uid: leave room for them
                nproc_extra = count_uid_processes(os.getuid())
    source = program + "\n\n" + tests + "\n"
    payload = {"token": token, "source": source, "sys_path": _site_paths(cfg),
               "limits": _limits(cfg, timeout_s, nproc_extra), "uid": uid,
               "require_unprivileged": require_unprivileged, "unshare_net": unshare_net,
               "init": bwrap is not None}
    stdin_fd = _payload_fd(payload)
    t0 = time.monotonic()
    deadline = t0 + float(timeout_s)
    try:
        proc = subprocess.Popen(argv, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, cwd=cwd, close_fds=True, pass_fds=pass_fds, start_new_session=True)
    except OSError as e:
        for fd in (stdin_fd, info_r, info_w):
            if fd is not None:
                os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return ExecResult(False, "sandbox_error", None, False, 0.0, "", f"cannot start: {e}", bwrap is not None, uid)
    os.close(stdin_fd)
    if info_w is not None:
        os.close(info_w)
    out, err, info = bytearray(), bytearray(), bytearray()
    reason, timed_out, total, err_keep = None, False, 0, 16384
    pidfd = pidfd_open(proc.pid)
    inner_fd = None  # pidfd of the sandbox's pid 1 (the harness), from bwrap's --info-fd
    sel = selectors.DefaultSelector()
    try:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        if info_r is not None:
            sel.register(info_r, selectors.EVENT_READ, "info")
        open_streams = 2
        while open_streams and reason is None:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 65536)
                if key.data == "info":
                    if chunk:
                        info += chunk
                    else:
                        sel.unregister(key.fileobj)
                        inner_fd = inner_pidfd(bytes(info), proc.pid)
                    continue
                if not chunk:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                total += len(chunk)
                if key.data == "out":
                    out += chunk
                elif len(err) < err_keep:
                    err += chunk[: err_keep - len(err)]
                if total > cfg.output_limit_bytes:
                    reason = "output_limit"
                    break
        if not timed_out and reason is None:
            # both pipes closed: wait (without reaping) for the exit, still bounded by the deadline
            timed_out = not wait_exit(proc, pidfd, deadline)
    finally:
        sel.close()
        abnormal = timed_out or reason is not None
        if abnormal and inner_fd is not None:
            # Kill the sandbox's pid 1 first: the kernel then kills the whole pid namespace and bwrap
            # reaps its child and exits (killing bwrap first would orphan pid 1 as a zombie).
            try:
                signal.pidfd_send_signal(inner_fd, signal.SIGKILL)
            except OSError:
                pass
            wait_exit(proc, pidfd, time.monotonic() + 1.0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # pid not yet reaped: cannot hit a recycled group
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        for fd in (pidfd, inner_fd, info_r):
            if fd is not None:
                os.close(fd)
        for f in (proc.stdout, proc.stderr):
            f.close()
        # A normal bwrap exit leaves nothing (pid 1 is the harness; its exit tears the namespace
        # down before bwrap returns). After a kill, and always without bwrap, make sure that no
        # process of the run's uid survives this call.
        if uid is not None and (bwrap is None or abnormal):
            kill_uid(uid)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t0
    rc = proc.returncode
    line = ("\n" + token + "\n").encode()
    if timed_out:
        reason = "timeout"
    elif reason is None:
        if rc == HARNESS_SETUP_FAILED and b"kat-sandbox: set-up failed" in err:
            reason = "sandbox_error"
        elif rc == 0 and line in out:
            reason = "passed"
        elif bwrap is not None and rc == 1 and err.startswith(b"bwrap:"):
            reason = "sandbox_error"
        else:
            reason = "failed"
    tail = bytes(out[-4096:]).replace(token.encode(), b"<token>").decode("utf-8", "replace")
    return ExecResult(reason == "passed", reason, rc, timed_out, elapsed, tail,
                      bytes(err).decode("utf-8", "replace"), bwrap is not None, uid)


_argv_cache: dict = {}


def _bwrap_argv_cached(cfg: SandboxConfig, bwrap: str) -> list[str]:
    key = (cfg, bwrap, sys.executable)
    argv = _argv_cache.get(key)
    if argv is None:
        argv = _argv_cache[key] = bwrap_argv(cfg, bwrap)
    return argv
