"""Group-relative advantages of the GRPO family (docs/algorithms.md §2): the oracle of
``kat_kernels.grpo.group_advantages``.

* :func:`group_advantages` (contract, docs/design.md §5; also importable as ``kat.losses.grpo.group_advantages``):
  ``(r − mean_g)/(std_g + eps)`` with a Bessel std, or the batch std, or no scaling (Dr. GRPO); optional
  leave-one-out baseline (RLOO). Rows are prompt-major (``i = b*G + j``).
* :func:`broadcast_advantages`: outcome credit, one advantage per row spread over its response tokens.

Shapes: ``B`` rows (rollouts), ``G`` rollouts per prompt, ``T`` padded response length.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from kat.losses._checks import _choice

__all__ = ["ADVANTAGE_SCALES", "ADVANTAGE_BASELINES", "broadcast_advantages", "group_advantages"]

ADVANTAGE_SCALES = ("group", "batch", "none")
ADVANTAGE_BASELINES = ("mean", "loo")


def _check_group_args(rewards: Tensor, group_size: int, eps: float) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G] (prompt-major), got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.float32


def group_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, scale: str = "group", baseline: str = "mean"
) -> Tensor:
    """Group-relative advantages (docs/design.md §5, contract; docs/algorithms.md §2).

    ``rewards`` is ``[B*G]``, prompt-major (row ``b*G + j`` is rollout ``j`` of prompt ``b``)::

        c_i = r_i − mean_g(r)                  baseline="mean"
        c_i = r_i − mean_{g, j≠i}(r)           baseline="loo"  (RLOO; = G/(G−1)·(r_i − mean_g))
        A_i = c_i / (std_g + eps)              scale="group", std with Bessel's correction
        A_i = c_i / (std_batch + eps)          scale="batch", Bessel std over all B*G rewards given
        A_i = c_i                              scale="none" (Dr. GRPO)

    ``group_size == 1`` gives zeros. The group mean is shifted by the group's first reward, so a group of
    equal rewards gives exactly 0 (never NaN). Computed in fp32 (fp64 for fp64 input); returned in the
    rewards' dtype (fp32 for integer/bool rewards).

    >>> group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0]), 2, scale="none")
    tensor([ 0.5000, -0.5000,  0.0000,  0.0000])
    """
    _check_group_args(rewards, group_size, eps)
    _choice("scale", scale, ADVANTAGE_SCALES)
    _choice("baseline", baseline, ADVANTAGE_BASELINES)
    out_dtype = _out_dtype(rewards.dtype)
    if group_size == 1 or rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=out_dtype, device=rewards.device)
    r = rewards.to(_compute_dtype(rewards.dtype))
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite (drop ungradable groups before computing advantages)")
    G = group_size
    rg = r.view(-1, G)  # (B, G)
    shift = rg[:, :1]  # (B, 1)
    dev = rg - shift  # (B, G), exactly 0 for equal rewards
    dev_sum = dev.sum(dim=1, keepdim=True)  # (B, 1)
    mean = shift + dev_sum / G  # (B, 1)
    if baseline == "mean":
        centred = rg - mean  # (B, G)
    else:  # leave-one-out: b_i = shift + (Σ_j dev_j − dev_i)/(G−1)
        centred = dev - (dev_sum - dev) / (G - 1)  # (B, G)
    if scale == "group":
        d = rg - mean
        std = torch.sqrt((d * d).sum(dim=1, keepdim=True) / (G - 1))  # (B, 1)
        adv = centred / (std + eps)
    elif scale == "batch":
        flat = r - (r[:1] + (r - r[:1]).sum() / r.numel())  # (B*G,)
        std = torch.sqrt((flat * flat).sum() / (r.numel() - 1))  # ()
        adv = centred / (std + eps)
    else:
        adv = centred
    return adv.reshape(-1).to(out_dtype)


def broadcast_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Outcome credit: ``A_{i,t} = A_i·m_{i,t}``. ``advantages [B]``, ``mask [B, T]`` -> ``[B, T]`` fp32."""
    if advantages.dim() != 1 or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"advantages must be [B] and mask [B, T] with the same B, got {tuple(advantages.shape)} "
            f"and {tuple(mask.shape)}"
        )
    return advantages.float()[:, None] * mask.float()  # (B, T)
