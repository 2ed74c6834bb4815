"""strategy=fsdp on 2 CPU processes (gloo): sharding and export, exact resume, atomic checkpoints, SIGKILL recovery.

That every stage *trains* under auto, ddp and fsdp (gradient and weights checked) is tests/stages/test_strategies.py."""
from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kat.trainer.fsdp import AtomicCheckpointIO, swap_in
from kat_testing import run_module

TINY = ["+stage=coldstart", "data.n_train_per_level=8", "data.n_val_per_level=1", "data.batch_size=4",
        "trainer.val_check_interval=1000", "callbacks.checkpoint.every_n_train_steps=3",
        "trainer.log_every_n_steps=1", "stage.module.val.max_new_tokens=24"]
FSDP = ["strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for f in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def _train(tmp_path, name, extra, *, env=None):
    r = run_module(["kat.train", *TINY, *extra, "logger=csv", f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path,
                   env_extra={"OMP_NUM_THREADS": "1", **(env or {})})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp_two_cpu_ranks_shard_train_and_export(tmp_path):
    r = _train(tmp_path, "run", [*FSDP, "trainer.max_steps=3"])
    held = [tuple(map(int, m)) for m in re.findall(r"\[rank (\d)\].*\((\d+) of (\d+) parameters held", r.stdout + r.stderr)]
    assert held, r.stdout[-2000:]  # rank 0's log (the other ranks do not configure logging)
    for _, local, full in held:
        assert abs(local - full / 2) < 0.05 * full  # rank 0 holds about half
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    shards = sorted(ckpt.glob("*.distcp"))
    assert ckpt.is_dir() and [p.name for p in shards] == ["__0_0.distcp", "__1_0.distcp"]
    # each rank wrote only its shard: parameters + two Adam moments in fp32 = 12 bytes per parameter
    full_bytes = 12 * held[0][2]
    for p in shards:
        assert 0.4 * full_bytes < p.stat().st_size < 0.6 * full_bytes, (p.name, p.stat().st_size, full_bytes)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.partial"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_gives_the_uninterrupted_losses(tmp_path):
    _train(tmp_path, "A", ["trainer.max_steps=6"])
    _train(tmp_path, "B", ["trainer.max_steps=4"])  # last checkpoint at step 3
    r = _train(tmp_path, "B", ["trainer.max_steps=6"])  # same folder: ckpt_path=auto resumes
    assert "Resuming from" in r.stdout and "resuming at epoch 0, batch 3" in r.stdout
    a, b = _losses(tmp_path / "A"), _losses(tmp_path / "B")
    assert set(a) == set(range(6))
    for step in range(6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_fsdp_resume_gives_the_uninterrupted_losses(tmp_path):
    _train(tmp_path, "A", [*FSDP, "trainer.max_steps=6"])
    _train(tmp_path, "B", [*FSDP, "trainer.max_steps=4"])
    r = _train(tmp_path, "B", [*FSDP, "trainer.max_steps=6"])
    assert "Resuming from" in r.stdout
    a, b = _losses(tmp_path / "A"), _losses(tmp_path / "B")
    for step in range(3, 6):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_sigkill_then_restart_resumes_the_same_mlflow_run(tmp_path, mlflow_uri):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "kat.train", *TINY, "trainer.max_steps=600",
            "callbacks.checkpoint.every_n_train_steps=20", f"hydra.run.dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckdir = run / "checkpoints"

    def saved_steps():
        return [int(p.name[4:10]) for p in ckdir.glob("step*.ckpt")] if ckdir.exists() else []

    while time.time() < deadline and max(saved_steps(), default=0) < 40:
        assert proc.poll() is None, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first_id = (run / "mlflow_run_id").read_text().strip()
    assert max(saved_steps()) < 600

    # restart with a nearer end (max_steps may change on resume) so the test stays fast
    r = run_module(["kat.train", *TINY, "trainer.max_steps=60", "callbacks.checkpoint.every_n_train_steps=20",
                    f"hydra.run.dir={run}"], cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"Resuming from (\S+)", r.stdout)
    assert m and Path(m.group(1)).name == "last.ckpt"
    assert (run / "mlflow_run_id").read_text().strip() == first_id
    import mlflow

    client = mlflow.MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [x.info.run_id for x in runs] == [first_id]  # one run, continued
    steps = {h.step for h in client.get_metric_history(first_id, "train/loss")}
    assert max(steps) >= 58 and set(range(41, 58)) <= steps  # the steps after the kill were logged into it


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def boom(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1  # the old checkpoint is intact


def test_swap_keeps_old_until_new_is_in_place(tmp_path):
    path, tmp = tmp_path / "last.ckpt", tmp_path / "last.ckpt.partial"
    path.mkdir()
    (path / "a").write_text("old")
    tmp.mkdir()
    (tmp / "a").write_text("new")
    swap_in(tmp, path)
    assert (path / "a").read_text() == "new" and not tmp.exists()
    assert not (tmp_path / "last.ckpt.old").exists()


def test_interrupted_swap_resumes_from_old(tmp_path, compose_cfg):
    from omegaconf import OmegaConf

    from kat.train import resolve_ckpt_path

    cfg = compose_cfg(["+stage=coldstart"])
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict_cfg(cfg):
        cfg.paths.ckpt_dir = str(tmp_path)
    assert resolve_ckpt_path(cfg) is None  # auto: nothing to resume
    (tmp_path / "last.ckpt.old").write_bytes(b"x")
    assert resolve_ckpt_path(cfg) == str(tmp_path / "last.ckpt.old")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path(cfg) == str(tmp_path / "last.ckpt")
    cfg.ckpt_path = None
    assert resolve_ckpt_path(cfg) is None


def open_dict_cfg(cfg):
    from omegaconf import open_dict

    return open_dict(cfg)
