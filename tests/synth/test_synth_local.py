"""``synth.backend=local``: the same chain on an in-process HF model (no server), resumable from the cache,
and :func:`kat.synth.run.pipeline_labels` (``data.labels=synth`` of kat.pipeline)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kat.data import schema


def _arch_overrides(arch: dict) -> list[str]:
    return [f"model.arch.{k}={v}" for k, v in arch.items()]


def test_local_backend_runs_the_chain_and_resumes_from_the_cache(compose_cfg, tmp_path, synth_kit):
    from kat.synth.run import synth

    ov = ["synth=embedded", "logger=none", f"synth.work_dir={tmp_path / 'work'}", "synth.input.n_per_level=1",
          "synth.input.n_val_per_level=1", "synth.vote.k=2", "synth.think.rounds=1", "synth.bad_retries=1",
          "synth.think.params.max_tokens=24", *_arch_overrides(synth_kit.TINY_ARCH)]
    cfg = compose_cfg(ov, config_name="synth")
    report = synth(cfg)
    assert report["input"] == 20
    sent = report["endpoints"]["teacher"]["run"]["sent"]
    assert sent > 0 and report["endpoints"]["teacher"]["completion_tokens"] > 0
    # an untrained model: every direct answer is wrong -> think-on; no draft verifies -> set aside with the reason
    assert report["mode_share"]["labels"]["all"]["n"] == 20
    think = report["steps"]["think"]
    assert think["in"] == 20 and think["done"] + think["aside"] == 20
    assert set(think["aside_reasons"]) <= {"no verified think-on response after 1 round(s)"}
    for p in (tmp_path / "work").rglob("*.jsonl"):
        for line in p.read_text().splitlines():
            assert not schema.sample_errors(json.loads(line)), (p, line[:200])
    for line in (tmp_path / "work" / "vote" / "shard-00000.jsonl").read_text().splitlines():
        v = json.loads(line)["synth"]["vote"]
        assert v["models"][0].startswith("untrained:tiny_teacher") and v["prompts"][0].startswith("direct-v1@")
    # again: nothing is asked, every step is complete, the report is the same
    report2 = synth(compose_cfg(ov, config_name="synth"))
    assert report2["endpoints"]["teacher"]["run"]["sent"] == 0
    assert report2["steps"]["think"]["aside"] == think["aside"]
    # a changed setting redoes that step and the later ones, answered from the cache (same questions)
    report3 = synth(compose_cfg(ov + ["synth.direct.select=first"], config_name="synth"))
    assert report3["endpoints"]["teacher"]["run"]["sent"] == 0 and report3["cache"]["hits"] > 0
    assert report3["steps"]["direct"]["done"] == 20 and report3["steps"]["direct"]["this_run"]["done"] == 20
    assert report3["steps"]["vote"]["this_run"] == {"done": 0, "aside": 0, "skipped_done": 0}  # unchanged: skipped


@pytest.mark.slow
def test_pipeline_labels_writes_coldstart_jsonl_for_the_pipeline(tmp_path, tiny_ckpt, monkeypatch):
    """Labels from kat.synth with the generator's gold responses (steps vote, judge, assemble)."""
    from kat.synth.run import pipeline_labels

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "synth"
    data = pipeline_labels(tiny_ckpt, ["synth.steps=[vote,judge,assemble]", "synth.input.strip=[mode,judge]",
                                       "synth.input.n_per_level=2", "synth.input.n_val_per_level=1", "synth.vote.k=2"],
                           seed=0, out_dir=out, threads=1)
    assert data == ["data=jsonl", f"data.path={out / 'out' / 'coldstart.jsonl'}",
                    f"data.val_path={out / 'out' / 'heldout.jsonl'}"]
    cold = schema.load_samples(out / "out" / "coldstart.jsonl", "coldstart")
    held = schema.load_samples(out / "out" / "heldout.jsonl", "eval")
    assert len(cold) == 40 and len(held) == 20
    assert {c["judge"] for c in cold} <= {"easy", "hard"}
    assert all(c["judge"] == {"on": "hard", "off": "easy"}[c["mode"]] for c in cold)
    # an untrained teacher answers nothing right: think-on except the random 1 %
    assert sum(c["mode"] == "on" for c in cold) >= 38
    assert "synth=embedded" in (out / "command.txt").read_text()
    assert Path(out / "out" / "report.json").exists()
