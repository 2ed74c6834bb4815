"""Loss aggregation and step-global counts (docs/algorithms.md §5): how per-token losses become one scalar.

* :func:`aggregation_weights` / :func:`aggregate`: ``token-mean`` and the three sequence modes, normalised by
  counts that the caller makes step-global with :func:`global_counts`, plus Thinkless' decision term.
* :func:`global_counts` -> :class:`GlobalCounts`: token and sequence counts over every micro-batch of a step
  (all-reduced across ranks), so that the micro-batch losses add up to the step's loss.

:func:`kat.losses.grpo.policy_loss` weights its per-token loss with :func:`aggregation_weights`;
``global_counts``, ``GlobalCounts``, ``aggregation_weights`` and ``LOSS_AGGREGATIONS`` are also importable from
:mod:`kat.losses.grpo`. Shapes: ``B`` rows (rollouts), ``T`` padded response length.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from kat.losses._checks import _choice, _count, _same_shape

__all__ = ["LOSS_AGGREGATIONS", "GlobalCounts", "aggregate", "aggregation_weights", "global_counts"]

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class GlobalCounts(NamedTuple):
    """Normalisers for one optimisation step (docs/algorithms.md §5). 0-dim fp64 tensors.

    ``tokens``: valid (non-decision) tokens; ``seqs``: rows with >= 1 such token; ``decision_seqs``: rows with
    >= 1 decision token. Summed over the micro-batches given and, when torch.distributed is initialised, over
    the ranks; divided by the world size when gradients are averaged across ranks (DDP/FSDP).
    """

    tokens: Tensor
    seqs: Tensor
    decision_seqs: Tensor


def _as_list(x: Tensor | Sequence[Tensor] | None) -> list[Tensor] | None:
    if x is None:
        return None
    return [x] if isinstance(x, Tensor) else list(x)


def _local_counts(ms: list[Tensor], ds: list[Tensor] | None) -> Tensor:
    """``[tokens, seqs, decision_seqs]`` (fp64) of these masks, on the masks' device."""
    acc = torch.zeros(3, dtype=torch.float64, device=ms[0].device)
    for k, m in enumerate(ms):
        if m.dim() != 2:
            raise ValueError(f"masks[{k}] must be [b, T], got shape {tuple(m.shape)}")
        mb = m.bool()
        if ds is not None:
            d = ds[k].bool()
            if d.shape != mb.shape:
                raise ValueError(f"decision_masks[{k}] must have shape {tuple(mb.shape)}, got {tuple(d.shape)}")
            acc[2] += (d & mb).any(-1).sum()
            mb = mb & ~d
        acc[0] += mb.sum()
        acc[1] += mb.any(-1).sum()
    return acc


def global_counts(
    masks: Tensor | Sequence[Tensor],
    *,
    decision_masks: Tensor | Sequence[Tensor] | None = None,
    group=None,
    divide_by_world_size: bool = True,
) -> GlobalCounts:
    """Step-global token and sequence counts for :func:`aggregation_weights` / :func:`policy_loss`.

    ``masks``: the response masks ``[b, T]`` of all micro-batches this rank will run in the step (one tensor or
    a list); ``decision_masks`` the matching decision masks (Thinkless' control token), which are excluded from
    ``tokens``/``seqs`` and counted in ``decision_seqs``. If ``torch.distributed`` is initialised the counts are
    all-reduced (SUM) over ``group``; with ``divide_by_world_size`` (default) they are then divided by the
    group's size, because DDP/FSDP average gradients over ranks: each rank's ``Σ_local/(N/W)`` averaged over
    ranks is exactly ``Σ_all/N``. One small all-reduce, no host sync.
    """
    ms = _as_list(masks)
    if not ms:
        raise ValueError("masks must hold at least one [b, T] mask")
    ds = _as_list(decision_masks)
    if ds is not None and len(ds) != len(ms):
        raise ValueError(f"decision_masks must match masks one to one, got {len(ds)} and {len(ms)}")
    acc = _local_counts(ms, ds)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(acc, op=torch.distributed.ReduceOp.SUM, group=group)
        if divide_by_world_size:
            acc = acc / torch.distributed.get_world_size(group)
    return GlobalCounts(tokens=acc[0], seqs=acc[1], decision_seqs=acc[2])


def aggregation_weights(
    mask: Tensor,
    loss_agg: str = "token-mean",
    *,
    counts: GlobalCounts | None = None,
    norm_const: float | None = None,
    decision_mask: Tensor | None = None,
    decision_weight: float = 1.0,
) -> Tensor:
    """Per-token weights ``w [B, T]`` (fp32) with ``loss = Σ w·ℓ`` (docs/algorithms.md §5).

    ============================  ===================================
    ``token-mean``                ``1/N_tok``
    ``seq-mean-token-mean``       ``1/(N_seq·n_i)``, ``n_i`` row's valid tokens
    ``seq-mean-token-sum``        ``1/N_seq``
    ``seq-mean-token-sum-norm``   ``1/(N_seq·norm_const)`` (Dr. GRPO; default ``norm_const = T``)
    decision tokens               ``decision_weight/(N_dec·d_i)``, ``d_i`` row's decision tokens
    ============================  ===================================

    ``counts`` from :func:`global_counts` make the loss invariant to the micro-batch split and the DP size;
    ``None`` uses this batch's own counts.
    Departure: verl's ``seq-mean-token-sum-norm`` does not divide by ``N_seq``; kat does (as TRL ``dr_grpo``).
    """
    _choice("loss_agg", loss_agg, LOSS_AGGREGATIONS)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m0 = mask.bool()  # (B, T)
    m, d = m0, None
    if decision_mask is not None:
        _same_shape("mask", mask, decision_mask=decision_mask)
        d = decision_mask.bool() & m0
        m = m0 & ~d
    local = _local_counts([m0], None if d is None else [d])  # (3,) this batch's own counts
    given = (None, None, None) if counts is None else (counts.tokens, counts.seqs, counts.decision_seqs)
    n_tok = _count(given[0], local[0], "counts.tokens")
    n_seq = _count(given[1], local[1], "counts.seqs")
    mf = m.to(torch.float64)  # (B, T)
    if loss_agg == "token-mean":
        w = mf / n_tok.clamp(min=1)
    elif loss_agg == "seq-mean-token-mean":
        w = mf / mf.sum(-1, keepdim=True).clamp(min=1) / n_seq.clamp(min=1)
    elif loss_agg == "seq-mean-token-sum":
        w = mf / n_seq.clamp(min=1)
    else:
        c = float(mask.shape[-1]) if norm_const is None else float(norm_const)
        if not c > 0:
            raise ValueError(f"norm_const must be > 0, got {norm_const}")
        w = mf / (n_seq.clamp(min=1) * c)
    if d is not None:
        n_dec = _count(given[2], local[2], "counts.decision_seqs")
        df = d.to(torch.float64)
        w = w + decision_weight * df / df.sum(-1, keepdim=True).clamp(min=1) / n_dec.clamp(min=1)
    return w.to(torch.float32)


def aggregate(
    loss: Tensor,
    mask: Tensor,
    loss_agg: str = "token-mean",
    *,
    counts: GlobalCounts | None = None,
    norm_const: float | None = None,
    decision_mask: Tensor | None = None,
    decision_weight: float = 1.0,
) -> Tensor:
    """``Σ_{i,t} w_{i,t}·loss_{i,t}`` with :func:`aggregation_weights`; masked entries may be inf/NaN."""
    _same_shape("mask", mask, loss=loss)
    w = aggregation_weights(
        mask, loss_agg, counts=counts, norm_const=norm_const, decision_mask=decision_mask,
        decision_weight=decision_weight,
    )
    safe = torch.where(mask.bool(), loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    acc = torch.promote_types(loss.dtype, torch.float32)  # never weight in bf16 (1/N has 3 digits there)
    return (safe.to(acc) * w.to(acc)).sum()
