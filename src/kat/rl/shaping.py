"""Reward shaping: the per-rollout and per-group reward rules of each estimator, on plain sequences.

Specification (formulas, defaults, every departure from a paper): ``docs/algorithms.md`` §6 (Step-SRPO, kat's
own spec) and §7 (GRPO, DAPO, AdaptThink, Thinkless side by side). :mod:`kat.rl.credit` turns these rewards into
per-token advantages (one ``*_credit`` function per estimator).

* shared rules: :func:`is_correct`, :func:`answer_reward`;
* Step-SRPO: :func:`preferred_mode`, :func:`step_srpo_group_rewards` (answer, judge and modulated reward), with
  its settings :class:`StepSRPOConfig` (``conf/algorithm/step_srpo.yaml`` ``credit:``);
* the others: :func:`grpo_rewards`, :func:`dapo_rewards` (+ :func:`overlong_penalty`), :func:`adaptthink_rewards`,
  :func:`thinkless_rewards`.

Rows are prompt-major (``i = b*G + j``); a score is a float in [0, 1] or ``None`` (ungradable).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from kat.losses.advantages import ADVANTAGE_SCALES

__all__ = [
    "MODES",
    "MODULATIONS",
    "StepSRPOConfig",
    "StepSRPOGroup",
    "adaptthink_rewards",
    "answer_reward",
    "dapo_rewards",
    "grpo_rewards",
    "is_correct",
    "overlong_penalty",
    "preferred_mode",
    "step_srpo_group_rewards",
    "thinkless_rewards",
]

MODES = ("on", "off")
MODULATIONS = ("multiplicative", "additive", "gated", "none")


def _check_mode(name: str, mode: str | None, allow_none: bool = True) -> None:
    if mode is None and allow_none:
        return
    if mode not in MODES:
        raise ValueError(f"{name} must be 'on', 'off'{' or None' if allow_none else ''}, got {mode!r}")


def _same_len(**seqs: Sequence | None) -> int:
    lens = {k: len(v) for k, v in seqs.items() if v is not None}
    if len(set(lens.values())) > 1:
        raise ValueError(f"per-rollout inputs must have the same length, got {lens}")
    return next(iter(lens.values()))


# --------------------------------------------------------------------------------------------------------------
# shared per-rollout rules
# --------------------------------------------------------------------------------------------------------------
def is_correct(score: float | None, well_formed: bool, threshold: float = 1.0) -> bool:
    """``well_formed ∧ score ≥ threshold`` (an ungradable ``None`` score is not correct)."""
    return bool(well_formed) and score is not None and score >= threshold


def answer_reward(score: float | None, well_formed: bool, *, format_penalty: float = -1.0) -> float | None:
    """Step-SRPO answer reward ``a``: the verifier score, or ``format_penalty`` for malformed output.

    ``None`` (ungradable) stays ``None`` when the output is well formed.

    >>> answer_reward(1.0, True), answer_reward(1.0, False), answer_reward(0.0, True)
    (1.0, -1.0, 0.0)
    """
    if not well_formed:
        return float(format_penalty)
    return None if score is None else float(score)


# --------------------------------------------------------------------------------------------------------------
# Step-SRPO
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepSRPOConfig:
    """Step-SRPO reward shaping and credit (docs/algorithms.md §6)."""

    judge_weight: float = field(
        default=0.5,
        metadata={"help": "w: weight of the judge reward in the modulation (algorithm.credit.judge_weight)"},
    )
    modulation: str = field(default="multiplicative", metadata={"help": "multiplicative | additive | gated | none"})
    margin: float = field(default=0.1, metadata={"help": "mu: think-off is right iff acc_off >= acc_on - margin"})
    format_penalty: float = field(default=-1.0, metadata={"help": "answer reward of malformed output"})
    correct_threshold: float = field(default=1.0, metadata={"help": "score >= this counts as correct"})
    efficiency_weight: float = field(default=0.0, metadata={"help": "eta: token-efficiency term in the judge reward"})
    scale: str = field(default="group", metadata={"help": "advantage scale: group | batch | none"})
    eps: float = field(default=1e-6, metadata={"help": "advantage epsilon"})
    decision_weight: float | None = field(
        default=None, metadata={"help": "None: judge tokens in the token-mean; float: own seq-mean term (§5)"}
    )

    def __post_init__(self) -> None:
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.scale not in ADVANTAGE_SCALES:
            raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {self.scale!r}")
        if self.judge_weight < 0:
            raise ValueError(f"judge_weight must be >= 0, got {self.judge_weight}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.efficiency_weight < 0:
            raise ValueError(f"efficiency_weight must be >= 0, got {self.efficiency_weight}")


class StepSRPOGroup(NamedTuple):
    """Rewards of one group of rollouts (``None`` entries only when ``skipped``)."""

    answer: tuple[float, ...]  # a_i: score, or the format penalty
    judge: tuple[float, ...]  # j_i: +1 right mode, −1 wrong or no mode, 0 undecided (+ η·e_i)
    reward: tuple[float, ...]  # r_i: a_i modulated by j_i (the answer tokens' reward)
    correct: tuple[bool, ...]
    preferred: str | None  # the mode judged right for this prompt
    acc_on: float | None  # accuracy of the think-on rollouts (None if there are none)
    acc_off: float | None
    skipped: bool  # an ungradable rollout: the whole group gets zero reward and advantage


def preferred_mode(
    modes: Sequence[str | None], correct: Sequence[bool], *, prior: str | None = None, margin: float = 0.1
) -> tuple[str | None, float | None, float | None]:
    """Which mode was right for this prompt, decided from the group (docs/algorithms.md §6.2).

    Returns ``(preferred, acc_on, acc_off)``. Both modes sampled: ``"off"`` iff ``acc_off ≥ acc_on − margin``,
    else ``"on"``. One mode sampled: ``prior`` (the cold-start label, may be ``None``). No mode: ``None``.

    >>> preferred_mode(["on", "on", "off", "off"], [True, True, True, False], margin=0.1)
    ('on', 1.0, 0.5)
    >>> preferred_mode(["on", "on", "off", "off"], [True, True, True, False], margin=0.5)
    ('off', 1.0, 0.5)
    >>> preferred_mode(["on", "on"], [True, False], prior="off")
    ('off', 0.5, None)
    """
    _same_len(modes=modes, correct=correct)
    _check_mode("prior", prior)
    acc = {}
    for mode in MODES:
        hits = [bool(c) for md, c in zip(modes, correct) if md == mode]
        acc[mode] = sum(hits) / len(hits) if hits else None
    for k, md in enumerate(modes):
        _check_mode(f"modes[{k}]", md)
    if acc["on"] is not None and acc["off"] is not None:
        pref = "off" if acc["off"] >= acc["on"] - margin else "on"
    elif acc["on"] is None and acc["off"] is None:
        pref = None
    else:
        pref = prior
    return pref, acc["on"], acc["off"]


def _efficiency(correct: Sequence[bool], lengths: Sequence[float]) -> list[float]:
    lens = [float(n) for n, c in zip(lengths, correct) if c]
    if not lens:
        return [0.0] * len(correct)
    mean = sum(lens) / len(lens)
    if mean <= 0:
        return [0.0] * len(correct)
    return [max(-1.0, min(1.0, 1.0 - float(n) / mean)) if c else 0.0 for n, c in zip(lengths, correct)]


def step_srpo_group_rewards(
    modes: Sequence[str | None],
    scores: Sequence[float | None],
    well_formed: Sequence[bool],
    *,
    prior: str | None = None,
    lengths: Sequence[float] | None = None,
    cfg: StepSRPOConfig = StepSRPOConfig(),
) -> StepSRPOGroup:
    """Answer, judge and modulated rewards of one group (docs/algorithms.md §6.1–6.3).

    ``a_i`` = score or ``format_penalty``; ``j_i`` = +1 when ``mode_i`` is the group's preferred mode
    (:func:`preferred_mode`), −1 when it is not or when ``mode_i`` is None, 0 when no mode is preferred; plus
    ``efficiency_weight·e_i`` with ``e_i = clip(1 − L_i/mean_correct(L), −1, 1)`` for correct rollouts (needs
    ``lengths``). Well-formed rollouts get ``r_i = a_i·(1 + w·j_i)`` (multiplicative), ``a_i + w·j_i`` (additive),
    ``a_i`` or ``(1 − w)·a_i`` when the mode was wrong (gated), or ``a_i`` (none); malformed ones
    ``r_i = format_penalty``. A group with an ungradable rollout is skipped (all zeros).
    """
    G = _same_len(modes=modes, scores=scores, well_formed=well_formed, lengths=lengths)
    if cfg.efficiency_weight > 0 and lengths is None:
        raise ValueError("lengths are required when efficiency_weight > 0")
    correct = tuple(is_correct(s, wf, cfg.correct_threshold) for s, wf in zip(scores, well_formed))
    if any(s is None and wf for s, wf in zip(scores, well_formed)):
        z = (0.0,) * G
        return StepSRPOGroup(z, z, z, correct, None, None, None, True)
    pref, acc_on, acc_off = preferred_mode(modes, correct, prior=prior, margin=cfg.margin)
    decision = [(-1.0 if md is None else 0.0 if pref is None else 1.0 if md == pref else -1.0) for md in modes]
    eff = _efficiency(correct, lengths) if cfg.efficiency_weight > 0 else [0.0] * G
    judge = [d + cfg.efficiency_weight * e for d, e in zip(decision, eff)]
    answer = [answer_reward(s, wf, format_penalty=cfg.format_penalty) for s, wf in zip(scores, well_formed)]
    w = cfg.judge_weight
    reward = []
    for a, j, d, wf in zip(answer, judge, decision, well_formed):
        if not wf:
            reward.append(float(cfg.format_penalty))
        elif cfg.modulation == "multiplicative":
            reward.append(a * (1.0 + w * j))
        elif cfg.modulation == "additive":
            reward.append(a + w * j)
        elif cfg.modulation == "gated":
            reward.append(a if d >= 0 else (1.0 - w) * a)
        else:
            reward.append(a)
    return StepSRPOGroup(tuple(answer), tuple(judge), tuple(reward), correct, pref, acc_on, acc_off, False)


# --------------------------------------------------------------------------------------------------------------
# the other algorithms' reward rules (docs/algorithms.md §7)
# --------------------------------------------------------------------------------------------------------------
def grpo_rewards(
    scores: Sequence[float | None], well_formed: Sequence[bool], *, format_penalty: float = 0.0
) -> list[float | None]:
    """Plain outcome reward: the verifier score; malformed output ``format_penalty`` (0: as an outcome verifier).

    >>> grpo_rewards([1.0, 0.0, 1.0], [True, True, False])
    [1.0, 0.0, 0.0]
    """
    _same_len(scores=scores, well_formed=well_formed)
    return [answer_reward(s, wf, format_penalty=format_penalty) for s, wf in zip(scores, well_formed)]


def overlong_penalty(length: float, *, max_len: int, cache_len: int, factor: float = 1.0) -> float:
    """DAPO soft overlong punishment: 0 up to ``max_len − cache_len``, then linear down to ``−factor`` at
    ``max_len`` (``min(−(L − (L_max − L_cache))/L_cache·factor, 0)``).

    >>> overlong_penalty(8, max_len=10, cache_len=4)
    -0.5
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    start = max_len - cache_len
    if length <= start:
        return 0.0
    return min(-(length - start) / cache_len * factor, 0.0)


def dapo_rewards(
    scores: Sequence[float | None],
    well_formed: Sequence[bool],
    lengths: Sequence[float] | None = None,
    *,
    correct_threshold: float = 1.0,
    correct_reward: float = 1.0,
    wrong_reward: float = -1.0,
    max_len: int | None = None,
    cache_len: int | None = None,
    factor: float = 1.0,
) -> list[float | None]:
    """DAPO: ``+1`` if correct else ``−1`` (malformed counts as wrong), plus :func:`overlong_penalty` when
    ``max_len`` is set (``cache_len`` defaults to ``max_len // 4``). Ungradable -> ``None``.

    >>> dapo_rewards([1.0, 0.0, 1.0], [True, True, True], [4, 5, 8], max_len=10, cache_len=4)
    [1.0, -1.0, 0.5]
    """
    _same_len(scores=scores, well_formed=well_formed, lengths=lengths)
    if max_len is not None and lengths is None:
        raise ValueError("lengths are required for the overlong penalty (max_len is set)")
    out: list[float | None] = []
    for k, (s, wf) in enumerate(zip(scores, well_formed)):
        if s is None and wf:
            out.append(None)
            continue
        r = correct_reward if is_correct(s, wf, correct_threshold) else wrong_reward
        if max_len is not None:
            r += overlong_penalty(lengths[k], max_len=max_len, cache_len=cache_len or max(1, max_len // 4),
                                  factor=factor)
        out.append(float(r))
    return out


def adaptthink_rewards(
    modes: Sequence[str | None],
    scores: Sequence[float | None],
    well_formed: Sequence[bool],
    *,
    ref_acc: float,
    delta: float = 0.05,
    correct_threshold: float = 1.0,
) -> list[float | None]:
    """AdaptThink: ``acc_i − ref_acc + δ·[mode_i = off]`` (acc 1/0; ``ref_acc`` = the reference model's mean
    accuracy on this prompt). Ungradable -> ``None``.

    >>> adaptthink_rewards(["off", "on", "off"], [1.0, 1.0, 0.0], [True] * 3, ref_acc=0.5)
    [0.55, 0.5, -0.45]
    """
    _same_len(modes=modes, scores=scores, well_formed=well_formed)
    if not 0.0 <= ref_acc <= 1.0:
        raise ValueError(f"ref_acc must be in [0, 1], got {ref_acc}")
    out: list[float | None] = []
    for md, s, wf in zip(modes, scores, well_formed):
        if s is None and wf:
            out.append(None)
            continue
        acc = 1.0 if is_correct(s, wf, correct_threshold) else 0.0
        out.append(acc - ref_acc + (delta if md == "off" else 0.0))
    return out


def thinkless_rewards(
    modes: Sequence[str | None],
    scores: Sequence[float | None],
    well_formed: Sequence[bool],
    *,
    short_correct: float = 1.0,
    think_correct: float = 0.5,
    wrong: float = -1.0,
    correct_threshold: float = 1.0,
) -> list[float | None]:
    """Thinkless: think-off (``<short>``) correct 1.0, think-on correct 0.5, wrong or malformed −1.0.

    >>> thinkless_rewards(["off", "on", "on", None], [1.0, 1.0, 0.0, 1.0], [True, True, True, False])
    [1.0, 0.5, -1.0, -1.0]
    """
    _same_len(modes=modes, scores=scores, well_formed=well_formed)
    out: list[float | None] = []
    for md, s, wf in zip(modes, scores, well_formed):
        if s is None and wf:
            out.append(None)
        elif is_correct(s, wf, correct_threshold) and md in MODES:
            out.append(short_correct if md == "off" else think_correct)
        else:
            out.append(wrong)
    return out
