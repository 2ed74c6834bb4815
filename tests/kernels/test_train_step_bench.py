"""CPU smoke run of benchmarks/train_step.py (the H100 training-step benchmark).

The script runs in a subprocess with ``--tiny --device cpu`` and ``TRITON_INTERPRET=1`` in *its* environment
(the Triton ULD kernel of the ``distill`` cases runs interpreted there; nothing leaks into this process). The
sequence is cut to 8 tokens (8 ULD rows per depth) because the interpreted kernel costs ~1.5 s per step even so.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "train_step.py"
SMOKE_CASES = ("sft", "distill", "distill_eager", "distill_fsdp_mtp_plain", "rl_update", "rl_update_eager", "rollout")
COLUMNS = ("case", "shape (B×T)", "ms/step", "tokens/s", "MFU %", "peak mem GiB", "note")


def _run(cases, out: Path | None = None, timeout: float = 240.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--seq", "8", "--steps", "1", "--warmup", "1",
           "--budget-s", "600", "--cases", ",".join(cases)]
    if out is not None:
        cmd += ["--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(table: str) -> dict[str, dict[str, str]]:
    """Markdown table -> {case: {column: cell}} (header and separator skipped)."""
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert tuple(header) == COLUMNS, header
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(COLUMNS), ln
        out[cells[0]] = dict(zip(COLUMNS, cells))
    return out


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_train_step_bench_cpu_smoke(tmp_path):
    out = tmp_path / "table.md"
    proc = _run(SMOKE_CASES, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = _rows(proc.stdout)
    assert list(rows) == list(SMOKE_CASES), proc.stdout  # every requested row, in the requested order
    for case, r in rows.items():
        assert "error" not in r["note"] and "skipped" not in r["note"], (case, r["note"], proc.stderr[-4000:])
        ms, tps, mfu = _number(r["ms/step"]), _number(r["tokens/s"]), _number(r["MFU %"])
        assert ms > 0 and tps > 0 and mfu >= 0, (case, r)
        assert r["peak mem GiB"] == "–"  # CUDA-only column
    # the distill rows ran kat's Triton ULD kernel and the eager reference respectively
    assert "triton" in rows["distill"]["note"] and "kat_kernels.uld" in rows["distill"]["note"]
    assert "kat.losses.uld" in rows["distill_eager"]["note"]
    assert "FSDP2 world 1" in rows["distill_fsdp_mtp_plain"]["note"]
    # shapes follow the flags: B×T for training, prompts×G×(prompt+new) for RL
    assert rows["sft"]["shape (B×T)"] == "2×8"
    assert rows["rollout"]["shape (B×T)"] == "2×2×16"
    assert out.read_text().strip() == proc.stdout.strip()


def test_train_step_bench_cpu_fsdp_sharded_mtp():
    # regression: MTPHeads.forward once called the parts of each depth, bypassing the FSDP2-wrapped MTPDepth
    # modules, so their sharded parameters were never gathered
    proc = _run(["distill_fsdp"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = _rows(proc.stdout)["distill_fsdp"]
    assert "error" not in r["note"], r["note"]
    assert _number(r["ms/step"]) > 0


def test_train_step_bench_rejects_unknown_case():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--cases", "sft,nope"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--cases" in proc.stderr and "nope" in proc.stderr
