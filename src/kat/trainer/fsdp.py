"""``strategy=fsdp``: FSDP2 (``fully_shard``) per decoder layer through Lightning's ModelParallelStrategy.

* :class:`KatFSDPStrategy` — ModelParallelStrategy with pure data parallelism (``data_parallel_size``
  = every process unless set, tensor parallel 1), kat's sharding options, and **atomic** checkpoints:
  a checkpoint is written to ``<name>.partial`` and swapped in only when every rank has finished, so
  a crash mid-write never leaves a torn ``last.ckpt``. Works on CUDA (NCCL) and on CPU (gloo), where
  Lightning's FSDPStrategy refuses to run.
* :func:`shard_model` — what :meth:`KatStage.configure_model` calls: ``fully_shard`` every decoder
  layer (optionally with activation checkpointing), every extra unit of the stage (the MTP heads),
  then the root; bf16 parameters with fp32 gradient reduction on GPU.
* :func:`full_state_dict` — the unsharded weights on rank 0 (a collective: call it on every rank),
  used to export plain HF checkpoints.
* :class:`AtomicCheckpointIO` — the same atomic write for single-file checkpoints (auto/ddp).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from kat.utils import get_logger

log = get_logger(__name__)


def swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp`` (files or folders); a crash leaves either the old or the new one."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if path.exists() or path.is_symlink():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to ``<path>.partial``, fsync, then rename over ``path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        swap_in(tmp, path)


class KatFSDPStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism with atomic (sharded) checkpoints; options read by :func:`shard_model`."""

    def __init__(self, data_parallel_size: int | str = "auto", save_distributed_checkpoint: bool = True,
                 mixed_precision: str = "auto", activation_checkpointing: bool = False,
                 reshard_after_forward: bool = True, shard_frozen: bool = False,
                 process_group_backend: str | None = None):
        if mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"strategy.mixed_precision must be auto, bf16 or fp32, got {mixed_precision!r}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend)
        self.mixed_precision = mixed_precision
        self.activation_checkpointing = bool(activation_checkpointing)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.shard_frozen = bool(shard_frozen)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # pure FSDP: every process is a data-parallel replica
            self._data_parallel_size = self.num_processes * self.num_nodes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(path.name + ".partial")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("kat_ckpt_clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("kat_ckpt_written")
        if self.global_rank == 0:
            swap_in(tmp, path)
        self.barrier("kat_ckpt_swapped")


def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (``model.model.layers`` for Llama/Qwen2-style models)."""
    base = getattr(model, "base_model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TypeError(f"strategy=fsdp: {type(model).__name__} has no base_model.layers to shard per layer")
    return list(layers)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _mp_policy(strategy: KatFSDPStrategy, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = strategy.mixed_precision == "bf16" or (strategy.mixed_precision == "auto" and device.type == "cuda")
    if bf16:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model, strategy: KatFSDPStrategy, mesh, device: torch.device,
                extra_units: Iterable[torch.nn.Module] = ()) -> None:
    """``fully_shard`` each decoder layer, each extra unit, then the root (idempotent)."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    mp = _mp_policy(strategy, device)
    if strategy.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=strategy.reshard_after_forward)
    for unit in extra_units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=strategy.reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    n_local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    n_full = sum(p.numel() for p in model.parameters())
    log.info(f"FSDP2: {len(decoder_layers(model))} decoder layers sharded over {mesh.size()} ranks "
             f"({n_local} of {n_full} parameters held by this rank; mixed precision "
             f"{'bf16' if mp.param_dtype == torch.bfloat16 else 'off'}; "
             f"activation checkpointing {'on' if strategy.activation_checkpointing else 'off'})", rank_all=True)


def shard_frozen(model, mesh) -> None:
    """Shard a frozen model (teacher, reference) per decoder layer when ``strategy.shard_frozen``."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict: complete on rank 0 (empty elsewhere) for a sharded module; the plain
    state dict otherwise. Collective for sharded modules: call on every rank."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded_copy(model):
    """A plain (unsharded, CPU) copy of an HF model with the full weights, on rank 0; None elsewhere.
    Collective: call on every rank."""
    import torch.distributed as dist

    sd = full_state_dict(model)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        clone = type(model)(model.config)
    clone.load_state_dict(sd, assign=True)
    clone.tie_weights()
    clone.generation_config = model.generation_config
    return clone
