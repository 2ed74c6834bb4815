"""A small pool of persistent worker processes with a *hard* per-task timeout.

Why not ``multiprocessing.Pool`` / ``concurrent.futures.ProcessPoolExecutor``: neither can kill one
task that hangs (a SymPy simplification can run for hours inside one C call; ``signal.alarm`` only
works on the main thread, Math-Verify #50/#55, and a thread cannot be stopped at all), and both
deadlock or leak zombies when a worker is killed behind their back (verl #288, #3290, PR #7254).
``spawn``/``forkserver`` contexts also re-import the caller's ``__main__`` (a Hydra entry point), which
we do not want in a grading worker.

Design (everything here is stdlib):

* Each worker is ``python -c "from kat.rewards.pool import _worker_main; _worker_main()" HANDLER MEM``
  started with :class:`subprocess.Popen` (``posix_spawn``/``vfork``: cheap even from a trainer holding
  GBs). ``HANDLER`` is ``"module:factory"``; the worker imports it, calls ``factory()`` once (heavy
  imports and warm-up happen here, off the request path) and announces ``{"ready": true}``.
* Requests and replies are one JSON object per line on the worker's stdin/stdout. The worker moves
  its real stdout to a private fd and points fd 1 at ``/dev/null`` so library prints cannot corrupt
  the protocol. A handler may send *progress* messages before its final reply (the math verifier
  reports "gold parsed" so the caller can tell a hung gold from a hung prediction).
* :meth:`WorkerPool.call` picks an idle worker (starting one lazily, up to ``size``), sends the
  request and waits with ``select`` until the reply or the deadline. On timeout the worker is
  SIGKILLed, reaped (``wait()``: no zombie) and replaced by a fresh process that starts warming up
  immediately; the call returns a :class:`Reply` with ``timed_out=True``. A worker that dies
  (segfault, ``RLIMIT_AS``) is replaced the same way (``crashed=True``).
* The timeout covers the task only. Waiting for an idle worker and for a (re)started worker to finish
  its imports is bounded separately by ``startup_timeout_s``.
* Workers have ``RLIMIT_AS`` (``memory_limit_mb``), exit on EOF of stdin, and a watchdog thread exits
  them when the parent disappears (re-parenting). :meth:`WorkerPool.close` (also registered with
  ``atexit``) kills and reaps all of them. A pool used after ``fork()`` in a child process refuses
  (the pipes belong to the parent); module-level pools check the pid and build a fresh one.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable


class WorkerStartupError(RuntimeError):
    """A worker could not start (import error in the handler, or no ready signal in time)."""


@dataclass
class Reply:
    """Outcome of one :meth:`WorkerPool.call`.

    ``result`` is the handler's reply (a dict) when the task finished; ``progress`` the progress
    messages received before it (or before the timeout). ``elapsed_s`` counts from sending the task.
    """

    result: dict | None = None
    progress: list[dict] = field(default_factory=list)
    timed_out: bool = False
    crashed: bool = False
    elapsed_s: float = 0.0


def _src_root() -> str:
    """Directory that holds the ``kat`` package (put on the worker's PYTHONPATH)."""
    import kat

    return os.path.dirname(os.path.dirname(os.path.abspath(kat.__file__)))


class _Worker:
    def __init__(self, handler: str, memory_limit_mb: int, env: dict[str, str]):
        cmd = [
            sys.executable,
            "-c",
            "from kat.rewards.pool import _worker_main; _worker_main()",
            handler,
            str(int(memory_limit_mb)),
            str(os.getpid()),
        ]
        # start_new_session: a Ctrl-C in the terminal goes to the trainer, which then closes the pool;
        # the workers never see a SIGINT halfway through a reply.
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buf = bytearray()
        self.ready = False
        self.started = time.monotonic()

    def send(self, obj: dict) -> None:
        self.proc.stdin.write(json.dumps(obj).encode("utf-8") + b"\n")
        self.proc.stdin.flush()

    def read(self, deadline: float) -> dict | None:
        """Next message, or None at the deadline. Raises EOFError when the worker died."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                return json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise EOFError("worker exited")
            self.buf += chunk

    def kill(self) -> None:
        """SIGKILL and reap (never leaves a zombie)."""
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class WorkerPool:
    """Up to ``size`` persistent workers running ``handler`` (``"module:factory"``), thread-safe.

    Args:
        handler: ``"module:factory"``; ``factory()`` runs once per worker and returns
            ``handle(request: dict, emit: Callable[[dict], None]) -> dict``.
        size: maximum number of worker processes (started lazily, one per concurrent caller).
        memory_limit_mb: ``RLIMIT_AS`` of each worker (0 = unlimited).
        startup_timeout_s: how long a caller may wait for a worker to become ready.
    """

    def __init__(self, handler: str, *, size: int = 1, memory_limit_mb: int = 2048,
                 startup_timeout_s: float = 120.0):
        if not isinstance(handler, str) or handler.count(":") != 1:
            raise ValueError(f"handler must be 'module:factory', got {handler!r}")
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.handler = handler
        self.size = int(size)
        self.memory_limit_mb = int(memory_limit_mb)
        self.startup_timeout_s = float(startup_timeout_s)
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._closed = False
        #: lifetime counters (tasks, timeouts, crashes, restarts)
        self.counters = {"tasks": 0, "timeouts": 0, "crashes": 0, "restarts": 0}
        env = dict(os.environ)
        root = _src_root()
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = "1"
        self._env = env
        self._finalizer = weakref.finalize(self, WorkerPool._kill_all, self._all, self._pid)
        atexit.register(self._finalizer)

    # ------------------------------------------------------------------ lifecycle
    @staticmethod
    def _kill_all(workers: list[_Worker], owner_pid: int) -> None:
        if os.getpid() != owner_pid:  # a forked child must not touch the parent's workers
            return
        for w in list(workers):
            w.kill()
        workers.clear()

    def close(self) -> None:
        """Kill and reap every worker. Idempotent; a later :meth:`call` raises."""
        with self._cond:
            self._closed = True
            self._idle.clear()
            self._cond.notify_all()
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def ensure_size(self, size: int) -> None:
        """Allow at least ``size`` workers (never shrinks)."""
        with self._cond:
            self.size = max(self.size, int(size))
            self._cond.notify_all()

    def n_workers(self) -> int:
        with self._cond:
            return len(self._all)

    def pids(self) -> list[int]:
        with self._cond:
            return [w.proc.pid for w in self._all]

    def _spawn(self) -> _Worker:
        w = _Worker(self.handler, self.memory_limit_mb, self._env)
        self._all.append(w)
        return w

    def _acquire(self, deadline: float) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("WorkerPool is closed")
                if self._idle:
                    return self._idle.pop()
                if len(self._all) < self.size:
                    return self._spawn()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no idle worker within {self.startup_timeout_s:.0f} s")
                self._cond.wait(left)

    def _release(self, w: _Worker) -> None:
        with self._cond:
            if self._closed:
                return
            self._idle.append(w)
            self._cond.notify()

    def _replace(self, w: _Worker) -> _Worker | None:
        """Kill ``w`` and start its successor (which warms up in the background)."""
        w.kill()
        with self._cond:
            if w in self._all:
                self._all.remove(w)
            self.counters["restarts"] += 1
            if self._closed:
                return None
            return self._spawn()

    def _wait_ready(self, w: _Worker, deadline: float) -> None:
        if w.ready:
            return
        try:
            msg = w.read(deadline)
        except EOFError:
            msg = {"ready": False, "error": f"worker exited with code {w.proc.wait()}"}
        if msg is None:
            msg = {"ready": False, "error": f"not ready within {self.startup_timeout_s:.0f} s"}
        if not msg.get("ready"):
            self._drop(w)
            raise WorkerStartupError(f"reward worker {self.handler!r} failed to start: {msg.get('error')}")
        w.ready = True

    def _drop(self, w: _Worker) -> None:
        w.kill()
        with self._cond:
            if w in self._all:
                self._all.remove(w)
            self._cond.notify()

    def warm_up(self, n: int | None = None) -> None:
        """Start ``n`` (default ``size``) workers now and wait until they are ready."""
        n = self.size if n is None else min(int(n), self.size)
        deadline = time.monotonic() + self.startup_timeout_s
        taken = []
        try:
            for _ in range(n):
                with self._cond:
                    if self._idle:
                        w = self._idle.pop()
                    elif len(self._all) < self.size:
                        w = self._spawn()
                    else:
                        break
                taken.append(w)
            for w in taken:
                self._wait_ready(w, deadline)
        finally:
            for w in taken:
                if w.proc.poll() is None and w in self._all:
                    self._release(w)

    # ------------------------------------------------------------------ the call
    def call(self, request: dict, *, timeout_s: float,
             on_progress: Callable[[dict], None] | None = None) -> Reply:
        """Run one task; never waits more than ``timeout_s`` for it once a worker is ready."""
        if os.getpid() != self._pid:
            raise RuntimeError("WorkerPool used in a forked child; build a new pool in the child")
        if not timeout_s or timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        w = self._acquire(time.monotonic() + self.startup_timeout_s)
        try:
            self._wait_ready(w, time.monotonic() + self.startup_timeout_s)
        except BaseException:
            self._drop(w)  # idempotent; frees the slot for the next caller
            raise
        reply = Reply()
        t0 = time.monotonic()
        deadline = t0 + float(timeout_s)
        try:
            w.send(request)
            while True:
                msg = w.read(deadline)
                if msg is None:
                    reply.timed_out = True
                    break
                if "progress" in msg:
                    reply.progress.append(msg["progress"])
                    if on_progress is not None:
                        on_progress(msg["progress"])
                    continue
                reply.result = msg
                break
        except (EOFError, OSError, ValueError):  # died mid-task, or a garbled reply
            reply.crashed = True
        except BaseException:  # KeyboardInterrupt mid-task: the worker's state is unknown
            self._drop(w)
            raise
        reply.elapsed_s = time.monotonic() - t0
        with self._cond:
            self.counters["tasks"] += 1
            if reply.timed_out:
                self.counters["timeouts"] += 1
            if reply.crashed:
                self.counters["crashes"] += 1
        if reply.timed_out or reply.crashed:
            w2 = self._replace(w)
            if w2 is not None:
                self._release(w2)
        else:
            self._release(w)
        return reply


# ---------------------------------------------------------------------- worker side
def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _worker_main() -> None:
    """Entry point of a worker process (see the module docstring for the protocol)."""
    handler_spec, mem_mb, parent_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    lock = threading.Lock()

    def emit_raw(obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8") + b"\n"
        with lock:
            view = memoryview(data)
            while view:
                n = os.write(out_fd, view)
                view = view[n:]

    if mem_mb > 0:
        import resource

        lim = mem_mb * 1024 * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ValueError, OSError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        import importlib

        mod_name, fn_name = handler_spec.split(":")
        handle = getattr(importlib.import_module(mod_name), fn_name)()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
        emit_raw({"ready": False, "error": f"{type(e).__name__}: {e}"})
        os._exit(1)
    emit_raw({"ready": True})
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            os._exit(0)
        try:
            req = json.loads(line)
        except ValueError as e:
            emit_raw({"error": f"bad request: {e}"})
            continue
        try:
            res: Any = handle(req, lambda p: emit_raw({"progress": p}))
            emit_raw(res)
        except MemoryError:
            emit_raw({"error": "MemoryError"})
            os._exit(3)  # state may be broken: let the parent start a fresh worker
        except BaseException as e:  # noqa: BLE001
            emit_raw({"error": f"{type(e).__name__}: {e}"})
