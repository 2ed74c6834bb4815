"""What every kat stage shares: optimizer and schedule, generation-based validation, HF export.

A stage is a LightningModule with a ``from_config(cfg, model, tokenizer)`` constructor that picks what
it needs from the composed config (kat.train calls it), ``self.model`` (an HF causal LM) and
``self.tokenizer``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kat import metrics
from kat.models import hf
from kat.rollout.evaluate import complete_and_grade
from kat.trainer import distributed, fsdp
from kat.utils import get_logger

log = get_logger(__name__)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warm-up, then ``constant`` or ``cosine`` decay to ``min_lr_ratio`` at ``total_steps``."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule must be constant or cosine, got {schedule!r}")

    def f(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or total_steps <= warmup_steps:
            return 1.0
        t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


class KatStage(L.LightningModule):
    """Base class: ``optim`` (dict: every ``optim.*`` key), ``val`` (dict: every ``stage.module.val.*`` key; typed by
    kat.config.schemas.OptimConfig and ValConfig)."""

    def __init__(self, model, tokenizer, *, optim: dict, val: dict):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.optim = dict(optim)
        self.val = dict(val)
        self._val_sums: dict[str, torch.Tensor] = {}
        self._val_records: list[metrics.Record] = []
        self.last_val: dict[str, dict] = {}  # mode -> summary (rank 0 view after the epoch)

    def on_fit_start(self) -> None:
        # from_pretrained returns eval mode; training needs train mode (dropout, if the model has any)
        self.model.train()

    # ------------------------------------------------------------------ sharding (strategy=fsdp)
    def fsdp_extra_units(self) -> list[torch.nn.Module]:
        """Trainable modules besides the decoder layers that get their own FSDP unit (MTP heads)."""
        return []

    def frozen_models(self) -> list[torch.nn.Module]:
        """Frozen models (teacher, reference) sharded when ``strategy.shard_frozen`` is true."""
        return []

    def configure_model(self) -> None:
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, fsdp.KatFSDPStrategy):
            return
        mesh = self.device_mesh["data_parallel"]
        fsdp.shard_model(self.model, strategy, mesh, strategy.root_device, self.fsdp_extra_units())
        if strategy.shard_frozen:
            for m in self.frozen_models():
                fsdp.shard_frozen(m, mesh)

    # ------------------------------------------------------------------ resume
    def batches_consumed(self) -> int:
        """Training batches consumed so far (per rank); the datamodule skips them on resume."""
        return int(self.global_step) * int(self.trainer.accumulate_grad_batches)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["kat_rng"] = distributed.gather_rng()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("kat_rng")
        if states:
            distributed.set_rng(states[min(distributed.rank(), len(states) - 1)])

    # ------------------------------------------------------------------ optimizer
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        o = self.optim
        params = self.trainable_parameters()
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(o["weight_decay"])},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(o["lr"]), betas=tuple(o["betas"]), eps=float(o["eps"]),
        )
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 10**9
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(
            o["schedule"], int(o["warmup_steps"]), total, float(o["min_lr_ratio"])))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def val_modes(self) -> list[str]:
        return list(self.val["modes"])

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        for mode in self.val_modes():
            records = self.evaluate(batch, mode)
            sums = metrics.level_sums(records, self.device)
            self._val_sums[mode] = self._val_sums.get(mode, torch.zeros_like(sums)) + sums

    def evaluate(self, samples: list[dict], mode: str) -> list[metrics.Record]:
        """Greedy completions of ``samples`` graded (``kat.rollout.evaluate``) with the ``val`` settings."""
        v = self.val
        return complete_and_grade(self.model, self.tokenizer, samples, fmt=v["fmt"], mode=mode,
                                  max_new_tokens=int(v["max_new_tokens"]), batch_size=int(v["batch_size"]),
                                  grading={"max_workers": int(v["grade_workers"])})

    def on_validation_epoch_end(self) -> None:
        for k, mode in enumerate(self.val_modes()):
            sums = self._val_sums.get(mode)
            if sums is None:
                continue
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # across ranks
            summary = metrics.summary_from_sums(sums)
            self.last_val[mode] = summary
            prefix = "val" if k == 0 else f"val_{mode}"
            flat = metrics.flat(summary, prefix=prefix)
            # every rank holds the same all-reduced sums: sync_dist averages identical values
            self.log_dict(flat, sync_dist=True)
            if k == 0 and len(self.val_modes()) > 1:
                self.log_dict(metrics.flat(summary, prefix=f"val_{mode}"), sync_dist=True)
            log.info(f"[step {self.global_step}] validation (mode={mode}): " + _fmt(summary))
        self._val_sums = {}

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path) -> Path:
        """Write the trained model as a plain HF checkpoint. Call on every rank: a sharded model is
        gathered (collective); rank 0 writes."""
        model = fsdp.unsharded_copy(self.model) if fsdp.is_sharded(self.model) else self.model
        if distributed.rank() == 0:
            hf.save(model, self.tokenizer, directory)
        distributed.barrier()
        return Path(directory)


def _fmt(summary: dict[str, dict]) -> str:
    return "; ".join(f"{g}: on={m['think_on_rate']:.2f} acc={m['acc']:.2f} tok={m['tokens_mean']:.1f}"
                     for g, m in summary.items())


def as_dict(x: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else dict(x or {})
