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

import kat.config.lightning  # noqa: F401  (registers the trainer and callbacks schemas)
from kat import models, tracking
from kat.config import CONF_DIR
from kat.data.datamodule import KatDataModule
from kat.utils import configure_threads, get_logger

log = get_logger(__name__)
STAGES = ("distill", "coldstart", "rl")


def train(cfg: DictConfig) -> float | None:
    stage = require_stage(cfg)
    configure_threads()
    L.seed_everything(cfg.seed, workers=True)

    model, tokenizer = models.load(cfg.model)
    datamodule = KatDataModule(cfg.data, tokenizer, stage=stage, seed=cfg.seed)
    module = get_class(cfg.stage.module._target_).from_config(cfg, model, tokenizer)

    ckpt = resolve_ckpt_path(cfg)
    loggers = build_loggers(cfg, stage, resuming=ckpt is not None)
    callbacks = build_callbacks(cfg, has_logger=bool(loggers))
    strategy = build_strategy(cfg.strategy)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, strategy=strategy,
                                     plugins=build_plugins(strategy))
    if ckpt is None:
        for lg in loggers:
            lg.log_hyperparams(tracking.params_from_config(cfg))
    else:
        log.info(f"Resuming from {ckpt}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)

    final = Path(cfg.paths.ckpt_dir) / "final"
    module.export(final)  # every rank (a sharded model is gathered); rank 0 writes
    if trainer.is_global_zero:
        log.info(f"final checkpoint: {final}")
        for lg in loggers:
            if isinstance(lg, L.pytorch.loggers.MLFlowLogger) and cfg.logger.mlflow.log_checkpoint:
                lg.experiment.log_artifacts(lg.run_id, str(final), artifact_path="checkpoint")
    value = trainer.callback_metrics.get(cfg.optimized_metric or "")
    return None if value is None else float(value)


def require_stage(cfg: DictConfig) -> str:
    """The stage name, or a clear error listing the valid ``+stage=`` values."""
    stage = cfg.stage
    if stage is None or stage.name not in STAGES:
        raise SystemExit(f"choose a stage: python -m kat.train +stage=<{'|'.join(STAGES)}> [overrides]")
    return stage.name


def build_callbacks(cfg: DictConfig, *, has_logger: bool) -> list:
    """The ``callbacks`` group; callbacks that need a logger are left out (with a note) under ``logger=none``."""
    out = []
    for name, c in (cfg.callbacks or {}).items():
        if c is None:
            continue
        if not has_logger and c._target_.endswith("LearningRateMonitor"):
            log.info(f"callbacks.{name}: skipped (no logger)")
            continue
        out.append(instantiate(c))
    return out


def build_strategy(cfg: DictConfig):
    """``strategy=auto|ddp|fsdp``: a Lightning strategy object, or the name Lightning resolves itself."""
    if "_target_" in cfg:
        return instantiate(cfg)
    return cfg.name


def build_plugins(strategy) -> list:
    """Atomic single-file checkpoints (the FSDP strategy writes its sharded ones atomically itself)."""
    from kat.trainer.fsdp import AtomicCheckpointIO, KatFSDPStrategy

    return [] if isinstance(strategy, KatFSDPStrategy) else [AtomicCheckpointIO()]


RUN_ID_FILE = "mlflow_run_id"


def build_loggers(cfg: DictConfig, stage: str, *, resuming: bool = False) -> list:
    """MLflow (default) and/or CSV loggers from the ``logger`` group.

    The MLflow run id is kept in ``<output_dir>/mlflow_run_id``: a resumed run continues the same run.
    """
    out = []
    lcfg = cfg.logger
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    if lcfg.mlflow is not None:
        m = lcfg.mlflow
        id_file = Path(cfg.paths.output_dir) / RUN_ID_FILE
        run_id = m.run_id or (id_file.read_text().strip() if resuming and id_file.exists() else None)
        logger = tracking.mlflow_logger(
            experiment_name=m.experiment_name, stage=stage, tracking_uri_=m.tracking_uri,
            artifact_location_=m.artifact_location, run_name_=m.run_name, overrides=overrides,
            run_id=run_id)
        if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0:
            id_file.parent.mkdir(parents=True, exist_ok=True)
            id_file.write_text(logger.run_id + "\n")
        out.append(logger)
    if lcfg.csv is not None:
        out.append(instantiate(lcfg.csv))
    return out


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """``ckpt_path``: ``auto`` (resume from this output dir's last checkpoint when there is one),
    ``last`` (the same, warning when there is none), null (always fresh), or a checkpoint path.

    An interrupted swap of atomic checkpoints can leave only ``last.ckpt.old``: it is used then.
    """
    ckpt = cfg.ckpt_path
    if not ckpt:
        return None
    if ckpt in ("auto", "last"):
        base = Path(cfg.paths.ckpt_dir)
        for cand in (base / "last.ckpt", base / "last.ckpt.old"):
            if cand.exists():
                return str(cand)
        if ckpt == "last":
            log.warning(f"ckpt_path=last but no {base / 'last.ckpt'}: starting fresh")
        return None
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
