"""What every kat stage shares: optimizer and schedule, generation-based validation, HF export.

A stage is a LightningModule with a ``from_config(cfg, model, tokenizer)`` constructor that picks what
it needs from the composed config (kat.train calls it), ``self.model`` (an HF causal LM) and
``self.tokenizer``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kat import metrics
from kat.models import hf
from kat.rollout.evaluate import complete_and_grade
from kat.stages import fsdp
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
        checkpoint["kat_rng"] = _gather_rng()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        states = checkpoint.get("kat_rng")
        if states:
            _set_rng(states[min(_rank(), len(states) - 1)])

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
        if _rank() == 0:
            hf.save(model, self.tokenizer, directory)
        _barrier()
        return Path(directory)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _gather_rng() -> list[dict]:
    """Every rank's torch/python/numpy RNG state (rank order); a collective under distributed runs."""
    import random

    import numpy as np
    import torch.distributed as dist

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain lists and tensors only: checkpoints load with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, state)
        return out
    return [state]


def _set_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fmt(summary: dict[str, dict]) -> str:
    return "; ".join(f"{g}: on={m['think_on_rate']:.2f} acc={m['acc']:.2f} tok={m['tokens_mean']:.1f}"
                     for g, m in summary.items())


class Throughput(L.Callback):
    """Logs ``perf/tokens_per_s`` (non-padding input tokens per second, all ranks) and, on GPU, ``perf/mfu``.

    MFU = tokens/s × FLOPs per token / peak (docs/design.md §6): FLOPs per token = 6·N + 6·L·d·T for the
    trained model, plus 2·N_t + 2·L_t·d_t·T for a teacher forward (``module.teacher_flops_per_token``).
    """

    def __init__(self, peak_tflops: float = 989.0, log_every_n_steps: int = 10):
        self.peak = peak_tflops * 1e12
        self.every = log_every_n_steps
        self._t0 = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None or not isinstance(batch, dict) or "attention_mask" not in batch:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - self._t0
        mask = batch["attention_mask"]
        tokens = float(mask.sum()) * trainer.world_size
        tps = tokens / max(dt, 1e-9)
        out = {"perf/tokens_per_s": tps}
        if torch.cuda.is_available():
            cfg = pl_module.model.config
            # N = trained parameters (model + MTP heads; frozen teacher/reference excluded).
            # Under FSDP each rank holds a shard: count the full sizes.
            n = sum(_full_numel(p) for p in pl_module.trainable_parameters())
            T = mask.shape[1]
            flops = 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * T
            flops += getattr(pl_module, "teacher_flops_per_token", lambda T: 0)(T)
            out["perf/mfu"] = tps * flops / (self.peak * trainer.world_size)
        if trainer.global_step % self.every == 0 or trainer.global_step >= trainer.max_steps > 0:
            pl_module.log_dict(out, rank_zero_only=True)  # the last step too (LogLastStep has it logged)


class LogLastStep(L.Callback):
    """The last training step is always logged: Lightning logs every ``trainer.log_every_n_steps``-th step only,
    so a run shorter than that recorded no ``train/*`` at all, and a longer one ended on an unlogged step unless
    ``max_steps`` was a multiple of the period.

    On the batches of the last optimizer step (``global_step + 1 == max_steps``) the trainer's period is set to 1,
    and set back when training ends. List it before ``LearningRateMonitor`` (conf/callbacks/default.yaml) so that
    the learning rate is logged at that step too. Stages that log through the loggers themselves (RL) are not
    affected.
    """

    def __init__(self):
        self._period: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step + 1
        if last and self._period is None and trainer.log_every_n_steps > 1:
            self._period, trainer.log_every_n_steps = trainer.log_every_n_steps, 1

    def on_train_end(self, trainer, pl_module):
        self._restore(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self._restore(trainer)

    def _restore(self, trainer) -> None:
        if self._period is not None:
            trainer.log_every_n_steps, self._period = self._period, None


def _full_numel(p: torch.Tensor) -> int:
    """Parameter count of ``p``, unsharded (DTensor shards report their global shape)."""
    return int(torch.Size(p.shape).numel())


def as_dict(x: Any) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else dict(x or {})
