"""Which prompts and rollouts one RL step trains on, and the rollout -> grade -> credit loop that gathers them.

Specification: ``docs/algorithms.md`` §6.5 and §8; the loop: ``docs/rl.md``.

* :class:`HistoryResampler` (SRPO, arXiv 2504.14286): at each epoch end, prompts whose rollouts were **all**
  correct during that epoch are excluded from every later epoch; mixed and all-incorrect prompts stay. Its
  state is a small JSON-serialisable dict (``state_dict``/``load_state_dict``) saved with the checkpoint, so a
  run resumed mid-epoch keeps the partial records. ``rl/resampled_out`` = prompts excluded at the last epoch end.
  :func:`select_prompts` / :func:`draw_prompts` apply it to a batch; :func:`record_history` feeds it (all ranks).
* :func:`zero_std_groups` and :class:`DynamicSampler` (DAPO, arXiv 2503.14476): drop groups whose values
  (accuracy, by default in verl) have zero std and keep generating until the batch is full, with an error after
  ``max_gen_batches`` generation rounds in one step.
* :class:`SamplingConfig`: ``algorithm.resampling``; :func:`forced_modes`: AdaptThink's forced split.
* :func:`collect`: rollout -> grade -> credit for one step, with the dynamic sampling rounds, over callables
  (the engine, the grader, the credit rule, the prompt draw), so it runs without Lightning.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kat.rl.credit import Credit, RolloutBatch
from kat.rl.metrics import behaviour_rows
from kat.rollout.hf import Rollouts
from kat.utils import get_logger

log = get_logger(__name__)

__all__ = ["DynamicSampler", "HistoryResampler", "SamplingConfig", "collect", "draw_prompts", "forced_modes",
           "record_history", "select_prompts", "zero_std_groups"]


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


# ==============================================================================================================
# settings
# ==============================================================================================================
@dataclass(frozen=True)
class SamplingConfig:
    """``algorithm.resampling`` (+ ``algorithm.force_modes``): History Resampling on/off; dynamic sampling on/off,
    over which per-rollout values (``acc`` | ``reward``), with at most ``max_gen_batches`` rounds and, when still
    short, ``on_unfilled`` = ``error`` (verl) | ``partial`` (train on the groups kept)."""

    history: bool = False
    dynamic: bool = False
    dynamic_metric: str = "acc"
    max_gen_batches: int = 10
    on_unfilled: str = "error"
    force_modes: bool = False

    def __post_init__(self) -> None:
        if self.on_unfilled not in ("error", "partial"):
            raise ValueError(f"algorithm.resampling.on_unfilled must be error or partial, got {self.on_unfilled!r}")
        if self.dynamic_metric not in ("acc", "reward"):
            raise ValueError(f"algorithm.resampling.dynamic_metric must be acc or reward, got {self.dynamic_metric!r}")

    @classmethod
    def from_algorithm(cls, algorithm) -> "SamplingConfig":
        """From the typed ``algorithm`` node (kat.rl.config): ``algorithm.resampling.*`` and ``force_modes``."""
        res = algorithm.resampling
        return cls(history=bool(res.history), dynamic=bool(res.dynamic), dynamic_metric=str(res.dynamic_metric),
                   max_gen_batches=int(res.max_gen_batches), on_unfilled=str(res.on_unfilled),
                   force_modes=bool(algorithm.force_modes))


def forced_modes(group_size: int, n_prompts: int) -> list[str]:
    """AdaptThink's split: the first ``G//2`` rows of each group forced off, the rest on."""
    return [("off" if j < group_size // 2 else "on") for _ in range(n_prompts) for j in range(group_size)]


# ==============================================================================================================
# prompts
# ==============================================================================================================
def draw_prompts(pool: Iterable[dict], n: int, exclude_ids: set[str], hr: HistoryResampler | None,
                 rng_key: str) -> list[dict]:
    """``n`` random samples of ``pool`` still in play (not excluded by History Resampling, not in
    ``exclude_ids``), deterministic in ``rng_key``."""
    cand = [s for s in pool if str(s.get("id")) not in exclude_ids and (hr is None or hr.keep(str(s.get("id"))))]
    rng = random.Random(rng_key)
    return rng.sample(cand, min(n, len(cand)))


def select_prompts(batch: Sequence[dict], hr: HistoryResampler | None,
                   draw: Callable[[int, set[str]], list[dict]]) -> list[dict]:
    """The batch minus prompts removed by History Resampling, topped up to its size by ``draw(n, exclude_ids)``."""
    if hr is None:
        return list(batch)
    kept = [s for s in batch if hr.keep(str(s.get("id")))]
    if len(kept) < len(batch):
        kept += draw(len(batch) - len(kept), {str(s.get("id")) for s in kept})
    return kept


def record_history(hr: HistoryResampler | None, records: list[tuple[list[str], list[bool]]], group_size: int,
                   *, distributed: bool = False) -> None:
    """Feed this step's (prompt ids, correct) records to History Resampling; with ``distributed`` every rank
    records every rank's rollouts (one all-gather per step), so all ranks exclude the same prompts."""
    if hr is None:
        return
    if distributed:
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    for ids, correct in records:
        hr.record(ids, correct, group_size)


# ==============================================================================================================
# rollout -> grade -> credit, with dynamic sampling rounds
# ==============================================================================================================
def collect(samples: Sequence[dict], *, group_size: int, cfg: SamplingConfig, dynamic: DynamicSampler | None,
            rollout: Callable[[list[dict]], Rollouts],
            grade: Callable[[list[dict], Sequence[str]], tuple[list, dict]],
            credit: Callable[[list[dict], Rollouts, Sequence], tuple[RolloutBatch, Credit]],
            draw: Callable[[int, set[str], str], list[dict]]) -> dict:
    """Rollout → grade → credit for one step, with DAPO dynamic sampling rounds when ``dynamic`` is given.

    ``rollout(samples)`` -> ``group_size`` rollouts per sample; ``grade(rows, texts)`` -> (scores, info with
    ``timeouts, errors, graded, cache_hits``); ``credit(samples, rollouts, scores)`` -> (batch, credit);
    ``draw(n, exclude_ids, tag)`` -> fresh prompts for another round. Returns ``rollouts`` (the trained groups),
    ``samples`` (one per group), ``credit``, ``batch`` and, for the behaviour metrics, every generated row
    (``all_rows``), the zero-std and seen group counts, ``rounds``, ``grade``, timings and ``history_records``
    (the History Resampling records of this step, when ``cfg.history``)."""
    G_ = group_size
    B = len(samples)
    dyn = dynamic
    if dyn is not None:
        dyn.reset()
    cur = list(samples)
    parts: list[tuple[list[dict], Rollouts, list]] = []
    all_rows: list = []  # kat.metrics.Record per rollout (kat.rl.metrics.behaviour_rows)
    zero_std = groups_seen = 0
    grade_info = {"timeouts": 0, "errors": 0, "graded": 0, "cache_hits": 0}
    t_roll = t_grade = 0.0
    rounds = 0
    used_ids = {str(s.get("id")) for s in cur}
    on_unfilled, dyn_metric = cfg.on_unfilled, cfg.dynamic_metric
    out_hr: list[tuple[list[str], list[bool]]] = []  # History Resampling records of this step
    while True:
        rounds += 1
        t0 = time.perf_counter()
        roll = rollout(cur)
        t_roll += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = [s for s in cur for _ in range(G_)]
        scores, gi = grade(rows, roll.texts)
        for k in grade_info:
            grade_info[k] += gi[k]
        batch, cr = credit(cur, roll, scores)
        t_grade += time.perf_counter() - t0
        if cfg.history:
            out_hr.append(([str(s.get("id")) for s in cur], cr.correct.tolist()))
        keep_g = ~cr.skipped  # (B,)
        zs = zero_std_groups(cr.reward, G_) & keep_g
        zero_std += int(zs.sum())
        groups_seen += int(keep_g.sum())
        behaviour_rows(all_rows, cur, roll, batch, cr, G_)
        if dyn is None:
            parts.append((cur, roll, scores))
            break
        keep_g = keep_g & dyn.filter(cr.correct if dyn_metric == "acc" else cr.reward, G_)
        gids = [b for b in range(len(cur)) if bool(keep_g[b])]
        if gids:
            rows_idx = [b * G_ + j for b in gids for j in range(G_)]
            parts.append(([cur[b] for b in gids], roll.select(rows_idx), [scores[i] for i in rows_idx]))
        kept = sum(len(p[0]) for p in parts)
        if kept >= B:
            break
        if dyn.max_gen_batches and dyn.gen_batches >= dyn.max_gen_batches:
            if on_unfilled == "partial":
                break
            raise RuntimeError(
                f"dynamic sampling: {dyn.gen_batches} generation rounds kept {kept} of {B} groups with non-zero "
                f"{dyn_metric} std; raise algorithm.resampling.max_gen_batches, set "
                "algorithm.resampling.on_unfilled=partial, or check the data")
        cur = draw(B, used_ids, f"dyn{rounds}")
        used_ids |= {str(s.get("id")) for s in cur}
        if not cur:
            log.warning("dynamic sampling: no prompts left to draw; training on the groups kept so far")
            break
    out = {"all_rows": all_rows, "zero_std": zero_std, "groups_seen": groups_seen, "rounds": rounds,
           "grade": grade_info, "t_rollout": t_roll, "t_grade": t_grade, "history_records": out_hr}
    if not parts:
        out.update(rollouts=None, samples=[], credit=None, batch=None)
        return out
    t0 = time.perf_counter()
    samp = [s for p in parts for s in p[0]][:B]
    roll = Rollouts.concat([p[1] for p in parts])
    roll = roll.select(range(len(samp) * G_)) if len(roll) > len(samp) * G_ else roll
    scores = [x for p in parts for x in p[2]][: len(samp) * G_]
    batch, cr = credit(samp, roll, scores) if dyn is not None else (batch, cr)
    out["t_grade"] += time.perf_counter() - t0 if dyn is not None else 0.0
    out.update(rollouts=roll, samples=samp, credit=cr, batch=batch)
    return out
