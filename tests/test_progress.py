"""kat.trainer.progress: the plain progress lines of a run whose stdout is no terminal (step/total, rate, ETA), the last step
always logged (a run shorter than log_every_n_steps), and what the pipeline shows (k of n, passed-through lines,
the overall ETA scaled from reference times)."""
from __future__ import annotations

import csv
import json
import re

import pytest
from omegaconf import OmegaConf

from kat.trainer import progress
from kat_testing import run_module

TINY = ["model.arch.hidden_size=32", "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2",
        "model.arch.num_key_value_heads=1", "model.arch.intermediate_size=64", "data.n_train_per_level=2",
        "data.n_val_per_level=1", "data.domains=[math,science]", "data.batch_size=8"]
STAGE = {
    "distill": ["+stage=distill", "teacher=tiny", "teacher.model.arch.hidden_size=48",
                "teacher.model.arch.num_hidden_layers=1", "teacher.model.arch.num_attention_heads=2",
                "teacher.model.arch.num_key_value_heads=1", "teacher.model.arch.intermediate_size=64",
                "trainer.val_check_interval=4", "stage.module.val.max_new_tokens=16"],
    "coldstart": ["+stage=coldstart", "trainer.val_check_interval=4", "stage.module.val.max_new_tokens=16"],
}
# the first step's line and the last one's (ETA 0s on a run this fast)
FIRST = re.compile(r"\[kat\.trainer\.progress\]\[INFO\] - step 1/4 \(25 %\) · [\d.]+ (steps/s|s/step) · ETA \d+s · "
                   r"train/loss [\d.]+")
LAST = re.compile(r"\[kat\.trainer\.progress\]\[INFO\] - step 4/4 \(100 %\) · [\d.]+ (steps/s|s/step) · done in \d+s")


@pytest.mark.parametrize("stage", ["distill", "coldstart"])
def test_four_step_run_logs_its_last_step_and_prints_progress(stage, tmp_path, mlflow_uri):
    """trainer.log_every_n_steps stays at its default 10: the 4-step run still records train/loss (at its last
    step) in MLflow and the CSV logger, and its stdout (a pipe) has the plain progress lines."""
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    r = run_module(["kat.train", *STAGE[stage], *TINY, "trainer.max_steps=4", "logger=mlflow_csv",
                    "logger.mlflow.log_checkpoint=false", f"hydra.run.dir={out}"], cwd=tmp_path,
                   env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert FIRST.search(r.stdout), r.stdout[-3000:]
    assert LAST.search(r.stdout), r.stdout[-3000:]
    assert "validation at step 4 …" in r.stdout

    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("embedded").experiment_id])
    last = 3  # Lightning's step index of the 4th optimizer step
    for name in ("train/loss", "lr-AdamW/pg1", "perf/tokens_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == [last], name
    rows = list(csv.DictReader((out / "csv" / "version_0" / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows if row.get("train/loss")] == [last]


def test_rl_logs_every_step_whatever_the_logging_period(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    r = run_module(["kat.train", "+stage=rl", *TINY, "rollout.group_size=2", "rollout.max_new_tokens=8",
                    "stage.module.val.max_new_tokens=8", "data.batch_size=2", "trainer.max_steps=2",
                    "trainer.log_every_n_steps=10", "stage.module.plots=false", "logger.mlflow.log_checkpoint=false",
                    f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"step 2/2 \(100 %\) · .* · done in \d+s · .*rl/reward_mean", r.stdout), r.stdout[-3000:]
    client = MlflowClient(tracking_uri=mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("embedded").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rl/reward_mean")] == [1, 2]


def test_durations_and_lines_parse_back():
    for s in (0, 42, 283, 3725):
        assert progress.parse_duration(progress.fmt_duration(s)) == pytest.approx(s, abs=60 if s >= 3600 else 0)
    assert progress.fmt_duration(283) == "4m43s" and progress.fmt_duration(3725) == "1h02m"
    assert progress.fmt_rate(3.14) == "3.1 steps/s" and progress.fmt_rate(0.25) == "4.0 s/step"
    line = ("[2026-12-04 20:10:02,157][kat.trainer.progress][INFO] - step 120/1000 (12 %) · 3.1 steps/s · ETA 4m43s · "
            "train/loss 1.2\n")
    assert progress.parse_line(line) == {"step": 120, "total": 1000, "eta_s": 283,
                                         "text": "step 120/1000 (12 %) · 3.1 steps/s · ETA 4m43s · train/loss 1.2"}
    assert progress.parse_line("[..][kat.stages.base][INFO] - step 3 of something") is None
    assert progress.parse_line("[..][kat.trainer.progress][INFO] - validation at step 4 …") is None


def test_pipeline_lines_show_the_step_and_the_overall_eta(monkeypatch, capsys):
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    p = progress.PipelineProgress(["teacher", "coldstart", "rl"], {"teacher": 10, "coldstart": 100, "rl": 50},
                                  "the recipe's measured times", bar=False)
    p.begin("teacher")
    clock[0] += 20  # this machine is 2x slower than the reference
    p.finish("teacher", 20.0)
    p.begin("coldstart")
    clock[0] += 30
    assert p.remaining() == pytest.approx(2 * 100 - 30 + 2 * 50)  # no child ETA yet: the scaled reference
    assert p.remaining(current_eta=60) == pytest.approx(2 * 100 - 30 + 2 * 50)  # the child's ETA is less
    assert p.remaining(current_eta=250) == pytest.approx(250 + 2 * 50)  # the child's ETA is more: it counts
    with p.watch("coldstart") as feed:
        feed("[t][kat.trainer.progress][INFO] - step 30/100 (30 %) · 0.3 steps/s · ETA 4m10s · train/loss 2.5\n")
        feed("[t][kat.stages.base][INFO] - [step 30] validation (mode=auto): all: on=1.00\n")
        feed("[t][kat.trainer.progress][INFO] - validation at step 30 …\n")
        feed("[t][kat.data][INFO] - something else\n")
    out = capsys.readouterr().out.splitlines()
    assert out == ["  [2/3 coldstart] step 30/100 (30 %) · 0.3 steps/s · ETA 4m10s · train/loss 2.5 · "
                   "pipeline 50s, ≈ 5m50s left (the recipe's measured times, scaled)",
                   "  [2/3 coldstart] [step 30] validation (mode=auto): all: on=1.00",
                   "  [2/3 coldstart] validation at step 30 …"]
    assert progress.PipelineProgress(["eval"], bar=False).overall() == "pipeline 0s"  # no reference: elapsed



def test_reference_times_come_from_an_earlier_run_or_the_recipe(tmp_path):
    recipe = OmegaConf.create({"name": "default", "seconds": {"teacher": 30, "eval": 5}})
    steps = ["teacher", "eval"]
    out = tmp_path / "now"
    assert progress.reference_seconds(recipe, steps, ["recipe=default"], out) == (
        {"teacher": 30.0, "eval": 5.0}, "the recipe's measured times")
    assert progress.reference_seconds(recipe, steps, ["recipe.teacher_steps=600"], out) == (None, "")
    assert progress.reference_seconds(recipe, ["teacher", "vote"], [], out) == (None, "")
    earlier = tmp_path / "2026-12-01_10-00-00"
    earlier.mkdir()
    (earlier / "pipeline_report.json").write_text(json.dumps(
        {"recipe": "default", "steps": steps, "seconds": {"teacher": 61.0, "eval": 9.0},
         "overrides": ["recipe.teacher_steps=600"]}))
    assert progress.reference_seconds(recipe, steps, ["recipe.teacher_steps=600", f"hydra.run.dir={out}"], out) == (
        {"teacher": 61.0, "eval": 9.0}, "run 2026-12-01_10-00-00")
