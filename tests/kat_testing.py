"""Helpers shared by kat's tests (importable because pytest puts tests/ on sys.path)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def run_module(args, *, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` in a subprocess with the test environment."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set for the test process only (tests/conftest.py); a run sets it explicitly
    env.setdefault("OMP_NUM_THREADS", "2")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
