"""kat.generate: input forms, output lines, crash-safe append and resume (in-process and through the entry point)."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from kat import generate as gen
from kat.data.schema import DataValidationError
from kat_testing import run_module

ARCH = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            max_position_embeddings=512, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kat import models

    torch.manual_seed(0)
    model, tok = models.load({"arch": ARCH})
    path = models.save(model, tok, tmp_path_factory.mktemp("gen") / "model")
    return model, tok, str(path)


def _write_inputs(path, n=5):
    lines = [json.dumps({"prompt": f"{i}+{i}"}) if i % 2 else
             json.dumps({"id": f"s{i}", "messages": [{"role": "user", "content": f"{i}+1"}], "domain": "math",
                         "answer": str(i + 1)})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


def _cfg(tmp_path, **kw):
    base = dict(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out.jsonl"), mode="auto", max_new_tokens=6,
                max_judge_tokens=3, batch_size=2, samples=1, temperature=0.0, top_p=1.0)
    base.update(kw)
    return OmegaConf.create(base)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_read_prompts_both_forms_and_every_error(tmp_path):
    p = tmp_path / "in.jsonl"
    _write_inputs(p, 3)
    items = gen.read_prompts(p)
    assert [i["id"] for i in items] == ["s0", "line-2", "s2"]
    assert items[1]["messages"] == [{"role": "user", "content": "1+1"}]
    p.write_text('{"prompt": ""}\n{"id": "a", "messages": []}\nnot json\n{"id": 1, "prompt": "x"}\n{"id": 1, "prompt": "y"}\n')
    with pytest.raises(DataValidationError) as e:
        gen.read_prompts(p)
    errs = e.value.errors
    assert [x.split(": ", 1)[0] for x in errs] == [f"{p}:1", f"{p}:2", f"{p}:3", f"{p}:5"]
    assert "duplicate id 1" in errs[-1]


def test_output_lines_and_resume_after_a_crash(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny
    _write_inputs(tmp_path / "in.jsonl", 5)
    cfg = _cfg(tmp_path, mode="on")
    out = gen.run(model, tok, cfg)
    full = _lines(out)
    assert [r["id"] for r in full] == ["s0", "line-2", "s2", "line-4", "s4"]
    for r in full:
        assert set(r) >= {"id", "sample", "messages", "forced_mode", "completion", "judge", "mode", "thinking",
                          "answer", "well_formed", "tokens", "truncated"}
        assert r["forced_mode"] == "on" and 0 < r["tokens"] <= 6

    # crash mid-batch: two complete lines, then a torn one
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][: len(text[2]) // 2])
    calls = []
    import kat.rollout.hf as hf_rollout  # run() calls kat.rollout.hf.generate: count the prompts it is given

    orig = hf_rollout.generate
    monkeypatch.setattr(hf_rollout, "generate", lambda m, t, prompts, **k: calls.append(len(prompts)) or
                        orig(m, t, prompts, **k))
    gen.run(model, tok, cfg)
    assert calls == [2, 1]  # only the 3 missing prompts, in batches of 2
    again = _lines(out)
    assert again[:2] == full[:2]  # kept, not regenerated
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in full)
    assert again == full  # greedy: the regenerated lines are the same

    calls.clear()
    gen.run(model, tok, cfg)  # nothing left to do
    assert calls == [] and _lines(out) == full
    with pytest.raises(ValueError, match="generate.mode=on"):
        gen.run(model, tok, _cfg(tmp_path, mode="off"))


def test_incomplete_samples_of_an_id_are_regenerated(tiny, tmp_path):
    model, tok, _ = tiny
    _write_inputs(tmp_path / "in.jsonl", 3)
    cfg = _cfg(tmp_path, samples=2, temperature=1.0)
    out = gen.run(model, tok, cfg)
    rows = _lines(out)
    assert [(r["id"], r["sample"]) for r in rows] == [(i, j) for i in ("s0", "line-2", "s2") for j in (0, 1)]
    out.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")  # s0 complete, line-2 has 1 of 2 samples
    gen.run(model, tok, cfg)
    rows2 = _lines(out)
    assert rows2[:2] == rows[:2]
    assert sorted((r["id"], r["sample"]) for r in rows2) == sorted((r["id"], r["sample"]) for r in rows)
    with pytest.raises(ValueError, match="generate.samples > 1 needs"):
        gen.run(model, tok, _cfg(tmp_path, samples=2, temperature=0.0))


def test_entry_point_resumes(tiny, tmp_path):
    _, _, path = tiny
    _write_inputs(tmp_path / "in.jsonl", 4)
    out = tmp_path / "out.jsonl"
    keep = {"id": "s0", "sample": 0, "samples_per_prompt": 1, "forced_mode": None, "completion": "kept"}
    out.write_text(json.dumps(keep) + "\n")
    proc = run_module(["kat.generate", f"model.path={path}", f"generate.input={tmp_path / 'in.jsonl'}",
                       f"generate.output={out}", "generate.max_new_tokens=5", f"hydra.run.dir={tmp_path / 'run'}"],
                      cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())
    rows = _lines(out)
    assert rows[0] == keep and [r["id"] for r in rows] == ["s0", "line-2", "s2", "line-4"]
    assert "resume: 1 of 4 prompts already in" in proc.stdout + proc.stderr
