"""Multiple-choice grading: extract the chosen letter from the ``<answer>`` block.

Patterns, tried in order inside the answer block only; the first that matches wins
(docs/verifiers.md, Science):

1. ``\\boxed{X}`` (also ``\\boxed{(X)}``, ``\\boxed{\\text{X}}``, ``\\boxed{\\mathrm{X}}``)
2. ``Answer: X`` / ``Answer：(X)`` (case-insensitive "answer"; first occurrence)
3. ``answer is X`` / ``option is (X)`` / ``choice is X``
4. the whole block is ``X``, ``(X)``, ``X.`` or ``X)``
5. the block starts with ``X)``, ``(X)``, ``X.`` or ``X:`` followed by text (``B) 132``)

``X`` is an upper-case letter among the first ``n_choices`` letters (A-Z when ``n_choices`` is None)
and must not run into another letter (``Answer: Avocado`` is no hit). There is no bare-letter
fallback: in "A good answer is…" the article is never read as option A. Lower-case letters are not
accepted (``answer is a ...`` is prose).

:func:`score` adds one rule for samples with ``choices``: when no pattern matches and the whole
block equals exactly one option's text (``132``), that option is chosen.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Mapping

from kat.data.templates import answer_block
from kat.rewards import GoldParseError

LETTERS = string.ascii_uppercase


@lru_cache(maxsize=32)
def _patterns(n_choices: int) -> tuple[re.Pattern, ...]:
    cls = "[" + LETTERS[:n_choices] + "]"
    x = rf"(?P<x>{cls})(?![A-Za-z])"
    return (
        re.compile(rf"\\boxed\s*\{{\s*\(?\s*(?:\\(?:text|mathrm|textbf|mathbf)\s*\{{\s*)?{x}\s*\}}?\s*\)?\s*\}}"),
        re.compile(rf"(?i:answer)\s*[:：]\s*\(?\s*{x}"),
        re.compile(rf"(?i:answer|option|choice)\s+is\s*:?\s*\(?\s*{x}"),
        re.compile(rf"\s*\(?\s*{x}\s*[).]?\s*", re.DOTALL),  # whole block (fullmatch)
        re.compile(rf"\s*\(?\s*(?P<x>{cls})\s*[).:]"),  # block start (match)
    )


def extract_choice(completion: str, n_choices: int | None = None) -> str | None:
    """The option letter chosen in the ``<answer>`` block of ``completion``, or None."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if n_choices is None:
        n_choices = len(LETTERS)
    if not isinstance(n_choices, int) or not 1 <= n_choices <= len(LETTERS):
        raise ValueError(f"n_choices must be an int in 1..{len(LETTERS)}, got {n_choices!r}")
    block = answer_block(completion)
    if block is None:
        return None
    return extract_from_block(block, n_choices)


def extract_from_block(block: str, n_choices: int) -> str | None:
    """:func:`extract_choice` on an already isolated answer block."""
    boxed, colon, is_, whole, start = _patterns(n_choices)
    for pat in (boxed, colon, is_):
        m = pat.search(block)
        if m:
            return m.group("x")
    m = whole.fullmatch(block)
    if m:
        return m.group("x")
    m = start.match(block)
    if m:
        return m.group("x")
    return None


def _norm_option(text: str) -> str:
    return " ".join(str(text).strip().rstrip(".").lower().split())


def gold_letter(sample: Mapping) -> tuple[str, int | None]:
    """``(letter, n_choices)`` of a science sample; raises GoldParseError when the gold is not a
    letter within the options (``"(B)"`` and ``"b"`` are accepted as B)."""
    gold = sample.get("answer")
    choices = sample.get("choices")
    n = len(choices) if isinstance(choices, (list, tuple)) and choices else None
    if n is not None and n > len(LETTERS):
        raise GoldParseError(f"science sample has {n} choices; at most {len(LETTERS)} are supported")
    if not isinstance(gold, str):
        raise GoldParseError(f"science gold must be a letter, got {gold!r}")
    g = gold.strip().strip("().").strip().upper()
    if len(g) != 1 or g not in LETTERS[: n or len(LETTERS)]:
        raise GoldParseError(f"science gold {gold!r} is not one of the option letters")
    return g, n


def score(sample: Mapping, completion: str) -> bool:
    """True when the letter chosen in ``completion`` is the sample's gold letter."""
    gold, n = gold_letter(sample)
    block = answer_block(completion)
    if block is None:
        return False
    got = extract_from_block(block, n or len(LETTERS))
    if got is None and n:
        hits = [i for i, c in enumerate(sample["choices"]) if _norm_option(c) == _norm_option(block)]
        if len(hits) == 1:
            got = LETTERS[hits[0]]
    return got == gold
