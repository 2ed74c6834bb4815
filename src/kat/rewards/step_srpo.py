"""Step-SRPO reward and credit rules, and the rules of the algorithms kat compares it with.

Specification (formulas, defaults, every departure from a paper): ``docs/algorithms.md`` §6 (Step-SRPO, kat's
own spec; DESIGN §7) and §7 (GRPO, DAPO, AdaptThink, Thinkless side by side).

Per rollout the RL module provides the parsed mode (``"on"``/``"off"``/``None``), the verifier score (float in
[0, 1], ``None`` = ungradable), ``well_formed`` and the per-token segment ids (0 = not in the response,
1 = judge + mode tokens, 2 = thinking/answer tokens; :func:`segment_ids_from_tokens`). Per prompt: the
cold-start label (``prior``) and, for AdaptThink, the reference accuracy. Rows are prompt-major
(``i = b*G + j``).

Layers, from the bottom:

* per-group reward rules on plain sequences: :func:`step_srpo_group_rewards` (answer, judge, modulated
  reward), :func:`grpo_rewards`, :func:`dapo_rewards` (+ :func:`overlong_penalty`), :func:`adaptthink_rewards`,
  :func:`thinkless_rewards`;
* :func:`step_credit_advantages`: the per-token Step-SRPO advantage (torch reference of
  ``kat_kernels.grpo.step_credit_advantages``);
* :func:`assign_credit` (``algorithm=`` name -> :class:`Credit`) over a :class:`RolloutBatch`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import Tensor

from kat.losses.grpo import ADVANTAGE_SCALES, group_advantages

__all__ = [
    "ALGORITHMS",
    "MODULATIONS",
    "SEGMENT_ANSWER",
    "SEGMENT_JUDGE",
    "SEGMENT_PAD",
    "AdaptThinkConfig",
    "Credit",
    "DAPOConfig",
    "GRPOConfig",
    "RolloutBatch",
    "StepSRPOConfig",
    "StepSRPOGroup",
    "ThinklessConfig",
    "adaptthink_credit",
    "adaptthink_rewards",
    "answer_reward",
    "assign_credit",
    "dapo_credit",
    "dapo_rewards",
    "decision_token_mask",
    "forced_token_old_logp",
    "grpo_credit",
    "grpo_rewards",
    "is_correct",
    "overlong_penalty",
    "preferred_mode",
    "segment_ids_from_boundaries",
    "segment_ids_from_tokens",
    "step_credit_advantages",
    "step_srpo_credit",
    "step_srpo_group_rewards",
    "thinkless_credit",
    "thinkless_rewards",
]

SEGMENT_PAD, SEGMENT_JUDGE, SEGMENT_ANSWER = 0, 1, 2
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
        default=0.5, metadata={"help": "w: weight of the judge reward in the modulation (reward.judge_weight)"}
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
# segments
# --------------------------------------------------------------------------------------------------------------
def segment_ids_from_tokens(response_ids: Tensor, response_mask: Tensor, mode_token_ids: Sequence[int]) -> Tensor:
    """Segment ids ``[B, T]`` (long) from the response tokens (docs/algorithms.md §6.4).

    Valid positions up to and including the first mode token (``<think_on>``/``<think_off>``) are 1 (judge +
    mode), later valid positions 2; a row without a mode token is all 2; masked positions are 0.
    """
    if response_ids.dim() != 2 or response_ids.shape != response_mask.shape:
        raise ValueError(
            f"response_ids and response_mask must both be [B, T], got {tuple(response_ids.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    if len(mode_token_ids) == 0:
        raise ValueError("mode_token_ids must name at least one token id")
    m = response_mask.bool()
    ids = torch.as_tensor(list(mode_token_ids), device=response_ids.device, dtype=response_ids.dtype)
    is_mode = torch.isin(response_ids, ids) & m  # (B, T)
    pos = torch.arange(response_ids.shape[1], device=response_ids.device)[None, :]  # (1, T)
    first = torch.where(is_mode, pos, response_ids.shape[1]).min(dim=1, keepdim=True).values  # (B, 1); T if none
    found = first < response_ids.shape[1]
    seg = torch.where(found & (pos <= first), SEGMENT_JUDGE, SEGMENT_ANSWER)
    return torch.where(m, seg, SEGMENT_PAD).long()


def segment_ids_from_boundaries(boundaries: Tensor, response_mask: Tensor) -> Tensor:
    """Segment ids from ``boundaries [B]`` (the first column of segment 2) and ``response_mask [B, T]``:
    1 where ``mask ∧ t < k_i``, 2 where ``mask ∧ t ≥ k_i``, else 0."""
    if response_mask.dim() != 2 or boundaries.shape != (response_mask.shape[0],):
        raise ValueError(
            f"boundaries must be [B] and response_mask [B, T], got {tuple(boundaries.shape)} "
            f"and {tuple(response_mask.shape)}"
        )
    pos = torch.arange(response_mask.shape[1], device=response_mask.device)[None, :]
    seg = torch.where(pos < boundaries.to(pos.device).long()[:, None], SEGMENT_JUDGE, SEGMENT_ANSWER)
    return torch.where(response_mask.bool(), seg, SEGMENT_PAD).long()


def decision_token_mask(segment_ids: Tensor) -> Tensor:
    """The mode token of each row, as a bool mask ``[B, T]``: the last segment-1 position (none for rows
    without segment 1). Thinkless' control token in kat's format."""
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    pos = torch.arange(segment_ids.shape[1], device=segment_ids.device)[None, :]
    last = torch.where(segment_ids == SEGMENT_JUDGE, pos, -1).max(dim=1, keepdim=True).values  # (B, 1)
    return (pos == last) & (last >= 0)


# --------------------------------------------------------------------------------------------------------------
# step credit (torch reference of the Triton kernel)
# --------------------------------------------------------------------------------------------------------------
def _resolve_segments(
    segment_ids: Tensor | None, boundaries: Tensor | None, response_mask: Tensor | None, rows: int
) -> Tensor:
    if segment_ids is not None:
        if boundaries is not None or response_mask is not None:
            raise ValueError("give either segment_ids or (boundaries, response_mask), not both")
        if segment_ids.dim() != 2 or segment_ids.shape[0] != rows:
            raise ValueError(f"segment_ids must be [{rows}, T], got shape {tuple(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        return segment_ids
    if boundaries is None or response_mask is None:
        raise ValueError("segment_ids is None: boundaries and response_mask are both required")
    if response_mask.dim() != 2 or response_mask.shape[0] != rows:
        raise ValueError(f"response_mask must be [{rows}, T], got shape {tuple(response_mask.shape)}")
    return segment_ids_from_boundaries(boundaries, response_mask)


def step_credit_advantages(
    judge_rewards: Tensor,
    answer_rewards: Tensor,
    segment_ids: Tensor | None,
    group_size: int,
    *,
    boundaries: Tensor | None = None,
    response_mask: Tensor | None = None,
    eps: float = 1e-6,
    scale: str = "group",
) -> Tensor:
    """Per-token Step-SRPO advantages ``[B*G, T]`` fp32 (docs/algorithms.md §6.4)::

        A_{i,t} = group_advantages(judge)_i    where s_{i,t} = 1   (judge + mode tokens)
                = group_advantages(answer)_i   where s_{i,t} = 2   (thinking + answer tokens)
                = 0                            where s_{i,t} = 0

    ``judge_rewards, answer_rewards [B*G]`` (answer = the modulated reward ``r``); segments as ``segment_ids
    [B*G, T]`` or as ``boundaries [B*G]`` (first column of segment 2) with ``response_mask [B*G, T]``.
    Other segment values are an error. ``eps``/``scale`` as :func:`kat.losses.grpo.group_advantages`.
    """
    if judge_rewards.shape != answer_rewards.shape or judge_rewards.dim() != 1:
        raise ValueError(
            f"judge_rewards and answer_rewards must both be [B*G], got {tuple(judge_rewards.shape)} "
            f"and {tuple(answer_rewards.shape)}"
        )
    seg = _resolve_segments(segment_ids, boundaries, response_mask, judge_rewards.shape[0])
    if seg.numel() and bool(((seg < 0) | (seg > SEGMENT_ANSWER)).any()):
        raise ValueError("segment_ids must hold only 0 (padding), 1 (judge + mode) or 2 (thinking/answer)")
    a_j = group_advantages(judge_rewards, group_size, eps=eps, scale=scale).float()[:, None]  # (B*G, 1)
    a_a = group_advantages(answer_rewards, group_size, eps=eps, scale=scale).float()[:, None]
    zero = torch.zeros((), dtype=torch.float32, device=seg.device)
    return torch.where(seg == SEGMENT_JUDGE, a_j, torch.where(seg == SEGMENT_ANSWER, a_a, zero))  # (B*G, T)


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


def forced_token_old_logp(old_logp: Tensor, forced_mask: Tensor, prob: float = 0.5) -> Tensor:
    """AdaptThink's importance-sampling fix for a forced mode token: where ``forced_mask`` is True the
    behaviour log-prob is ``log(prob)`` (the rollout forced the choice with probability ``prob``). Same shape."""
    if old_logp.shape != forced_mask.shape:
        raise ValueError(f"forced_mask must have shape {tuple(old_logp.shape)}, got {tuple(forced_mask.shape)}")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"prob must be in (0, 1], got {prob}")
    return torch.where(forced_mask.bool(), torch.full_like(old_logp, math.log(prob)), old_logp)


# --------------------------------------------------------------------------------------------------------------
# batch level: algorithm name -> per-token credit
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutBatch:
    """What the RL module knows about ``B`` prompts × ``G`` rollouts (rows prompt-major)."""

    group_size: int
    modes: Sequence[str | None]  # (B*G,) parsed mode
    scores: Sequence[float | None]  # (B*G,) verifier score in [0, 1]; None = ungradable
    well_formed: Sequence[bool]  # (B*G,)
    segment_ids: Tensor  # (B*G, T) 0 pad, 1 judge + mode, 2 thinking/answer
    priors: Sequence[str | None] | None = None  # (B,) cold-start label per prompt (Step-SRPO)
    ref_acc: Sequence[float] | None = None  # (B,) reference accuracy per prompt (AdaptThink)

    def __post_init__(self) -> None:
        n = _same_len(modes=self.modes, scores=self.scores, well_formed=self.well_formed)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if n % self.group_size:
            raise ValueError(f"{n} rollouts is not a multiple of group_size={self.group_size}")
        if self.segment_ids.dim() != 2 or self.segment_ids.shape[0] != n:
            raise ValueError(f"segment_ids must be [{n}, T], got shape {tuple(self.segment_ids.shape)}")
        for name in ("priors", "ref_acc"):
            v = getattr(self, name)
            if v is not None and len(v) != n // self.group_size:
                raise ValueError(f"{name} must have one entry per prompt ({n // self.group_size}), got {len(v)}")
        for k, md in enumerate(self.modes):
            _check_mode(f"modes[{k}]", md)

    @property
    def num_groups(self) -> int:
        return len(self.modes) // self.group_size

    def group(self, b: int) -> slice:
        return slice(b * self.group_size, (b + 1) * self.group_size)

    def lengths(self) -> list[int]:
        """Response tokens per rollout (non-zero segment ids)."""
        return (self.segment_ids != SEGMENT_PAD).sum(-1).tolist()


class Credit(NamedTuple):
    """What an algorithm hands the policy loss (and the metrics)."""

    # all tensors on the device of RolloutBatch.segment_ids
    advantages: Tensor  # (B*G, T) fp32; 0 outside the response and in skipped groups
    reward: Tensor  # (B*G,) the reward behind the response tokens' advantage -> rl/reward_mean
    answer_reward: Tensor  # (B*G,) a_i before shaping/modulation -> rl/reward_answer
    judge_reward: Tensor | None  # (B*G,) j_i (step_srpo) -> rl/reward_judge
    correct: Tensor  # (B*G,) bool -> rl/acc, History Resampling, dynamic sampling
    skipped: Tensor  # (B,) bool: groups with an ungradable rollout (drop them from loss and metrics)
    decision_mask: Tensor | None  # (B*G, T) bool: tokens in the separate decision term of the loss
    decision_weight: float  # λ of the decision term (policy_loss(decision_weight=...))


@dataclass(frozen=True)
class GRPOConfig:
    format_penalty: float = field(default=0.0, metadata={"help": "reward of malformed output"})
    correct_threshold: float = field(default=1.0, metadata={"help": "score >= this counts as correct"})
    scale: str = field(default="group", metadata={"help": "advantage scale: group | batch | none"})
    eps: float = field(default=1e-6, metadata={"help": "advantage epsilon"})


@dataclass(frozen=True)
class DAPOConfig:
    correct_reward: float = field(default=1.0, metadata={"help": "reward of a correct answer"})
    wrong_reward: float = field(default=-1.0, metadata={"help": "reward of a wrong or malformed answer"})
    overlong_max_len: int | None = field(default=None, metadata={"help": "L_max (max_new_tokens); None: no penalty"})
    overlong_cache_len: int | None = field(default=None, metadata={"help": "L_cache; None: L_max // 4"})
    overlong_factor: float = field(default=1.0, metadata={"help": "penalty at L_max"})
    correct_threshold: float = field(default=1.0, metadata={"help": "score >= this counts as correct"})
    scale: str = field(default="group", metadata={"help": "advantage scale: group | batch | none"})
    eps: float = field(default=1e-6, metadata={"help": "advantage epsilon"})


@dataclass(frozen=True)
class AdaptThinkConfig:
    delta: float = field(default=0.05, metadata={"help": "bonus for think-off"})
    correct_threshold: float = field(default=1.0, metadata={"help": "score >= this counts as correct"})


@dataclass(frozen=True)
class ThinklessConfig:
    short_correct: float = field(default=1.0, metadata={"help": "reward: think-off and correct"})
    think_correct: float = field(
        default=0.5, metadata={"help": "reward: think-on and correct (0.8 in the reproduction)"}
    )
    wrong: float = field(default=-1.0, metadata={"help": "reward: wrong or malformed"})
    alpha: float = field(default=1e-3, metadata={"help": "weight of the control-token (mode token) loss term"})
    correct_threshold: float = field(default=1.0, metadata={"help": "score >= this counts as correct"})


def _flat_rewards(batch: RolloutBatch, per_group: Callable[[slice, int], list[float | None]]) -> tuple[Tensor, Tensor]:
    """Apply a per-group rule; groups with a None become zeros and are marked skipped."""
    vals: list[float] = []
    skipped: list[bool] = []
    for b in range(batch.num_groups):
        r = per_group(batch.group(b), b)
        skip = any(v is None for v in r)
        skipped.append(skip)
        vals.extend([0.0] * batch.group_size if skip else [float(v) for v in r])
    return torch.tensor(vals, dtype=torch.float32), torch.tensor(skipped, dtype=torch.bool)


def _correct(batch: RolloutBatch, threshold: float) -> Tensor:
    return torch.tensor([is_correct(s, wf, threshold) for s, wf in zip(batch.scores, batch.well_formed)],
                        dtype=torch.bool)


def _answer(batch: RolloutBatch, format_penalty: float, skipped: Tensor) -> Tensor:
    a = [answer_reward(s, wf, format_penalty=format_penalty) for s, wf in zip(batch.scores, batch.well_formed)]
    t = torch.tensor([0.0 if v is None else v for v in a], dtype=torch.float32)
    return torch.where(skipped.repeat_interleave(batch.group_size), 0.0, t)


def _outcome_credit(batch: RolloutBatch, skipped: Tensor, adv: Tensor) -> Tensor:
    dev = batch.segment_ids.device
    keep = (~skipped).repeat_interleave(batch.group_size).to(dev)  # (B*G,)
    adv = torch.where(keep, adv.to(dev).float(), 0.0)
    return adv[:, None] * (batch.segment_ids != SEGMENT_PAD).float()  # (B*G, T)


def grpo_credit(batch: RolloutBatch, cfg: GRPOConfig = GRPOConfig()) -> Credit:
    """GRPO: ``r = a`` (score, malformed ``format_penalty``), one group-normalised advantage on every token."""
    r, skipped = _flat_rewards(
        batch, lambda sl, b: grpo_rewards(batch.scores[sl], batch.well_formed[sl], format_penalty=cfg.format_penalty)
    )
    adv = group_advantages(r, batch.group_size, eps=cfg.eps, scale=cfg.scale)
    return Credit(
        advantages=_outcome_credit(batch, skipped, adv), reward=r,
        answer_reward=_answer(batch, cfg.format_penalty, skipped), judge_reward=None,
        correct=_correct(batch, cfg.correct_threshold), skipped=skipped, decision_mask=None, decision_weight=1.0,
    )


def dapo_credit(batch: RolloutBatch, cfg: DAPOConfig = DAPOConfig()) -> Credit:
    """DAPO: ±1 plus the overlong penalty, group-normalised, every token (dynamic sampling is
    ``kat.data.resampling.DynamicSampler`` over ``Credit.correct``)."""
    lengths = batch.lengths()
    r, skipped = _flat_rewards(
        batch,
        lambda sl, b: dapo_rewards(
            batch.scores[sl], batch.well_formed[sl], lengths[sl], correct_threshold=cfg.correct_threshold,
            correct_reward=cfg.correct_reward, wrong_reward=cfg.wrong_reward, max_len=cfg.overlong_max_len,
            cache_len=cfg.overlong_cache_len, factor=cfg.overlong_factor,
        ),
    )
    adv = group_advantages(r, batch.group_size, eps=cfg.eps, scale=cfg.scale)
    correct = _correct(batch, cfg.correct_threshold)
    answer = torch.where(correct, cfg.correct_reward, cfg.wrong_reward)
    answer = torch.where(skipped.repeat_interleave(batch.group_size), 0.0, answer)
    return Credit(
        advantages=_outcome_credit(batch, skipped, adv), reward=r, answer_reward=answer, judge_reward=None,
        correct=correct, skipped=skipped, decision_mask=None, decision_weight=1.0,
    )


def adaptthink_credit(batch: RolloutBatch, cfg: AdaptThinkConfig = AdaptThinkConfig()) -> Credit:
    """AdaptThink: ``r = acc − ref_acc + δ·[off]`` and ``A = r`` on every token (no group normalisation)."""
    if batch.ref_acc is None:
        raise ValueError("adaptthink needs RolloutBatch.ref_acc (the reference model's accuracy per prompt)")
    r, skipped = _flat_rewards(
        batch,
        lambda sl, b: adaptthink_rewards(
            batch.modes[sl], batch.scores[sl], batch.well_formed[sl], ref_acc=float(batch.ref_acc[b]),
            delta=cfg.delta, correct_threshold=cfg.correct_threshold,
        ),
    )
    correct = _correct(batch, cfg.correct_threshold)
    answer = torch.where(skipped.repeat_interleave(batch.group_size), 0.0, correct.float())
    return Credit(
        advantages=_outcome_credit(batch, skipped, r), reward=r, answer_reward=answer, judge_reward=None,
        correct=correct, skipped=skipped, decision_mask=None, decision_weight=1.0,
    )


def thinkless_credit(batch: RolloutBatch, cfg: ThinklessConfig = ThinklessConfig()) -> Credit:
    """Thinkless (decoupled GRPO): reward table, ``A = r − mean_g(r)`` on every token; the mode token is also
    the decision term of the loss with weight ``alpha``."""
    r, skipped = _flat_rewards(
        batch,
        lambda sl, b: thinkless_rewards(
            batch.modes[sl], batch.scores[sl], batch.well_formed[sl], short_correct=cfg.short_correct,
            think_correct=cfg.think_correct, wrong=cfg.wrong, correct_threshold=cfg.correct_threshold,
        ),
    )
    adv = group_advantages(r, batch.group_size, scale="none")
    correct = _correct(batch, cfg.correct_threshold)
    answer = torch.where(skipped.repeat_interleave(batch.group_size), 0.0, correct.float())
    return Credit(
        advantages=_outcome_credit(batch, skipped, adv), reward=r, answer_reward=answer, judge_reward=None,
        correct=correct, skipped=skipped, decision_mask=decision_token_mask(batch.segment_ids),
        decision_weight=float(cfg.alpha),
    )


def step_srpo_credit(batch: RolloutBatch, cfg: StepSRPOConfig = StepSRPOConfig()) -> Credit:
    """Step-SRPO: per-group answer/judge/modulated rewards, then :func:`step_credit_advantages`."""
    lengths = batch.lengths()
    ans: list[float] = []
    jud: list[float] = []
    rew: list[float] = []
    skipped: list[bool] = []
    for b in range(batch.num_groups):
        sl = batch.group(b)
        g = step_srpo_group_rewards(
            batch.modes[sl], batch.scores[sl], batch.well_formed[sl],
            prior=None if batch.priors is None else batch.priors[b], lengths=lengths[sl], cfg=cfg,
        )
        ans.extend(g.answer)
        jud.extend(g.judge)
        rew.extend(g.reward)
        skipped.append(g.skipped)
    dev = batch.segment_ids.device
    a, j, r = (torch.tensor(x, dtype=torch.float32) for x in (ans, jud, rew))
    skip = torch.tensor(skipped, dtype=torch.bool)
    adv = step_credit_advantages(j.to(dev), r.to(dev), batch.segment_ids, batch.group_size, eps=cfg.eps,
                                 scale=cfg.scale)
    adv = adv * (~skip).repeat_interleave(batch.group_size).to(dev)[:, None]
    dec = None if cfg.decision_weight is None else batch.segment_ids == SEGMENT_JUDGE
    return Credit(
        advantages=adv, reward=r, answer_reward=a, judge_reward=j, correct=_correct(batch, cfg.correct_threshold),
        skipped=skip, decision_mask=dec, decision_weight=1.0 if cfg.decision_weight is None else cfg.decision_weight,
    )


def _to_device(c: Credit, dev: torch.device) -> Credit:
    return Credit(*(x.to(dev) if isinstance(x, Tensor) else x for x in c))


#: ``algorithm=`` name -> (config class, credit function).
ALGORITHMS: dict[str, tuple[type, Callable[..., Credit]]] = {
    "step_srpo": (StepSRPOConfig, step_srpo_credit),
    "grpo": (GRPOConfig, grpo_credit),
    "dapo": (DAPOConfig, dapo_credit),
    "adaptthink": (AdaptThinkConfig, adaptthink_credit),
    "thinkless": (ThinklessConfig, thinkless_credit),
}


def assign_credit(algorithm: str, batch: RolloutBatch, cfg=None, **overrides) -> Credit:
    """Rewards and per-token advantages of ``batch`` under ``algorithm`` (one of :data:`ALGORITHMS`).

    ``cfg`` is the algorithm's config dataclass (default: its defaults); keyword ``overrides`` replace fields,
    e.g. ``assign_credit("step_srpo", batch, judge_weight=cfg.reward.judge_weight)``.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    cls, fn = ALGORITHMS[algorithm]
    if cfg is None:
        cfg = cls(**overrides)
    else:
        if not isinstance(cfg, cls):
            raise TypeError(f"cfg for {algorithm!r} must be a {cls.__name__}, got {type(cfg).__name__}")
        if overrides:
            cfg = replace(cfg, **overrides)
    return _to_device(fn(batch, cfg), batch.segment_ids.device)
