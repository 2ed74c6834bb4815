"""The real entry points: python -m kat.train / kat.pipeline in subprocesses, MLflow contents."""
from __future__ import annotations

import json

import pytest

from kat_testing import ROOT, run_module

SMALL = ["data.n_train_per_level=4", "data.n_val_per_level=1", "data.batch_size=8", "trainer.max_steps=4",
         "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
         "stage.module.val.max_new_tokens=40"]


def _runs(uri):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True)


def test_coldstart_smoke_through_the_entry_point(tmp_path, mlflow_uri):
    out = tmp_path / "run"
    r = run_module(["kat.train", "+stage=coldstart", *SMALL, f"hydra.run.dir={out}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    final = out / "checkpoints" / "final"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert len(tok.encode("<think_on>", add_special_tokens=False)) == 1
    assert (out / "checkpoints" / "last.ckpt").exists()

    runs = _runs(mlflow_uri)
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["tags.kat.stage"] == "coldstart"
    assert run["tags.kat.git_commit"]
    assert run["params.trainer/max_steps"] == "4"
    for m in ("train/loss", "val/acc", "val/think_on_rate", "val/tokens_mean", "val/acc/level_1"):
        assert f"metrics.{m}" in runs.columns, m
    import mlflow

    arts = [a.path for a in mlflow.MlflowClient(mlflow_uri).list_artifacts(run["run_id"], "checkpoint")]
    assert any(a.endswith("config.json") for a in arts)


def test_bad_data_file_exits_with_file_and_line(tmp_path, mlflow_uri):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "messages": [{"role": "user", "content": "x"}]}\n{oops\n')
    r = run_module(["kat.train", "+stage=coldstart", "data=jsonl", f"data.path={bad}", "logger=none",
                    f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path)
    assert r.returncode != 0
    assert f"{bad}:1: missing field 'mode'" in r.stderr
    assert f"{bad}:2: malformed JSON" in r.stderr


def test_unknown_stage_lists_valid_stages(tmp_path):
    r = run_module(["kat.train", "+stage=nope", "logger=none"], cwd=tmp_path)
    assert r.returncode != 0
    assert "Available options in 'stage'" in r.stderr and "coldstart" in r.stderr
    r = run_module(["kat.train", "logger=none"], cwd=tmp_path)
    assert r.returncode != 0 and "+stage=" in r.stderr


def test_pipeline_smoke(tmp_path, mlflow_uri):
    r = run_module(["kat.pipeline", "recipe=smoke", f"hydra.run.dir={tmp_path / 'p'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    summary = json.loads(open(last).read())
    # the recipe step (k of n) and its child's progress lines, passed through (stdout is no terminal here)
    assert "[1/7 teacher] step 3/3 (100 %)" in r.stdout and "[6/7 rl] step 2/2 (100 %)" in r.stdout, r.stdout[-3000:]
    assert set(summary) <= {"before_rl", "after_rl"} and "before_rl" in summary
    for block in summary.values():
        assert set(block) == {"level_1", "level_2", "level_3", "level_4", "level_5", "all"}
        for m in block.values():
            assert set(m) == {"think_on_rate", "acc", "tokens_mean", "n"}
            assert 0 <= m["think_on_rate"] <= 1 and 0 <= m["acc"] <= 1
        assert block["all"]["n"] == sum(block[f"level_{k}"]["n"] for k in range(1, 6))
    runs = _runs(mlflow_uri)
    parent = runs[runs["tags.kat.stage"] == "pipeline"]
    assert len(parent) == 1
    children = runs[runs["tags.mlflow.parentRunId"] == parent.iloc[0]["run_id"]]
    assert len(children) >= 2  # one per training step
    assert "metrics.train/loss" in children.columns and children["metrics.train/loss"].notna().all()
    # both labelling steps ran; the later one (synth) fed coldstart and rl
    out = tmp_path / "p"
    report = json.loads((out / "pipeline_report.json").read_text())
    assert report["steps"] == ["teacher", "vote", "synth", "distill", "coldstart", "rl", "eval"]
    assert report["labels"] == "synth" and set(summary) == {"before_rl", "after_rl"}
    assert (out / "vote" / "train.jsonl").exists() and (out / "synth" / "out" / "coldstart.jsonl").exists()
    for step in ("coldstart", "rl"):
        assert f"data.path={out / 'synth' / 'out' / 'coldstart.jsonl'}" in (out / step / "command.txt").read_text()
    assert "metrics.synth/off_share" in parent.columns and "metrics.vote/off_share" in parent.columns
