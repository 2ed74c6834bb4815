"""Small shared helpers: rank-aware logging, git commit, threads."""
from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only


class _RankZeroAdapter(logging.LoggerAdapter):
    """A logger that writes on global rank 0 only (``rank=None`` in a call: every rank, prefixed)."""

    def log(self, level, msg, *args, rank_all: bool = False, **kwargs):
        if not self.isEnabledFor(level):
            return
        if rank_all:
            msg = f"[rank {rank_zero_only.rank}] {msg}"
            self.logger.log(level, msg, *args, **kwargs)
        elif rank_zero_only.rank == 0:
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> _RankZeroAdapter:
    """Rank-aware logger: ``log.info(...)`` prints on rank 0 only; ``log.info(..., rank_all=True)`` on all."""
    return _RankZeroAdapter(logging.getLogger(name), {})


def git_commit(path: str | Path | None = None) -> str:
    """The current git commit of the kat checkout (``"unknown"`` outside a git tree)."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()
    except Exception:
        return "unknown"


def configure_threads() -> None:
    """Honour OMP_NUM_THREADS for torch's intra-op pool (CPU runs)."""
    import torch

    n = os.environ.get("OMP_NUM_THREADS")
    if n and n.isdigit() and int(n) > 0:
        torch.set_num_threads(int(n))


def log_tail(path: str | Path, n: int = 30) -> str:
    """The last ``n`` lines of a text log (for error messages that point at the log)."""
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
