"""Special tokens, response templates and the parser for kat's adaptive-thinking format.

The targets (docs/design.md §3, contract):

* think-on:  ``<judge>{judge}</judge><think_on><think>{thinking}</think><answer>{response}</answer>``
* think-off: ``<judge>{judge}</judge><think_off><answer>{response}</answer>``
* distill (stage 1): the trigger ``<think_on>`` / ``<think_off>`` is part of the *input* (no loss);
  the target is ``<think>{thinking}</think><answer>{response}</answer>`` or ``<answer>{response}</answer>``.

Every one of the eight tags is a single token id in every tokenizer kat uses
(:func:`kat.models.tokenizer.add_special_tokens`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

JUDGE_OPEN, JUDGE_CLOSE = "<judge>", "</judge>"
THINK_ON, THINK_OFF = "<think_on>", "<think_off>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

#: The eight kat tags, in a fixed order (this order is the order of their ids when added to a tokenizer).
SPECIAL_TOKENS: tuple[str, ...] = (
    JUDGE_OPEN,
    JUDGE_CLOSE,
    THINK_ON,
    THINK_OFF,
    THINK_OPEN,
    THINK_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
)
MODE_TOKENS = {"on": THINK_ON, "off": THINK_OFF}


def mode_token(mode: str) -> str:
    """``"on"`` -> ``<think_on>``, ``"off"`` -> ``<think_off>``."""
    try:
        return MODE_TOKENS[mode]
    except KeyError:
        raise ValueError(f"mode must be 'on' or 'off', got {mode!r}") from None


def body(mode: str, thinking: str | None, response: str) -> str:
    """The part after the mode token: ``<think>…</think><answer>…</answer>`` or ``<answer>…</answer>``."""
    if mode == "on":
        if thinking is None:
            raise ValueError("a think-on target needs a thinking trace")
        return f"{THINK_OPEN}{thinking}{THINK_CLOSE}{ANSWER_OPEN}{response}{ANSWER_CLOSE}"
    if mode == "off":
        return f"{ANSWER_OPEN}{response}{ANSWER_CLOSE}"
    raise ValueError(f"mode must be 'on' or 'off', got {mode!r}")


def judge_prefix(judge: str) -> str:
    """``<judge>{judge}</judge>``."""
    return f"{JUDGE_OPEN}{judge}{JUDGE_CLOSE}"


def coldstart_target(mode: str, judge: str, thinking: str | None, response: str) -> str:
    """The full stage-2/3 completion: judge, mode token, (thinking,) answer."""
    return judge_prefix(judge) + mode_token(mode) + body(mode, thinking, response)


def distill_target(mode: str, thinking: str | None, response: str) -> tuple[str, str]:
    """Stage-1 pair ``(trigger, target)``: the trigger goes into the input and carries no loss."""
    return mode_token(mode), body(mode, thinking, response)


@dataclass(frozen=True)
class Parsed:
    """A completion split into its parts. Missing parts are ``None``.

    ``mode`` is ``"on"``/``"off"`` when a mode token directly follows ``</judge>`` (or opens the
    completion when it has no judge block), else ``None``. ``well_formed`` is True only when the
    completion follows one of the two templates exactly (optional text after ``</answer>`` aside).
    """

    judge: str | None
    mode: str | None
    thinking: str | None
    answer: str | None
    well_formed: bool


_FULL = re.compile(
    r"^\s*(?:<judge>(?P<judge>.*?)</judge>)?\s*(?P<mode><think_on>|<think_off>)"
    r"(?:\s*<think>(?P<thinking>.*?)</think>)?\s*<answer>(?P<answer>.*?)</answer>",
    re.DOTALL,
)


def _between(text: str, open_tag: str, close_tag: str) -> str | None:
    i = text.find(open_tag)
    if i < 0:
        return None
    j = text.find(close_tag, i + len(open_tag))
    return None if j < 0 else text[i + len(open_tag) : j]


def parse(completion: str) -> Parsed:
    """Split a completion into judge, mode, thinking and answer (docs/design.md §3, contract).

    Lenient on what it extracts (a truncated think-on completion still yields judge and mode),
    strict on ``well_formed``: judge block (if any), then mode token, then ``<think>…</think>``
    exactly when the mode is on, then ``<answer>…</answer>``.

    >>> p = parse("<judge>easy</judge><think_off><answer>42</answer>")
    >>> (p.judge, p.mode, p.thinking, p.answer, p.well_formed)
    ('easy', 'off', None, '42', True)
    >>> parse("<judge>hard</judge><think_on><think>1+1=2</think>").mode
    'on'
    """
    judge = _between(completion, JUDGE_OPEN, JUDGE_CLOSE)
    rest = completion
    if judge is not None:
        rest = completion[completion.find(JUDGE_CLOSE) + len(JUDGE_CLOSE) :]
    stripped = rest.lstrip()
    mode = None
    if stripped.startswith(THINK_ON):
        mode = "on"
    elif stripped.startswith(THINK_OFF):
        mode = "off"
    thinking = _between(rest, THINK_OPEN, THINK_CLOSE)
    answer = _between(rest, ANSWER_OPEN, ANSWER_CLOSE)

    m = _FULL.match(completion)
    well_formed = bool(m) and (
        (m.group("mode") == THINK_ON and m.group("thinking") is not None)
        or (m.group("mode") == THINK_OFF and m.group("thinking") is None)
    )
    if well_formed:
        # no stray tags inside the parts
        parts = [m.group("judge") or "", m.group("thinking") or "", m.group("answer")]
        well_formed = not any(tag in part for part in parts for tag in SPECIAL_TOKENS)
    return Parsed(judge=judge, mode=mode, thinking=thinking, answer=answer, well_formed=well_formed)


def answer_block(completion: str) -> str | None:
    """The text inside the first ``<answer>…</answer>`` block, or None. Verifiers read only this."""
    return _between(completion, ANSWER_OPEN, ANSWER_CLOSE)
