"""Sample schema validation: every bad line reported as FILE:LINE: message."""
from __future__ import annotations

import json

import pytest

from kat.data.schema import DataValidationError, load_samples, sample_errors, write_jsonl

GOOD = {"id": "a", "messages": [{"role": "user", "content": "1+1"}], "domain": "math", "answer": "2", "level": 1,
        "mode": "off", "judge": "easy", "response": "2"}


def test_good_sample_passes_every_stage():
    for stage in ("any", "coldstart", "rl", "eval"):
        assert sample_errors(GOOD, stage) == []


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"id": None}, "'id'"),
        ({"messages": []}, "non-empty"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "last message"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"domain": "poetry"}, "unknown domain"),
        ({"level": 7}, "1..5"),
        ({"level": "3"}, "'level' must be int"),
        ({"level": True}, "'level' must be int"),
        ({"mode": "maybe"}, "'on' or 'off'"),
        ({"choices": [1, 2]}, "list of strings"),
        ({"answer": 2}, "'answer' must be str"),
    ],
)
def test_field_errors(patch, needle):
    bad = {**GOOD, **patch}
    if patch.get("id", 1) is None:
        bad.pop("id")
    errs = sample_errors(bad)
    assert any(needle in e for e in errs), errs


def test_stage_requirements():
    s = {k: v for k, v in GOOD.items() if k not in ("mode", "judge")}
    assert any("'mode'" in e for e in sample_errors(s, "coldstart"))
    on = {**GOOD, "mode": "on"}
    assert any("thinking" in e for e in sample_errors(on, "coldstart"))
    rl = {k: v for k, v in GOOD.items() if k != "answer"}
    assert any("'answer' or 'tests'" in e for e in sample_errors(rl, "rl"))


def test_file_reports_every_bad_line(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD), "{not json", json.dumps({**GOOD, "id": "b", "domain": "poetry"}), "",
             json.dumps({**GOOD, "id": "c"}), json.dumps({**GOOD, "id": "a"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as e:
        load_samples(path, "coldstart")
    msg = str(e.value)
    assert f"{path}:2: malformed JSON" in msg
    assert f"{path}:3: unknown domain 'poetry'" in msg
    assert f"{path}:6: duplicate id 'a' (first at {path}:1)" in msg
    assert len(e.value.errors) == 3


def test_round_trip_and_parquet(tmp_path):
    samples = [{**GOOD, "id": f"s{i}"} for i in range(3)]
    p = write_jsonl(tmp_path / "x.jsonl", samples)
    assert load_samples(p) == samples
    import datasets

    pq = tmp_path / "x.parquet"
    datasets.Dataset.from_list(samples).to_parquet(str(pq))
    assert [s["id"] for s in load_samples(pq)] == ["s0", "s1", "s2"]


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.path"):
        load_samples(tmp_path / "nope.jsonl")
