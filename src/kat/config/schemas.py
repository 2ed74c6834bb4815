"""Schemas (Hydra structured configs) of the config groups whose keys kat's code reads (docs/config.md).

One dataclass per YAML file (or per family of files): field names and types only. The values and their one-line
comments live in the YAML file, which names its schema first in its defaults list (``defaults: [model_schema,
_self_]``). A field has no default (``MISSING``) unless some YAML file legitimately omits the key; each such
default says why. Lightning-typed schemas (``trainer``, ``callbacks``) are in :mod:`kat.config.lightning`.

The RL-owned groups (``reward``, ``algorithm``, ``rollout`` and the ``stage`` node of ``+stage=rl``) are typed by
:mod:`kat.rl.config`; :func:`register` stores them too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING


# ------------------------------------------------------------------------------------------- model
@dataclass
class ArchConfig:
    """``model.arch``: the Qwen2Config fields of a model built from config (conf/model/tiny.yaml)."""
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    intermediate_size: int = MISSING
    max_position_embeddings: int = MISSING
    tie_word_embeddings: bool = MISSING
    rope_theta: float = MISSING


@dataclass
class ModelConfig:
    """``model`` (conf/model/*.yaml) and ``teacher.model``."""
    name: str = MISSING
    path: Optional[str] = MISSING
    dtype: str = MISSING
    attn_implementation: str = MISSING
    mtp_depth: int = MISSING
    arch: Optional[ArchConfig] = MISSING


# ------------------------------------------------------------------------------------------- teacher
@dataclass
class OnlineTeacherConfig:
    """``teacher=tiny`` (kind online)."""
    model: ModelConfig = MISSING
    kind: str = MISSING
    path: Optional[str] = MISSING
    dtype: str = MISSING
    align: str = MISSING


@dataclass
class DualTeacherConfig:
    """``teacher=dual``."""
    model: ModelConfig = MISSING
    kind: str = MISSING
    on_path: Optional[str] = MISSING
    off_path: Optional[str] = MISSING
    dtype: str = MISSING
    align: str = MISSING


@dataclass
class OfflineTeacherConfig:
    """``teacher=offline``."""
    kind: str = MISSING
    cache_dir: str = MISSING
    k: Optional[int] = MISSING
    expect_teacher: Optional[str] = MISSING
    verify: str = MISSING


# ------------------------------------------------------------------------------------------- data
@dataclass
class DirectionsConfig:
    """``data.directives.judge``: one rationale per direction (quoted "on"/"off" keys in YAML)."""
    on: Optional[str] = MISSING
    off: Optional[str] = MISSING


@dataclass
class PhrasingsConfig:
    """``data.directives.phrasings``: per direction, language -> phrasings."""
    on: Dict[str, List[str]] = MISSING
    off: Dict[str, List[str]] = MISSING


@dataclass
class DirectivesConfig:
    """``data.directives`` (conf/data/_directives.yaml; also ``directives`` of conf/eval.yaml)."""
    share: float = MISSING
    stages: List[str] = MISSING
    off_share: float = MISSING
    position: str = MISSING
    separators: List[str] = MISSING
    judge: DirectionsConfig = MISSING
    phrasings: PhrasingsConfig = MISSING


@dataclass
class LoaderConfig:
    """Batching and templating fields of every data option (conf/data/_loader.yaml)."""
    directives: DirectivesConfig = MISSING
    template: Optional[str] = MISSING
    modes: str = MISSING
    batch_size: int = MISSING
    val_batch_size: int = MISSING
    val_limit: Optional[int] = MISSING
    max_length: int = MISSING
    on_overlong: str = MISSING
    num_workers: int = MISSING


@dataclass
class SyntheticDataConfig(LoaderConfig):
    """``data=synthetic``."""
    name: str = MISSING
    n_train_per_level: int = MISSING
    n_val_per_level: int = MISSING
    domains: List[str] = MISSING
    labels: str = MISSING
    operand_digits: Optional[List[List[int]]] = MISSING
    off_share: List[float] = MISSING
    random_mode_rate: float = MISSING


@dataclass
class JsonlDataConfig(LoaderConfig):
    """``data=jsonl``."""
    name: str = MISSING
    path: str = MISSING
    val_path: Optional[str] = MISSING
    val_fraction: float = MISSING


@dataclass
class MixSyntheticConfig:
    """``data.synthetic`` of ``data=mix``: the settings of its synthetic sources."""
    n_train_per_level: int = MISSING
    n_val_per_level: int = MISSING
    domains: List[str] = MISSING
    labels: str = MISSING
    operand_digits: Optional[List[List[int]]] = MISSING
    off_share: List[float] = MISSING
    random_mode_rate: float = MISSING


@dataclass
class MixSharesConfig:
    """``data.shares`` of ``data=mix``: target shares per axis (keys: a domain, a level 1..5, a mode)."""
    domain: Optional[Dict[str, float]] = MISSING
    level: Optional[Dict[Any, float]] = MISSING
    mode: Optional[Dict[str, float]] = MISSING


@dataclass
class MixDataConfig(LoaderConfig):
    """``data=mix``. ``sources`` entries are free-form: ``name``, ``weight`` and that source kind's fields."""
    name: str = MISSING
    size: int = MISSING
    sources: List[Dict[str, Any]] = MISSING
    synthetic: MixSyntheticConfig = MISSING
    shares: MixSharesConfig = MISSING


# ------------------------------------------------------------------------------------------- strategy
@dataclass
class AutoStrategyConfig:
    """``strategy=auto``: a name Lightning resolves."""
    name: str = MISSING


@dataclass
class DDPStrategyConfig:
    """``strategy=ddp``."""
    _target_: str = MISSING
    find_unused_parameters: bool = MISSING


@dataclass
class FSDPStrategyConfig:
    """``strategy=fsdp`` (kat.trainer.fsdp.KatFSDPStrategy)."""
    _target_: str = MISSING
    data_parallel_size: Any = MISSING  # auto | an int
    save_distributed_checkpoint: bool = MISSING
    mixed_precision: str = MISSING
    activation_checkpointing: bool = MISSING
    reshard_after_forward: bool = MISSING
    shard_frozen: bool = MISSING
    process_group_backend: Optional[str] = MISSING


# ------------------------------------------------------------------------------------------- logger
@dataclass
class MLflowLoggerConfig:
    """``logger.mlflow`` (kat.tracking.mlflow_logger)."""
    experiment_name: str = MISSING
    tracking_uri: Optional[str] = MISSING
    artifact_location: Optional[str] = MISSING
    run_name: Optional[str] = MISSING
    run_id: Optional[str] = MISSING
    log_checkpoint: bool = MISSING


@dataclass
class CSVLoggerConfig:
    """``logger.csv`` (lightning CSVLogger)."""
    _target_: str = MISSING
    save_dir: str = MISSING
    name: str = MISSING


@dataclass
class LoggerConfig:
    """``logger``: each option sets only its own loggers, so both default to None (= not used)."""
    mlflow: Optional[MLflowLoggerConfig] = None
    csv: Optional[CSVLoggerConfig] = None


# ------------------------------------------------------------------------------------------- paths, root
@dataclass
class PathsConfig:
    """``paths`` (conf/paths/default.yaml)."""
    output_dir: str = MISSING
    ckpt_dir: str = MISSING


@dataclass
class OptimConfig:
    """``optim`` (conf/train.yaml)."""
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    eps: float = MISSING
    warmup_steps: int = MISSING
    schedule: str = MISSING
    min_lr_ratio: float = MISSING


@dataclass
class LossConfig:
    """``loss`` (conf/train.yaml); stages that add loss settings extend it (DistillLossConfig)."""
    impl: str = MISSING


@dataclass
class DistillLossConfig(LossConfig):
    """``loss`` under ``+stage=distill`` (conf/stage/distill.yaml names it for ``loss``)."""
    w_ce: float = MISSING
    w_uld: float = MISSING
    student_temperature: float = MISSING
    teacher_temperature: float = MISSING
    mtp_lambda: float = MISSING
    mtp_lambda_final: float = MISSING
    mtp_lambda_switch: float = MISSING


@dataclass
class ValConfig:
    """``stage.module.val``: generation-based validation (kat.stages.base.KatStage)."""
    fmt: str = MISSING
    modes: List[str] = MISSING
    max_new_tokens: int = MISSING
    batch_size: int = MISSING
    grade_workers: int = MISSING


@dataclass
class StageModuleConfig:
    """``stage.module`` of Distill and ColdStart."""
    _target_: str = MISSING
    val: ValConfig = MISSING


@dataclass
class StageConfig:
    """``stage`` of ``+stage=distill|coldstart`` (conf/stage/*.yaml name it for ``stage``)."""
    name: str = MISSING
    module: StageModuleConfig = MISSING


@dataclass
class TrainConfig:
    """The root of conf/train.yaml. Groups typed by their options' own schemas are ``Any`` here."""
    model: ModelConfig = MISSING
    teacher: Any = MISSING  # OnlineTeacherConfig | DualTeacherConfig | OfflineTeacherConfig (the option's schema)
    data: Any = MISSING  # SyntheticDataConfig | JsonlDataConfig | MixDataConfig (the option's schema)
    reward: Any = MISSING  # kat.rl.config.RewardConfig
    algorithm: Any = MISSING  # kat.rl.config.<Name>AlgorithmConfig (the option's schema)
    rollout: Any = MISSING  # kat.rl.config.HFRolloutConfig | VLLMRolloutConfig
    strategy: Any = MISSING  # AutoStrategyConfig | DDPStrategyConfig | FSDPStrategyConfig
    trainer: Any = MISSING  # kat.config.lightning.TrainerConfig
    logger: LoggerConfig = MISSING
    callbacks: Any = MISSING  # kat.config.lightning.CallbacksConfig
    paths: PathsConfig = MISSING
    stage: Any = None  # absent until +stage=...: StageConfig for distill/coldstart, kat.rl.config.RLStageConfig for rl
    task_name: str = MISSING
    seed: int = MISSING
    ckpt_path: Optional[str] = MISSING
    optimized_metric: Optional[str] = MISSING
    optim: OptimConfig = MISSING
    loss: LossConfig = MISSING


SCHEMAS: list[tuple[str | None, str, type]] = [
    (None, "train_schema", TrainConfig),
    ("model", "model_schema", ModelConfig),
    ("teacher", "online_schema", OnlineTeacherConfig),
    ("teacher", "dual_schema", DualTeacherConfig),
    ("teacher", "offline_schema", OfflineTeacherConfig),
    ("data", "directives_schema", DirectivesConfig),
    ("data", "synthetic_schema", SyntheticDataConfig),
    ("data", "jsonl_schema", JsonlDataConfig),
    ("data", "mix_schema", MixDataConfig),
    ("strategy", "auto_schema", AutoStrategyConfig),
    ("strategy", "ddp_schema", DDPStrategyConfig),
    ("strategy", "fsdp_schema", FSDPStrategyConfig),
    ("logger", "logger_schema", LoggerConfig),
    ("paths", "paths_schema", PathsConfig),
    ("stage", "stage_schema", StageConfig),
    ("stage", "distill_loss_schema", DistillLossConfig),
]


def register() -> None:
    """Store every schema of this module and of :mod:`kat.rl.config` in Hydra's ConfigStore (idempotent)."""
    from kat.config import store
    from kat.rl import config as rl_config  # dependency-free (no torch, no lightning)

    for group, name, node in SCHEMAS:
        store(group, name, node)
    # kat.rl.config imports this module: when it was imported first it is still partial here and registers its
    # schemas itself once defined
    for group, name, node in getattr(rl_config, "SCHEMAS", ()):
        store(group, name, node)
