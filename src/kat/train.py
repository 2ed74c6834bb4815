"""``python -m kat.train +stage=distill|coldstart|rl [overrides]`` — one training stage, from its config.

The recipe: seed → model and tokenizer → datamodule → stage module → callbacks, loggers, trainer →
log the resolved config → fit (resuming when asked) → export the HF checkpoint → return the metric a
sweeper optimises (``optimized_metric``).
"""
from __future__ import annotations

import os
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from kat import models, tracking
from kat.data.datamodule import KatDataModule
from kat.utils import configure_threads, get_logger

log = get_logger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent / "conf") if (Path(__file__).resolve().parent / "conf").is_dir() \
    else str(Path(__file__).resolve().parents[2] / "conf")
STAGES = ("distill", "coldstart", "rl")


def train(cfg: DictConfig) -> float | None:
    stage = require_stage(cfg)
    configure_threads()
    L.seed_everything(cfg.seed, workers=True)

    model, tokenizer = models.load(cfg.model)
    datamodule = KatDataModule(cfg.data, tokenizer, stage=cfg.stage.get("data_stage", stage), seed=cfg.seed)
    module = get_class(cfg.stage.module._target_).from_config(cfg, model, tokenizer)

    loggers = build_loggers(cfg, stage)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers,
                                     strategy=build_strategy(cfg.strategy))
    for lg in loggers:
        lg.log_hyperparams(tracking.params_from_config(cfg))

    ckpt = resolve_ckpt_path(cfg)
    if ckpt:
        log.info(f"Resuming from {ckpt}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    final = Path(cfg.paths.ckpt_dir) / "final"
    if trainer.is_global_zero:
        module.export(final)
        log.info(f"final checkpoint: {final}")
        for lg in loggers:
            if isinstance(lg, L.pytorch.loggers.MLFlowLogger) and cfg.logger.mlflow.get("log_checkpoint", True):
                lg.experiment.log_artifacts(lg.run_id, str(final), artifact_path="checkpoint")
    value = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return None if value is None else float(value)


def require_stage(cfg: DictConfig) -> str:
    """The stage name, or a clear error listing the valid ``+stage=`` values."""
    stage = cfg.get("stage")
    if stage is None or stage.get("name") not in STAGES:
        raise SystemExit(f"choose a stage: python -m kat.train +stage=<{'|'.join(STAGES)}> [overrides]")
    return stage.name


def build_callbacks(cfg: DictConfig, *, has_logger: bool) -> list:
    """The ``callbacks`` group; callbacks that need a logger are left out (with a note) under ``logger=none``."""
    out = []
    for name, c in (cfg.callbacks or {}).items():
        if c is None:
            continue
        if not has_logger and c.get("_target_", "").endswith("LearningRateMonitor"):
            log.info(f"callbacks.{name}: skipped (no logger)")
            continue
        out.append(instantiate(c))
    return out


def build_strategy(cfg: DictConfig):
    """``strategy=auto|ddp|fsdp``: a Lightning strategy object, or the name Lightning resolves itself."""
    if "_target_" in cfg:
        return instantiate(cfg)
    return cfg.name


def build_loggers(cfg: DictConfig, stage: str) -> list:
    """MLflow (default) and/or CSV loggers from the ``logger`` group."""
    out = []
    lcfg = cfg.get("logger") or {}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if lcfg.get("mlflow"):
        m = lcfg.mlflow
        out.append(tracking.mlflow_logger(
            experiment_name=m.experiment_name, stage=stage, tracking_uri_=m.get("tracking_uri"),
            artifact_location_=m.get("artifact_location"), run_name_=m.get("run_name"), overrides=overrides,
            run_id=m.get("run_id")))
    if lcfg.get("csv"):
        out.append(instantiate(lcfg.csv))
    return out


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: null (fresh), ``last`` (the last checkpoint of this output dir), or a path."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt:
        return None
    if ckpt == "last":
        last = Path(cfg.paths.ckpt_dir) / "last.ckpt"
        if not last.exists():
            log.warning(f"ckpt_path=last but no {last}: starting fresh")
            return None
        return str(last)
    if not Path(ckpt).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt!r} does not exist")
    return str(ckpt)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info("config:\n" + OmegaConf.to_yaml(cfg, resolve=True))
    return train(cfg)


if __name__ == "__main__":
    main()
