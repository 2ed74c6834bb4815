"""GRPO-family policy loss as pure PyTorch functions: the oracles for ``kat_kernels.grpo``.

Everything here is specified, with formulas and departures from the papers, in ``docs/algorithms.md``
(§3 clipped policy loss, §4 KL estimators). The advantages (§2) are in :mod:`kat.losses.advantages`, the
aggregation and step-global counts (§5) in :mod:`kat.losses.aggregation`; the names the RL module and the
docs use are importable from here too (:func:`group_advantages`, :func:`global_counts`, :class:`GlobalCounts`,
:func:`aggregation_weights`, ``LOSS_AGGREGATIONS``). Summary:

* :func:`ppo_clip_loss`: per-token PPO clip with separate ``eps_low``/``eps_high`` (clip-higher), optional
  dual clip, log-ratio clamp, token- or sequence-level (GSPO) ratio; clip-fraction and ratio stats.
* :func:`kl_estimate`: ``k1``, ``k2``, ``k3``, ``k3+`` against a frozen reference with verl's clamps.
* :func:`policy_loss`: the single entry the RL module calls with config values; returns ``(loss, stats)``.
* :func:`selective_log_softmax`, :func:`entropy_from_logits`, :func:`policy_loss_from_hidden` (the twin of the
  fused Triton loss ``kat_kernels.grpo.fused_policy_loss``).

Shapes: ``B`` rows (rollouts), ``T`` padded response length, ``V`` vocabulary, ``H`` hidden size.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from kat.losses._checks import _choice, _count, _same_shape
from kat.losses.advantages import group_advantages
from kat.losses.aggregation import LOSS_AGGREGATIONS, GlobalCounts, aggregation_weights, global_counts

__all__ = [
    "KL_ESTIMATORS",
    "RATIO_LEVELS",
    "ClipLoss",
    "HiddenPolicyLoss",
    "PolicyLossStats",
    "entropy_from_logits",
    "kl_estimate",
    "masked_mean",
    "policy_loss",
    "policy_loss_from_hidden",
    "policy_stats",
    "ppo_clip_loss",
    "selective_log_softmax",
    # re-exported (documented here; defined in kat.losses.advantages / kat.losses.aggregation)
    "LOSS_AGGREGATIONS",
    "GlobalCounts",
    "aggregation_weights",
    "global_counts",
    "group_advantages",
]

KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
RATIO_LEVELS = ("token", "sequence")

# verl's clamps for the k3 estimator (volcengine/verl, core_algos.py ``kl_penalty``; docs/algorithms.md §4):
# input |x| <= 20, output in [-10, 10].
K3_INPUT_CLAMP = 20.0
K3_OUTPUT_CLAMP = 10.0


# --------------------------------------------------------------------------------------------------------------
# log-probs and entropy from logits
# --------------------------------------------------------------------------------------------------------------
def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


def selective_log_softmax(
    logits: Tensor, index: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """``log softmax(logits/τ)[index]`` without materialising the log-softmax: ``z[y]/τ − logsumexp(z/τ)``.

    ``logits [..., V]``, ``index [...]`` (long) -> ``[...]`` fp32. Rows are processed ``chunk_size`` at a time,
    each upcast to fp32 (bf16 ``logsumexp`` is too coarse for ratios near 1). Differentiable.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index must have shape {tuple(logits.shape[:-1])}, got {tuple(index.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _rows(logits)  # (N, V)
    y = index.reshape(-1, 1).long()  # (N, 1)
    out = []
    for s in range(0, z.shape[0], chunk_size):
        zc = z[s : s + chunk_size].float() / temperature  # (n, V)
        out.append(zc.gather(-1, y[s : s + chunk_size]).squeeze(-1) - torch.logsumexp(zc, dim=-1))
    res = torch.cat(out) if out else z.new_zeros(0, dtype=torch.float32)
    return res.reshape(index.shape)


def entropy_from_logits(logits: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024) -> Tensor:
    """Entropy of ``softmax(logits/τ)`` per row: ``H = logsumexp(z) − Σ_v softmax(z)_v·z_v``, ``z = logits/τ``.

    ``logits [..., V]`` -> ``[...]`` fp32, computed in row chunks (for the ``rl/entropy`` metric).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _rows(logits)
    out = []
    for s in range(0, z.shape[0], chunk_size):
        zc = z[s : s + chunk_size].float() / temperature  # (n, V)
        lse = torch.logsumexp(zc, dim=-1, keepdim=True)  # (n, 1)
        p = torch.exp(zc - lse)
        out.append(lse.squeeze(-1) - (p * zc).sum(-1))
    res = torch.cat(out) if out else z.new_zeros(0, dtype=torch.float32)
    return res.reshape(logits.shape[:-1])


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over ``mask``; 0 when the mask is empty. Masked-out entries may be inf/NaN."""
    m = mask.bool()
    n = m.sum()
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / n.clamp(min=1).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# clipped policy loss
# --------------------------------------------------------------------------------------------------------------
class ClipLoss(NamedTuple):
    """Per-token clipped policy-gradient loss and its stats (scalars are detached masked means)."""

    loss: Tensor  # (B, T) pg_{i,t}; 0 where mask is False
    ratio: Tensor  # (B, T) detached ρ used by the clip
    clip_frac_low: Tensor  # () A<0 and ρ < 1−eps_low
    clip_frac_high: Tensor  # () A>0 and ρ > 1+eps_high
    clip_frac_dual: Tensor  # () A<0 and ρ > clip_ratio_c
    clip_frac: Tensor  # () sum of the three (tokens whose gradient the clip removed)
    approx_kl: Tensor  # () mean((ρ−1) − log ρ), k3 of KL(π_old‖π)
    ratio_mean: Tensor  # ()
    ratio_min: Tensor  # ()
    ratio_max: Tensor  # ()


def _check_clip_args(clip_eps_low: float, clip_eps_high: float, clip_ratio_c: float | None, clamp: float) -> None:
    if not 0.0 <= clip_eps_low < 1.0:
        raise ValueError(f"clip_eps_low must be in [0, 1), got {clip_eps_low}")
    if not clip_eps_high >= 0.0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {clip_ratio_c}")
    if not clamp > 0.0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {clamp}")


def _token_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    if advantages.dim() == 1 and logp.dim() == 2 and advantages.shape[0] == logp.shape[0]:
        return advantages[:, None].expand_as(logp)
    if advantages.shape != logp.shape:
        raise ValueError(
            f"advantages must be [B] or have the shape of logp {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    return advantages


def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    ratio_level: str = "token",
) -> ClipLoss:
    """Per-token clipped surrogate (docs/algorithms.md §3; verl ``compute_policy_loss_vanilla``/``_gspo``).

    ``logp, old_logp, mask: [B, T]``; ``advantages: [B]`` or ``[B, T]``::

        ρ    = exp(clamp(logπ − logπ_old, −C, C))                                   ratio_level="token"
        ρ    = exp(sg[clamp(mean_t(logπ − logπ_old), −C, C)] + logπ − sg[logπ])      ratio_level="sequence" (GSPO)
        pg   = max(−A·ρ, −A·clip(ρ, 1 − eps_low, 1 + eps_high))
        pg   = min(pg, −A·c)   where A < 0                                            dual clip, c = clip_ratio_c > 1

    Masked positions of the inputs may hold anything (inf/NaN): they are replaced before any arithmetic.
    Computed in at least fp32 (bf16 log-probs are upcast; the loss is fp32 then).
    Departure: verl clamps the GSPO sequence log-ratio at +10 only; kat uses ``±log_ratio_clamp`` for both levels.
    """
    _check_clip_args(clip_eps_low, clip_eps_high, clip_ratio_c, log_ratio_clamp)
    _choice("ratio_level", ratio_level, RATIO_LEVELS)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    _same_shape("logp", logp, old_logp=old_logp, mask=mask)
    m = mask.bool()  # (B, T)
    acc = torch.promote_types(logp.dtype, torch.float32)  # bf16 log-probs: the surrogate is computed in fp32
    zero = torch.zeros((), dtype=acc, device=logp.device)
    adv = torch.where(m, _token_advantages(advantages, logp).to(acc), zero)  # (B, T)
    lp = torch.where(m, logp.to(acc), zero)
    olp = torch.where(m, old_logp.to(acc), zero)
    C = log_ratio_clamp
    if ratio_level == "token":
        log_ratio = torch.clamp(lp - olp, -C, C)  # (B, T)
    else:
        n = m.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        seq = torch.clamp(((lp - olp) * m).sum(-1, keepdim=True) / n, -C, C)  # (B, 1)
        log_ratio = seq.detach() + lp - lp.detach()  # (B, T): value seq, gradient ∇logπ
    ratio = torch.exp(log_ratio)  # (B, T)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high)
    pg = torch.maximum(pg1, pg2)
    r = ratio.detach()
    low = m & (adv < 0) & (r < 1.0 - clip_eps_low)
    high = m & (adv > 0) & (r > 1.0 + clip_eps_high)
    if clip_ratio_c is not None:
        pg3 = -adv * clip_ratio_c
        pg = torch.where(adv < 0, torch.minimum(pg, pg3), pg)
        dual = m & (adv < 0) & (r > clip_ratio_c)
    else:
        dual = torch.zeros_like(m)
    pg = torch.where(m, pg, zero)
    f = lambda b: masked_mean(b.to(torch.float32), m)  # noqa: E731
    rf = r.float()
    any_valid = m.any()
    one = rf.new_ones(())
    return ClipLoss(
        loss=pg,
        ratio=r,
        clip_frac_low=f(low),
        clip_frac_high=f(high),
        clip_frac_dual=f(dual),
        clip_frac=f(low | high | dual),
        approx_kl=masked_mean((rf - 1.0) - torch.log(rf), m),
        ratio_mean=masked_mean(rf, m),
        ratio_min=torch.where(any_valid, torch.where(m, rf, math.inf).min(), one),
        ratio_max=torch.where(any_valid, torch.where(m, rf, -math.inf).max(), one),
    )


# --------------------------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------------------------
def _k3(x: Tensor) -> Tensor:
    xc = torch.clamp(x, -K3_INPUT_CLAMP, K3_INPUT_CLAMP)
    return torch.clamp(torch.exp(-xc) - 1.0 + xc, -K3_OUTPUT_CLAMP, K3_OUTPUT_CLAMP)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled-token log-probs (docs/algorithms.md §4), same shape.

    With ``x = logπ − logπ_ref``: ``k1 = x``; ``k2 = x²/2``; ``k3 = exp(−x̄) − 1 + x̄``, ``x̄ = clamp(x, ±20)``,
    value clamped to ``[−10, 10]`` (verl ``low_var_kl``); ``k3+`` = k3's value with k2's gradient
    (straight-through ``k2 + sg[k3 − k2]``, verl PR #2953).
    """
    _choice("kl_estimator", estimator, KL_ESTIMATORS)
    _same_shape("logp", logp, ref_logp=ref_logp)
    x = logp - ref_logp.to(logp.dtype)
    if estimator == "k1":
        return x
    if estimator == "k2":
        return 0.5 * x * x
    if estimator == "k3":
        return _k3(x)
    k2 = 0.5 * x * x
    return k2 + (_k3(x) - k2).detach()


# --------------------------------------------------------------------------------------------------------------
# the entry the RL module calls
# --------------------------------------------------------------------------------------------------------------
class PolicyLossStats(NamedTuple):
    """Detached scalars for logging. Means are over this call's valid tokens; weight them by ``num_tokens``
    to combine micro-batches."""

    pg_loss: Tensor | None  # () aggregated policy-gradient term alone (None from policy_stats)
    kl: Tensor | None  # () masked mean of the KL estimate (None without ref_logp) -> rl/kl
    clip_frac: Tensor  # () -> rl/clip_frac
    clip_frac_low: Tensor  # ()
    clip_frac_high: Tensor  # ()
    clip_frac_dual: Tensor  # ()
    approx_kl: Tensor  # () KL(π_old‖π), k3
    ratio_mean: Tensor  # ()
    ratio_min: Tensor  # ()
    ratio_max: Tensor  # ()
    num_tokens: Tensor  # () valid tokens in this call


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    ratio_level: str = "token",
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    loss_agg: str = "token-mean",
    counts: GlobalCounts | None = None,
    norm_const: float | None = None,
    decision_mask: Tensor | None = None,
    decision_weight: float = 1.0,
) -> tuple[Tensor, PolicyLossStats]:
    """The RL loss of one micro-batch: ``L = Σ_{i,t} w_{i,t}·(pg_{i,t} + kl_coef·kl_{i,t})``.

    ``logp [B, T]`` (with grad), ``old_logp, mask [B, T]``, ``advantages [B]`` or ``[B, T]``, ``ref_logp [B, T]``
    (needed when ``kl_coef != 0``; with ``kl_coef == 0`` it is only logged). ``pg`` is :func:`ppo_clip_loss`,
    ``kl`` is :func:`kl_estimate`, ``w`` is :func:`aggregation_weights` (pass ``counts`` from
    :func:`global_counts` over the whole step so that micro-batch losses add up to the step's loss).
    Returns ``(loss (), stats)``.
    """
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    clip = ppo_clip_loss(
        logp, old_logp, advantages, mask, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        clip_ratio_c=clip_ratio_c, log_ratio_clamp=log_ratio_clamp, ratio_level=ratio_level,
    )
    w = aggregation_weights(
        mask, loss_agg, counts=counts, norm_const=norm_const, decision_mask=decision_mask,
        decision_weight=decision_weight,
    ).to(torch.promote_types(logp.dtype, torch.float32))  # (B, T); bf16 logp is weighted in fp32
    m = mask.bool()
    pg_loss = (clip.loss * w).sum()
    loss = pg_loss
    kl_mean = None
    if ref_logp is not None:
        acc = torch.promote_types(logp.dtype, torch.float32)
        zero = torch.zeros((), dtype=acc, device=logp.device)
        kl = torch.where(m, kl_estimate(torch.where(m, logp.to(acc), zero), torch.where(m, ref_logp.to(acc), zero),
                                        kl_estimator), zero)  # (B, T)
        kl_mean = masked_mean(kl.detach(), m)
        if kl_coef != 0.0:
            loss = loss + kl_coef * (kl * w).sum()
    stats = PolicyLossStats(
        pg_loss=pg_loss.detach(),
        kl=kl_mean,
        clip_frac=clip.clip_frac,
        clip_frac_low=clip.clip_frac_low,
        clip_frac_high=clip.clip_frac_high,
        clip_frac_dual=clip.clip_frac_dual,
        approx_kl=clip.approx_kl,
        ratio_mean=clip.ratio_mean,
        ratio_min=clip.ratio_min,
        ratio_max=clip.ratio_max,
        num_tokens=m.sum(),
    )
    return loss, stats


def policy_stats(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    kl_estimator: str = "k3",
) -> PolicyLossStats:
    """The stats of :func:`policy_loss` from detached log-probs (``pg_loss`` None); use with the fused kernel,
    which returns the per-token ``logp``. Shapes ``[B, T]`` (or any 2-D view of the tokens)."""
    with torch.no_grad():
        clip = ppo_clip_loss(
            logp.detach(), old_logp, advantages, mask, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
            clip_ratio_c=clip_ratio_c, log_ratio_clamp=log_ratio_clamp,
        )
        m = mask.bool()
        kl_mean = None
        if ref_logp is not None:
            zero = torch.zeros((), dtype=torch.float32, device=logp.device)
            kl = kl_estimate(torch.where(m, logp.float(), zero), torch.where(m, ref_logp.float(), zero), kl_estimator)
            kl_mean = masked_mean(kl, m)
    return PolicyLossStats(
        pg_loss=None, kl=kl_mean, clip_frac=clip.clip_frac, clip_frac_low=clip.clip_frac_low,
        clip_frac_high=clip.clip_frac_high, clip_frac_dual=clip.clip_frac_dual, approx_kl=clip.approx_kl,
        ratio_mean=clip.ratio_mean, ratio_min=clip.ratio_min, ratio_max=clip.ratio_max, num_tokens=m.sum(),
    )


# --------------------------------------------------------------------------------------------------------------
# the torch twin of the fused Triton loss
# --------------------------------------------------------------------------------------------------------------
class HiddenPolicyLoss(NamedTuple):
    """Result of :func:`policy_loss_from_hidden` (and of ``kat_kernels.grpo.fused_policy_loss``)."""

    loss: Tensor  # () Σ w·(pg + kl_coef·kl)
    logp: Tensor  # (...) detached fp32 log-prob of the sampled tokens
    entropy: Tensor | None  # (...) detached fp32 entropy of softmax(z/τ) (None unless compute_entropy)


def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    temperature: float = 1.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    compute_entropy: bool = False,
) -> HiddenPolicyLoss:
    """Eager policy loss from hidden states and the output head (logits materialised): the oracle of
    ``kat_kernels.grpo.fused_policy_loss``.

    ``hidden [..., H]``, ``weight [V, H]``; ``tokens, old_logp, advantages, mask, ref_logp [...]`` (per token).
    ``z = (hidden @ weightᵀ)`` in the input dtype, then fp32 ``/ temperature``; ``logπ = z_y − logsumexp(z)``;
    per-token ``ℓ = pg + kl_coef·kl`` (token-level ratio, :func:`ppo_clip_loss`, :func:`kl_estimate`);
    ``loss = Σ w·ℓ`` with ``w = token_weights·mask`` if given (e.g. from :func:`aggregation_weights`) else
    ``mask/num_tokens`` (token-mean; default ``num_tokens`` = this call's valid tokens).
    """
    if hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"tokens must have shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    _same_shape("tokens", tokens, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                token_weights=token_weights)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    m = mask.reshape(1, -1).bool()  # (1, N)
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()  # (N, V) input dtype
    y = torch.where(m[0], tokens.reshape(-1), torch.zeros_like(tokens.reshape(-1)))
    logp = selective_log_softmax(logits, y, temperature=temperature, chunk_size=1 << 30)[None]  # (1, N) fp32
    clip = ppo_clip_loss(
        logp, old_logp.reshape(1, -1).float(), advantages.reshape(1, -1).float(), m, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, clip_ratio_c=clip_ratio_c, log_ratio_clamp=log_ratio_clamp,
    )
    per_tok = clip.loss  # (1, N)
    if kl_coef != 0.0:
        zero = logp.new_zeros(())
        kl = kl_estimate(torch.where(m, logp, zero), torch.where(m, ref_logp.reshape(1, -1).float(), zero),
                         kl_estimator)
        per_tok = per_tok + kl_coef * torch.where(m, kl, zero)
    if token_weights is not None:
        w = token_weights.reshape(1, -1).float() * m
    else:
        n = _count(num_tokens, m.sum(), "num_tokens")
        w = (m.to(torch.float64) / n.clamp(min=1)).float()
    loss = (per_tok * w).sum()
    ent = None
    if compute_entropy:
        with torch.no_grad():
            ent = entropy_from_logits(logits, temperature=temperature).reshape(tokens.shape)
    return HiddenPolicyLoss(loss=loss, logp=logp.detach().reshape(tokens.shape), entropy=ent)
