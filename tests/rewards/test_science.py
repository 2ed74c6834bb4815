"""kat.rewards.science: ordered letter patterns inside <answer>, letter limits, no prose fallback."""
from __future__ import annotations

import pytest

from kat.rewards import GoldParseError
from kat.rewards.science import extract_choice, score


def A(text: str) -> str:
    return f"<judge>easy</judge><think_off><answer>{text}</answer>"


@pytest.mark.parametrize(
    "block, expected",
    [
        (r"\boxed{B}", "B"),
        (r"\boxed{(C)}", "C"),
        (r"$\boxed{\text{D}}$", "D"),
        ("Answer: C", "C"),
        ("answer：(B)", "B"),
        ("The answer is A.", "A"),
        ("I think the correct option is (D) because 132 fits", "D"),
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("  C)  ", "C"),
        ("B) 132", "B"),
        ("(A) 122", "A"),
        ("D: 133", "D"),
    ],
)
def test_each_pattern(block, expected):
    assert extract_choice(A(block), 4) == expected


def test_priority_first_pattern_wins():
    # boxed beats "Answer:", which beats "answer is", which beats the block start
    assert extract_choice(A(r"Answer: A. so \boxed{C}"), 4) == "C"
    assert extract_choice(A("the answer is B. Answer: D"), 4) == "D"
    assert extract_choice(A("A) no, the answer is C"), 4) == "C"
    # within one pattern the first occurrence wins
    assert extract_choice(A("Answer: B ... Answer: C"), 4) == "B"


@pytest.mark.parametrize(
    "block",
    [
        "A good answer is hard to find",  # the article is not option A
        "I am not sure",
        "Answer: Avocado",  # the letter must stand alone
        "the answer is a mystery",  # lower case is prose
        "132",
        "",
        "Because A and B are both wrong",
    ],
)
def test_no_bare_letter_fallback_in_prose(block):
    assert extract_choice(A(block), 4) is None


def test_letters_are_limited_to_the_option_count():
    assert extract_choice(A("E"), 4) is None
    assert extract_choice(A(r"\boxed{E}"), 4) is None
    assert extract_choice(A("E"), 5) == "E"
    assert extract_choice(A("Z"), None) == "Z"
    assert extract_choice(A(r"\boxed{E} Answer: B"), 4) == "B"  # out-of-range hits do not count
    with pytest.raises(ValueError, match="n_choices"):
        extract_choice(A("A"), 0)


def test_only_the_answer_block_is_read():
    assert extract_choice("<judge>x</judge><think_on><think>Answer: A</think><answer>B</answer>", 4) == "B"
    assert extract_choice("Answer: A", 4) is None  # no block: malformed
    assert extract_choice("<think>Answer: A</think><answer>hmm</answer>", 4) is None


def test_score_with_gold_letter_and_option_text():
    sample = {"domain": "science", "answer": "B", "choices": ["122", "132", "142", "133"]}
    assert score(sample, A("B"))
    assert not score(sample, A("C"))
    assert score(sample, A("132"))  # the whole block is exactly one option's text
    assert not score(sample, A("132 or 133"))
    assert not score(sample, "B")  # malformed
    assert score({"domain": "science", "answer": "(b)", "choices": ["1", "2"]}, A("Answer: B"))


@pytest.mark.parametrize("gold", [None, "", "E", "AB", 3])
def test_bad_gold_raises(gold):
    with pytest.raises(GoldParseError):
        score({"domain": "science", "answer": gold, "choices": ["1", "2", "3", "4"]}, A("A"))
