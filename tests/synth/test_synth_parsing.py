"""kat.synth.parsing: every role's parser on well-formed, sloppy and bad replies."""
from __future__ import annotations

import pytest

from kat.synth.parsing import (BadAnswer, Solution, compile_refusals, extract_json, parse_correct, parse_rationale,
                               parse_solution, parse_tag, parse_verdict, screen)

DOMAINS = ("math", "code", "science", "general", "multiturn", "tool")


@pytest.mark.parametrize("text,expected", [
    ('{"domain": "math", "level": 3}', {"domain": "math", "level": 3}),
    ('Sure!\n```json\n{"Domain": "Mathematics", "Difficulty": "Level 4"}\n```', {"domain": "math", "level": 4}),
    ("{'domain': 'code', 'level': 2.0}", {"domain": "code", "level": 2}),
    ('The tags are {"category": "physics", "level": "5/5"} as requested.', {"domain": "science", "level": 5}),
    ("domain: general\nlevel: 1", {"domain": "general", "level": 1}),
    ('{"domain": "tool", "level": 2}<|im_end|>', {"domain": "tool", "level": 2}),
])
def test_parse_tag_accepts_sloppy_but_unambiguous_replies(text, expected):
    assert parse_tag(text, DOMAINS) == expected


@pytest.mark.parametrize("text,reason", [
    ("", "empty"),
    ("   <|endoftext|>", "empty"),
    ("I'm sorry, but I can't help with that.", "refusal"),
    ("this is hard, maybe a three", "non_json"),
    ('{"domain": "math", "level": 7}', "invalid"),
    ('{"domain": "math", "level": true}', "invalid"),
    ('{"domain": "art", "level": 2}', "invalid"),
    ('{"domain": "math"}', "invalid"),
])
def test_parse_tag_names_the_reason_of_bad_replies(text, reason):
    out = parse_tag(text, DOMAINS)
    assert isinstance(out, BadAnswer) and out.reason == reason


def test_parse_tag_respects_the_allowed_domains():
    out = parse_tag('{"domain": "code", "level": 2}', ("math", "general"))
    assert isinstance(out, BadAnswer) and out.reason == "invalid" and "code" in out.detail


def test_extract_json_takes_the_first_object_and_skips_broken_braces():
    assert extract_json('x {broken {"a": 1} {"b": 2}') == {"a": 1}
    assert extract_json("no object here") is None
    assert extract_json("[1, 2]") is None


def test_refusals_are_configurable():
    custom = compile_refusals([r"nope\b"])
    assert screen("Nope, not doing that", custom).reason == "refusal"
    assert screen("I'm sorry, but no", custom) is None  # the default list is replaced
    assert screen("I'm sorry, but no").reason == "refusal"
    assert screen("Sorry about the wait: 42") is None  # an apology that is not a refusal
    assert screen("anything", compile_refusals([])) is None


@pytest.mark.parametrize("text,expected", [
    ('{"correct": true}', True), ('{"correct": "no"}', False), ("correct: yes", True),
    ("```json\n{\"is_correct\": false}\n```", False),
])
def test_parse_correct(text, expected):
    assert parse_correct(text) is expected


@pytest.mark.parametrize("text,reason", [("maybe?", "non_json"), ('{"correct": "perhaps"}', "invalid"), ("", "empty")])
def test_parse_correct_bad(text, reason):
    assert parse_correct(text).reason == reason


def test_parse_verdict():
    assert parse_verdict('{"verdict": "Revise", "feedback": "step 2 drops a carry"}') == ("revise", "step 2 drops a carry")
    assert parse_verdict("Verdict: accept\nAll steps check out.")[0] == "accept"
    assert parse_verdict("I would not accept this").reason == "non_json"  # a bare word in prose is ambiguous
    assert parse_verdict('{"verdict": "maybe"}').reason == "invalid"


def test_parse_solution_kat_body_and_chat_variants():
    s = parse_solution("<think>7+5=12;4+8+1=13;=132</think><answer>132</answer>", need_thinking=True)
    assert s == Solution(answer="132", thinking="7+5=12;4+8+1=13;=132")
    assert parse_solution("<answer> B </answer><|endoftext|>") == Solution(answer="B")
    # a chat model that reasons in prose and ends with an Answer line
    s = parse_solution("First add the units.\nThen the tens.\n**Final answer:** 132", need_thinking=True)
    assert s.answer == "132" and "units" in s.thinking
    # reasoning-parser servers return the trace separately
    s = parse_solution("<answer>9</answer>", reasoning="4+5=9", need_thinking=True)
    assert s.thinking == "4+5=9"


@pytest.mark.parametrize("kwargs,reason", [
    (dict(text="<think>4+5=</think><answer>9"), "wrong_format"),
    (dict(text="<think>4+5=", finish_reason="length"), "truncated"),
    (dict(text="<think>4+5=</think><answer>9", finish_reason="length"), "truncated"),
    (dict(text="just a number 9"), "wrong_format"),
    (dict(text="<answer>   </answer>"), "empty"),
    (dict(text="<answer>9<judge></answer>"), "stray_tags"),
    (dict(text="<think>x<|assistant|></think><answer>9</answer>", need_thinking=True), "stray_tags"),
    (dict(text="<answer>9</answer>", need_thinking=True), "wrong_format"),
    (dict(text="As an AI, I cannot do math."), "refusal"),
])
def test_parse_solution_bad(kwargs, reason):
    out = parse_solution(**kwargs)
    assert isinstance(out, BadAnswer) and out.reason == reason, out


def test_parse_rationale():
    assert parse_rationale('Rationale: "A one-step sum I can recall;\n use THINK-OFF mode."') == \
        "A one-step sum I can recall; use THINK-OFF mode."
    assert parse_rationale("<judge>Needs several carries; use THINK-ON mode.</judge>") == \
        "Needs several carries; use THINK-ON mode."
    assert parse_rationale("x" * 500, max_chars=400).reason == "too_long"
    assert parse_rationale("<|assistant|><|assistant|>").reason == "stray_tags"
    assert parse_rationale("<think_on>").reason == "stray_tags"
    assert parse_rationale('""').reason == "empty"


def test_bad_answer_rejects_unknown_reasons():
    with pytest.raises(ValueError, match="reason must be one of"):
        BadAnswer("weird")
