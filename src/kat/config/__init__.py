"""kat's Hydra tree and its typed schemas (structured configs; docs/config.md).

* :data:`CONF_DIR` — the Hydra config tree (``conf/`` of a checkout, ``kat/conf`` of an install). Every
  entry point's ``@hydra.main(config_path=CONF_DIR, ...)`` takes it from here; importing this package pulls in
  neither torch nor lightning.
* Schemas — dataclasses stored in Hydra's ConfigStore, named in a YAML file's defaults list as Hydra's
  "Structured Config schema" pattern has it (``conf/strategy/fsdp.yaml``: ``defaults: [fsdp_schema, _self_]``).
  The YAML file keeps the values and their comments; the dataclass holds the field names and types. A key the
  schema lacks (a typo in a YAML file, a recipe, a sweep, ``conf/local/default.yaml``, a ``+stage=`` delta) or a
  value of the wrong type fails when the config is composed. Importing this package registers every schema
  that needs no lightning (:mod:`kat.config.schemas`); ``import kat.config.lightning`` registers those typed
  from Lightning's signatures (``trainer``, ``callbacks``).
* :func:`check` — keys added with ``+group.key=value`` on the command line bypass the schema in Hydra (the
  ``+`` opens the node); :func:`check` walks a composed config and rejects every key its schema lacks. The
  Hydra callback :class:`SchemaCheck` (``conf/hydra/default.yaml``) runs it before the task function.
* :func:`store` — register a schema (the RL package registers its own this way).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve()
#: the Hydra tree: ``kat/conf`` when installed (setup.py ships conf/ as kat.conf), else the checkout's ``conf/``
CONF_DIR = str(_HERE.parents[1] / "conf") if (_HERE.parents[1] / "conf").is_dir() else str(_HERE.parents[3] / "conf")


class SchemaError(KeyError):
    """A composed config holds a key that its schema (a structured config) does not declare."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def store(group: str | None, name: str, node: Any, package: str | None = None) -> None:
    """``ConfigStore.instance().store(group=group, name=name, node=node)``: ``node`` (a dataclass) becomes the
    schema ``<group>/<name>``, used by listing ``name`` first in a YAML file's defaults (``- name`` in a file of
    that group, ``- /group/name@pkg`` elsewhere)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group=group, name=name, node=node, package=package)


def unknown_keys(cfg: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Full keys under ``cfg`` that the schema of their node does not declare (``+group.key=`` additions);
    top-level keys in ``skip`` are not looked at."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    out: list[str] = []
    if not isinstance(cfg, (DictConfig, ListConfig)) or cfg._is_none() or cfg._is_missing() \
            or cfg._is_interpolation():
        return out
    if isinstance(cfg, ListConfig):
        for i in range(len(cfg)):
            out.extend(unknown_keys(cfg._get_node(i), f"{prefix}[{i}]"))
        return out
    typ = OmegaConf.get_type(cfg)
    known = {f.name for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else None
    for key in cfg.keys():
        if key in skip:
            continue
        full = f"{prefix}.{key}" if prefix else str(key)
        if known is not None and key not in known:
            out.append(f"{full} (not a field of {typ.__name__})")
        else:
            out.extend(unknown_keys(cfg._get_node(key), full))
    return out


def check(cfg: Any, skip: tuple[str, ...] = ("hydra",)) -> Any:
    """Raise :class:`SchemaError` naming every key of ``cfg`` (top-level keys in ``skip`` aside) that its schema
    lacks; returns ``cfg``."""
    bad = unknown_keys(cfg, skip=skip)
    if bad:
        raise SchemaError("unknown config key(s): " + "; ".join(bad)
                          + " — a typo, or a field to add to its schema (docs/config.md)")
    return cfg


try:  # a Hydra callback: the check runs on every composed job config before the task function
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency
    _Callback = object


class SchemaRefused(SystemExit):
    """The run is refused (exit status 1, the message on stderr). A ``SystemExit``: Hydra turns an ``Exception``
    raised in a callback into a warning and runs the job anyway."""


class SchemaCheck(_Callback):
    """``hydra.callbacks.schema_check`` (conf/hydra/default.yaml): :func:`check` on the run's and every job's
    config, before the task function. ``+sweep=NAME`` without a sweep file is left to kat.sweep's callback, which
    lists the sweeps there are."""

    @staticmethod
    def _check(config) -> None:
        try:
            check(config, skip=("hydra", "sweep"))
        except SchemaError as e:
            raise SchemaRefused(f"{type(e).__module__}.{type(e).__name__}: {e}") from None

    def on_run_start(self, config, **kwargs) -> None:
        self._check(config)

    def on_job_start(self, config, **kwargs) -> None:
        self._check(config)


from kat.config import schemas as _schemas  # noqa: E402  (registers the schemas)

_schemas.register()
