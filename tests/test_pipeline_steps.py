"""kat.pipeline wiring without training: the labelling steps (vote / synth / generator), which overrides each
student step gets, the ``labels=`` switch, and the vote rule with its threshold (scripted teacher answers)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kat import pipeline


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """``run_stage`` replaced by a recorder: {step: overrides}; each step's "checkpoint" is a path in tmp_path."""
    calls: dict[str, list[str]] = {}

    def fake_run_stage(step, overrides, out_dir, *, parent_run, threads, progress=None):
        assert parent_run  # every step is a child of the pipeline's parent run
        calls[step] = list(overrides)
        return tmp_path / step / "final"

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    return calls


def _synth_report(out_dir: Path, off_by_level: dict[int, float]) -> None:
    """The parts of kat.synth's report.json that the synth step reads."""
    level = {str(lv): {"n": 10, "off_share": v} for lv, v in off_by_level.items()}
    share = {"all": {"n": 50, "off_share": sum(off_by_level.values()) / 5}, "level": level, "domain": {}}
    (out_dir / "out").mkdir(parents=True, exist_ok=True)
    (out_dir / "out" / "report.json").write_text(json.dumps(
        {"input": 50, "seconds": 1.0, "outputs": {"coldstart": 50},
         "mode_share": {"labels": share, "coldstart": share}}))


def _metrics(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics


def test_resolve_steps_swaps_the_labelling_step():
    base = ["teacher", "vote", "distill", "coldstart", "rl", "eval"]
    assert pipeline.resolve_steps(base, None) == base
    assert pipeline.resolve_steps(base, "synth") == ["teacher", "synth", "distill", "coldstart", "rl", "eval"]
    assert pipeline.resolve_steps(base, "generator") == ["teacher", "distill", "coldstart", "rl", "eval"]
    both = ["teacher", "vote", "synth", "coldstart"]
    assert pipeline.resolve_steps(both, "vote") == ["teacher", "vote", "coldstart"]
    # no labelling step in the recipe: placed right after the teacher
    assert pipeline.resolve_steps(["teacher", "distill", "coldstart"], "vote") == ["teacher", "vote", "distill",
                                                                                  "coldstart"]
    with pytest.raises(ValueError, match="needs the teacher step"):
        pipeline.resolve_steps(["coldstart", "rl", "eval"], "synth")
    with pytest.raises(ValueError, match="labels must be one of"):
        pipeline.resolve_steps(base, "teacher")


def test_synth_step_feeds_coldstart_and_rl(compose_cfg, recorded, monkeypatch, tmp_path, mlflow_uri):
    """labels=synth: kat.synth runs on the teacher step's checkpoint with recipe.synth, and its JSONL replaces the
    synthetic data (and the generator's overrides) of the coldstart and rl steps; the shares reach the parent run."""
    import kat.synth.run as synth_run

    seen = {}

    def fake_pipeline_labels(teacher, overrides, seed, out_dir, *, parent_run=None, threads=None, task_name=None,
                             timeout_s=None):
        seen.update(teacher=teacher, overrides=list(overrides), seed=seed, out_dir=out_dir, parent_run=parent_run,
                    task_name=task_name)
        _synth_report(out_dir, {1: 0.6, 2: 0.2, 3: 0.1, 4: 0.0, 5: 0.0})
        return ["data=jsonl", f"data.path={out_dir}/out/coldstart.jsonl", f"data.val_path={out_dir}/out/heldout.jsonl"]

    monkeypatch.setattr(synth_run, "pipeline_labels", fake_pipeline_labels)
    cfg = compose_cfg(["recipe=smoke", "labels=synth", "seed=3", "recipe.steps=[teacher,vote,distill,coldstart,rl]"],
                      config_name="pipeline")
    assert cfg.recipe.generator  # the recipe has generator overrides: a labelling step must drop them
    out = tmp_path / "p"
    out.mkdir()
    path = pipeline.run(cfg, out)
    assert json.loads(path.read_text()) == {}  # no eval step: no summary block
    report = json.loads((out / "pipeline_report.json").read_text())
    assert report["steps"] == ["teacher", "synth", "distill", "coldstart", "rl"] and report["labels"] == "synth"
    assert list(recorded) == ["teacher", "distill", "coldstart", "rl"]  # no vote: labels=synth replaced it
    assert seen["teacher"] == tmp_path / "teacher" / "final" and seen["seed"] == 3
    assert seen["overrides"] == list(cfg.recipe.synth) and seen["out_dir"] == out / "synth"
    assert seen["task_name"] == "embedded"
    data = [f"data.path={out / 'synth'}/out/coldstart.jsonl", f"data.val_path={out / 'synth'}/out/heldout.jsonl"]
    for step in ("coldstart", "rl"):
        ov = recorded[step]
        assert "data=jsonl" in ov and all(d in ov for d in data), ov
        # synthetic-only keys of `common` and the generator's overrides are not passed with data=jsonl
        assert not any(o.startswith(("data.n_train_per_level=", "data.n_val_per_level=", "data.off_share="))
                       for o in ov), ov
    assert f"model.path={tmp_path / 'distill' / 'final'}" in recorded["coldstart"]
    assert f"model.path={tmp_path / 'coldstart' / 'final'}" in recorded["rl"]
    assert "data=jsonl" not in recorded["distill"] and "data=jsonl" not in recorded["teacher"]
    m = _metrics(mlflow_uri, report["parent_run_id"])
    assert m["synth/off_share/level_1"] == pytest.approx(0.6) and m["synth/off_share"] == pytest.approx(0.18)


def test_generator_labels_use_the_recipe_generator_overrides(compose_cfg, recorded, tmp_path, mlflow_uri):
    cfg = compose_cfg(["labels=generator", "recipe.steps=[teacher,vote,coldstart,rl]"], config_name="pipeline")
    out = tmp_path / "p"
    out.mkdir()
    pipeline.run(cfg, out)
    assert list(recorded) == ["teacher", "coldstart", "rl"]
    gen = list(cfg.recipe.generator)
    assert gen and gen[0].startswith("data.off_share=")
    cold, rl = recorded["coldstart"], recorded["rl"]
    assert "data=jsonl" not in cold + rl
    assert cold[-len(gen):] == gen  # after `common`: the generator's values win
    assert rl[-len(gen) - 1:] == [*gen, f"model.path={tmp_path / 'coldstart' / 'final'}"]
    assert "data.off_share" not in " ".join(recorded["teacher"])
    # the teacher's size knobs are resolved into its overrides
    assert f"trainer.max_steps={cfg.recipe.teacher_steps}" in recorded["teacher"]
    assert not any("${" in o for ov in recorded.values() for o in ov)
    assert json.loads((out / "pipeline_report.json").read_text())["labels"] == "generator"


def test_unknown_step_fails_before_any_work(compose_cfg, recorded, tmp_path, mlflow_uri):
    cfg = compose_cfg(["recipe.steps=[teacher,vote,destill]"], config_name="pipeline")
    with pytest.raises(ValueError, match=r"unknown step\(s\) \['destill'\]"):
        pipeline.run(cfg, tmp_path)
    assert recorded == {}


def test_synth_failure_is_a_step_failure(compose_cfg, recorded, monkeypatch, tmp_path, mlflow_uri):
    import kat.synth.run as synth_run

    def failing(*a, **k):
        raise synth_run.SynthFailed("kat.synth failed (exit 2); log: x")

    monkeypatch.setattr(synth_run, "pipeline_labels", failing)
    cfg = compose_cfg(["labels=synth", "recipe.steps=[teacher,coldstart]"], config_name="pipeline")
    with pytest.raises(pipeline.StepFailed, match="step 'synth' failed: kat.synth failed"):
        pipeline.run(cfg, tmp_path)
    assert list(recorded) == ["teacher"]


# ------------------------------------------------------------------------------------------ the vote rule
@pytest.mark.parametrize("threshold,need", [(1.0, 4), (0.5, 2), (0.3, 2), (0.01, 1)])
def test_vote_labels_off_iff_enough_right_and_stops_when_decided(monkeypatch, tmp_path, threshold, need):
    """Scripted teacher: query i's j-th answer is right per a fixed pattern. The label is off iff at least
    ceil(threshold * k) answers are right; a query is not asked again once its label is decided."""
    from omegaconf import OmegaConf

    import kat.models
    import kat.rollout.hf as hf_rollout
    import kat.rewards.cache as grade_cache
    from kat.data import synthetic
    from kat.models.tokenizer import build_char_tokenizer

    k = 4
    tok = build_char_tokenizer()
    monkeypatch.setattr(kat.models, "load", lambda cfg: (object(), tok))
    train = synthetic.splits(2, 1, seed=0, domains=("math",)).train  # 10 queries
    # per query: the outcome of answers 1..k (1 = right); 10 patterns covering 0..4 right in several orders
    patterns = [[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 1],
                [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 1]]
    ids = [str(s["id"]) for s in train]
    asked = {i: 0 for i in ids}

    def fake_generate(model, tok_, prompts, **kw):
        assert kw["do_sample"] and kw["max_new_tokens"] == 7
        return [hf_rollout.Completion(text=p, token_ids=[], truncated=False) for p in prompts]

    def fake_grade(self, samples, texts, max_workers=2):
        scores = []
        for s in samples:
            i = str(s["id"])
            scores.append(float(patterns[ids.index(i)][asked[i]]))
            asked[i] += 1
        return scores, None, None

    monkeypatch.setattr(hf_rollout, "generate", fake_generate)
    monkeypatch.setattr(grade_cache.GradeCache, "grade", fake_grade)
    vcfg = OmegaConf.create({"k": k, "threshold": threshold, "temperature": 1.0, "n_train_per_level": 2,
                             "n_val_per_level": 1, "domains": ["math"], "random_mode_rate": 0.0,
                             "max_new_tokens": 7, "batch_size": 4})
    data = pipeline.vote_labels(tmp_path / "teacher", vcfg, 0, tmp_path / "vote")
    assert data == ["data=jsonl", f"data.path={tmp_path / 'vote' / 'train.jsonl'}",
                    f"data.val_path={tmp_path / 'vote' / 'heldout.jsonl'}"]
    rows = [json.loads(x) for x in (tmp_path / "vote" / "train.jsonl").read_text().splitlines()]
    assert [str(r["id"]) for r in rows] == ids
    for r, pat in zip(rows, patterns):
        assert r["mode"] == ("off" if sum(pat) >= need else "on"), (pat, r["mode"])
        # answers asked until `need` right or more than k - need wrong
        right = wrong = n = 0
        for outcome in pat:
            n += 1
            right += outcome
            wrong += 1 - outcome
            if right >= need or wrong > k - need:
                break
        assert asked[str(r["id"])] == n, pat
    rep = json.loads((tmp_path / "vote" / "report.json").read_text())
    assert rep["need"] == need and rep["threshold"] == threshold
    assert len((tmp_path / "vote" / "heldout.jsonl").read_text().splitlines()) == 5


def test_vote_threshold_out_of_range_is_named(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(ValueError, match="recipe.vote.threshold"):
        pipeline.vote_labels(tmp_path, OmegaConf.create({"k": 4, "threshold": 0.0}), 0, tmp_path / "v")


@pytest.mark.parametrize("recipe,share", [("default", "[0.8,0.4,0.2,0.1,0.1]"),
                                          ("reproduce", "[0.45,0.45,0.45,0.15,0.15]"),
                                          ("reproduce_long", "[0.45,0.45,0.45,0.15,0.15]"),
                                          ("reproduce_hard", "[0.45,0.45,0.45,0.15,0.15]")])
def test_each_recipe_trains_on_its_own_generator_shares(compose_cfg, recorded, tmp_path, mlflow_uri, recipe, share):
    """The last data.off_share a student step gets (the one Hydra applies) is the recipe's own."""
    cfg = compose_cfg([f"recipe={recipe}", "recipe.steps=[coldstart,rl]"], config_name="pipeline")
    pipeline.run(cfg, tmp_path)
    for step in ("coldstart", "rl"):
        shares = [o for o in recorded[step] if o.startswith("data.off_share=")]
        assert shares and shares[-1] == f"data.off_share={share}", recorded[step]


def test_reproduce_long_is_reproduce_with_a_longer_cold_start_on_more_items(compose_cfg, recorded, tmp_path, mlflow_uri):
    """recipe=reproduce_long: 10x the distinct items for both student steps, 5,000 cold-start steps, eval on 100/level."""
    cfg = compose_cfg(["recipe=reproduce_long", "recipe.steps=[coldstart,rl]"], config_name="pipeline")
    assert list(cfg.recipe.steps) == ["coldstart", "rl"] and cfg.recipe.eval.n_val_per_level == 100
    pipeline.run(cfg, tmp_path)
    for step in ("coldstart", "rl"):
        items = [o for o in recorded[step] if o.startswith("data.n_train_per_level=")]
        assert items and items[-1] == "data.n_train_per_level=10000", recorded[step]
    assert "trainer.max_steps=5000" in recorded["coldstart"]
    assert "trainer.max_steps=400" in recorded["rl"]  # RL as in `recipe=reproduce`


def test_recipe_operand_digits_reach_every_step(compose_cfg, recorded, monkeypatch, tmp_path, mlflow_uri):
    """recipe=reproduce_hard: one set of operand shapes for the training steps (data.operand_digits), the vote,
    the synth step and the final evaluation, so training, labels and the held-out split share one suite."""
    seen: dict = {}

    def fake_vote(teacher, vcfg, seed, out_dir, *, parent_run=None, operand_digits=None):
        seen["vote"] = operand_digits
        return ["data=jsonl", f"data.path={out_dir / 'train.jsonl'}"]

    def fake_eval(ckpt, ev):
        seen.setdefault("eval", []).append(list(map(list, ev.operand_digits)))
        return {"all": {"think_on_rate": 1.0, "acc": 1.0, "tokens_mean": 1.0, "n": 1}}

    monkeypatch.setattr(pipeline, "vote_labels", fake_vote)
    monkeypatch.setattr(pipeline, "evaluate_checkpoint", fake_eval)
    cfg = compose_cfg(["recipe=reproduce_hard", "recipe.steps=[teacher,vote,coldstart,rl,eval]"],
                      config_name="pipeline")
    shapes = [[1, 1], [2, 1], [2, 2], [3, 3], [4, 4, 4]]
    pipeline.run(cfg, tmp_path)
    assert seen == {"vote": shapes, "eval": [shapes, shapes]}
    assert "data.operand_digits=[[1,1],[2,1],[2,2],[3,3],[4,4,4]]" in recorded["teacher"]
    for step in ("coldstart", "rl"):  # they read the vote's JSONL: the synthetic-only key is dropped there
        assert not any(o.startswith("data.operand_digits=") for o in recorded[step]), recorded[step]

    # labels=synth: the same shapes reach kat.synth's synthetic input
    def fake_synth(teacher, overrides, seed, out_dir, **kw):
        seen["synth"] = list(overrides)
        return ["data=jsonl", f"data.path={out_dir / 'train.jsonl'}"]

    monkeypatch.setattr(pipeline, "synth_labels", fake_synth)
    cfg = compose_cfg(["recipe=reproduce_hard", "labels=synth", "recipe.steps=[teacher,synth,coldstart]"],
                      config_name="pipeline")
    (tmp_path / "s").mkdir()
    pipeline.run(cfg, tmp_path / "s")
    assert seen["synth"][-1] == "synth.input.operand_digits=[[1,1],[2,1],[2,2],[3,3],[4,4,4]]"

    # generator labels: the student steps generate the suite themselves
    cfg = compose_cfg(["recipe=reproduce_hard", "recipe.steps=[coldstart,rl]"], config_name="pipeline")
    (tmp_path / "g").mkdir()
    pipeline.run(cfg, tmp_path / "g")
    for step in ("coldstart", "rl"):
        assert "data.operand_digits=[[1,1],[2,1],[2,2],[3,3],[4,4,4]]" in recorded[step]
    assert "trainer.max_steps=5000" in recorded["coldstart"]  # reproduce_long's cold start, inherited
    # the reproduce RL plus a KL term to the cold start (docs/rl.md §5.2b: seed 1 needs it)
    assert {"+stage=rl", "rollout.logprobs=sampler", "trainer.max_steps=400",
            "algorithm.loss.kl_coef=0.05"} <= set(recorded["rl"]), recorded["rl"]
    assert not any(o.startswith("algorithm.loss.kl_coef") for o in recorded["coldstart"])


def test_bad_recipe_operand_digits_fail_before_any_work(compose_cfg, recorded, tmp_path, mlflow_uri):
    cfg = compose_cfg(["recipe.operand_digits=[[1,1],[2,1]]"], config_name="pipeline")
    with pytest.raises(ValueError, match=r"recipe\.operand_digits: data\.operand_digits must be 5 lists"):
        pipeline.run(cfg, tmp_path)
    assert recorded == {}
