"""Credit assignment: each estimator's rule from graded rollouts to per-token advantages, and their registry.

In the spirit of verl's ``core_algos.py``: one function per estimator (:func:`step_srpo_credit`,
:func:`grpo_credit`, :func:`dapo_credit`, :func:`adaptthink_credit`, :func:`thinkless_credit`), each with its
settings dataclass (``conf/algorithm/<name>.yaml`` ``credit:``), registered by ``algorithm.name`` in
:data:`ALGORITHMS`; :func:`assign_credit` dispatches. Specification: ``docs/algorithms.md`` §6 (Step-SRPO) and §7
(the others side by side); the reward rules they call are in :mod:`kat.rl.shaping`.

Per rollout the RL stage provides the parsed mode (``"on"``/``"off"``/``None``), the verifier score (float in
[0, 1], ``None`` = ungradable), ``well_formed`` and the per-token segment ids (0 = not in the response,
1 = judge + mode tokens, 2 = thinking/answer tokens; :func:`segment_ids_from_tokens`). Per prompt: the
cold-start label (``prior``) and, for AdaptThink, the reference accuracy. Rows are prompt-major
(``i = b*G + j``). Layers, from the bottom:

* segments: :func:`segment_ids_from_tokens`, :func:`segment_ids_from_boundaries`, :func:`decision_token_mask`;
* :func:`step_credit_advantages`: the per-token Step-SRPO advantage (torch reference of
  ``kat_kernels.grpo.step_credit_advantages``);
* :func:`assign_credit` (``algorithm=`` name -> :class:`Credit`) over a :class:`RolloutBatch`, and
  :func:`build_credit_config` (the ``algorithm:`` config group -> the estimator's dataclass).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple

import torch
from torch import Tensor

from kat.losses.grpo import group_advantages
from kat.rl.shaping import (  # noqa: F401  (re-exported: the reward rules the estimators use)
    MODES,
    MODULATIONS,
    StepSRPOConfig,
    StepSRPOGroup,
    _check_mode,
    _same_len,
    adaptthink_rewards,
    answer_reward,
    dapo_rewards,
    grpo_rewards,
    is_correct,
    overlong_penalty,
    preferred_mode,
    step_srpo_group_rewards,
    thinkless_rewards,
)

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
    "build_credit_config",
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
    ``kat.rl.sampling.DynamicSampler`` over ``Credit.correct``)."""
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
    e.g. ``assign_credit("step_srpo", batch, judge_weight=0.25)``.
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


def build_credit_config(algorithm):
    """The credit dataclass of ``algorithm.name`` from ``algorithm.credit`` (every setting of an estimator lives in
    its ``conf/algorithm/<name>.yaml``), each field read by attribute. ``algorithm``: the typed config node (its
    schema, kat.rl.config, rejects a key the estimator lacks at compose time) or an object with the same
    attributes."""
    name = algorithm.name
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm.name must be one of {tuple(ALGORITHMS)}, got {name!r}")
    cls, _ = ALGORITHMS[name]
    return cls(**{f.name: getattr(algorithm.credit, f.name) for f in fields(cls)})
