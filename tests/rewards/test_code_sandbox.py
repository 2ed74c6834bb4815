"""kat.rewards.code.run_tests: pass only on the harness token; hostile programs score 0, leave nothing.

Every hostile case is checked for (1) a False result, (2) a return within its timeout plus start-up,
(3) no process left with the run's uid (a /proc scan; the harness drops to a per-run uid), and
(4) no zombie children of the test process.
"""
from __future__ import annotations

import os
import socket
import time
import uuid

import pytest

from kat.rewards import code, sandbox, sandbox_procs
from kat.rewards.sandbox import SandboxConfig, SandboxUnavailableError

BWRAP_OK, BWRAP_DETAIL = sandbox.probe()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {BWRAP_DETAIL}")

TIMEOUT = 1.0  # per hostile program; the wall limit covers sandbox start-up too
SLACK = 1.5  # kill + reap + /proc scan


def _zombie_children() -> list[int]:
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == me:
            out.append(int(name))
    return out


def _run_clean(program: str, tests: str = "assert True", timeout_s: float = TIMEOUT, **kw):
    t0 = time.monotonic()
    res = code.run_tests_detailed(program, tests, timeout_s=timeout_s, **kw)
    elapsed = time.monotonic() - t0
    assert elapsed < timeout_s + SLACK, (elapsed, res)
    if res.uid is not None:
        assert sandbox_procs.pids_of_uid(res.uid) == [], f"processes left behind: {res}"
    assert _zombie_children() == []
    return res


@needs_bwrap
def test_passing_program_and_failing_assertion():
    assert code.run_tests("def f(x):\n    return x + 132", "assert f(0) == 132\nassert f(3) == 135")
    res = _run_clean("def f(x):\n    return x + 131", "assert f(0) == 132")
    assert not res.passed and res.reason == "failed" and "AssertionError" in res.stderr_head
    assert res.sandboxed and res.uid is not None


@needs_bwrap
def test_fenced_answer_and_syntax_error():
    assert code.run_tests("```python\nf = lambda x: x + 2\n```", "assert f(1) == 3")
    assert code.strip_fences("```\nx = 1\n") == "x = 1\n"  # an unclosed fence runs to the end
    assert code.strip_fences("x = 1") == "x = 1"
    assert not _run_clean("def f(:\n  pass").passed


@needs_bwrap
@pytest.mark.parametrize(
    "name, program",
    [
        ("sys_exit_0", "import sys\nsys.exit(0)"),
        ("os_exit_0", "import os\nos._exit(0)"),
        ("raise_systemexit", "raise SystemExit"),
        ("kill_parent", "import os\nos.kill(os.getppid(), 9)"),
        ("kill_all", "import os\nos.kill(-1, 9)"),
        ("memory_bomb", "x = bytearray(8 << 30)"),
        ("memory_creep", "l = []\nwhile True:\n    l.append(b'x' * (1 << 20))"),
        ("infinite_loop", "while True:\n    pass"),
        ("sleep", "import time\ntime.sleep(60)"),
        ("fork_bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
        ("stdout_flood", "while True:\n    print('x' * 1000)"),
        ("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('x' * 1000)"),
        ("big_file", "open('big', 'wb').write(b'x' * (64 << 20))"),
        ("read_secrets", "print(open('/etc/shadow').read())"),
        ("stdin_read", "input()"),
    ],
)
def test_hostile_programs_score_zero_and_leave_nothing(name, program):
    # the tests would pass: only the program's behaviour can fail the run
    res = _run_clean(program, "assert True")
    assert not res.passed, res
    assert res.reason in ("failed", "timeout", "output_limit"), res


@needs_bwrap
def test_timeout_reason_and_flood_reason():
    assert _run_clean("while True:\n    pass").reason == "timeout"
    assert _run_clean("while True:\n    print('x' * 1000)").reason == "output_limit"


@needs_bwrap
def test_no_network():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        prog = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
        res = _run_clean(prog)
        assert not res.passed
        with pytest.raises(BlockingIOError):
            srv.accept()  # the sandbox's loopback is not the host's
        res = _run_clean("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)")
        assert not res.passed
    finally:
        srv.close()


@needs_bwrap
def test_writes_outside_the_sandbox_fail_and_leave_nothing(tmp_path):
    tag = uuid.uuid4().hex
    targets = [f"/etc/kat-{tag}", f"/work/kat-{tag}", str(tmp_path / f"kat-{tag}"), f"/tmp/kat-{tag}"]
    for target in targets[:3]:
        res = _run_clean(f"open({target!r}, 'w').write('x')")
        # read-only bind of the host, or (for the host's /tmp) not even visible
        assert not res.passed and any(m in res.stderr_head for m in ("Read-only", "denied", "No such file")), res
    # the private /tmp is writable inside, and invisible outside
    assert _run_clean(f"open({targets[3]!r}, 'w').write('x')").passed
    assert not any(os.path.exists(t) for t in targets)


@needs_bwrap
@pytest.mark.parametrize(
    "program",
    [
        "import subprocess\nsubprocess.Popen(['sleep', '30'])",
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n    os._exit(0)",
        "import os, time\nif os.fork() == 0:\n    if os.fork() == 0:\n        time.sleep(30)\n    os._exit(0)",
    ],
    ids=["popen", "setsid_fork", "double_fork"],
)
def test_background_processes_do_not_outlive_the_run(program):
    # the program itself is fine (its tests pass), but nothing it started may survive the run
    assert _run_clean(program, "assert True", timeout_s=5.0).passed
    assert not _run_clean(program, "assert False", timeout_s=5.0).passed


@needs_bwrap
def test_token_is_not_forgeable_by_printing():
    res = _run_clean("print('KAT-PASS-' + '0' * 32)\nimport os\nos._exit(0)")
    assert not res.passed


@needs_bwrap
def test_program_runs_unprivileged_with_minimal_env():
    prog = "import os, sys\nprint(os.getuid(), sorted(os.environ), os.getcwd(), os.listdir('/root'))"
    res = _run_clean(prog, "import os\nassert os.getuid() != 0 and os.geteuid() != 0")
    assert res.passed, res
    assert "'PATH'" in res.stdout_tail and "AWS" not in res.stdout_tail and "/tmp/work" in res.stdout_tail


def test_missing_bubblewrap_raises_unless_allowed():
    cfg = SandboxConfig(bwrap="kat-no-such-bwrap")
    with pytest.raises(SandboxUnavailableError, match="allow_unsandboxed"):
        code.run_tests("x = 1", "assert x == 1", config=cfg)
    # explicitly allowed: the weaker rlimit-only path still runs the harness (token, exit status)
    assert code.run_tests("x = 1", "assert x == 1", config=cfg, allow_unsandboxed=True)
    res = _run_clean("x = 1", "assert x == 2", config=cfg, allow_unsandboxed=True)
    assert not res.passed and not res.sandboxed
    assert not _run_clean("import sys\nsys.exit(0)", config=cfg, allow_unsandboxed=True).passed
    assert _run_clean("while True:\n    pass", config=cfg, allow_unsandboxed=True).reason == "timeout"


def test_config_coercion_from_hydra_style_mapping():
    cfg = SandboxConfig.coerce({"memory_mb": 512, "hide": ["/root"], "uid_range": [61000, 61010],
                                "allow_unsandboxed": True, "timeout_s": 2})
    assert cfg.memory_mb == 512 and cfg.hide == ("/root",) and cfg.uid_range == (61000, 61010)
    with pytest.raises(TypeError, match="'memory'"):  # reward.code typos fail at compose time (kat.rl.config)
        SandboxConfig.coerce({"memory": 1})
    with pytest.raises(ValueError, match="nproc"):
        SandboxConfig(nproc=0)
    with pytest.raises(ValueError, match="uid"):
        SandboxConfig(uid=0)
    with pytest.raises(TypeError, match="program"):
        code.run_tests(None, "assert True")


@needs_bwrap
def test_interpreter_under_tmp_survives_the_fresh_tmp(tmp_path):
    """A venv in a scratch checkout under /tmp (the sandbox mounts a fresh /tmp) still runs the harness."""
    venv_bin = tmp_path / "checkout" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(os.path.realpath(__import__("sys").executable))
    cfg = SandboxConfig(python=str(venv_bin / "python"), site_packages=False)
    argv = sandbox.bwrap_argv(cfg, "bwrap")
    tmpfs = argv.index("/tmp", argv.index("--tmpfs"))
    assert str(venv_bin) in argv[tmpfs:]  # bound back after the fresh /tmp
    assert code.run_tests("def f(x):\n    return x + 1\n", "assert f(1) == 2", timeout_s=TIMEOUT, config=cfg)
