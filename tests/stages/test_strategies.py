"""Every stage trains under every strategy, on 1 and 2 CPU processes, through the real entry point.

Each test starts from a cold start that writes well-formed answers (the ``formatted_checkpoint`` fixture), so the
update has something to do, and asserts that it ran: a non-zero gradient norm at every step and weights that
differ from the starting checkpoint. RL runs several micro-batches per optimizer step (``micro_batch_size=3`` for
8 rollout rows per rank): the second micro-batch's forward after the first backward is what crashed under FSDP2
when a forward bypassed the root module (kat.models.forward).
"""
from __future__ import annotations

import math

import pytest

from kat_testing import EASY_DIGITS, csv_metrics, run_module, weight_change

RL = ["+stage=rl", "data.domains=[math]", EASY_DIGITS, "data.n_train_per_level=4", "data.n_val_per_level=1",
      "data.batch_size=2", "rollout.group_size=4", "rollout.max_new_tokens=40", "stage.module.val.max_new_tokens=24",
      "stage.module.update.micro_batch_size=3", "trainer.max_steps=2", "trainer.val_check_interval=100",
      "stage.module.validate_at_start=false", "stage.module.plots=false", "logger=csv", "trainer.accelerator=cpu"]


def _strategy(name: str, devices: int) -> list[str]:
    return [f"strategy={name}", f"trainer.devices={devices}"]


def _run(tmp_path, args, env=None, timeout=400):
    out = tmp_path / "run"
    r = run_module(["kat.train", *args, f"hydra.run.dir={out}"], cwd=tmp_path,
                   env_extra={"OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r.stdout + r.stderr


def _assert_trained(start, out, rows, grad_key):
    """The update ran: a finite, non-zero gradient norm at every logged step, and the weights moved."""
    norms = [row[grad_key] for row in rows if grad_key in row]
    assert norms, f"no {grad_key} was logged"
    assert all(math.isfinite(n) and n > 0 for n in norms), norms
    change = weight_change(start, out / "checkpoints" / "final")
    moved = [k for k, d in change.items() if d > 0]
    # AdamW's first step moves every weight with a non-zero gradient by about lr (1e-4 here), far above 0
    assert max(change.values()) > 1e-6, change
    assert len(moved) >= len(change) // 2, (len(moved), len(change))


@pytest.mark.parametrize("strategy,devices,extra", [
    ("auto", 1, []),
    ("fsdp", 1, []),
    # the frozen reference (KL term) sharded too: its forwards go through its root as well
    ("fsdp", 2, ["algorithm.loss.kl_coef=0.05", "strategy.shard_frozen=true"]),
    ("ddp", 2, []),
], ids=["auto-1", "fsdp-1", "fsdp-2-kl", "ddp-2"])
def test_rl_update_runs(tmp_path, formatted_checkpoint, strategy, devices, extra):
    out, log = _run(tmp_path, [*RL, f"model.path={formatted_checkpoint}", *_strategy(strategy, devices), *extra])
    if strategy == "fsdp":
        assert f"sharded over {devices} ranks" in log
    rows = csv_metrics(out)
    steps = [row for row in rows if "rl/grad_norm" in row]
    assert [int(row["step"]) for row in steps] == [1, 2]
    assert min(row["rl/frac_zero_std"] for row in steps) < 1.0  # some group had rewards that differ
    _assert_trained(formatted_checkpoint, out, rows, "rl/grad_norm")
    if "algorithm.loss.kl_coef=0.05" in extra:  # the policy moved away from the reference at the second step
        assert steps[1]["rl/kl"] > 0


def test_rl_fused_triton_loss_under_fsdp(tmp_path, formatted_checkpoint):
    """The fused policy loss reads the head weight itself: it must be the one the root forward gathered."""
    out, log = _run(tmp_path, [*RL, f"model.path={formatted_checkpoint}", *_strategy("fsdp", 2), "loss.impl=triton"],
                    env={"TRITON_INTERPRET": "1"})
    assert "policy loss: triton" in log
    _assert_trained(formatted_checkpoint, out, csv_metrics(out), "rl/grad_norm")


COLDSTART = ["+stage=coldstart", "data.domains=[math]", "data.n_train_per_level=8", "data.n_val_per_level=1",
             "data.batch_size=4", "trainer.max_steps=3", "trainer.val_check_interval=1000",
             "trainer.log_every_n_steps=1", "stage.module.val.max_new_tokens=8", "logger=csv",
             "trainer.accelerator=cpu", "optim.warmup_steps=0"]


@pytest.mark.parametrize("strategy,devices", [("fsdp", 2), ("ddp", 2)], ids=["fsdp-2", "ddp-2"])
def test_coldstart_update_runs(tmp_path, formatted_checkpoint, strategy, devices):
    out, _ = _run(tmp_path, [*COLDSTART, f"model.path={formatted_checkpoint}", *_strategy(strategy, devices)])
    rows = csv_metrics(out)
    losses = [row["train/loss"] for row in rows if "train/loss" in row]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses), losses
    change = weight_change(formatted_checkpoint, out / "checkpoints" / "final")
    assert max(change.values()) > 1e-6 and sum(d > 0 for d in change.values()) >= len(change) // 2, change


def test_distill_with_mtp_under_fsdp_trains_student_and_heads(tmp_path, formatted_checkpoint):
    """Distill under FSDP2 on 2 ranks with one MTP depth and a sharded teacher: the main weights move, the MTP depth
    gets a loss of its own, and its saved weights are no longer their initial values (norms start at exactly 1)."""
    from safetensors.torch import load_file

    out, log = _run(tmp_path, ["+stage=distill", "data.domains=[math]", "data.n_train_per_level=8",
                               "data.n_val_per_level=1", "data.batch_size=4", "trainer.max_steps=3",
                               "trainer.val_check_interval=1000", "trainer.log_every_n_steps=1",
                               "stage.module.val.max_new_tokens=8", "logger=csv", "trainer.accelerator=cpu",
                               "optim.warmup_steps=0", f"model.path={formatted_checkpoint}", "model.mtp_depth=1",
                               "strategy.shard_frozen=true", *_strategy("fsdp", 2)])
    assert "sharded over 2 ranks" in log
    rows = csv_metrics(out)
    mtp = [row["train/mtp_ce_d1"] for row in rows if "train/mtp_ce_d1" in row]
    assert mtp and all(math.isfinite(x) and x > 0 for x in mtp), mtp
    change = weight_change(formatted_checkpoint, out / "checkpoints" / "final")
    assert max(change.values()) > 1e-6, change
    heads = load_file(str(out / "checkpoints" / "final" / "mtp_heads.safetensors"))
    norms = {k: v for k, v in heads.items() if k.endswith("norm.weight")}
    assert norms and any(float((v - 1).abs().max()) > 0 for v in norms.values())
