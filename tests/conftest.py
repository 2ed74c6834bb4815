"""Shared fixtures: a fresh Hydra, tmp MLflow stores, a tiny tokenizer, offline HF."""
from __future__ import annotations

import os
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# Triton decides interpreter-vs-compiled when a kernel is *decorated* (module import), so the flag must be set before
# any test module (or kat code they import) pulls in kat_kernels. Without CUDA the kernels only run interpreted.
if os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from kat_testing import CONF  # noqa: E402


@pytest.fixture
def hydra_clean():
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


@pytest.fixture
def compose_cfg(hydra_clean):
    """compose_cfg(overrides, config_name="train") -> DictConfig with the hydra node set, checked against the
    schemas (kat.config: registered at import; kat.config.lightning: trainer and callbacks)."""
    from hydra import compose, initialize_config_dir

    import kat.config
    import kat.config.lightning  # noqa: F401

    def _compose(overrides=(), config_name="train"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return kat.config.check(compose(config_name, overrides=list(overrides), return_hydra_config=True))

    return _compose


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def char_tokenizer():
    from kat.models.tokenizer import build_char_tokenizer

    return build_char_tokenizer()


@pytest.fixture(scope="session")
def formatted_checkpoint(tmp_path_factory):
    """An HF folder of a tiny cold start that writes well-formed answers (kat_testing.train_formatted_checkpoint)."""
    from kat_testing import train_formatted_checkpoint

    return train_formatted_checkpoint(tmp_path_factory.mktemp("formatted") / "coldstart")
