"""kat.rewards.general: normalised exact match, keyword coverage with guards, wrong answers."""
from __future__ import annotations

import pytest

from kat.rewards.general import content_words, match, normalize, numbers, score


def A(text: str) -> str:
    return f"<judge>easy</judge><think_off><answer>{text}</answer>"


def test_normalisation():
    assert normalize("The  Answer, is: 1,000.0!") == "answer is 1000"
    assert normalize("An apple; a pear.") == "apple pear"
    assert numbers("1,000 and 2.50 and -3 but not x2 or 2-3") == ["1000", "2.5", "-3", "2", "3"]
    assert content_words("Bob's total apples") == ["bob", "apple"]


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("132 in total", "132 in total"),
        ("132 In Total.", "132 in total"),
        ("The capital is Paris", "capital is Paris"),
        ("132.0 in total", "132 in total"),
    ],
)
def test_exact_match(answer, reference):
    assert score(A(answer), reference) == 1.0


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("In total they have 132 apples", "132 apples in total"),
        ("Paris is the capital of France", "The capital of France is Paris"),
        ("total: 1,000 dollars", "1000 dollars"),
    ],
)
def test_keyword_match(answer, reference):
    assert match(A(answer), reference)


@pytest.mark.parametrize(
    "answer, reference",
    [
        ("131 in total", "132 in total"),  # wrong number
        ("132", "132 apples"),  # a content word is missing
        ("131 or 132 or 133 apples", "132 apples"),  # hedging with extra numbers
        ("apples " * 40 + "132", "132 apples"),  # absurdly longer than the reference
        ("Lyon is the capital of France", "The capital of France is Paris"),
        ("no", "yes"),
        ("", "132 in total"),
    ],
)
def test_wrong_answers(answer, reference):
    assert score(A(answer), reference) == 0.0


def test_reference_without_keywords_needs_exact_match():
    assert match(A("Not at all."), "not at all")  # only stop words: nothing to look for
    assert not match(A("not at all, really"), "not at all")
    assert match(A("yes, indeed"), "yes")  # "yes" is a content word: keyword rule applies


def test_only_the_answer_block_counts():
    assert not match("<think>132 in total</think><answer>131</answer>", "132 in total")
    assert not match("132 in total", "132 in total")  # no answer block
    with pytest.raises(TypeError, match="reference"):
        match(A("x"), None)
