"""kat.eval: the entry point end to end on a tiny model, pass@k, the metric block, budgets, benchmarks."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from kat import metrics
from kat.metrics import Record
from kat_testing import run_module

TINY_ARCH = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Qwen2 with the embedded tokenizer, saved like a stage checkpoint."""
    from kat import models

    torch.manual_seed(0)
    model, tok = models.load({"arch": TINY_ARCH})
    return str(models.save(model, tok, tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from kat import models

    return models.load({"path": tiny_dir})


# ------------------------------------------------------------------------------------------- pass@k
def test_pass_at_k_hand_cases():
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # pass@1 = c/n
    assert metrics.pass_at_k(4, 0, 2) == 0.0
    assert metrics.pass_at_k(4, 1, 4) == 1.0  # n = k: any correct sample passes
    assert metrics.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert metrics.pass_at_k(3, 2, 2) == 1.0  # fewer than k wrong samples
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 40)
        k, c = rng.randint(1, n), rng.randint(0, n)
        assert metrics.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError, match="n .* must be >= k"):
        metrics.pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="c .* must be in"):
        metrics.pass_at_k(2, 3, 1)
    with pytest.raises(ValueError, match="k must be"):
        metrics.pass_at_k(2, 1, 0)


def test_pass_k_summary_groups():
    from kat.eval import pass_k_summary

    samples = [{"level": 1, "domain": "math"}, {"level": 2, "domain": "math"}, {"level": 2, "domain": "code"}]
    r = lambda ok: Record(level=None, domain=None, mode="on", correct=ok, tokens=1)  # noqa: E731
    recs = [r(True), r(False), r(False), r(False), r(None), r(None)]  # n = 2 per sample; the third is ungradable
    out = pass_k_summary(samples, recs, n=2, k=1)
    assert out["all"]["pass_at_k"] == pytest.approx(0.25) and out["level_1"]["pass_at_k"] == pytest.approx(0.5)
    assert out["level_2"]["pass_at_k"] == 0.0 and "domain_code" not in out
    assert out["all"]["pass_at_1_sampled"] == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------- metric block
def test_eval_block_hand_case():
    recs = [Record(1, "math", "on", True, 10), Record(1, "math", "on", False, 20, truncated=True, well_formed=False),
            Record(5, "code", "off", True, 4), Record(5, "code", None, False, 30, well_formed=False),
            Record(5, "code", "off", None, 99)]  # skipped: left out everywhere
    m = metrics.eval_block(recs, directive="off")
    assert m["n"] == 4 and m["acc"] == 0.5 and m["think_on_rate"] == 0.5
    assert m["tokens_mean"] == 16.0 and m["tokens_p50"] == 15.0 and m["tokens_p90"] == pytest.approx(27.0)
    assert (m["n_on"], m["tokens_mean_on"], m["acc_on"]) == (2, 15.0, 0.5)
    assert (m["n_off"], m["tokens_mean_off"], m["tokens_p90_off"]) == (1, 4.0, 4.0)
    assert m["format_error_rate"] == 0.5 and m["truncation_rate"] == 0.25
    assert m["follow_rate"] == 0.25  # malformed (mode None) does not follow
    s = metrics.eval_summary(recs)
    assert list(s) == ["all", "level_1", "level_5", "domain_code", "domain_math"]
    assert s["all"]["n_skipped"] == 1 and s["level_5"]["n"] == 2
    assert metrics.token_saving_pct(75.0, 100.0) == pytest.approx(25.0)
    assert metrics.percentile([3, 1, 2], 0.5) == 2.0 and metrics.percentile([], 0.9) == 0.0


# ------------------------------------------------------------------------------------------- generation
def test_records_follow_the_definitions(tiny):
    """One record per completion from greedy generation and the verifiers: mode and well-formedness parsed from
    the completion text, correct = verifier score >= 1, tokens = generated ids (docs/design.md, "Evaluation")."""
    from kat import rewards
    from kat.data import schema, synthetic, templates
    from kat.models.tokenizer import render_prompt
    from kat.rollout.evaluate import complete_and_grade
    from kat.rollout.hf import generate

    model, tok = tiny
    items = synthetic.generate(1, seed=0, split="heldout", domains=("science", "general"))
    ours = complete_and_grade(model, tok, items, mode="auto", max_new_tokens=12, batch_size=8)
    comps = generate(model, tok, [render_prompt(tok, schema.prompt_messages(s)) for s in items], max_new_tokens=12)
    scores = rewards.grade_batch(items, [c.text for c in comps]).scores
    assert len(ours) == len(items)
    for r, s, c, score in zip(ours, items, comps, scores):
        parsed = templates.parse(c.text)
        assert (r.level, r.domain, r.mode, r.well_formed) == (s["level"], s["domain"], parsed.mode, parsed.well_formed)
        assert r.tokens == c.n_tokens and r.truncated == c.truncated
        assert r.correct == (None if score is None else score >= 1.0)


def test_forced_mode_budget_covers_the_whole_completion(tiny):
    from kat.models.tokenizer import render_prompt
    from kat.rollout.hf import generate

    model, tok = tiny
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "47+85", "code: f(x)=x+1+2")]
    for budget in (3, 10, 40):
        comps = generate(model, tok, prompts, max_new_tokens=budget, force_mode="on", max_judge_tokens=8)
        assert all(c.n_tokens <= budget for c in comps)
        if budget <= 8:
            continue  # the judge cap shrinks to budget - 1 there; the comparison below needs the same cap
        longer = generate(model, tok, prompts, max_new_tokens=budget + 8, force_mode="on", max_judge_tokens=8)
        for c, ref in zip(comps, longer):
            assert c.n_tokens <= budget
            assert c.token_ids == ref.token_ids[:budget]  # the same decoding, cut at the budget
            assert c.truncated == (ref.truncated or ref.n_tokens > budget)


def test_benchmarks_from_files(tmp_path, char_tokenizer):
    from pathlib import Path

    from kat.data import convert
    from kat.eval import bench_name, load_benchmark, parse_modes

    fix = Path(__file__).resolve().parent / "fixtures" / "convert"
    out = tmp_path / "gsm8k test.jsonl"
    convert.convert_file("gsm8k", fix / "gsm8k.jsonl", out)
    assert bench_name(str(out)) == "gsm8k_test" and bench_name("synthetic") == "synthetic"
    from omegaconf import OmegaConf

    ev = OmegaConf.create({"synthetic": {"n_per_level": 2, "domains": ["math"]}})
    assert len(load_benchmark(str(out), ev, 0, limit=2)) == 2
    assert len(load_benchmark("synthetic", ev, 0)) == 10
    ev.synthetic.operand_digits = [[1, 1], [2, 1], [2, 2], [3, 3], [4, 4, 4]]  # the suite a recipe trained on
    assert [len(x["messages"][0]["content"].split("+")) for x in load_benchmark("synthetic", ev, 0)] == [2] * 8 + [3] * 2
    assert parse_modes("on") == ["on"] and parse_modes(["auto", "off", "auto"]) == ["auto", "off"]
    with pytest.raises(ValueError, match="eval.mode"):
        parse_modes("sometimes")


# ------------------------------------------------------------------------------------------- entry point
FAMILIES = ("n", "acc", "think_on_rate", "tokens_mean", "tokens_p50", "tokens_p90", "tokens_mean_on",
            "tokens_mean_off", "tokens_p90_on", "tokens_p90_off", "format_error_rate", "truncation_rate")


def test_entry_point_json_table_mlflow(tiny_dir, tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from kat import models, tracking
    from kat.data import directives

    tok = models.load_tokenizer({"path": tiny_dir})
    assert directives.encodable("Think deeper.", tok), (
        "a saved kat checkpoint's tokenizer must round-trip spaces (kat.models.hf.load_tokenizer: AutoTokenizer "
        "returns Qwen2Tokenizer for the character tokenizer next to a qwen2 config.json and drops spaces)")
    parent = tracking.start_parent_run("embedded", "parent", uri=mlflow_uri)
    out_dir = tmp_path / "run"
    proc = run_module(
        ["kat.eval", f"model.path={tiny_dir}", "eval.benchmarks=[synthetic]", "eval.synthetic.n_per_level=1",
         "eval.synthetic.domains=[science,general]", "eval.mode=[auto,off]", "eval.directives=true",
         "eval.max_new_tokens=8", "eval.max_judge_tokens=4", "eval.pass_k.k=2", f"eval.compare={tiny_dir}",
         f"hydra.run.dir={out_dir}"],
        cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1", tracking.PARENT_ENV: parent}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path == str((out_dir / "eval.json").resolve())
    assert "kat.eval" in proc.stdout and "directive_off" in proc.stdout  # the table
    report = json.loads(open(path).read())

    res = report["results"]["model"]["synthetic"]
    assert set(res) == {"auto", "off", "directive_on", "directive_off"}
    for cond, groups in res.items():
        assert {"all", "level_1", "level_5", "domain_science", "domain_general"} <= set(groups)
        for g in groups.values():
            assert set(FAMILIES) <= set(g), cond
        if cond.startswith("directive_"):
            assert 0.0 <= groups["all"]["follow_rate"] <= 1.0
        else:
            assert 0.0 <= groups["all"]["pass_at_k"] <= 1.0 and "pass_at_1_sampled" in groups["level_3"]
    assert res["auto"]["all"]["n"] == 10 and res["directive_on"]["all"]["n"] == 10
    assert res["off"]["all"]["tokens_p90"] <= 8  # the budget covers the whole forced completion
    # the same checkpoint as comparison: identical greedy numbers, zero saving
    assert report["results"]["compare"]["synthetic"]["auto"]["all"] == {
        k: v for k, v in res["auto"]["all"].items()}
    assert report["token_saving_pct"]["synthetic"]["auto"]["all"] == 0.0

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["kat.stage"] == "eval" and run.data.tags["mlflow.parentRunId"] == parent
    m = run.data.metrics
    for name in ("eval/synthetic/auto/acc", "eval/synthetic/auto/acc/level_5", "eval/synthetic/auto/pass_at_k",
                 "eval/synthetic/off/tokens_p90", "eval/synthetic/directive_off/follow_rate",
                 "eval/synthetic/directive_on/follow_rate/level_1", "eval/synthetic/auto/truncation_rate",
                 "eval/synthetic/auto/format_error_rate", "eval/synthetic/auto/tokens_mean_on",
                 "compare/synthetic/auto/acc", "eval/synthetic/auto/token_saving_pct"):
        assert name in m, name
    assert not any("@" in k for k in m)
    assert run.data.params["eval/mode"] == "['auto', 'off']"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["eval.json"]


def test_bad_settings_fail_before_loading_the_model(compose_cfg):
    from kat.eval import run

    cfg = compose_cfg(["model.path=/nonexistent", "eval.mode=sometimes"], config_name="eval")
    with pytest.raises(ValueError, match="eval.mode must be auto, on, off or a list of them"):
        run(cfg)
    cfg = compose_cfg(["model.path=/nonexistent", "eval.benchmarks=[a/x.jsonl,b/x.jsonl]"], config_name="eval")
    with pytest.raises(ValueError, match="share the name"):
        run(cfg)
