"""Triton kernels of kat (``kat_kernels.uld``, ``kat_kernels.grpo``); each has a pure-torch twin in ``kat.losses``.

This package imports only torch and triton (``tests/test_layout.py`` checks it).
"""
from __future__ import annotations

import os


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter, read the way Triton reads it (1, true, yes or on,
    any case). Triton decides when a kernel is decorated, i.e. when ``kat_kernels.uld``/``grpo`` are imported: the
    kernels then run on CPU tensors (slowly); otherwise they need CUDA. The one place kat parses the variable."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
