"""python -m kat.train +stage=rl through the real entry point: every algorithm runs, rl/* and val/* metrics and the
plots reach MLflow, and a resumed run restores the RL state."""
from __future__ import annotations

import math

import pytest

from kat_testing import EASY_DIGITS, csv_metrics, run_module, weight_change

TINY = ["data.n_train_per_level=2", "data.n_val_per_level=1", "data.batch_size=2", "data.domains=[math,science]",
        "rollout.group_size=4", "rollout.max_new_tokens=16", "stage.module.val.max_new_tokens=16",
        "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2"]

RL_METRICS = ("rl/reward_mean", "rl/reward_judge", "rl/reward_answer", "rl/acc", "rl/think_on_rate",
              "rl/tokens_mean", "rl/tokens_think_on", "rl/tokens_think_off", "rl/clip_frac", "rl/kl", "rl/entropy",
              "rl/frac_zero_std", "rl/resampled_out", "rl/acc_think_on", "rl/acc_think_off", "perf/tokens_per_s",
              "timing/rollout_s")


def test_rl_step_srpo_through_the_entry_point(tmp_path, mlflow_uri):
    import mlflow

    out = tmp_path / "run"
    r = run_module(["kat.train", "+stage=rl", *TINY, "trainer.max_steps=3", "trainer.val_check_interval=2",
                    "algorithm.loss.reference=true",
                    f"hydra.run.dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "built from config with random weights" in log  # runs on its own from defaults, with a warning
    assert "policy loss: torch" in log
    assert (out / "checkpoints" / "final" / "config.json").exists()
    client = mlflow.MlflowClient(mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)  # other tests may have set a process-wide URI
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1
    run = runs.iloc[0]
    rid = run["run_id"]
    for name in RL_METRICS:
        hist = client.get_metric_history(rid, name)
        assert [m.step for m in hist] == [1, 2, 3], name
    per_level = [k for k in run.index if k.startswith("metrics.rl/think_on_rate/level_")]
    assert per_level and any(k.startswith("metrics.rl/think_on_rate/domain_") for k in run.index)
    acc = client.get_metric_history(rid, "val/acc")
    assert sorted(m.step for m in acc) == [0, 2, 3]  # before the first update, every 2 steps, at the end
    assert client.get_metric_history(rid, "val/think_on_rate/level_5")
    assert run["params.loss/impl_used"] == "torch"
    assert run["tags.kat.stage"] == "rl"
    plots = [a.path for a in client.list_artifacts(rid, "plots")]
    assert {"plots/think_on_rate.png", "plots/tokens_mean.png"} <= set(plots)

    # resume: the RL state (history, resampling) comes back from last.ckpt
    r2 = run_module(["kat.train", "+stage=rl", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=2",
                     "ckpt_path=last", "logger=none", "stage.module.validate_at_end=false",
                     f"hydra.run.dir={out}"], cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Resuming from" in r2.stdout + r2.stderr and "restored History Resampling" in r2.stdout + r2.stderr


@pytest.mark.parametrize("algorithm", ["step_srpo", "grpo", "dapo", "adaptthink", "thinkless"])
def test_every_algorithm_updates_the_policy(tmp_path, algorithm, formatted_checkpoint):
    """From a cold start that writes well-formed answers, so that rewards differ within groups: each estimator's
    update runs (non-zero gradient norm at some step) and the weights move."""
    extra = ["algorithm.resampling.on_unfilled=partial", "algorithm.resampling.max_gen_batches=2"] \
        if algorithm == "dapo" else []
    out = tmp_path / "run"
    r = run_module(["kat.train", "+stage=rl", f"algorithm={algorithm}", *TINY, *extra, "rollout.max_new_tokens=40",
                    f"model.path={formatted_checkpoint}", "data.domains=[math]", EASY_DIGITS, "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "logger=csv", "stage.module.validate_at_start=false",
                    "stage.module.plots=false", f"hydra.run.dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"algorithm={algorithm}" in r.stdout + r.stderr
    norms = [row["rl/grad_norm"] for row in csv_metrics(out) if "rl/grad_norm" in row]
    assert norms and max(norms) > 0 and all(math.isfinite(n) for n in norms), norms
    change = weight_change(formatted_checkpoint, out / "checkpoints" / "final")
    assert max(change.values()) > 1e-6, change
