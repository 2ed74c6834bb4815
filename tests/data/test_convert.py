"""Benchmark converters on small hand-made fixtures in each format (tests/fixtures/convert/)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kat.data import convert, schema

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "convert"


def _conv(fmt: str, name: str, tmp_path, **kw) -> list[dict]:
    out = tmp_path / f"{fmt}.jsonl"
    samples = convert.convert_file(fmt, FIX / name, out, **kw)
    assert schema.load_samples(out, "eval") == samples  # written file validates for evaluation
    return samples


def _sandbox_or_skip():
    from kat.rewards import code

    try:
        code.check_available(code.SandboxConfig())
    except code.SandboxUnavailableError as e:
        pytest.skip(f"code sandbox unavailable: {e}")


def test_gsm8k(tmp_path):
    s = _conv("gsm8k", "gsm8k.jsonl", tmp_path)
    assert [x["answer"] for x in s] == ["31", "37500", "-5"]  # after ####, thousands comma removed
    assert [x["id"] for x in s] == ["gsm8k-0", "gsm8k-1", "gsm8k-2"]
    assert all(x["domain"] == "math" and x["messages"][-1]["role"] == "user" for x in s)
    assert s[0]["messages"][0]["content"].startswith("Mia buys 3 boxes")


def test_math500_levels_and_boxed_fallback(tmp_path):
    s = _conv("math500", "math500.jsonl", tmp_path)
    assert [x["id"] for x in s] == ["test/prealgebra/1.json", "test/algebra/2.json", "test/algebra/3.json"]
    assert [x.get("level") for x in s] == [1, 3, None]  # int, "Level 3", "Level ?" (left out)
    assert s[0]["answer"] == "\\frac{5}{6}"
    assert s[2]["answer"] == "5\\sqrt{2}"  # no `answer` field: last \boxed{} of the solution, braces balanced
    assert convert.last_boxed("a \\boxed{1} then \\boxed{\\frac{a}{b}} end") == "\\frac{a}{b}"


def test_aime_case_insensitive_fields(tmp_path):
    s = _conv("aime", "aime.jsonl", tmp_path)
    assert [(x["id"], x["answer"]) for x in s] == [("2024-1", "24"), ("2023-II-5", "9")]


def test_humaneval_tests_check_the_whole_function(tmp_path):
    from kat.rewards import code

    s = _conv("humaneval", "humaneval.jsonl", tmp_path)
    rows = convert.read_rows(FIX / "humaneval.jsonl")
    assert [x["id"] for x in s] == ["HumanEval/0", "HumanEval/1"]
    for sample, row in zip(s, rows):
        assert sample["domain"] == "code"
        assert sample["tests"].rstrip().endswith(f"check({row['entry_point']})")
        assert row["prompt"].rstrip() in sample["messages"][0]["content"]
    _sandbox_or_skip()
    for sample, row in zip(s, rows):
        program = row["prompt"] + row["canonical_solution"]  # the completion = the full function
        assert code.run_tests(program, sample["tests"], timeout_s=10)
        wrong = row["prompt"] + "    return None\n"
        assert not code.run_tests(wrong, sample["tests"], timeout_s=10)
        # a program that defines the wrong name fails too: the tests call check(entry_point)
        renamed = program.replace(f"def {row['entry_point']}(", "def other_name(")
        assert not code.run_tests(renamed, sample["tests"], timeout_s=10)


def test_mbpp_setup_code_and_asserts(tmp_path):
    from kat.rewards import code

    s = _conv("mbpp", "mbpp.jsonl", tmp_path)
    rows = convert.read_rows(FIX / "mbpp.jsonl")
    assert [x["id"] for x in s] == ["mbpp-11", "mbpp-12"]
    assert "assert reverse_words('a b c') == 'c b a'" in s[0]["messages"][0]["content"]  # names the function
    assert s[1]["tests"].startswith("import math\n")
    _sandbox_or_skip()
    for sample, row in zip(s, rows):
        assert code.run_tests(row["code"], sample["tests"], timeout_s=10)
        assert not code.run_tests(row["code"].replace("return ", "return 1 + "), sample["tests"], timeout_s=10)


def test_gpqa_shuffle_is_deterministic_and_letter_points_at_the_correct_answer(tmp_path):
    rows = convert.read_rows(FIX / "gpqa.csv")
    s0 = _conv("gpqa", "gpqa.csv", tmp_path, seed=0)
    assert s0 == convert.convert("gpqa", rows, seed=0)
    assert [x["id"] for x in s0] == ["recA1", "recB2", "recC3"]
    for sample, row in zip(s0, rows):
        assert sample["domain"] == "science" and len(sample["choices"]) == 4
        assert sample["choices"]["ABCD".index(sample["answer"])] == row["Correct Answer"].strip()
        assert sorted(sample["choices"]) == sorted(
            v.strip() for k, v in row.items() if k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                                      "Incorrect Answer 3"))
        text = sample["messages"][0]["content"]
        for letter, choice in zip("ABCD", sample["choices"]):
            assert f"{letter}) {choice}" in text
    assert s0[1]["messages"][0]["content"].startswith("A solution has pH 3.\nWhat is its")  # multi-line CSV cell
    s1 = convert.convert("gpqa", rows, seed=1)
    assert [x["choices"] for x in s1] != [x["choices"] for x in s0]
    # a row's order depends on its record id, not on its position in the file
    assert convert.convert("gpqa", rows[::-1], seed=0)[::-1] == s0
    letters = {x["answer"] for seed in range(8) for x in convert.convert("gpqa", rows, seed=seed)}
    assert len(letters) >= 3  # the correct option is not always at the same letter


def test_every_bad_row_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q1", "answer": "no final answer"}) + "\n"
                   + json.dumps({"answer": "#### 3"}) + "\n"
                   + "{not json\n")
    with pytest.raises(convert.ConvertError) as e:
        convert.convert_file("gsm8k", bad, tmp_path / "out.jsonl")
    assert e.value.errors == [f"{bad}:3: malformed JSON: Expecting property name enclosed in double quotes (column 2)"]
    bad.write_text(bad.read_text().splitlines()[0] + "\n" + json.dumps({"answer": "#### 3"}) + "\n")
    with pytest.raises(convert.ConvertError) as e:
        convert.convert_file("gsm8k", bad, tmp_path / "out.jsonl")
    msgs = e.value.errors
    assert len(msgs) == 2
    assert msgs[0].startswith(f"{bad}:1: ") and "####" in msgs[0]
    assert msgs[1].startswith(f"{bad}:2: ") and "'question'" in msgs[1]
    assert not (tmp_path / "out.jsonl").exists()  # nothing written on error


def test_cli(tmp_path, capsys):
    out = tmp_path / "g.jsonl"
    assert convert.main(["gpqa", str(FIX / "gpqa.csv"), str(out), "--seed", "2"]) == 0
    assert "wrote 3 samples (science)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert convert.main(["nope", str(FIX / "gpqa.csv"), str(out)]) == 2
    assert "unknown FORMAT 'nope'" in capsys.readouterr().err


def test_outputs_hold_only_schema_fields():
    for fmt, name in [("gsm8k", "gsm8k.jsonl"), ("math500", "math500.jsonl"), ("aime", "aime.jsonl"),
                      ("humaneval", "humaneval.jsonl"), ("mbpp", "mbpp.jsonl"), ("gpqa", "gpqa.csv")]:
        for s in convert.convert(fmt, convert.read_rows(FIX / name)):
            assert set(s) <= {"id", "messages", "domain", "answer", "tests", "choices", "level"}, fmt
            assert not schema.sample_errors(s, "eval")
