"""Typed configs (kat.config): an unknown key or a wrongly typed value fails when the config is composed.

Covers a ``+group.typo=`` on the command line, a typo inside a YAML file on the search path (conf/local/default.yaml,
a ``+stage=`` delta, a sweep), wrongly typed values, the Lightning-typed trainer schema, and the real entry point.
"""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from kat_testing import run_module

from kat.config import CONF_DIR, SchemaError


def _error_text(e: BaseException) -> str:
    """The exception and its causes, as Hydra prints them."""
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def _fails(compose_cfg, overrides, key, **kw) -> str:
    with pytest.raises((SchemaError, ConfigCompositionException)) as e:
        compose_cfg(overrides, **kw)
    text = _error_text(e.value)
    assert key in text, text
    return text


# one typo per typed node: (overrides selecting the option, full key of the typo)
TYPOS = [
    ([], "typo"),  # the root (TrainConfig)
    ([], "model.typo"),
    ([], "model.arch.typo"),
    ([], "teacher.typo"),
    ([], "teacher.model.typo"),
    (["teacher=dual"], "teacher.typo"),
    (["teacher=offline"], "teacher.typo"),
    ([], "data.typo"),
    ([], "data.directives.typo"),
    ([], "data.directives.phrasings.typo"),
    (["data=jsonl"], "data.typo"),
    (["data=mix"], "data.typo"),
    (["data=mix"], "data.synthetic.typo"),
    (["data=mix"], "data.shares.typo"),
    ([], "strategy.typo"),
    (["strategy=ddp"], "strategy.typo"),
    (["strategy=fsdp"], "strategy.typo"),
    ([], "trainer.typo"),
    ([], "logger.typo"),
    ([], "logger.mlflow.typo"),
    (["logger=csv"], "logger.csv.typo"),
    ([], "callbacks.typo"),
    ([], "callbacks.checkpoint.typo"),
    ([], "callbacks.progress.typo"),
    ([], "paths.typo"),
    ([], "optim.typo"),
    ([], "loss.typo"),
    ([], "stage.typo"),
    ([], "stage.module.typo"),
    ([], "stage.module.val.typo"),
]


@pytest.mark.parametrize("stage", ["coldstart", "distill"])
@pytest.mark.parametrize("options,key", TYPOS, ids=[f"{'-'.join(o) or 'default'}:{k}" for o, k in TYPOS])
def test_unknown_key_on_the_command_line_fails(compose_cfg, stage, options, key):
    text = _fails(compose_cfg, [f"+stage={stage}", *options, f"+{key}=1"], key)
    assert "not a field of" in text


# the RL-owned groups (kat.rl.config): one typo per typed node under +stage=rl
RL_TYPOS = [
    ([], "algorithm.typo"),
    ([], "algorithm.credit.typo"),
    ([], "algorithm.loss.typo"),
    ([], "algorithm.resampling.typo"),
    ([], "algorithm.ref_acc.typo"),
    *[([f"algorithm={a}"], k) for a in ("grpo", "dapo", "adaptthink", "thinkless")
      for k in ("algorithm.typo", "algorithm.credit.typo", "algorithm.loss.typo")],
    ([], "reward.typo"),
    ([], "reward.math.typo"),
    ([], "reward.code.typo"),
    ([], "rollout.typo"),
    (["rollout=vllm"], "rollout.typo"),
    ([], "stage.typo"),
    ([], "stage.module.typo"),
    ([], "stage.module.val.typo"),
    ([], "stage.module.update.typo"),
]


@pytest.mark.parametrize("plus", ["+", ""], ids=["append", "override"])
@pytest.mark.parametrize("options,key", RL_TYPOS, ids=[f"{'-'.join(o) or 'default'}:{k}" for o, k in RL_TYPOS])
def test_unknown_key_in_an_rl_group_fails(compose_cfg, plus, options, key):
    """``+key=`` (kat.config.check) and ``key=`` (Hydra: no such key in the schema) both name the key."""
    _fails(compose_cfg, ["+stage=rl", *options, f"{plus}{key}=1"], key)


@pytest.mark.parametrize("algorithm,key", [
    ("grpo", "judge_weight"), ("dapo", "modulation"), ("adaptthink", "format_penalty"), ("thinkless", "scale"),
    ("step_srpo", "delta"), ("step_srpo", "overlong_factor"),
])
def test_credit_keys_belong_to_their_algorithm(compose_cfg, algorithm, key):
    """Each algorithm's schema lists exactly its own ``credit`` keys."""
    text = _fails(compose_cfg, ["+stage=rl", f"algorithm={algorithm}", f"algorithm.credit.{key}=1"],
                  f"algorithm.credit.{key}")
    assert "CreditConfig" in text


def test_rl_groups_are_typed(compose_cfg):
    from kat.rl import config as C

    for algorithm, typ in [("step_srpo", C.StepSRPOAlgorithmConfig), ("grpo", C.GRPOAlgorithmConfig),
                           ("dapo", C.DAPOAlgorithmConfig), ("adaptthink", C.AdaptThinkAlgorithmConfig),
                           ("thinkless", C.ThinklessAlgorithmConfig)]:
        cfg = compose_cfg(["+stage=rl", f"algorithm={algorithm}"])
        assert OmegaConf.get_type(cfg.algorithm) is typ
        for node in (cfg.algorithm, cfg.rollout, cfg.reward, cfg.stage):  # every field set by the YAML
            OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    assert OmegaConf.get_type(cfg.stage) is C.RLStageConfig and OmegaConf.get_type(cfg.reward) is C.RewardConfig
    assert OmegaConf.get_type(cfg.rollout) is C.HFRolloutConfig
    vllm = compose_cfg(["+stage=rl", "rollout=vllm"]).rollout
    assert OmegaConf.get_type(vllm) is C.VLLMRolloutConfig
    OmegaConf.to_container(vllm, throw_on_missing=True)


@pytest.mark.parametrize("override,key", [
    ("rollout.group_size=abc", "rollout.group_size"),
    ("rollout.temperature=hot", "rollout.temperature"),
    ("algorithm.loss.clip_eps_high=wide", "algorithm.loss.clip_eps_high"),
    ("algorithm.credit.judge_weight=heavy", "algorithm.credit.judge_weight"),
    ("algorithm.resampling.history=perhaps", "algorithm.resampling.history"),
    ("algorithm.ref_acc.samples=some", "algorithm.ref_acc.samples"),
    ("reward.timeout_s=slow", "reward.timeout_s"),
    ("reward.math.numeric_precision=high", "reward.math.numeric_precision"),
    ("reward.code.allow_unsandboxed=perhaps", "reward.code.allow_unsandboxed"),
    ("stage.module.update.micro_batch_size=big", "stage.module.update.micro_batch_size"),
    ("stage.module.plots=maybe", "stage.module.plots"),
    ("stage.module.log_samples=few", "stage.module.log_samples"),
])
def test_wrongly_typed_rl_value_fails(compose_cfg, override, key):
    _fails(compose_cfg, ["+stage=rl", override], key)


def test_wrongly_typed_value_in_an_rl_option_schema(compose_cfg):
    _fails(compose_cfg, ["+stage=rl", "algorithm=dapo", "algorithm.credit.overlong_cache_len=long"],
           "algorithm.credit.overlong_cache_len")
    _fails(compose_cfg, ["+stage=rl", "rollout=vllm", "rollout.sleep_level=deep"], "rollout.sleep_level")


@pytest.mark.parametrize("override,key", [
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("model.mtp_depth=x", "model.mtp_depth"),
    ("data.batch_size=big", "data.batch_size"),
    ("optim.lr=fast", "optim.lr"),
    ("stage.module.val.max_new_tokens=many", "stage.module.val.max_new_tokens"),
    ("logger.mlflow.log_checkpoint=perhaps", "logger.mlflow.log_checkpoint"),
    ("callbacks.checkpoint.save_top_k=all", "callbacks.checkpoint.save_top_k"),
])
def test_wrongly_typed_value_fails(compose_cfg, override, key):
    _fails(compose_cfg, ["+stage=coldstart", override], key)


def test_wrong_type_in_an_option_schema(compose_cfg):
    _fails(compose_cfg, ["+stage=coldstart", "strategy=fsdp", "strategy.shard_frozen=maybe"], "strategy.shard_frozen")
    _fails(compose_cfg, ["+stage=distill", "loss.w_uld=strong"], "loss.w_uld")
    _fails(compose_cfg, ["+stage=coldstart", "teacher=offline", "teacher.k=top"], "teacher.k")


def test_distill_loss_fields_belong_to_distill_only(compose_cfg):
    cfg = compose_cfg(["+stage=distill"])
    assert cfg.loss.w_uld == 1.5 and cfg.loss.impl == "auto"
    _fails(compose_cfg, ["+stage=coldstart", "loss.w_uld=1.0"], "loss.w_uld")


def _searchpath(tmp_path: Path) -> str:
    return f"hydra.searchpath=[pkg://kat.sweeps,file://{tmp_path}]"


@pytest.mark.parametrize("body,key", [
    ("model:\n  mtp_dept: 1\n", "mtp_dept"),
    ("trainer:\n  max_step: 3\n", "max_step"),
    ("data:\n  directives:\n    shar: 0.2\n", "shar"),
    ("callbacks:\n  checkpoint:\n    every_n_train_step: 3\n", "every_n_train_step"),
    ("optim:\n  lr_peak: 0.1\n", "lr_peak"),
    ("seeed: 1\n", "seeed"),
])
def test_typo_in_local_default_yaml_fails(compose_cfg, tmp_path, body, key):
    """conf/local/default.yaml (your machine's overrides) is merged into the typed config."""
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\n" + body)
    _fails(compose_cfg, ["+stage=coldstart", _searchpath(tmp_path)], key)


def test_valid_local_default_yaml_composes(compose_cfg, tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "default.yaml").write_text("# @package _global_\ntrainer:\n  accelerator: cpu\n"
                                                      "data:\n  num_workers: 2\n")
    cfg = compose_cfg(["+stage=coldstart", _searchpath(tmp_path)])
    assert cfg.trainer.accelerator == "cpu" and cfg.data.num_workers == 2


def test_stage_delta_with_a_key_its_group_lacks_fails(compose_cfg, tmp_path):
    """A ``+stage=`` delta (``# @package _global_``) sets keys in several groups: each is checked by that group's
    schema, and the ``stage`` node by StageConfig."""
    (tmp_path / "stage").mkdir()
    delta = (Path(CONF_DIR) / "stage" / "coldstart.yaml").read_text()
    (tmp_path / "stage" / "mine.yaml").write_text(delta)
    assert compose_cfg(["+stage=mine", _searchpath(tmp_path)]).stage.name == "coldstart"
    cases = [(delta.replace("      grade_workers: 2", "      grade_worker: 2"), "grade_worker"),
             (delta.replace("  warmup_steps: 100", "  warmup_step: 100"), "warmup_step"),
             (delta + "data:\n  templat: distill\n", "templat"),
             (delta + "model:\n  mtp_dept: 1\n", "mtp_dept")]
    for text, key in cases:
        assert text != delta
        (tmp_path / "stage" / "mine.yaml").write_text(text)
        _fails(compose_cfg, ["+stage=mine", _searchpath(tmp_path)], key)


def test_sweep_file_with_a_typo_fails(compose_cfg, tmp_path):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "mine.yaml").write_text("# @package _global_\ntrainer:\n  max_step: 3\n")
    _fails(compose_cfg, ["+stage=coldstart", "+sweep=mine", _searchpath(tmp_path)], "max_step")


def test_recipe_step_overrides_compose(compose_cfg):
    """Every training step of every recipe (its overrides, as kat.pipeline passes them) composes and checks."""
    recipes = sorted(p.stem for p in (Path(CONF_DIR) / "recipe").glob("*.yaml"))
    for recipe in recipes:
        r = OmegaConf.to_container(compose_cfg([f"recipe={recipe}"], config_name="pipeline").recipe, resolve=True)
        for step in ("teacher", "distill", "coldstart", "rl"):
            if step in r["steps"] or step == "teacher":
                over = [*r.get("common", []), *r.get("generator", []), *r[step]]
                cfg = compose_cfg(over)
                assert cfg.stage.name in ("coldstart", "distill", "rl"), (recipe, step)


def test_trainer_schema_is_lightnings_signature(compose_cfg):
    import lightning.pytorch as pl

    from kat.config.lightning import KAT_BUILT, TrainerConfig

    cfg = compose_cfg(["+stage=coldstart", "trainer.enable_checkpointing=false", "trainer.limit_val_batches=2"])
    params = {n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"}
    fields = set(TrainerConfig.__dataclass_fields__) - {"_target_"}
    assert fields == params - set(KAT_BUILT)
    assert cfg.trainer.enable_checkpointing is False and cfg.trainer.limit_val_batches == 2
    # arguments the YAML does not set keep Lightning's own default (read from the signature)
    assert cfg.trainer.min_steps == inspect.signature(pl.Trainer.__init__).parameters["min_steps"].default
    _fails(compose_cfg, ["+stage=coldstart", "+trainer.strategy=ddp"], "trainer.strategy")


def test_store_registers_a_schema_for_another_package(compose_cfg, tmp_path):
    """kat.config.store: how a package (the RL one) registers its own schema."""
    from dataclasses import dataclass

    from omegaconf import MISSING

    import kat.config

    @dataclass
    class Probe:
        size: int = MISSING

    # a group the root declares as Any (rollout: each option names its own schema) gets one from an option's defaults
    kat.config.store("rollout", "probe_schema", Probe)
    (tmp_path / "rollout").mkdir()
    (tmp_path / "rollout" / "probe.yaml").write_text("defaults:\n  - probe_schema\n  - _self_\nsize: 3\n")
    cfg = compose_cfg(["+stage=coldstart", "rollout=probe", _searchpath(tmp_path)])
    assert OmegaConf.get_type(cfg.rollout) is Probe and cfg.rollout.size == 3
    _fails(compose_cfg, ["+stage=coldstart", "rollout=probe", "+rollout.sise=1", _searchpath(tmp_path)],
           "rollout.sise")


def test_conf_dir_imports_without_torch_or_lightning():
    code = ("import sys; from kat.config import CONF_DIR; import os; assert os.path.isfile(CONF_DIR + '/train.yaml');"
            "bad = [m for m in ('torch', 'lightning') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], cwd="/tmp", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_entry_point_fails_before_training(tmp_path):
    """``python -m kat.train``: an unknown key (command line or conf/local/default.yaml) and a wrongly typed value
    exit non-zero with the key in stderr, before anything is built or written."""
    (tmp_path / "conf" / "local").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "default.yaml").write_text("# @package _global_\ndata:\n  batch_sise: 8\n")
    base = ["kat.train", "+stage=coldstart", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    cases = [([*base, "+model.mtp_dept=1"], "model.mtp_dept"),
             ([*base, "trainer.max_steps=abc"], "trainer.max_steps"),
             ([*base, f"--config-dir={tmp_path / 'conf'}"], "batch_sise")]
    rl = ["kat.train", "+stage=rl", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"]
    cases += [([*rl, "+algorithm.loss.clip_eps_hihg=0.3"], "algorithm.loss.clip_eps_hihg"),  # the example
              ([*rl, "algorithm.loss.clip_eps_hihg=0.3"], "clip_eps_hihg"),
              ([*rl, "algorithm=grpo", "algorithm.credit.judge_weight=1"], "judge_weight"),
              ([*rl, "rollout.group_size=many"], "rollout.group_size")]
    for args, key in cases:
        r = run_module(args, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
        assert r.returncode != 0, (args, r.stdout[-2000:])
        assert key in r.stderr, (args, r.stderr[-3000:])
        assert "built from config" not in r.stderr + r.stdout  # no model was built
        assert not (tmp_path / "run" / "checkpoints").exists()
