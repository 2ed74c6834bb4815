"""``python -m kat.upscale``: configs, calibration texts, the entry point end to end (streaming), MLflow,
the in-memory path against the streaming one, clear errors, and ColdStart training of the grown model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kat_testing import CONF, run_module

ARCH = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64, "max_position_embeddings": 512, "tie_word_embeddings": True}
UPSCALE = ["model=hf", "model.dtype=float32", "upscale.target_layers=6", "upscale.init=identity",
           "data.n_train_per_level=2", "data.n_val_per_level=1", "upscale.calib.n_samples=16",
           "upscale.calib.batch_size=8"]


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """A tiny 4-layer Qwen2 (char tokenizer, sharded) grown to 6 layers by the real entry point."""
    from kat.models import hf

    root = tmp_path_factory.mktemp("upscale")
    torch.manual_seed(0)
    model, tok = hf.load({"name": "tiny", "arch": {**ARCH, "initializer_range": 0.2}})
    src = root / "src"
    model.save_pretrained(src, max_shard_size="60KB")  # sharded: upscale.streaming=auto streams
    tok.save_pretrained(src)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "run"
    r = run_module(["kat.upscale", *UPSCALE, f"model.path={src}", f"hydra.run.dir={run_dir}"], cwd=root,
                   env_extra={"MLFLOW_TRACKING_URI": uri})
    return {"root": root, "src": src, "run_dir": run_dir, "uri": uri, "proc": r, "model": model, "tok": tok}


def test_upscale_entry_point_end_to_end(grown):
    r = grown["proc"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = Path(r.stdout.strip().splitlines()[-1])
    assert out == (grown["run_dir"] / "model").resolve()
    assert "layer saturation" in r.stdout  # the rich table

    report = json.loads((out / "upscale_report.json").read_text())
    assert report["streaming"] is True and report["model_type"] == "qwen2" and report["init"] == "identity"
    assert report["plan"]["n_before"] == 4 and report["plan"]["n_after"] == 6
    assert report["plan"]["duplicated"] == [1, 2]  # the only eligible layers (first/last excluded)
    assert report["plan"]["sources"] == [0, 1, 1, 2, 2, 3]
    assert [a["layer"] for a in report["analysis"]] == [0, 1, 2, 3]
    assert report["calibration"]["n_samples"] == 16 and report["calibration"]["n_tokens"] > 16 * 10
    assert sorted(report["ranking"]) == [0, 1, 2, 3]
    assert (grown["run_dir"] / "saturation.png").stat().st_size > 1000
    assert (grown["run_dir"] / "saturation.csv").read_text().count("\n") == 5

    from transformers import AutoModelForCausalLM, AutoTokenizer

    big = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert big.config.num_hidden_layers == 6 and len(big.config.layer_types) == 6
    x = torch.tensor([tok.encode("<|user|>12+7<|end|><|assistant|><judge>", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(big(x).logits, grown["model"](x).logits, rtol=1e-5, atol=1e-5)
    gen = big.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(gen, grown["model"].generate(x, max_new_tokens=6, do_sample=False))

    import mlflow

    mlflow.set_tracking_uri(grown["uri"])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0]["tags.kat.stage"] == "upscale"
    run_id = runs.iloc[0]["run_id"]
    assert runs.iloc[0]["params.upscale/target_layers"] == "6"
    client = mlflow.MlflowClient(grown["uri"])
    hist = sorted(client.get_metric_history(run_id, "upscale/cos_mean"), key=lambda m: m.step)
    assert [m.step for m in hist] == [0, 1, 2, 3]
    assert [m.value for m in hist] == pytest.approx([a["cos_mean"] for a in report["analysis"]])
    arts = {Path(a.path).name for a in client.list_artifacts(run_id, "upscale")}
    assert {"upscale_report.json", "saturation.png", "saturation.csv"} <= arts


def test_grown_model_trains_in_coldstart(grown, tmp_path):
    assert grown["proc"].returncode == 0
    out = Path(grown["proc"].stdout.strip().splitlines()[-1])
    r = run_module(["kat.train", "+stage=coldstart", "model=tiny", f"model.path={out}", "logger=none",
                    "callbacks.lr_monitor=null", "data.n_train_per_level=4", "data.n_val_per_level=1",
                    "data.batch_size=8", "trainer.max_steps=3", "trainer.val_check_interval=3",
                    "stage.module.val.max_new_tokens=40", f"hydra.run.dir={tmp_path / 'cs'}"], cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    final = tmp_path / "cs" / "checkpoints" / "final"
    cfg = json.loads((final / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and len(cfg["layer_types"]) == 6
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(final)
    start = AutoModelForCausalLM.from_pretrained(out)
    # training moved the inserted (zero-initialised) output projections
    assert trained.model.layers[2].self_attn.o_proj.weight.abs().sum() > 0
    assert start.model.layers[2].self_attn.o_proj.weight.abs().sum() == 0


# ------------------------------------------------------------------------------------------ in-process
def _cfg(compose_cfg, tmp_path, overrides):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose_cfg([*UPSCALE, "logger=none", *overrides], config_name="upscale")
    OmegaConf.set_readonly(cfg.hydra, False)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_in_memory_path_matches_the_streaming_entry(grown, compose_cfg, tmp_path):
    from kat.upscale import run

    assert grown["proc"].returncode == 0
    cfg = _cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}", "upscale.streaming=false"])
    out = run(cfg)
    mem = json.loads((out / "upscale_report.json").read_text())
    streamed = json.loads((grown["run_dir"] / "model" / "upscale_report.json").read_text())
    assert mem["streaming"] is False and mem["plan"] == streamed["plan"]
    for key in ("n_parameters_before", "n_parameters_after"):  # headers-only count == model.parameters()
        assert mem[key] == streamed[key]
    assert mem["n_parameters_after"] > mem["n_parameters_before"]
    for a, b in zip(mem["analysis"], streamed["analysis"]):
        assert a["n_tokens"] == b["n_tokens"]
        assert a["cos_mean"] == pytest.approx(b["cos_mean"], abs=1e-5)
    from safetensors.torch import load_file

    from kat.models.upscale import CheckpointReader

    s = CheckpointReader(grown["run_dir"] / "model")
    streamed_sd = s.get(list(s.weight_map))
    mem_sd = load_file(out / "model.safetensors")
    assert streamed_sd.keys() == mem_sd.keys()
    assert all(torch.equal(streamed_sd[k], mem_sd[k]) for k in mem_sd)


def test_entry_errors_are_clear(grown, compose_cfg, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kat.models.upscale import UnsupportedArchitecture
    from kat.upscale import run

    with pytest.raises(ValueError, match="must exceed the checkpoint's 4 layers"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}", "upscale.target_layers=4"]))
    with pytest.raises(ValueError, match="upscale.layers has 1 entries"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}", "upscale.layers=[1]"]))
    with pytest.raises(ValueError, match="allow_ends"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}", "upscale.layers=[0,1]"]))
    with pytest.raises(ValueError, match="needs a checkpoint: model=hf model.path=DIR"):
        run(_cfg(compose_cfg, tmp_path, []))
    with pytest.raises(ValueError, match="set upscale.target_layers=N"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}", "upscale.target_layers=???"]))
    with pytest.raises(FileNotFoundError, match="model.path"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={tmp_path / 'nope'}"]))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={grown['src']}",
                                         f"upscale.output_dir={grown['run_dir'] / 'model'}"]))
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedArchitecture, match="model_type='gpt2'"):
        run(_cfg(compose_cfg, tmp_path, [f"model.path={tmp_path / 'gpt2'}"]))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "upscale").glob("*.yaml")))
def test_upscale_configs_compose(compose_cfg, option):
    cfg = compose_cfg([f"upscale={option}", "model.path=/x"], config_name="upscale")
    assert cfg.upscale.selection in ("single", "block") and cfg.upscale.init in ("copy", "identity")
    assert {"model", "data", "logger", "paths", "upscale"} <= set(cfg)
    if option == "kat_40b":
        assert cfg.upscale.target_layers == 80 and cfg.upscale.init == "copy" and cfg.upscale.streaming is True


def test_calibration_texts(char_tokenizer):
    from kat.upscale import calibration_text

    s = {"id": "a", "messages": [{"role": "user", "content": "3+4"}], "mode": "on", "judge": "hard",
         "thinking": "3+4=7", "response": "7"}
    p = "<|user|>3+4<|end|><|assistant|>"
    assert calibration_text(char_tokenizer, s, "coldstart") == \
        p + "<judge>hard</judge><think_on><think>3+4=7</think><answer>7</answer>"
    assert calibration_text(char_tokenizer, s, "distill") == p + "<think_on><think>3+4=7</think><answer>7</answer>"
    assert calibration_text(char_tokenizer, s, "response") == p + "7"
    assert calibration_text(char_tokenizer, s, "none") == p
    bare = {"id": "b", "messages": s["messages"]}
    assert calibration_text(char_tokenizer, bare, "coldstart") == p
    with pytest.raises(ValueError, match="upscale.calib.completion"):
        calibration_text(char_tokenizer, s, "judge")
