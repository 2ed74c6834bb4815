"""Robust parsing of endpoint replies, and the reasons a reply is a *bad answer*.

Every role of the synth chain asks for one kind of output; the parser of that role returns the value or a
:class:`BadAnswer` whose ``reason`` is one of :data:`BAD_REASONS`. Bad answers are counted, retried with a
fresh sample index and, when the retries run out, the item is set aside with the reason (never written as
data). Pure functions, no I/O.

=================  ===========================================================================
reason             meaning
=================  ===========================================================================
``empty``          nothing but whitespace (or only the server's end-of-text markers)
``refusal``        the reply opens with a refusal ("I'm sorry, but I can't ...")
``non_json``       a JSON object was asked for and none could be decoded
``invalid``        the JSON decoded but a field is missing or out of range (level 7, domain "art")
``wrong_format``   no ``<answer>`` block (nor an ``Answer:`` line) where one was asked for
``truncated``      the reply hit the token limit before its answer was closed
``stray_tags``     kat's tags or chat control tokens (``<|im_end|>``) inside a part (they would corrupt the templates)
``too_long``       a rationale longer than the configured limit
=================  ===========================================================================
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from kat.data.templates import ANSWER_CLOSE, ANSWER_OPEN, SPECIAL_TOKENS, THINK_CLOSE, THINK_OPEN

BAD_REASONS = ("empty", "refusal", "non_json", "invalid", "wrong_format", "truncated", "stray_tags", "too_long")

#: default refusal openings (case-insensitive, matched at the start of the stripped reply)
DEFAULT_REFUSALS = (
    r"i'?m sorry\b", r"i am sorry\b", r"sorry,? (?:but )?i", r"i can(?:no|')t (?:help|assist|comply|do that|answer)",
    r"i cannot (?:help|assist|comply|do that|answer)", r"i'?m (?:not able|unable) to", r"i am (?:not able|unable) to",
    r"as an ai\b", r"i won'?t (?:help|assist|answer)",
)

#: end-of-text markers some servers leave in the text (stripped before parsing)
_EOT = re.compile(r"(?:<\|endoftext\|>|<\|im_end\|>|<\|end\|>|<\|eot_id\|>|</s>)+\s*$")

DOMAIN_SYNONYMS = {
    "maths": "math", "mathematics": "math", "arithmetic": "math", "algebra": "math", "geometry": "math",
    "programming": "code", "coding": "code", "software": "code", "python": "code",
    "physics": "science", "chemistry": "science", "biology": "science", "medicine": "science",
    "chat": "general", "writing": "general", "knowledge": "general", "other": "general",
    "multi-turn": "multiturn", "multi_turn": "multiturn", "dialogue": "multiturn",
    "tools": "tool", "tool_use": "tool", "tool-use": "tool", "function_calling": "tool",
}


@dataclass(frozen=True)
class BadAnswer:
    """Why a reply cannot be used: ``reason`` (one of :data:`BAD_REASONS`) and a short ``detail``."""

    reason: str
    detail: str = ""

    def __post_init__(self):
        if self.reason not in BAD_REASONS:
            raise ValueError(f"reason must be one of {BAD_REASONS}, got {self.reason!r}")


@dataclass(frozen=True)
class Solution:
    """A parsed answer: ``answer`` (the text for ``<answer>``) and ``thinking`` (None for direct answers)."""

    answer: str
    thinking: str | None = None


def compile_refusals(patterns: Iterable[str] | None = None) -> re.Pattern:
    """One case-insensitive regex matching any of ``patterns`` at the start of a reply."""
    pats = list(DEFAULT_REFUSALS if patterns is None else patterns)
    if not pats:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(r"^\s*(?:" + "|".join(f"(?:{p})" for p in pats) + ")", re.IGNORECASE)


_DEFAULT_REFUSAL_RE = compile_refusals()


def clean(text: str | None) -> str:
    """The reply without surrounding whitespace and trailing end-of-text markers."""
    return _EOT.sub("", text or "").strip()


def screen(text: str | None, refusals: re.Pattern | None = None) -> BadAnswer | None:
    """``empty`` or ``refusal`` for unusable replies, else None (the reply may still fail its parser)."""
    t = clean(text)
    if not t:
        return BadAnswer("empty")
    if (refusals or _DEFAULT_REFUSAL_RE).match(t):
        return BadAnswer("refusal", t[:80])
    return None


def _strip_fences(text: str) -> str:
    m = re.search(r"```(?:json|JSON)?\s*\n?(.*?)```", text, re.DOTALL)
    return m.group(1) if m else text


def extract_json(text: str) -> dict | None:
    """The first JSON object in ``text`` (Markdown fences, prose around it and Python-style quotes tolerated)."""
    t = _strip_fences(clean(text))
    dec = json.JSONDecoder()
    for i, ch in enumerate(t):
        if ch != "{":
            continue
        try:
            obj, _ = dec.raw_decode(t, i)
        except json.JSONDecodeError:
            obj = None
        if obj is None:  # {'domain': 'math', 'level': 3, 'ok': True}: a Python literal
            j = t.find("}", i)
            while j >= 0 and obj is None:
                try:
                    obj = ast.literal_eval(t[i : j + 1])
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    obj = None
                j = t.find("}", j + 1) if obj is None else j
        if isinstance(obj, dict):
            return obj
    return None


def _get_ci(obj: dict, *names: str) -> Any:
    low = {str(k).strip().lower(): v for k, v in obj.items()}
    for n in names:
        if n in low:
            return low[n]
    return None


def _level(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)) and float(v).is_integer():
        return int(v)
    if isinstance(v, str):
        m = re.search(r"\d+", v)
        if m:
            return int(m.group(0))
    return None


def normalize_domain(v: Any, allowed: Sequence[str]) -> str | None:
    """``v`` as one of ``allowed`` (case, spacing and common synonyms tolerated), else None."""
    if not isinstance(v, str):
        return None
    d = v.strip().strip(".").lower()
    d = DOMAIN_SYNONYMS.get(d, d)
    return d if d in allowed else None


def parse_tag(text: str, domains: Sequence[str], refusals: re.Pattern | None = None) -> dict | BadAnswer:
    """``{"domain": str, "level": int}`` from a tagger's reply, or why not.

    Reads the first JSON object (keys case-insensitive: ``domain``/``category``/``subject`` and
    ``level``/``difficulty``; ``"3"``, ``"level 3"``, ``3.0`` are level 3); without one, ``domain: X`` and
    ``level: N`` lines. Level must be 1..5 and the domain one of ``domains``.
    """
    bad = screen(text, refusals)
    if bad:
        return bad
    obj = extract_json(text)
    if obj is None:
        t = clean(text)
        dm = re.search(r"(?im)\b(?:domain|category)\s*[:=]\s*[\"']?([\w-]+)", t)
        lm = re.search(r"(?im)\b(?:level|difficulty)\s*[:=]\s*[\"']?(\d+)", t)
        if not (dm and lm):
            return BadAnswer("non_json", clean(text)[:80])
        obj = {"domain": dm.group(1), "level": lm.group(1)}
    raw_d = _get_ci(obj, "domain", "category", "subject")
    raw_l = _get_ci(obj, "level", "difficulty", "difficulty_level")
    level = _level(raw_l)
    if level is None or not 1 <= level <= 5:
        return BadAnswer("invalid", f"level {raw_l!r}")
    domain = normalize_domain(raw_d, domains)
    if domain is None:
        return BadAnswer("invalid", f"domain {raw_d!r}")
    return {"domain": domain, "level": level}


def _truthy(v: Any) -> bool | None:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return bool(v)
    if isinstance(v, str):
        s = v.strip().lower()
        if s in ("true", "yes", "correct", "right", "1", "y"):
            return True
        if s in ("false", "no", "incorrect", "wrong", "0", "n"):
            return False
    return None


def parse_correct(text: str, refusals: re.Pattern | None = None) -> bool | BadAnswer:
    """A grader's ``{"correct": true|false}`` (or a ``correct: yes|no`` line)."""
    bad = screen(text, refusals)
    if bad:
        return bad
    obj = extract_json(text)
    if obj is None:
        m = re.search(r"(?im)\b(?:correct|verdict)\s*[:=]\s*[\"']?(\w+)", clean(text))
        if not m:
            return BadAnswer("non_json", clean(text)[:80])
        obj = {"correct": m.group(1)}
    v = _truthy(_get_ci(obj, "correct", "is_correct", "verdict"))
    if v is None:
        return BadAnswer("invalid", f"correct {_get_ci(obj, 'correct', 'is_correct', 'verdict')!r}")
    return v


VERDICTS = ("accept", "revise", "reject")


def parse_verdict(text: str, refusals: re.Pattern | None = None) -> tuple[str, str] | BadAnswer:
    """A critic's ``{"verdict": "accept"|"revise"|"reject", "feedback": str}`` -> ``(verdict, feedback)``.

    Without JSON only an explicit ``verdict: X`` line counts (a bare "accept" inside prose is ambiguous).
    """
    bad = screen(text, refusals)
    if bad:
        return bad
    obj = extract_json(text)
    if obj is None:
        m = re.search(r"(?im)\bverdict\s*[:=]\s*[\"']?(\w+)", clean(text))
        if not m:
            return BadAnswer("non_json", clean(text)[:80])
        obj = {"verdict": m.group(1), "feedback": clean(text)}
    v = _get_ci(obj, "verdict", "decision")
    v = v.strip().lower() if isinstance(v, str) else v
    if v not in VERDICTS:
        return BadAnswer("invalid", f"verdict {v!r}")
    fb = _get_ci(obj, "feedback", "reason", "notes", "comment")
    return v, (fb.strip() if isinstance(fb, str) else "")


#: chat-template control tokens (``<|im_start|>``, ``<|assistant|>``, ...) leaking into generated text
_CONTROL = re.compile(r"<\|[^|<>\s]{1,40}\|>")


def _has_tags(*parts: str | None) -> bool:
    """kat's tags or chat-template control tokens inside a part."""
    return any(p is not None and (any(t in p for t in SPECIAL_TOKENS) or _CONTROL.search(p)) for p in parts)


_ANSWER_LINE = re.compile(r"(?im)^\s*(?:\*\*)?(?:final answer|answer)\s*(?:[:：]\s*\*\*|\*\*\s*[:：]|[:：])\s*(.+?)\s*$")


def parse_solution(text: str, *, reasoning: str | None = None, finish_reason: str | None = None,
                   need_thinking: bool = False, refusals: re.Pattern | None = None) -> Solution | BadAnswer:
    """Thinking and answer from a reply in kat's body format or a chat model's approximation of it.

    Answer: the first ``<answer>…</answer>`` block, else the last ``Answer:``/``Final answer:`` line.
    Thinking (``need_thinking``): the ``<think>…</think>`` block, else the server's separate
    ``reasoning`` (``reasoning_content`` of reasoning-parser servers), else the text before the answer.
    A reply without an answer is ``truncated`` when it hit the token limit, else ``wrong_format``.
    """
    bad = screen(text, refusals)
    t = clean(text)
    if bad and not (bad.reason == "empty" and reasoning and need_thinking):
        return bad
    answer = None
    start = t.find(ANSWER_OPEN)
    if start >= 0:
        end = t.find(ANSWER_CLOSE, start + len(ANSWER_OPEN))
        if end >= 0:
            answer = t[start + len(ANSWER_OPEN) : end]
        elif finish_reason == "length":
            return BadAnswer("truncated", "answer not closed")
    if answer is None and start < 0:
        lines = _ANSWER_LINE.findall(t)
        if lines:
            answer = lines[-1]
    if answer is None:
        if finish_reason == "length":
            return BadAnswer("truncated")
        return BadAnswer("wrong_format", "no <answer> block")
    answer = answer.strip()
    if not answer:
        return BadAnswer("empty", "empty answer")
    thinking = None
    if need_thinking:
        i = t.find(THINK_OPEN)
        j = t.find(THINK_CLOSE, i + 1) if i >= 0 else -1
        if i >= 0 and j >= 0:
            thinking = t[i + len(THINK_OPEN) : j].strip()
        elif reasoning and reasoning.strip():
            thinking = reasoning.strip()
        else:
            head = t[:start] if start >= 0 else t[: t.rfind(answer)]
            thinking = head.replace(THINK_OPEN, "").replace(THINK_CLOSE, "").strip()
        if not thinking:
            return BadAnswer("wrong_format", "no reasoning before the answer")
    if _has_tags(answer, thinking):
        return BadAnswer("stray_tags")
    return Solution(answer=answer, thinking=thinking)


def parse_rationale(text: str, *, max_chars: int = 400, refusals: re.Pattern | None = None) -> str | BadAnswer:
    """A one-paragraph judge rationale: whitespace collapsed, quotes and ``<judge>`` tags around it removed."""
    bad = screen(text, refusals)
    if bad:
        return bad
    t = clean(text)
    t = t.replace("<judge>", "").replace("</judge>", "")
    t = re.sub(r"^(?:rationale|judge)\s*[:：]\s*", "", t, flags=re.IGNORECASE)
    t = " ".join(t.split()).strip().strip('"').strip("'").strip()
    if not t:
        return BadAnswer("empty")
    if _has_tags(t):
        return BadAnswer("stray_tags")
    if len(t) > max_chars:
        return BadAnswer("too_long", f"{len(t)} > {max_chars} characters")
    return t
