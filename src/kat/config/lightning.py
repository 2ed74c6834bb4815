"""Schemas typed from Lightning's own signatures: ``trainer`` and ``callbacks`` (imports lightning).

``import kat.config.lightning`` registers them (kat.train does; so does tests/conftest.py's ``compose_cfg``).

* ``TrainerConfig``: one field per argument of ``lightning.pytorch.Trainer`` (``inspect.signature``), so any
  Trainer argument can be set (``trainer.X=...``) and an unknown one fails at compose time. Field types come
  from the annotations (``int``, ``bool``, ``float``, ``str``, optional or not; any other union is ``Any``).
  Arguments conf/trainer/default.yaml does not set legitimately keep Lightning's own default (read from the
  signature, not copied). ``callbacks``, ``logger``, ``strategy`` and ``plugins`` are not fields: kat builds
  them from the ``callbacks``, ``logger`` and ``strategy`` groups.
* ``CallbacksConfig``: ``checkpoint`` (ModelCheckpoint) and ``lr_monitor`` (LearningRateMonitor) likewise from
  their signatures; kat's own callbacks (``log_last_step``, ``throughput``, ``progress``) are written out.
  A callback set to null is left out.
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, List, Optional, Union

from omegaconf import MISSING

from kat.config import store

_PRIMITIVES = (bool, int, float, str)


def field_type(hint: Any) -> Any:
    """An OmegaConf-supported type for an annotation: primitives (optional or not) as they are, a union of int and
    float as float, anything else ``Any``."""
    if hint in _PRIMITIVES:
        return hint
    origin = typing.get_origin(hint)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType)):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            base = field_type(rest[0])
        elif rest and set(rest) <= {int, float}:
            base = float
        else:
            base = Any
        return Optional[base] if optional and base is not Any else base
    return Any


def _representable(v: Any) -> bool:
    return v is None or isinstance(v, _PRIMITIVES)


def signature_schema(cls: type, name: str, *, exclude: tuple[str, ...] = ()) -> type:
    """A dataclass with ``_target_`` and one field per keyword argument of ``cls`` (its defaults are the
    signature's; an argument without a representable default is required)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: fall back per parameter
        hints = {}
    fields: list = [("_target_", str, dataclasses.field(default=MISSING))]
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.name in exclude or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = p.default if p.default is not inspect.Parameter.empty and _representable(p.default) else MISSING
        typ = field_type(hints.get(p.name, Any))
        if default is None and typ is not Any and typing.get_origin(typ) is not Union:
            typ = Optional[typ]
        fields.append((p.name, typ, dataclasses.field(default=default)))
    schema = dataclasses.make_dataclass(name, fields)
    schema.__module__ = __name__
    schema.__doc__ = f"Keyword arguments of {cls.__module__}.{cls.__qualname__} (inspect.signature)."
    setattr(sys.modules[__name__], name, schema)  # importable by name (pickled configs)
    return schema


from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402

#: arguments kat passes to Trainer itself, from the callbacks / logger / strategy groups
KAT_BUILT = ("callbacks", "logger", "strategy", "plugins")
TrainerConfig = signature_schema(Trainer, "TrainerConfig", exclude=KAT_BUILT)
ModelCheckpointConfig = signature_schema(ModelCheckpoint, "ModelCheckpointConfig")
LearningRateMonitorConfig = signature_schema(LearningRateMonitor, "LearningRateMonitorConfig")


@dataclass
class LogLastStepConfig:
    """``callbacks.log_last_step`` (kat.trainer.callbacks.LogLastStep)."""
    _target_: str = MISSING


@dataclass
class ThroughputConfig:
    """``callbacks.throughput`` (kat.trainer.callbacks.Throughput)."""
    _target_: str = MISSING
    peak_tflops: float = MISSING
    log_every_n_steps: int = MISSING


@dataclass
class ProgressConfig:
    """``callbacks.progress`` (kat.trainer.progress.Progress)."""
    _target_: str = MISSING
    style: str = MISSING
    every_n_seconds: float = MISSING
    metrics: List[str] = MISSING


@dataclass
class CallbacksConfig:
    """``callbacks`` (conf/callbacks/default.yaml); null leaves a callback out."""
    log_last_step: Optional[LogLastStepConfig] = MISSING
    checkpoint: Optional[ModelCheckpointConfig] = MISSING  # type: ignore[valid-type]
    lr_monitor: Optional[LearningRateMonitorConfig] = MISSING  # type: ignore[valid-type]
    throughput: Optional[ThroughputConfig] = MISSING
    progress: Optional[ProgressConfig] = MISSING


def register() -> None:
    store("trainer", "trainer_schema", TrainerConfig)
    store("callbacks", "callbacks_schema", CallbacksConfig)


register()
