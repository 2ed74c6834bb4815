"""Code rewards: run the ``<answer>`` program and the sample's unit tests in the sandbox.

``run_tests(program, tests)`` is True only when the program and every assertion in ``tests`` ran
to the end inside the sandbox (a random per-run token printed after the last statement appears in
stdout and the exit status is 0); an exception, a failed assertion, an early ``sys.exit(0)`` /
``os._exit(0)``, a timeout, a memory or process limit, or an output flood all give False. The
sandbox itself is described in :mod:`kat.rewards.sandbox`; settings come from
:class:`~kat.rewards.sandbox.SandboxConfig` (Hydra ``reward.code.*``).

Measured on the 2-core development machine (docs/verifiers.md): about 20 ms of sandbox, interpreter
and harness start-up per program when the machine is idle, 30-55 ms under load.
"""
from __future__ import annotations

import re
from typing import Mapping

from kat.rewards.sandbox import (
    ExecResult,
    SandboxConfig,
    SandboxUnavailableError,
    check_available,
    probe,
    run_python,
)

__all__ = [
    "ExecResult",
    "SandboxConfig",
    "SandboxUnavailableError",
    "check_available",
    "probe",
    "run_tests",
    "run_tests_detailed",
    "strip_fences",
]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def strip_fences(text: str) -> str:
    """The code of a Markdown-fenced answer: the first fenced block (an unclosed fence runs to the
    end); text without fences is returned unchanged. ``"```python\\nx=1\\n```"`` -> ``"x=1\\n"``."""
    m = _FENCE.search(text)
    if m is None:
        return text
    return m.group(2)


def run_tests_detailed(program: str, tests: str, *, timeout_s: float = 5.0,
                       config: SandboxConfig | Mapping | None = None, **overrides) -> ExecResult:
    """Like :func:`run_tests` but returns the :class:`~kat.rewards.sandbox.ExecResult` (reason,
    exit status, elapsed time, output excerpts). ``overrides`` replace fields of ``config``, e.g.
    ``allow_unsandboxed=True``, ``memory_mb=512``."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not isinstance(tests, str):
        raise TypeError(f"tests must be a str, got {type(tests).__name__}")
    cfg = SandboxConfig.coerce(config)
    if overrides:
        cfg = cfg.replace(**overrides)
    return run_python(strip_fences(program), tests, timeout_s=timeout_s, config=cfg)


def run_tests(program: str, tests: str, *, timeout_s: float = 5.0,
              config: SandboxConfig | Mapping | None = None, **overrides) -> bool:
    """True when ``program`` (the answer text; Markdown fences are stripped) followed by ``tests``
    runs to completion in the sandbox within ``timeout_s`` wall-clock seconds.

    Raises :class:`~kat.rewards.sandbox.SandboxUnavailableError` when bubblewrap cannot run and
    ``allow_unsandboxed`` is not set (in ``config`` or as a keyword override).
    """
    return run_tests_detailed(program, tests, timeout_s=timeout_s, config=config, **overrides).passed
