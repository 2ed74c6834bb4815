"""Argument checks and normaliser coercion shared by :mod:`kat.losses.advantages`, :mod:`kat.losses.aggregation`
and :mod:`kat.losses.grpo` (private to ``kat.losses``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _same_shape(ref_name: str, ref: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")




def _count(value: Tensor | float | None, default: Tensor, name: str) -> Tensor:
    """A normaliser as a 0-dim fp64 tensor on ``default``'s device: ``value`` if given, else ``default``."""
    if value is None:
        return default.to(torch.float64)
    if isinstance(value, Tensor):
        return value.to(device=default.device, dtype=torch.float64).reshape(())
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return torch.tensor(float(value), dtype=torch.float64, device=default.device)
