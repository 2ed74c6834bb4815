"""kat's own Lightning callbacks (conf/callbacks/default.yaml): throughput/MFU and the always-logged last step.
The progress display is :mod:`kat.trainer.progress`."""
from __future__ import annotations

import time

import lightning as L
import torch


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
            n = sum(full_numel(p) for p in pl_module.trainable_parameters())
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


def full_numel(p: torch.Tensor) -> int:
    """Parameter count of ``p``, unsharded (DTensor shards report their global shape)."""
    return int(torch.Size(p.shape).numel())
