"""``python -m kat.upscale model=hf model.path=DIR upscale.target_layers=N [data=...]`` — depth upscaling.

The recipe (docs/upscale.md): calibration texts from the ``data`` group (chat-template prompt plus the
sample's reference completion) → per-layer saturation (mean cosine between each decoder layer's input
and output over real tokens) → the layers to duplicate (``upscale.selection``) → the expanded HF
checkpoint + tokenizer + ``upscale_report.json`` in ``upscale.output_dir``. The saturation table is
printed, and the table (CSV), a plot (PNG) and the report are logged to MLflow as a run of its own
(tag ``kat.stage=upscale``). The last line of stdout is the output checkpoint folder.

``upscale.streaming=auto`` analyses layer by layer and expands shard by shard when the checkpoint is
sharded (``model.safetensors.index.json``), so a model larger than RAM needs only disk; otherwise the
model is loaded whole in ``model.dtype`` and written in that dtype.
"""
from __future__ import annotations

import csv
import json
import os
import random
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kat import tracking
from kat.data import schema, templates
from kat.data.datamodule import load_splits
from kat.models import upscale as up
from kat.models import upscale_expand as ux
from kat.models.hf import torch_dtype
from kat.models.tokenizer import render_prompt
from kat.config import CONF_DIR
from kat.utils import configure_threads, get_logger

log = get_logger(__name__)
COMPLETIONS = ("coldstart", "distill", "response", "none")


# --------------------------------------------------------------------------------------- calibration
def calibration_text(tokenizer, sample: dict, completion: str = "coldstart") -> str:
    """The chat-template prompt of ``sample`` followed by its reference completion.

    ``coldstart``: ``<judge>…</judge><think_on|off>…<answer>…</answer>`` (docs/design.md §3) when the sample
    has ``mode`` and ``response`` (and ``thinking`` for mode on); ``distill``: trigger + ``<think>…`` /
    ``<answer>…``; ``response``: the raw response; ``none``: the prompt only. A sample lacking the
    fields a template needs falls back to its raw response, or the prompt alone.
    """
    if completion not in COMPLETIONS:
        raise ValueError(f"upscale.calib.completion must be one of {COMPLETIONS}, got {completion!r}")
    prompt = render_prompt(tokenizer, schema.prompt_messages(sample))
    response, mode, thinking = sample.get("response"), sample.get("mode"), sample.get("thinking")
    if completion == "none" or response is None:
        return prompt
    templated = mode in ("on", "off") and (mode == "off" or thinking is not None)
    if completion == "coldstart" and templated:
        return prompt + templates.coldstart_target(mode, sample.get("judge") or "", thinking, response)
    if completion == "distill" and templated:
        trigger, target = templates.distill_target(mode, thinking, response)
        return prompt + trigger + target
    return prompt + response


def calibration_samples(cfg: DictConfig) -> list[dict]:
    """A seeded subset of the ``data`` group's ``upscale.calib.split`` split."""
    calib = cfg.upscale.calib
    splits = load_splits(cfg.data, "upscale", int(cfg.seed))
    if calib.split not in ("train", "val"):
        raise ValueError(f"upscale.calib.split must be train or val, got {calib.split!r}")
    samples = list(splits.train if calib.split == "train" else splits.val)
    n = calib.get("n_samples")
    if n is not None and int(n) < len(samples):
        samples = random.Random(f"kat-upscale/{cfg.seed}").sample(samples, int(n))
    if not samples:
        raise ValueError(f"the {calib.split} split of data={cfg.data.name} is empty")
    return samples


# -------------------------------------------------------------------------------------------- helpers
def resolve_streaming(flag, path: Path) -> bool:
    """``auto``: stream when the checkpoint is sharded; ``true`` needs safetensors; ``false`` loads whole."""
    value = str(flag).lower()
    if value == "auto":
        return (path / up.INDEX_FILE).exists()
    if value in ("true", "1", "yes"):
        if not ((path / up.INDEX_FILE).exists() or (path / up.SINGLE_FILE).exists()):
            raise ValueError(f"upscale.streaming=true needs a safetensors checkpoint in {path}")
        return True
    if value in ("false", "0", "no"):
        return False
    raise ValueError(f"upscale.streaming must be auto, true or false, got {flag!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not str(name).startswith("cuda:"):
        raise ValueError(f"upscale.device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def analysis_dtype(model_cfg, config: dict) -> torch.dtype:
    """``model.dtype``; for ``auto`` the checkpoint's stored dtype (float32 when unknown)."""
    dt = torch_dtype(model_cfg.dtype)
    if dt != "auto":
        return dt
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(stored), torch.float32)


def choose_layers(cfg: DictConfig, profile: list[up.LayerSaturation], n_layers: int) -> list[int]:
    """``upscale.layers`` when given (checked), else :func:`kat.models.upscale.select_layers`."""
    u = cfg.upscale
    n_new = int(u.target_layers) - n_layers
    if u.get("layers") is None:
        return up.select_layers([p.cos_mean for p in profile], n_new, selection=u.selection,
                                allow_ends=bool(u.allow_ends))
    layers = [int(i) for i in u.layers]
    if len(layers) != n_new:
        raise ValueError(f"upscale.layers has {len(layers)} entries but target_layers={u.target_layers} - "
                         f"{n_layers} = {n_new} layers must be added")
    ends = {0, n_layers - 1} & set(layers)
    if ends and not u.allow_ends:
        raise ValueError(f"upscale.layers includes the first/last layer {sorted(ends)}: set upscale.allow_ends=true")
    return layers


# ------------------------------------------------------------------------------------- table and plot
def print_table(profile: list[up.LayerSaturation], plan: up.ExpansionPlan) -> None:
    from rich.console import Console
    from rich.table import Table

    rank = {layer: r for r, layer in enumerate(up.ranking(profile), 1)}
    table = Table(title=f"layer saturation: cosine(input, output) over {profile[0].n_tokens} tokens "
                        f"— {plan.n_before} → {plan.n_after} layers ({plan.selection})")
    for col in ("layer", "mean", "std", "p05", "p50", "p95", "rank", "duplicated"):
        table.add_column(col, justify="right")
    for p in profile:
        table.add_row(str(p.layer), f"{p.cos_mean:.4f}", f"{p.cos_std:.4f}", f"{p.cos_p05:.4f}", f"{p.cos_p50:.4f}",
                      f"{p.cos_p95:.4f}", str(rank[p.layer]), "yes" if p.layer in plan.duplicated else "")
    Console(width=120).print(table)


def write_table_csv(profile: list[up.LayerSaturation], plan: up.ExpansionPlan, path: Path) -> Path:
    rank = {layer: r for r, layer in enumerate(up.ranking(profile), 1)}
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "cos_mean", "cos_std", "cos_p05", "cos_p50", "cos_p95", "n_tokens", "rank", "duplicated"])
        for p in profile:
            w.writerow([p.layer, f"{p.cos_mean:.6f}", f"{p.cos_std:.6f}", f"{p.cos_p05:.4f}", f"{p.cos_p50:.4f}",
                        f"{p.cos_p95:.4f}", p.n_tokens, rank[p.layer], int(p.layer in plan.duplicated)])
    return path


def plot_profile(profile: list[up.LayerSaturation], plan: up.ExpansionPlan, path: Path, title: str) -> Path:
    """Mean cosine per layer with the 5–95 % band; duplicated layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p.layer for p in profile]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(x) + 4), 3.6))
    ax.fill_between(x, [p.cos_p05 for p in profile], [p.cos_p95 for p in profile], alpha=0.2, label="5–95 %")
    ax.plot(x, [p.cos_mean for p in profile], marker="o", ms=3, label="mean")
    dup = [p for p in profile if p.layer in plan.duplicated]
    ax.scatter([p.layer for p in dup], [p.cos_mean for p in dup], s=60, facecolors="none", edgecolors="red",
               label=f"duplicated ({plan.selection})", zorder=3)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cos(input, output)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def log_mlflow(cfg: DictConfig, profile: list[up.LayerSaturation], report: dict, files: list[Path]) -> str | None:
    """A run of its own in ``logger.mlflow.experiment_name``: params, per-layer metrics, artifacts."""
    m = cfg.logger.mlflow
    if m is None:
        return None
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking.tracking_uri(m.tracking_uri)
    tracking.ensure_experiment(m.experiment_name, uri, m.artifact_location)
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    tags = {"kat.stage": "upscale"}
    parent = os.environ.get(tracking.PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = tracking.start_parent_run(m.experiment_name, m.run_name or tracking.run_name("upscale", overrides),
                                       tags=tags, uri=uri)
    client = MlflowClient(tracking_uri=uri)
    params = [Param(k, v) for k, v in tracking.params_from_config(cfg).items()]
    for k in range(0, len(params), 100):
        client.log_batch(run_id, params=params[k:k + 100])
    now = int(time.time() * 1000)
    metrics = [Metric(f"upscale/{name}", float(getattr(p, name)), now, p.layer)
               for p in profile for name in ("cos_mean", "cos_std", "cos_p05", "cos_p95")]
    metrics += [Metric("upscale/n_layers_before", report["plan"]["n_before"], now, 0),
                Metric("upscale/n_layers_after", report["plan"]["n_after"], now, 0),
                Metric("upscale/calib_tokens", report["calibration"]["n_tokens"], now, 0)]
    for k in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[k:k + 500])
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="upscale")
    client.set_terminated(run_id)
    return run_id


# ----------------------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> Path:
    """Analyse, select, expand; return the output checkpoint folder."""
    t0 = time.time()
    configure_threads()
    u = cfg.upscale
    if OmegaConf.is_missing(cfg.model, "path") or not cfg.model.path:
        raise ValueError("kat.upscale needs a checkpoint: model=hf model.path=DIR (a local HF save_pretrained dir)")
    if OmegaConf.is_missing(u, "target_layers"):
        raise ValueError("set upscale.target_layers=N (the decoder layers after expansion)")
    src = Path(cfg.model.path)
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"model.path={str(src)!r} is not a HF checkpoint dir (no config.json)")
    config = json.loads((src / "config.json").read_text())
    up.arch_spec(config.get("model_type"))  # fail early on unknown architectures
    n_layers = int(config["num_hidden_layers"])
    if u.target_layers is None or int(u.target_layers) <= n_layers:
        raise ValueError(f"upscale.target_layers must exceed the checkpoint's {n_layers} layers, got {u.target_layers}")
    out = Path(u.output_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"upscale.output_dir={str(out)!r} already holds a checkpoint; choose another folder")
    streaming = resolve_streaming(u.streaming, src)
    device = resolve_device(str(u.device))
    dtype = analysis_dtype(cfg.model, config)
    attn = cfg.model.attn_implementation

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)  # as stored: the vocabulary must match the embeddings
    samples = calibration_samples(cfg)
    texts = [calibration_text(tokenizer, s, u.calib.completion) for s in samples]
    batches = up.calibration_batches(tokenizer, texts, batch_size=int(u.calib.batch_size),
                                     max_length=int(u.calib.max_length))
    n_tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    log.info(f"calibration: {len(texts)} samples, {n_tokens} tokens, {len(batches)} batches; "
             f"{'streaming (layer by layer)' if streaming else 'in-memory'} analysis on {device} in {dtype}")

    t1 = time.time()
    model = None
    if streaming:
        profile = up.analyze_checkpoint(src, batches, dtype=dtype, device=device, attn_implementation=attn)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn).to(device)
        profile = up.analyze_model(model, batches)
    t_analysis = time.time() - t1

    plan = up.plan_expansion(n_layers, choose_layers(cfg, profile, n_layers), selection=u.selection)
    log.info(f"duplicating layers {list(plan.duplicated)} ({u.selection}, init={u.init}): "
             f"{n_layers} -> {plan.n_after} layers")
    t2 = time.time()
    if streaming:
        n_params_before = up.CheckpointReader(src).n_parameters()
        info = ux.expand_checkpoint(src, out, plan, init=u.init)
        n_params = info["total_parameters"]
    else:
        n_params_before = sum(p.numel() for p in model.parameters())
        ux.expand_model(model, plan, init=u.init)
        model.save_pretrained(out, safe_serialization=True)
        ux.copy_aux_files(src, out)
        n_params = sum(p.numel() for p in model.parameters())
    t_expand = time.time() - t2

    result = up.UpscaleResult(profile, plan, u.init, str(out.resolve()), extra={
        "source": str(src.resolve()),
        "model_type": config.get("model_type"),
        "streaming": streaming,
        "analysis_dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "n_parameters_before": int(n_params_before),
        "n_parameters_after": int(n_params),
        "calibration": {"data": cfg.data.name, "split": u.calib.split, "n_samples": len(texts),
                        "n_tokens": n_tokens, "completion": u.calib.completion,
                        "max_length": int(u.calib.max_length)},
        "seconds": {"analysis": round(t_analysis, 3), "expansion": round(t_expand, 3),
                    "total": round(time.time() - t0, 3)},
    })
    report = result.to_dict()
    report_path = up.write_report(result, out / up.REPORT_FILE)

    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = write_table_csv(profile, plan, run_dir / "saturation.csv")
    plot = plot_profile(profile, plan, run_dir / "saturation.png",
                        f"{'/'.join(src.resolve().parts[-3:])} ({config.get('model_type')}): "
                        f"{n_layers} → {plan.n_after} layers, "
                        f"{n_tokens} calibration tokens")
    print_table(profile, plan)
    run_id = log_mlflow(cfg, profile, report, [report_path, table, plot])
    if run_id:
        log.info(f"MLflow run {run_id}")
    log.info(f"upscaled checkpoint: {out} ({n_params / 1e6:.2f}M parameters) in {time.time() - t0:.1f}s")
    return out


@hydra.main(config_path=CONF_DIR, config_name="upscale", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info("config:\n" + OmegaConf.to_yaml(cfg, resolve=True))
    try:
        out = run(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"kat.upscale: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(out.resolve(), flush=True)


if __name__ == "__main__":
    main()
