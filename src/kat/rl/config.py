"""Schemas (Hydra structured configs) of the RL-owned config groups (docs/config.md).

Field names and types only: the values and their one-line comments live in the YAML files, which name their
schema first in their defaults list (``conf/algorithm/grpo.yaml``: ``defaults: [grpo_schema, _self_]``). A key a
schema lacks or a value of the wrong type fails when the config is composed.

* ``algorithm`` — one schema per estimator (:class:`StepSRPOAlgorithmConfig`, :class:`GRPOAlgorithmConfig`, …):
  the shared ``loss``, ``resampling``, ``force_modes``, ``ref_acc`` and that estimator's own ``credit`` keys, so
  ``algorithm=grpo algorithm.credit.judge_weight=1`` fails;
* ``reward`` — :class:`RewardConfig` (verifier settings: ``math``, ``code``);
* ``rollout`` — :class:`HFRolloutConfig`, :class:`VLLMRolloutConfig`;
* ``stage`` of ``+stage=rl`` — :class:`RLStageConfig` (``stage.module.*``).

Dependency-free (dataclasses and omegaconf only): :mod:`kat.config` imports this module to register the schemas
and must stay importable without torch or lightning. The algorithm code keeps its own settings dataclasses
(:mod:`kat.rl.credit`, :mod:`kat.rl.sampling`, :mod:`kat.rl.update`), which :class:`kat.stages.rl.RL` builds from
these nodes by attribute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from omegaconf import MISSING

from kat.config.schemas import ValConfig


# ------------------------------------------------------------------------------------------- algorithm
@dataclass
class PolicyLossConfig:
    """``algorithm.loss``: ``kat.losses.grpo.policy_loss`` settings (kat.rl.update.loss_kwargs) + ``reference``."""
    clip_eps_low: float = MISSING
    clip_eps_high: float = MISSING
    clip_ratio_c: Optional[float] = MISSING
    log_ratio_clamp: float = MISSING
    ratio_level: str = MISSING
    loss_agg: str = MISSING
    norm_const: Optional[float] = MISSING
    kl_coef: float = MISSING
    kl_estimator: str = MISSING
    reference: Any = MISSING  # auto | true | false


@dataclass
class ResamplingConfig:
    """``algorithm.resampling`` (kat.rl.sampling.SamplingConfig)."""
    history: bool = MISSING
    dynamic: bool = MISSING
    dynamic_metric: str = MISSING
    max_gen_batches: int = MISSING
    on_unfilled: str = MISSING


@dataclass
class RefAccConfig:
    """``algorithm.ref_acc``: AdaptThink's reference accuracy."""
    samples: int = MISSING
    mode: str = MISSING


@dataclass
class StepSRPOCreditConfig:
    """``algorithm.credit`` of ``algorithm=step_srpo`` (kat.rl.shaping.StepSRPOConfig)."""
    judge_weight: float = MISSING
    modulation: str = MISSING
    margin: float = MISSING
    format_penalty: float = MISSING
    correct_threshold: float = MISSING
    efficiency_weight: float = MISSING
    scale: str = MISSING
    eps: float = MISSING
    decision_weight: Optional[float] = MISSING


@dataclass
class GRPOCreditConfig:
    """``algorithm.credit`` of ``algorithm=grpo`` (kat.rl.credit.GRPOConfig)."""
    format_penalty: float = MISSING
    correct_threshold: float = MISSING
    scale: str = MISSING
    eps: float = MISSING


@dataclass
class DAPOCreditConfig:
    """``algorithm.credit`` of ``algorithm=dapo`` (kat.rl.credit.DAPOConfig)."""
    correct_reward: float = MISSING
    wrong_reward: float = MISSING
    overlong_max_len: Optional[int] = MISSING
    overlong_cache_len: Optional[int] = MISSING
    overlong_factor: float = MISSING
    correct_threshold: float = MISSING
    scale: str = MISSING
    eps: float = MISSING


@dataclass
class AdaptThinkCreditConfig:
    """``algorithm.credit`` of ``algorithm=adaptthink`` (kat.rl.credit.AdaptThinkConfig)."""
    delta: float = MISSING
    correct_threshold: float = MISSING


@dataclass
class ThinklessCreditConfig:
    """``algorithm.credit`` of ``algorithm=thinkless`` (kat.rl.credit.ThinklessConfig)."""
    short_correct: float = MISSING
    think_correct: float = MISSING
    wrong: float = MISSING
    alpha: float = MISSING
    correct_threshold: float = MISSING


@dataclass
class AlgorithmConfig:
    """The keys every ``conf/algorithm/*.yaml`` sets; each option's schema adds its own ``credit``."""
    name: str = MISSING
    loss: PolicyLossConfig = MISSING
    resampling: ResamplingConfig = MISSING
    force_modes: bool = MISSING
    ref_acc: RefAccConfig = MISSING


@dataclass
class StepSRPOAlgorithmConfig(AlgorithmConfig):
    """``algorithm=step_srpo``."""
    credit: StepSRPOCreditConfig = MISSING


@dataclass
class GRPOAlgorithmConfig(AlgorithmConfig):
    """``algorithm=grpo``."""
    credit: GRPOCreditConfig = MISSING


@dataclass
class DAPOAlgorithmConfig(AlgorithmConfig):
    """``algorithm=dapo``."""
    credit: DAPOCreditConfig = MISSING


@dataclass
class AdaptThinkAlgorithmConfig(AlgorithmConfig):
    """``algorithm=adaptthink``."""
    credit: AdaptThinkCreditConfig = MISSING


@dataclass
class ThinklessAlgorithmConfig(AlgorithmConfig):
    """``algorithm=thinkless``."""
    credit: ThinklessCreditConfig = MISSING


# ------------------------------------------------------------------------------------------- reward
@dataclass
class MathRewardConfig:
    """``reward.math`` (kat.rewards.math.MathConfig)."""
    numeric_precision: int = MISSING
    float_rounding: int = MISSING
    max_answer_chars: int = MISSING
    workers: int = MISSING
    memory_limit_mb: int = MISSING
    startup_timeout_s: float = MISSING


@dataclass
class CodeRewardConfig:
    """``reward.code`` (kat.rewards.sandbox.SandboxConfig; the YAML sets these of its fields)."""
    timeout_s: Optional[float] = MISSING
    memory_mb: int = MISSING
    cpu_s: Optional[float] = MISSING
    fsize_mb: int = MISSING
    nofile: int = MISSING
    nproc: int = MISSING
    output_limit_bytes: int = MISSING
    tmpfs_mb: int = MISSING
    allow_unsandboxed: bool = MISSING


@dataclass
class RewardConfig:
    """``reward`` (conf/reward/step_srpo.yaml): verifier settings of every algorithm, kat.eval and kat.synth."""
    timeout_s: float = MISSING
    workers: int = MISSING
    cache: bool = MISSING
    math: MathRewardConfig = MISSING
    code: CodeRewardConfig = MISSING


# ------------------------------------------------------------------------------------------- rollout
@dataclass
class HFRolloutConfig:
    """``rollout=hf``; the fields every engine shares."""
    engine: str = MISSING
    group_size: int = MISSING
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING
    max_judge_tokens: int = MISSING
    batch_size: int = MISSING
    logprobs: str = MISSING
    logprob_batch_size: int = MISSING


@dataclass
class VLLMRolloutConfig(HFRolloutConfig):
    """``rollout=vllm`` (kat.rollout.vllm.VLLMEngine)."""
    top_k: Optional[int] = MISSING
    gpu_memory_utilization: float = MISSING
    max_model_len: int = MISSING
    dtype: str = MISSING
    enable_prefix_caching: bool = MISSING
    sleep_level: int = MISSING
    enforce_eager: bool = MISSING
    master_port: int = MISSING


# ------------------------------------------------------------------------------------------- stage
@dataclass
class RLUpdateConfig:
    """``stage.module.update`` (kat.rl.update.UpdateConfig)."""
    ppo_epochs: int = MISSING
    mini_batches: int = MISSING
    micro_batch_size: int = MISSING
    grad_clip: Optional[float] = MISSING


@dataclass
class RLModuleConfig:
    """``stage.module`` of ``+stage=rl`` (kat.stages.rl.RL.from_config)."""
    _target_: str = MISSING
    val: ValConfig = MISSING
    validate_at_start: bool = MISSING
    validate_at_end: bool = MISSING
    update: RLUpdateConfig = MISSING
    plots: bool = MISSING
    log_samples: int = MISSING


@dataclass
class RLStageConfig:
    """``stage`` of ``+stage=rl`` (conf/stage/rl.yaml names it for ``stage``)."""
    name: str = MISSING
    module: RLModuleConfig = MISSING


SCHEMAS: List[tuple] = [
    ("algorithm", "step_srpo_schema", StepSRPOAlgorithmConfig),
    ("algorithm", "grpo_schema", GRPOAlgorithmConfig),
    ("algorithm", "dapo_schema", DAPOAlgorithmConfig),
    ("algorithm", "adaptthink_schema", AdaptThinkAlgorithmConfig),
    ("algorithm", "thinkless_schema", ThinklessAlgorithmConfig),
    ("reward", "reward_schema", RewardConfig),
    ("rollout", "hf_schema", HFRolloutConfig),
    ("rollout", "vllm_schema", VLLMRolloutConfig),
    ("stage", "rl_stage_schema", RLStageConfig),
]


def register() -> None:
    """Store every schema of this module in Hydra's ConfigStore (idempotent; :mod:`kat.config` calls it)."""
    from kat.config import store

    for group, name, node in SCHEMAS:
        store(group, name, node)


register()  # also when this module is imported before kat.config has finished registering (see kat.config.schemas)
