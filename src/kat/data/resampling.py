"""Prompt resampling for RL: SRPO History Resampling (epoch level) and DAPO dynamic sampling (batch level).

Specification: ``docs/algorithms.md`` §6.5 and §8.

* :class:`HistoryResampler` (SRPO, arXiv 2504.14286): at each epoch end, prompts whose rollouts were **all**
  correct during that epoch are excluded from every later epoch; mixed and all-incorrect prompts stay. Its
  state is a small JSON-serialisable dict (``state_dict``/``load_state_dict``) saved with the checkpoint, so a
  run resumed mid-epoch keeps the partial records. ``rl/resampled_out`` = prompts excluded at the last epoch end.
* :func:`zero_std_groups` and :class:`DynamicSampler` (DAPO, arXiv 2503.14476): drop groups whose values
  (accuracy, by default in verl) have zero std and keep generating until the batch is full, with an error after
  ``max_gen_batches`` generation rounds in one step.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DynamicSampler", "HistoryResampler", "zero_std_groups"]


def _group_view(values: Tensor | Sequence[float], group_size: int, name: str = "values") -> Tensor:
    t = torch.as_tensor(values)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [B*G] (prompt-major), got shape {tuple(t.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if t.numel() % group_size:
        raise ValueError(f"{name} has {t.numel()} entries, not a multiple of group_size={group_size}")
    return t.reshape(-1, group_size)  # (B, G)


def zero_std_groups(values: Tensor | Sequence[float], group_size: int) -> Tensor:
    """``[B]`` bool: groups whose ``G`` values are all equal (reward std 0, so every advantage is 0).

    ``values`` is ``[B*G]`` prompt-major (accuracy or reward). A group of one is always zero-std.

    >>> zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    tensor([ True, False])
    """
    v = _group_view(values, group_size)
    return (v == v[:, :1]).all(dim=1)


class HistoryResampler:
    """SRPO History Resampling over prompt ids (the sample ``id`` of the data contract).

    Call :meth:`record` after grading each step's rollouts, :meth:`end_epoch` at each epoch end, and ask
    :meth:`keep` (or :meth:`filter`) when building the next epoch's prompt list.
    """

    STATE_VERSION = 1

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.excluded: set[str] = set()
        self.last_resampled_out = 0  # prompts excluded at the last epoch end -> rl/resampled_out
        self._seen: dict[str, list[int]] = {}  # this epoch: id -> [rollouts, correct rollouts]

    def record(self, prompt_ids: Sequence[str], correct: Tensor | Sequence[bool], group_size: int) -> None:
        """Record one batch: ``prompt_ids [B]``, ``correct [B*G]`` prompt-major. A prompt seen several times in
        an epoch is all-correct only if every one of its rollouts was correct."""
        c = _group_view(torch.as_tensor(correct, dtype=torch.bool).cpu(), group_size, "correct")
        if len(prompt_ids) != c.shape[0]:
            raise ValueError(f"prompt_ids has {len(prompt_ids)} entries, correct has {c.shape[0]} groups")
        hits = c.sum(dim=1).tolist()
        for pid, h in zip(prompt_ids, hits):
            if not isinstance(pid, str):
                raise TypeError(f"prompt ids must be str, got {type(pid).__name__}")
            rec = self._seen.setdefault(pid, [0, 0])
            rec[0] += group_size
            rec[1] += int(h)

    def end_epoch(self) -> int:
        """Exclude the prompts whose rollouts were all correct this epoch; returns how many (also kept in
        ``last_resampled_out``), and starts a new epoch."""
        newly = {pid for pid, (n, ok) in self._seen.items() if n > 0 and ok == n and pid not in self.excluded}
        self.excluded |= newly
        self.last_resampled_out = len(newly)
        self._seen = {}
        self.epoch += 1
        return self.last_resampled_out

    def keep(self, prompt_id: str) -> bool:
        """False for prompts excluded by History Resampling."""
        return prompt_id not in self.excluded

    def filter(self, prompt_ids: Iterable[str]) -> list[str]:
        """The ids still in play, in order."""
        return [p for p in prompt_ids if p not in self.excluded]

    @property
    def epoch_counts(self) -> dict[str, int]:
        """This epoch so far: prompts seen, all-correct, mixed, all-incorrect (HR stats per epoch)."""
        out = {"seen": 0, "all_correct": 0, "mixed": 0, "all_incorrect": 0}
        for n, ok in self._seen.values():
            out["seen"] += 1
            out["all_correct" if ok == n else "all_incorrect" if ok == 0 else "mixed"] += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (ids sorted for stable checkpoints)."""
        return {
            "version": self.STATE_VERSION,
            "epoch": self.epoch,
            "excluded": sorted(self.excluded),
            "last_resampled_out": self.last_resampled_out,
            "seen": {pid: list(v) for pid, v in sorted(self._seen.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(
                f"HistoryResampler state version must be {self.STATE_VERSION}, got {state.get('version')!r}"
            )
        self.epoch = int(state["epoch"])
        self.excluded = set(state["excluded"])
        self.last_resampled_out = int(state["last_resampled_out"])
        self._seen = {str(k): [int(v[0]), int(v[1])] for k, v in state["seen"].items()}


class DynamicSampler:
    """DAPO dynamic sampling: keep the groups whose values are not all equal, count what was dropped.

    Per training step: :meth:`reset`, then :meth:`filter` each generation round's values (``[B*G]``, e.g.
    ``Credit.correct``) until the caller has enough kept groups; more than ``max_gen_batches`` rounds in one
    step raise ``RuntimeError`` (verl ``max_num_gen_batches``; ``0`` = unlimited).
    """

    def __init__(self, max_gen_batches: int = 10) -> None:
        if max_gen_batches < 0:
            raise ValueError(f"max_gen_batches must be >= 0, got {max_gen_batches}")
        self.max_gen_batches = max_gen_batches
        self.reset()

    def reset(self) -> None:
        self.gen_batches = 0
        self.groups_seen = 0
        self.groups_kept = 0

    def filter(self, values: Tensor | Sequence[float], group_size: int) -> Tensor:
        """``[B]`` bool keep mask (True = the group has non-zero std) for this generation round."""
        if self.max_gen_batches and self.gen_batches >= self.max_gen_batches:
            raise RuntimeError(
                f"dynamic sampling: {self.gen_batches} generation batches did not fill the training batch "
                f"(kept {self.groups_kept} of {self.groups_seen} groups); raise max_gen_batches or check the data"
            )
        keep = ~zero_std_groups(values, group_size)
        self.gen_batches += 1
        self.groups_seen += int(keep.numel())
        self.groups_kept += int(keep.sum())
        return keep

    @property
    def frac_zero_std(self) -> float:
        """Share of the step's generated groups with zero std (``rl/frac_zero_std``); 0 before any round."""
        return 0.0 if self.groups_seen == 0 else 1.0 - self.groups_kept / self.groups_seen
