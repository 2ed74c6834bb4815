"""rollout=vllm: the module imports without vLLM and selecting it fails early with a clear message."""
from __future__ import annotations

import importlib
import sys

import pytest

vllm_missing = importlib.util.find_spec("vllm") is None


def test_module_imports_without_vllm():
    mod = importlib.import_module("kat.rollout.vllm")
    assert hasattr(mod, "VLLMEngine") and hasattr(mod, "KatWorkerExtension")
    if vllm_missing:
        assert "vllm" not in sys.modules
        assert mod.vllm_available() is False


@pytest.mark.skipif(not vllm_missing, reason="vLLM is installed")
def test_engine_raises_a_clear_error_without_vllm():
    from kat.rollout.vllm import VLLMEngine, VLLMUnavailableError

    with pytest.raises(VLLMUnavailableError, match="rollout=hf"):
        VLLMEngine(None, None, {})


@pytest.mark.skipif(not vllm_missing, reason="vLLM is installed")
def test_selecting_rollout_vllm_fails_before_training(compose_cfg):
    from kat import models
    from kat.rollout.vllm import VLLMUnavailableError
    from kat.stages.step_srpo import StepSRPO

    cfg = compose_cfg(["+stage=rl", "rollout=vllm", "model.arch.hidden_size=32", "model.arch.intermediate_size=64",
                       "model.arch.num_hidden_layers=1"])
    model, tok = models.load(cfg.model)
    with pytest.raises(VLLMUnavailableError, match="pip install vllm"):
        StepSRPO.from_config(cfg, model, tok)
