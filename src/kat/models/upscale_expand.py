"""Depth upscaling, surgery: duplicate decoder layers of a loaded model or of a safetensors checkpoint
following an :class:`~kat.models.upscale.ExpansionPlan` (docs/upscale.md). The analysis, the layer selection
and the plan are in :mod:`kat.models.upscale`.

* **Expansion** — ``init="copy"``: inserted layers are exact copies (the paper). ``init="identity"``:
  the inserted copy's attention output projection and MLP down projection (weights and biases, when
  present) are zero, so in a pre-norm residual block ``h + Attn(norm(h)) + MLP(norm(.))`` the block
  returns its input unchanged and the expanded model computes exactly the original function at step 0
  (LLaMA-Pro style; a departure from the paper, which duplicates plainly). Gradients then reach the
  zeroed projections first and the rest of the copy once they are non-zero. The model config is
  updated consistently (``num_hidden_layers``, the per-layer ``layer_types``, Qwen's
  ``max_window_layers``, a heterogeneous ``per_layer_config``) and every ``layer_idx`` renumbered, so
  the KV cache of ``generate`` addresses the right slots. :func:`expand_model` works on a loaded
  model; :func:`expand_checkpoint` works tensor by tensor, shard by shard, on a safetensors
  checkpoint (peak memory: one input shard plus its expansion) and keeps the stored dtype and bytes.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from kat.models.upscale import (INDEX_FILE, LAYER_KEY, REPORT_FILE, ArchSpec, CheckpointReader, ExpansionPlan,
                                _model_type, arch_spec, base_model)

INITS = ("copy", "identity")
# list-valued config fields that are not per-layer even when their length happens to equal num_hidden_layers
GLOBAL_LIST_FIELDS = frozenset({"architectures", "eos_token_id", "bos_token_id", "pad_token_id",
                                "suppress_tokens", "begin_suppress_tokens", "bad_words_ids"})


def config_updates(config: Mapping[str, Any], plan: ExpansionPlan) -> dict[str, Any]:
    """The config fields (of a ``config.json`` dict) that change under ``plan``, with their new values."""
    spec = arch_spec(config.get("model_type"))
    n = int(config["num_hidden_layers"])
    if n != plan.n_before:
        raise ValueError(f"the plan expects {plan.n_before} layers but the config has num_hidden_layers={n}")
    upd: dict[str, Any] = {"num_hidden_layers": plan.n_after}
    handled = {"num_hidden_layers", "per_layer_config"}
    for name in spec.per_layer_fields:
        handled.add(name)
        values = config.get(name)
        if values is None:
            continue
        if len(values) != n:
            raise ValueError(f"config.{name} has {len(values)} entries, expected num_hidden_layers={n}")
        upd[name] = [values[s] for s in plan.sources]
    if spec.window_layers_field and config.get(spec.window_layers_field) is not None:
        threshold = int(config[spec.window_layers_field])
        upd[spec.window_layers_field] = sum(1 for s in plan.sources if s < threshold)
    hetero = config.get("per_layer_config")
    if hetero:
        upd["per_layer_config"] = {str(j): copy.deepcopy(hetero[str(s)]) for j, s in enumerate(plan.sources)
                                   if str(s) in hetero}
    for key, value in config.items():
        if (key not in handled and key not in GLOBAL_LIST_FIELDS and isinstance(value, (list, tuple))
                and len(value) == n and n > 1):
            raise ValueError(
                f"config field {key!r} is a list of num_hidden_layers={n} entries (per-layer?) and kat.models.upscale "
                f"does not know how to expand it for model_type={config.get('model_type')!r}; extend its ArchSpec"
            )
    return upd


def expand_config_dict(config: Mapping[str, Any], plan: ExpansionPlan) -> dict[str, Any]:
    """A ``config.json`` dict for the expanded model."""
    return {**copy.deepcopy(dict(config)), **config_updates(config, plan)}


def expand_state_dict(state: Mapping[str, torch.Tensor], plan: ExpansionPlan, *, init: str = "copy",
                      spec: ArchSpec | None = None) -> dict[str, torch.Tensor]:
    """Rename/copy decoder-layer tensors into the new layer indices (any subset of a state dict, e.g. one shard).

    Non-layer tensors pass through unchanged (same objects); inserted copies are fresh tensors
    (zeros for ``spec.zero_on_identity`` under ``init="identity"``).
    """
    if init not in INITS:
        raise ValueError(f"upscale.init must be one of {INITS}, got {init!r}")
    spec = spec or ArchSpec("generic")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        m = LAYER_KEY.match(name)
        if not m:
            out[name] = t
            continue
        prefix, old, rest = m.group(1), int(m.group(2)), m.group(3)
        if old >= plan.n_before:
            raise ValueError(f"tensor {name!r} belongs to layer {old} but the plan has {plan.n_before} layers")
        for j in plan.new_indices(old):
            if not plan.inserted[j]:
                out[f"{prefix}{j}.{rest}"] = t
            elif init == "identity" and rest in spec.zero_on_identity:
                out[f"{prefix}{j}.{rest}"] = torch.zeros_like(t)
            else:
                out[f"{prefix}{j}.{rest}"] = t.clone()
    return out


def _zero_identity(layer: nn.Module, spec: ArchSpec) -> None:
    params = dict(layer.named_parameters())
    for name in spec.zero_on_identity:
        if name in params:
            with torch.no_grad():
                params[name].zero_()


def renumber_layers(layers: Sequence[nn.Module]) -> None:
    """Set ``layer_idx`` (attention / KV-cache slot) of every sub-module of layer ``j`` to ``j``."""
    for j, layer in enumerate(layers):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = j


def expand_model(model: nn.Module, plan: ExpansionPlan, *, init: str = "copy") -> nn.Module:
    """Expand a loaded CausalLM in place (layers duplicated, config updated, indices renumbered); returns it."""
    if init not in INITS:
        raise ValueError(f"upscale.init must be one of {INITS}, got {init!r}")
    spec = arch_spec(_model_type(model))
    base = base_model(model)
    layers = list(base.layers)
    if len(layers) != plan.n_before:
        raise ValueError(f"the plan expects {plan.n_before} layers, the model has {len(layers)}")
    new_layers = []
    for j, s in enumerate(plan.sources):
        if not plan.inserted[j]:
            new_layers.append(layers[s])
            continue
        dup = copy.deepcopy(layers[s])
        if init == "identity":
            _zero_identity(dup, spec)
        new_layers.append(dup)
    renumber_layers(new_layers)
    base.layers = nn.ModuleList(new_layers)
    for key, value in config_updates(model.config.to_dict(), plan).items():
        setattr(model.config, key, value)
    return model


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_SKIP_FILES = {"config.json", INDEX_FILE, "pytorch_model.bin.index.json", REPORT_FILE}


def copy_aux_files(src: str | Path, dst: str | Path) -> list[str]:
    """Copy tokenizer, generation config and other non-weight files from ``src`` (existing ones are kept)."""
    src, dst = Path(src), Path(dst)
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _SKIP_FILES or p.name.endswith(_WEIGHT_SUFFIXES) or (dst / p.name).exists():
            continue
        shutil.copy2(p, dst / p.name)
        copied.append(p.name)
    return copied


def expand_checkpoint(src: str | Path, dst: str | Path, plan: ExpansionPlan, *, init: str = "copy") -> dict:
    """Expand a safetensors checkpoint shard by shard into ``dst`` (config, weights, index, tokenizer files).

    Each input shard's tensors are read, expanded with :func:`expand_state_dict` and written as the
    matching output shard, so peak memory is one input shard plus its duplicated tensors. Stored
    dtypes and bytes are kept. Returns ``{"files", "total_size", "total_parameters"}``.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    spec = arch_spec(config.get("model_type"))
    new_config = expand_config_dict(config, plan)
    reader = CheckpointReader(src)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total_size = total_params = 0
    for fname in reader.files:
        names = [n for n, f in reader.weight_map.items() if f == fname]
        part = expand_state_dict(reader.get(names), plan, init=init, spec=spec)
        part = {k: v.contiguous() for k, v in part.items()}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        for k, v in part.items():
            weight_map[k] = fname
            total_size += v.numel() * v.element_size()
            total_params += v.numel()
        del part
    if reader.sharded:
        index = {"metadata": {"total_size": total_size, "total_parameters": total_params},
                 "weight_map": dict(sorted(weight_map.items()))}
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
    copy_aux_files(src, dst)
    return {"files": reader.files, "total_size": total_size, "total_parameters": total_params}
