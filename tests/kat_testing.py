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


# A tiny student (hidden 32, 2 layers) and a cold start short enough for a fixture (about 13 s on one core) on
# one-digit additions at every level (EASY_DIGITS). It writes well-formed <judge>…</judge><think_on|off>… answers
# and gets about 0.9 of them right greedily and 0.1–0.4 when sampled at temperature 1, so RL from it (on the same
# easy suite) sees groups whose rewards differ and the policy update really runs. A model built from config writes
# malformed text only: every reward is the format penalty, every group has zero std, and nothing is updated.
TINY_ARCH = ["model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2"]
EASY_DIGITS = "data.operand_digits=[[1,1],[1,1],[1,1],[1,1],[1,1]]"
FORMATTED_COLDSTART = ["+stage=coldstart", "data.domains=[math]", EASY_DIGITS, "data.n_train_per_level=100",
                       "data.n_val_per_level=1", "data.batch_size=32", *TINY_ARCH, "trainer.max_steps=300",
                       "trainer.val_check_interval=1000", "optim.lr=5e-3", "optim.warmup_steps=10",
                       "stage.module.val.max_new_tokens=8", "logger=none"]


def train_formatted_checkpoint(out: Path) -> Path:
    """Train the fixture cold start into ``out``; returns its HF folder (``checkpoints/final``)."""
    r = run_module(["kat.train", *FORMATTED_COLDSTART, f"hydra.run.dir={out}"], cwd=out.parent,
                   env_extra={"OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"fixture cold start failed:\n{r.stderr[-3000:]}")
    return out / "checkpoints" / "final"


def weight_change(before: Path, after: Path) -> dict[str, float]:
    """Per tensor, the largest |after − before| between two HF folders' ``model.safetensors``."""
    from safetensors.torch import load_file

    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    if set(a) != set(b):
        raise AssertionError(f"the checkpoints hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    return {k: float((b[k].double() - a[k].double()).abs().max()) for k in a}


def csv_metrics(run: Path) -> list[dict[str, float]]:
    """Rows of a run's CSV logger (``logger=csv``), empty cells dropped, values as floats."""
    import csv

    rows = []
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows
