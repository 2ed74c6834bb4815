"""The embedded task suite: determinism, correctness of traces and answers, splits, labels."""
from __future__ import annotations

import re
from collections import Counter

import pytest

from kat.data import synthetic as S
from kat.data.schema import sample_errors


def test_deterministic_and_seed_dependent():
    a = S.generate(5, seed=1)
    assert a == S.generate(5, seed=1)
    assert a != S.generate(5, seed=2)
    # prefix property: the first n items of a block do not depend on n
    big = {x["id"]: x for x in S.generate(9, seed=1)}
    assert all(big[x["id"]] == x for x in a)


def test_items_are_valid_and_correct():
    items = S.generate(20, seed=0)
    assert Counter((x["domain"], x["level"]) for x in items) == {(d, l): 20 for d in S.DOMAINS4 for l in range(1, 6)}
    for it in items:
        assert sample_errors(it, "coldstart") == [], it
        a, b = S.operands(it)  # the default suite has two operands at every level
        da, db = S.LEVEL_DIGITS[it["level"]]
        assert (len(str(a)), len(str(b))) == (da, db)
        assert it["thinking"].split(";=")[-1].split("=")[0] == str(a + b)
        if it["domain"] == "math":
            assert it["answer"] == it["response"] == str(a + b)
        elif it["domain"] == "code":
            env: dict = {}
            exec(it["response"], env)  # our own generated program
            exec(it["tests"], env)
        elif it["domain"] == "science":
            assert it["choices"][ord(it["answer"]) - 65] == str(a + b)
            assert len(set(it["choices"])) == 4
        else:
            assert str(a + b) in it["answer"]


def test_trace_columns():
    assert S.addition_trace(47, 85) == "7+5=12;4+8+1=13;=132"
    assert S.addition_trace(3, 4) == "3+4=7;=7"
    assert S.addition_trace(95, 9) == "5+9=14;9+1=10;=104"
    assert S.addition_trace(120, 5) == "0+5=5;2=2;1=1;=125"
    # three operands: the carry into a column can be 2, and it is written as its value
    assert S.addition_trace(999, 999, 999) == "9+9+9=27;9+9+9+2=29;9+9+9+2=29;=2997"
    assert S.addition_trace(5, 40, 305) == "5+0+5=10;4+0+1=5;3=3;=350"


THREE_AT_5 = [[1, 1], [2, 1], [2, 2], [3, 3], [4, 4, 4]]


def test_operand_digits_change_the_shapes_and_keep_every_family_correct():
    items = S.generate(15, seed=0, operand_digits=THREE_AT_5)
    for it in items:
        assert sample_errors(it, "coldstart") == [], it
        ops = S.operands(it)
        assert tuple(len(str(x)) for x in ops) == tuple(THREE_AT_5[it["level"] - 1]), it
        s = sum(ops)
        assert it["thinking"].split(";=")[-1].split("=")[0] == str(s)
        if it["domain"] == "code":
            env: dict = {}
            exec(it["response"], env)  # our own generated program
            exec(it["tests"], env)
        elif it["domain"] == "science":
            assert it["choices"][ord(it["answer"]) - 65] == str(s)
        else:
            assert it["response"].split()[0] == str(s)
    general5 = next(x for x in items if x["domain"] == "general" and x["level"] == 5)
    assert re.fullmatch(r"Ann has \d{4}, Bob \d{4}, Cy \d{4}\. Total\?", general5["messages"][0]["content"])
    # levels whose shape did not change draw the same items as the default suite
    default = S.generate(15, seed=0)
    assert [x for x in items if x["level"] < 5] == [x for x in default if x["level"] < 5]


def test_operand_digits_heldout_exclusion_uses_every_operand():
    sp = S.splits(40, 10, seed=3, operand_digits=[[1, 1], [1, 1, 1], [1, 1], [1, 1], [1, 1, 1, 1]])
    reserve = {(x["domain"], *S.operands(x)) for x in S.generate(S.HELDOUT_RESERVE, seed=3, split="heldout",
               operand_digits=[[1, 1], [1, 1, 1], [1, 1], [1, 1], [1, 1, 1, 1]]) if x["level"] > 1}
    assert {len(k) - 1 for k in reserve} == {2, 3, 4}
    assert not [x for x in sp.train if x["level"] > 1 and (x["domain"], *S.operands(x)) in reserve]


@pytest.mark.parametrize("bad", [[[1, 1]] * 4, [[1, 1], [2], [2, 2], [3, 3], [4, 4]],
                                 [[1, 1], [2, 1], [2, 0], [3, 3], [4, 4]], [[1, 1]] * 4 + [[1] * 7]])
def test_bad_operand_digits_name_the_key(bad):
    with pytest.raises(ValueError, match=r"data\.operand_digits must be 5 lists"):
        S.generate(1, seed=0, operand_digits=bad)


def test_heldout_never_in_training_above_level_1():
    sp = S.splits(60, 25, seed=3)
    reserve = {(x["domain"], *S.operands(x)) for x in S.generate(S.HELDOUT_RESERVE, seed=3, split="heldout")
               if x["level"] > 1}
    assert not [x for x in sp.train if x["level"] > 1 and (x["domain"], *S.operands(x)) in reserve]
    assert len(sp.val) == 4 * 5 * 25


def test_generator_labels_follow_off_share():
    items = S.generate(400, seed=0, domains=("math",), labels=S.LabelPolicy(off_share=(0.5, 0, 0, 0, 0.2),
                                                                            random_mode_rate=0.0))
    off = Counter(x["level"] for x in items if x["mode"] == "off")
    assert 160 < off[1] < 240 and off[2] == off[3] == off[4] == 0 and 50 < off[5] < 110
    assert all(x["judge"] == S.JUDGE_TEXT[x["mode"]] for x in items)


def test_bad_label_policy():
    with pytest.raises(ValueError, match="off_share"):
        S.LabelPolicy(off_share=(0.5, 0.5))
    with pytest.raises(ValueError, match="family"):
        S.generate(1, seed=0, domains=("poetry",))


def test_science_distractors_hide_the_last_digit():
    items = [x for x in S.generate(50, seed=0, domains=("science",)) if x["level"] >= 3]
    same_last = [sum(c[-1] == x["choices"][ord(x["answer"]) - 65][-1] for c in x["choices"]) for x in items]
    assert min(same_last) >= 3  # the answer's last digit is shared by most options
    assert all(re.fullmatch(r"[A-D]", x["response"]) for x in items)
