"""The embedded task suite: a seeded generator of adaptive-thinking tasks in four reward domains.

Every family is built on one skill a ~1M-parameter model learns on a CPU in minutes, multi-digit
addition, in the surface form of a reward domain (docs/tasks.md):

========  =====================================  ==========================  ====================
domain    prompt (example, level 3)              think-off response          graded by
========  =====================================  ==========================  ====================
math      ``47+85``                              ``132``                     math-verify
code      ``code: f(x)=x+47+85``                 ``f=lambda x:x+132``        unit tests, sandboxed
science   ``47+85? A)122 B)132 C)142 D)133``     ``B``                       choice extraction
general   ``Ann has 47, Bob 85. Total?``         ``132 in total``            keyword match
========  =====================================  ==========================  ====================

Level sets the operand sizes (default 1+1, 2+1, 2+2, 3+3, 4+4 digits; ``operand_digits`` changes them,
e.g. three 4-digit operands at level 5). A tiny model answers levels 1–2 directly (a lookup of at most
19×10 sums); from level 4 on the answer depends on a carry chain across 3–4 columns, which it computes
reliably only by writing the column sums out: the think-on trace is that column-by-column computation,
least significant column first, ending with the total (``7+5=12;4+8+1=13;=132``).

Mode labels (``labels="generator"``): think-off with probability ``off_share[level-1]`` (docs/design.md §4
default: half of level 1, nothing above: the cold-start model over-thinks, as the paper's does), then a
random mode for ``random_mode_rate`` of the items. ``labels="vote"`` replaces them with the teacher's
majority vote (kat.pipeline).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

DOMAINS4 = ("math", "code", "science", "general")
LEVEL_DIGITS = {1: (1, 1), 2: (2, 1), 3: (2, 2), 4: (3, 3), 5: (4, 4)}  # digits of each operand per level
NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Flo")  # the general family's people, one per operand
JUDGE_TEXT = {"on": "hard", "off": "easy"}
LETTERS = "ABCD"
HELDOUT_RESERVE = 100  # held-out items per (domain, level) kept out of training


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(0, 9) if digits == 1 else rng.randint(10 ** (digits - 1), 10**digits - 1)


def level_digits(operand_digits: Sequence[Sequence[int]] | None = None) -> dict[int, tuple[int, ...]]:
    """``{level: digits of each operand}`` from ``data.operand_digits`` (5 lists, levels 1..5; None = default).

    Accepts plain lists and config nodes alike (callers pass ``cfg.operand_digits`` as it is).
    """
    if operand_digits is None:
        return dict(LEVEL_DIGITS)
    rows = [list(r) for r in operand_digits]
    ok = len(rows) == 5 and all(
        2 <= len(r) <= len(NAMES) and all(isinstance(d, int) and 1 <= d <= 9 for d in r) for r in rows
    )
    if not ok:
        raise ValueError(
            "data.operand_digits must be 5 lists (levels 1..5) of 2 to 6 digit counts in 1..9, e.g. "
            f"[[1,1],[2,1],[2,2],[3,3],[4,4,4]]; got {rows}"
        )
    return {level: tuple(r) for level, r in enumerate(rows, start=1)}


def addition_trace(*ops: int) -> str:
    """Column-by-column sum, least significant column first: ``7+5=12;4+8+1=13;=132``.

    Any number of operands; the carry into a column is written as its value (``…+2`` with three operands).
    """
    digits = [str(x)[::-1] for x in ops]
    carry, steps = 0, []
    for i in range(max(len(d) for d in digits)):
        terms = [d[i] for d in digits if i < len(d)] + ([str(carry)] if carry else [])
        s = sum(int(t) for t in terms)
        steps.append(f"{'+'.join(terms)}={s}")
        carry = s // 10
    return ";".join(steps) + f";={sum(ops)}"


def _choices(rng: random.Random, s: int) -> tuple[list[str], str]:
    """Four distinct options for the sum ``s``; distractors differ by a carry (±1, ±10, ±100)."""
    cands = [s + d for d in (1, -1, 10, -10, 100, -100, 2, -2) if s + d >= 0]
    # prefer distractors that keep the last digit (only a full carry chain tells them apart)
    rng.shuffle(cands)
    cands.sort(key=lambda c: (c % 10 != s % 10))
    opts = [s] + cands[:3]
    rng.shuffle(opts)
    return [str(o) for o in opts], LETTERS[opts.index(s)]


def make_item(domain: str, level: int, ops: Sequence[int], rng: random.Random) -> dict:
    """One sample (the sum of ``ops``) in the schema of kat.data.schema, without mode/judge (see :func:`label`)."""
    s = sum(ops)
    expr = "+".join(str(x) for x in ops)
    trace = addition_trace(*ops)
    item: dict = {"domain": domain, "level": level}
    if domain == "math":
        prompt, response = expr, str(s)
        item["answer"] = str(s)
    elif domain == "code":
        prompt, response = f"code: f(x)=x+{expr}", f"f=lambda x:x+{s}"
        item["tests"] = f"assert f(0)=={s}\nassert f(3)=={s + 3}"
    elif domain == "science":
        opts, letter = _choices(rng, s)
        prompt = f"{expr}? " + " ".join(f"{LETTERS[i]}){o}" for i, o in enumerate(opts))
        response = letter
        trace = f"{trace}={letter}"
        item["choices"] = opts
        item["answer"] = letter
    elif domain == "general":
        people = ", ".join(f"{n} {x}" for n, x in zip(NAMES[1:], ops[1:]))
        prompt, response = f"{NAMES[0]} has {ops[0]}, {people}. Total?", f"{s} in total"
        item["answer"] = f"{s} in total"
    else:
        raise ValueError(f"synthetic suite has no {domain!r} family (known: {', '.join(DOMAINS4)})")
    item["messages"] = [{"role": "user", "content": prompt}]
    item["thinking"] = trace
    item["response"] = response
    return item


@dataclass
class LabelPolicy:
    """How the generator assigns cold-start modes (docs/design.md §4)."""

    off_share: Sequence[float] = (0.5, 0.0, 0.0, 0.0, 0.0)  # P(think-off) for levels 1..5
    random_mode_rate: float = 0.01  # share of items whose mode is then re-drawn uniformly

    def __post_init__(self):
        if len(self.off_share) != 5 or not all(0.0 <= p <= 1.0 for p in self.off_share):
            raise ValueError(f"data.off_share must be 5 probabilities (levels 1..5), got {list(self.off_share)}")
        if not 0.0 <= self.random_mode_rate <= 1.0:
            raise ValueError(f"data.random_mode_rate must be in [0, 1], got {self.random_mode_rate}")


def label(item: dict, mode: str) -> dict:
    """Set ``mode`` and the matching ``judge`` rationale."""
    item["mode"] = mode
    item["judge"] = JUDGE_TEXT[mode]
    return item


def generate(
    n_per_level: int,
    *,
    seed: int,
    split: str = "train",
    domains: Iterable[str] = DOMAINS4,
    levels: Iterable[int] = (1, 2, 3, 4, 5),
    labels: LabelPolicy | None = None,
    exclude: set[tuple] | None = None,
    operand_digits: Sequence[Sequence[int]] | None = None,
) -> list[dict]:
    """``n_per_level`` items per (domain, level), deterministic in ``(seed, split)``.

    ``exclude`` holds ``(domain, *operands)`` keys that must not be generated (the held-out split), for
    levels ≥ 2; level 1 has only 100 operand pairs, so train and held-out share them by design.
    ``operand_digits``: the digits of each operand per level (:func:`level_digits`; None = :data:`LEVEL_DIGITS`).
    """
    labels = labels or LabelPolicy()
    shapes = level_digits(operand_digits)
    out: list[dict] = []
    for domain in domains:
        for level in levels:
            if level not in shapes:
                raise ValueError(f"levels must be in 1..5, got {level}")
            # one stream per (domain, level): the first n items do not depend on n or on other blocks
            rng = random.Random(f"kat-synthetic/{seed}/{split}/{domain}/{level}")
            for i in range(n_per_level):
                for _ in range(1000):
                    ops = tuple(_operand(rng, d) for d in shapes[level])
                    if level == 1 or not exclude or (domain, *ops) not in exclude:
                        break
                item = make_item(domain, level, ops, rng)
                mode = "off" if rng.random() < labels.off_share[level - 1] else "on"
                if rng.random() < labels.random_mode_rate:
                    mode = rng.choice(("on", "off"))
                out.append({"id": f"{split}-{domain}-L{level}-{i}", **label(item, mode)})
    return out


def operands(item: dict) -> tuple[int, ...]:
    """The operands of a synthetic item, read from its prompt (used for the train/held-out exclusion).

    Every family writes the operands before its ``?`` (science options and the general question come after).
    """
    return tuple(int(x) for x in re.findall(r"\d+", item["messages"][-1]["content"].split("?")[0]))


@dataclass
class SyntheticSplits:
    """Train and held-out splits of the embedded suite."""

    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)


def splits(
    n_train_per_level: int,
    n_val_per_level: int,
    *,
    seed: int,
    domains: Iterable[str] = DOMAINS4,
    labels: LabelPolicy | None = None,
    operand_digits: Sequence[Sequence[int]] | None = None,
) -> SyntheticSplits:
    """Held-out items first, then training items that avoid the whole held-out reserve.

    The held-out split is a prefix of a fixed reserve of :data:`HELDOUT_RESERVE` items per (domain,
    level), so evaluations with different ``n_val_per_level`` never overlap training (levels ≥ 2).
    """
    domains = tuple(domains)
    if n_val_per_level > HELDOUT_RESERVE:
        raise ValueError(f"n_val_per_level must be <= {HELDOUT_RESERVE}, got {n_val_per_level}")
    reserve = generate(HELDOUT_RESERVE, seed=seed, split="heldout", domains=domains, labels=labels,
                       operand_digits=operand_digits)
    val = [it for it in reserve if int(it["id"].rsplit("-", 1)[1]) < n_val_per_level]
    exclude = {(it["domain"], *operands(it)) for it in reserve}
    train = generate(n_train_per_level, seed=seed, split="train", domains=domains, labels=labels, exclude=exclude,
                     operand_digits=operand_digits)
    return SyntheticSplits(train=train, val=val)
