"""Templates and the parser (docs/design.md §3)."""
from __future__ import annotations

import pytest

from kat.data import templates as T


@pytest.mark.parametrize("mode,thinking", [("on", "7+5=12;=12"), ("off", None)])
def test_coldstart_round_trip(mode, thinking):
    text = T.coldstart_target(mode, "why: because", thinking, "12")
    p = T.parse(text)
    assert (p.judge, p.mode, p.thinking, p.answer, p.well_formed) == ("why: because", mode, thinking, "12", True)


def test_exact_contract_strings():
    assert T.coldstart_target("on", "j", "t", "a") == "<judge>j</judge><think_on><think>t</think><answer>a</answer>"
    assert T.coldstart_target("off", "j", None, "a") == "<judge>j</judge><think_off><answer>a</answer>"
    assert T.distill_target("on", "t", "a") == ("<think_on>", "<think>t</think><answer>a</answer>")
    assert T.distill_target("off", None, "a") == ("<think_off>", "<answer>a</answer>")


@pytest.mark.parametrize(
    "text,mode,well_formed",
    [
        ("<judge>j</judge><think_off><think>x</think><answer>1</answer>", "off", False),  # off with a trace
        ("<judge>j</judge><think_on><answer>1</answer>", "on", False),  # on without a trace
        ("<judge>j</judge><answer>1</answer>", None, False),  # no mode token after </judge>
        ("<judge>j</judge><think_on><think>x", "on", False),  # truncated
        ("<judge>j", None, False),  # unclosed judge
        ("", None, False),
        ("<think_off><answer>5</answer>", "off", True),  # no judge block (distill-style) is still a template
        ("<judge>j</judge><think_off><answer>1<answer>2</answer>", "off", False),  # stray tag inside answer
        ("<judge>j</judge><think_off><answer>1</answer>trailing", "off", True),
    ],
)
def test_malformed(text, mode, well_formed):
    p = T.parse(text)
    assert p.mode == mode
    assert p.well_formed is well_formed


def test_mode_only_directly_after_judge():
    p = T.parse("<judge>j</judge>some text<think_on><think>x</think><answer>1</answer>")
    assert p.mode is None and not p.well_formed
    assert p.answer == "1"  # the answer is still found for grading


def test_answer_block():
    assert T.answer_block("<answer> 42 </answer>") == " 42 "
    assert T.answer_block("no answer") is None
    assert T.answer_block("<answer>unclosed") is None


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        T.coldstart_target("maybe", "j", None, "a")
    with pytest.raises(ValueError, match="thinking"):
        T.coldstart_target("on", "j", None, "a")
