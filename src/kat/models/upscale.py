"""Depth upscaling: layer-saturation analysis, layer selection and layer duplication (docs/upscale.md).

KAT-V1 (arXiv 2507.08297) grows Qwen2.5-32B (64 decoder layers) to 40B (80 layers) before continued
training, choosing the layers to duplicate by how little they change their input, as in the Yi report
(arXiv 2403.04652; 01-ai's "Dive deeper into Yi-9B"). This module holds the pieces as plain functions:

* **Analysis** — for decoder layer ``l`` with input ``h_l`` and output ``h_{l+1}`` (residual stream,
  pre final norm), per real token ``t`` (padding excluded)::

      s_l(t) = cos(h_l(t), h_{l+1}(t)) = <h_l(t), h_{l+1}(t)> / (|h_l(t)| |h_{l+1}(t)|)

  reported as the token mean ``S_l = mean_t s_l(t)`` (the saturation score), the population standard
  deviation over tokens, and 5/50/95 % percentiles read from a streaming 20,000-bin histogram on
  [-1, 1] (exact to 1e-4). Statistics stream over calibration batches through forward hooks; no
  hidden states are kept. :func:`analyze_model` runs on a loaded model; :func:`analyze_checkpoint`
  runs layer by layer from a safetensors checkpoint, holding one layer's weights plus the calibration
  activations (``n_tokens x hidden`` in the compute dtype).
* **Selection** — :func:`select_layers`: the ``n_new = target - L`` layers with the highest ``S_l``
  (``single``) or the contiguous block of ``n_new`` layers with the highest mean ``S_l`` (``block``);
  the first and last decoder layer are never chosen unless ``allow_ends``.
* **Plan** — :func:`plan_expansion`: new layer ``j`` is a duplicate of old layer ``sources[j]``.
  ``single``: each chosen layer is followed by its copy (``0,1,1',2,2',3``); ``block``: the block is
  repeated once (``0,1,2,1',2',3``, Yi-9B / SOLAR style). Primed layers are the ``inserted`` ones.
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

Supported ``model_type``: qwen2, qwen3, llama, mistral (:data:`ARCHS`); anything else raises
:class:`UnsupportedArchitecture` naming what is supported.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SELECTIONS = ("single", "block")
INITS = ("copy", "identity")
HIST_BINS = 20_000  # percentile histogram over [-1, 1]: bin width 1e-4
PERCENTILES = (5, 50, 95)
# state-dict names of decoder-layer tensors: "model.layers.{i}.{rest}" (CausalLM) or "layers.{i}.{rest}" (base model)
LAYER_KEY = re.compile(r"^((?:model\.)?layers\.)(\d+)\.(.+)$")
EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REPORT_FILE = "upscale_report.json"
# list-valued config fields that are not per-layer even when their length happens to equal num_hidden_layers
GLOBAL_LIST_FIELDS = frozenset({"architectures", "eos_token_id", "bos_token_id", "pad_token_id",
                                "suppress_tokens", "begin_suppress_tokens", "bad_words_ids"})


class UnsupportedArchitecture(ValueError):
    """The checkpoint's ``model_type`` has no :class:`ArchSpec`."""


@dataclass(frozen=True)
class ArchSpec:
    """What upscaling must know about a decoder family (HF transformers 5.x module and config names).

    ``zero_on_identity``: tensors (relative to a decoder layer) zeroed in an inserted layer under
    ``init="identity"``: the two projections that write into the residual stream.
    ``per_layer_fields``: config lists with one entry per decoder layer (remapped through the plan).
    ``window_layers_field``: Qwen's index threshold (layers ``>=`` it use sliding-window attention when
    ``layer_types`` is derived); recomputed as the number of new layers whose source is below it.
    """

    model_type: str
    zero_on_identity: tuple[str, ...] = ("self_attn.o_proj.weight", "self_attn.o_proj.bias",
                                         "mlp.down_proj.weight", "mlp.down_proj.bias")
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    window_layers_field: str | None = None


#: Decoder families kat can upscale. All four are pre-norm residual stacks under ``model.layers``.
ARCHS: dict[str, ArchSpec] = {
    "qwen2": ArchSpec("qwen2", window_layers_field="max_window_layers"),
    "qwen3": ArchSpec("qwen3", window_layers_field="max_window_layers"),
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
}


def arch_spec(model_type: str | None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model_type``, or :class:`UnsupportedArchitecture` listing the known ones."""
    try:
        return ARCHS[str(model_type)]
    except KeyError:
        raise UnsupportedArchitecture(
            f"kat.models.upscale does not know model_type={model_type!r}; supported: {', '.join(sorted(ARCHS))} "
            "(pre-norm decoders with model.layers.N.self_attn.o_proj / mlp.down_proj). Add an ArchSpec to "
            "kat.models.upscale.ARCHS after checking its per-layer config fields."
        ) from None


# ------------------------------------------------------------------------------------------ analysis
@dataclass(frozen=True)
class LayerSaturation:
    """Cosine similarity between one decoder layer's input and output over real calibration tokens."""

    layer: int
    cos_mean: float
    cos_std: float  # population std over tokens
    cos_p05: float  # percentiles from the 1e-4-wide histogram
    cos_p50: float
    cos_p95: float
    n_tokens: int


class _CosineStats:
    """Streaming mean / std / histogram of per-token cosine similarities of one layer."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor) -> None:
        """``x_in, x_out``: (B, T, d) layer input/output; ``mask``: (B, T) bool, True on real tokens."""
        cos = F.cosine_similarity(x_in.float(), x_out.float(), dim=-1, eps=1e-8)  # (B, T)
        vals = cos[mask.to(cos.device)].double()  # (N,) real tokens only
        self.n += vals.numel()
        self.total += float(vals.sum())
        self.total_sq += float((vals * vals).sum())
        self.hist += torch.histc(vals.float().cpu(), bins=HIST_BINS, min=-1.0, max=1.0).double()

    def result(self, layer: int) -> LayerSaturation:
        if self.n == 0:
            raise ValueError("the calibration batches hold no real tokens (attention_mask is all zero)")
        mean = self.total / self.n
        var = max(self.total_sq / self.n - mean * mean, 0.0)
        cdf = torch.cumsum(self.hist, 0)  # (HIST_BINS,)
        width = 2.0 / HIST_BINS

        def pct(q: float) -> float:
            k = int(torch.searchsorted(cdf, torch.tensor(q / 100.0 * self.n, dtype=torch.float64)))
            return -1.0 + (min(k, HIST_BINS - 1) + 0.5) * width  # bin centre

        p05, p50, p95 = (pct(q) for q in PERCENTILES)
        return LayerSaturation(layer, mean, math.sqrt(var), p05, p50, p95, self.n)


def _hidden_in_out(args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x_in = args[0] if args else kwargs["hidden_states"]
    x_out = output[0] if isinstance(output, (tuple, list)) else output
    return x_in, x_out


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (``Qwen2Model``/``LlamaModel``) of a CausalLM, or ``model`` itself."""
    inner = getattr(model, "base_model", model)
    if not hasattr(inner, "layers"):
        raise UnsupportedArchitecture(f"{type(model).__name__} has no decoder stack with a .layers list")
    return inner


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


@torch.no_grad()
def analyze_model(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[LayerSaturation]:
    """Per-layer saturation of a loaded model over ``batches`` (``input_ids``, ``attention_mask``: (B, T)).

    One forward pass of the decoder stack per batch (no LM head), with a forward hook on every
    decoder layer feeding a streaming accumulator; padding positions are excluded.
    """
    arch_spec(_model_type(model))
    base = base_model(model)
    layers = list(base.layers)
    stats = [_CosineStats() for _ in layers]
    state: dict[str, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            x_in, x_out = _hidden_in_out(args, kwargs, output)
            stats[i].update(x_in, x_out, state["mask"])

        return hook

    handles = [layer.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for b in batches:
            mask = b["attention_mask"].to(device)  # (B, T)
            state["mask"] = mask.bool()
            base(input_ids=b["input_ids"].to(device), attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s.result(i) for i, s in enumerate(stats)]


class _Skip(nn.Module):
    """Stands in for a decoder layer that is not loaded: returns its input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class CheckpointReader:
    """Tensor-level access to a local safetensors checkpoint (sharded with an index, or one file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.exists():
            self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            self.sharded = True
        elif (self.path / SINGLE_FILE).exists():
            from safetensors import safe_open

            with safe_open(self.path / SINGLE_FILE, "pt") as f:
                self.weight_map = {k: SINGLE_FILE for k in f.keys()}
            self.sharded = False
        else:
            raise FileNotFoundError(
                f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}: the streaming path needs a safetensors "
                "checkpoint (set upscale.streaming=false to load other formats whole)"
            )

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def get(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, ns in by_file.items():
            with safe_open(self.path / fname, "pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out

    def n_parameters(self) -> int:
        """Stored parameter count (tied weights are stored once), read from the headers only."""
        from safetensors import safe_open

        total = 0
        for fname in self.files:
            with safe_open(self.path / fname, "pt") as f:
                for n in f.keys():
                    total += math.prod(f.get_slice(n).get_shape())
        return total

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors, keyed relative to the layer (``self_attn.q_proj.weight``, ...)."""
        names = {}
        for n in self.weight_map:
            m = LAYER_KEY.match(n)
            if m and int(m.group(2)) == i:
                names[n] = m.group(3)
        if not names:
            raise KeyError(f"no tensors for decoder layer {i} in {self.path}")
        return {names[n]: t for n, t in self.get(names).items()}

    def embedding(self) -> torch.Tensor:
        for k in EMBED_KEYS:
            if k in self.weight_map:
                return self.get([k])[k]
        raise KeyError(f"no input embedding ({' or '.join(EMBED_KEYS)}) in {self.path}")


@torch.no_grad()
def analyze_checkpoint(path: str | Path, batches: Sequence[Mapping[str, torch.Tensor]], *,
                       dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       attn_implementation: str = "sdpa") -> list[LayerSaturation]:
    """Per-layer saturation computed layer by layer from a safetensors checkpoint at ``path``.

    Memory: the decoder stack is built on the meta device; layer ``l`` alone is materialised from its
    tensors, run over the cached calibration activations (every batch's ``(B, T, d)`` hidden state,
    which then becomes the next layer's input) and freed. Masks and rotary embeddings come from the
    model's own forward (other layers are pass-throughs), so the numbers equal :func:`analyze_model`'s.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    arch_spec(config.model_type)
    config._attn_implementation = attn_implementation
    reader = CheckpointReader(path)
    n_layers = int(config.num_hidden_layers)
    with torch.device("meta"):
        base = AutoModel.from_config(config)
    skeletons = list(base.layers)
    base.layers = nn.ModuleList([_Skip() for _ in range(n_layers)])
    base.norm = nn.Identity()  # the final norm is not part of any layer's input/output
    base.embed_tokens = nn.Identity()  # inputs_embeds are passed in
    base.rotary_emb = type(base.rotary_emb)(config=config).to(device)  # rebuilt off the meta device
    base.eval()

    embed = reader.embedding().to(device=device, dtype=dtype)  # (V, d)
    hidden = [F.embedding(b["input_ids"].to(device), embed) for b in batches]  # each (B, T, d)
    del embed
    masks = [b["attention_mask"].to(device) for b in batches]  # each (B, T)
    out: list[LayerSaturation] = []
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        captured["in"], captured["out"] = _hidden_in_out(args, kwargs, output)

    for i in range(n_layers):
        layer = skeletons[i]
        layer.load_state_dict(reader.layer_state(i), strict=True, assign=True)
        layer.to(device=device, dtype=dtype).eval()
        meta = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if meta:
            raise RuntimeError(f"layer {i}: tensors {meta} were not in the checkpoint and cannot be materialised")
        base.layers[i] = layer
        handle = layer.register_forward_hook(hook, with_kwargs=True)
        stats = _CosineStats()
        try:
            for k in range(len(hidden)):
                base(inputs_embeds=hidden[k], attention_mask=masks[k], use_cache=False)
                stats.update(captured["in"], captured["out"], masks[k].bool())
                hidden[k] = captured["out"]
        finally:
            handle.remove()
            base.layers[i] = _Skip()
            skeletons[i] = None  # free this layer's weights
            captured.clear()
        out.append(stats.result(i))
    return out


def ranking(profile: Sequence[LayerSaturation]) -> list[int]:
    """Layer indices from most to least saturated (highest mean cosine first; ties: lower index first)."""
    return [p.layer for p in sorted(profile, key=lambda p: (-p.cos_mean, p.layer))]


# ----------------------------------------------------------------------------------------- selection
def eligible_layers(n_layers: int, allow_ends: bool = False) -> list[int]:
    """Layers that may be duplicated: all but the first and last unless ``allow_ends``."""
    return list(range(n_layers)) if allow_ends else list(range(1, n_layers - 1))


def select_layers(scores: Sequence[float], n_new: int, *, selection: str = "single",
                  allow_ends: bool = False) -> list[int]:
    """Old layer indices to duplicate (sorted) so that ``len(scores) + n_new`` layers result.

    ``scores[l]`` is layer ``l``'s saturation (mean cosine; higher = changes its input less).
    ``single``: the ``n_new`` highest-scoring eligible layers, each duplicated once.
    ``block``: the contiguous run of ``n_new`` eligible layers with the highest mean score
    (ties: the earliest run). The first/last layer are not eligible unless ``allow_ends``.
    """
    n_layers = len(scores)
    if selection not in SELECTIONS:
        raise ValueError(f"upscale.selection must be one of {SELECTIONS}, got {selection!r}")
    if n_new < 1:
        raise ValueError(f"upscale.target_layers must exceed the model's {n_layers} layers (n_new={n_new})")
    if any(not math.isfinite(float(s)) for s in scores):
        raise ValueError(f"saturation scores must be finite, got {list(scores)}")
    ok = eligible_layers(n_layers, allow_ends)
    if n_new > len(ok):
        raise ValueError(
            f"upscale.target_layers={n_layers + n_new} needs {n_new} distinct layers to duplicate but only {len(ok)} "
            f"of {n_layers} are eligible (first/last excluded unless upscale.allow_ends=true); lower the target or "
            "set upscale.allow_ends=true"
        )
    if selection == "single":
        return sorted(sorted(ok, key=lambda i: (-float(scores[i]), i))[:n_new])
    best, best_a = -math.inf, ok[0]
    for a in range(ok[0], ok[-1] - n_new + 2):
        mean = sum(float(scores[i]) for i in range(a, a + n_new)) / n_new
        if mean > best:
            best, best_a = mean, a
    return list(range(best_a, best_a + n_new))


@dataclass(frozen=True)
class ExpansionPlan:
    """New layer ``j`` is a duplicate of old layer ``sources[j]``; ``inserted[j]`` marks the added copies."""

    n_before: int
    sources: tuple[int, ...]
    inserted: tuple[bool, ...]
    duplicated: tuple[int, ...]
    selection: str

    @property
    def n_after(self) -> int:
        return len(self.sources)

    def new_indices(self, old: int) -> list[int]:
        return [j for j, s in enumerate(self.sources) if s == old]

    def to_dict(self) -> dict:
        return {"n_before": self.n_before, "n_after": self.n_after, "selection": self.selection,
                "duplicated": list(self.duplicated), "sources": list(self.sources),
                "inserted": [j for j, f in enumerate(self.inserted) if f]}


def plan_expansion(n_layers: int, duplicated: Sequence[int], *, selection: str = "single") -> ExpansionPlan:
    """The new layer order for duplicating ``duplicated`` (see the module docstring)."""
    dup = sorted(int(i) for i in duplicated)
    if not dup:
        raise ValueError("upscale: no layers to duplicate")
    if len(set(dup)) != len(dup) or dup[0] < 0 or dup[-1] >= n_layers:
        raise ValueError(f"upscale.layers must be distinct indices in [0, {n_layers}), got {list(duplicated)}")
    if selection == "single":
        sources, inserted = [], []
        for i in range(n_layers):
            sources.append(i)
            inserted.append(False)
            if i in dup:
                sources.append(i)
                inserted.append(True)
    elif selection == "block":
        if dup != list(range(dup[0], dup[-1] + 1)):
            raise ValueError(f"upscale.selection=block needs contiguous layers, got {dup}")
        a, b = dup[0], dup[-1]
        sources = [*range(0, b + 1), *range(a, b + 1), *range(b + 1, n_layers)]
        inserted = [False] * (b + 1) + [True] * (b - a + 1) + [False] * (n_layers - b - 1)
    else:
        raise ValueError(f"upscale.selection must be one of {SELECTIONS}, got {selection!r}")
    return ExpansionPlan(n_layers, tuple(sources), tuple(inserted), tuple(dup), selection)


# ----------------------------------------------------------------------------------------- expansion
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


# --------------------------------------------------------------------------------------- calibration
def calibration_batches(tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int,
                        pad_id: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenise ``texts`` (no extra special tokens; cut to ``max_length``), sort by length, right-pad.

    Returns batches ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}``; padding is masked
    out of the analysis (and, with right padding, never attended to by real tokens).
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"upscale.calib.batch_size must be >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    if not texts:
        raise ValueError("no calibration texts (check data=... and upscale.calib.*)")
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    seqs = [tokenizer.encode(t, add_special_tokens=False)[:max_length] for t in texts]
    seqs = sorted((s for s in seqs if s), key=len, reverse=True)
    batches = []
    for k in range(0, len(seqs), batch_size):
        chunk = seqs[k:k + batch_size]
        n = len(chunk[0])
        ids = torch.full((len(chunk), n), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), n), dtype=torch.long)  # (B, T)
        for i, s in enumerate(chunk):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@dataclass
class UpscaleResult:
    """What one upscale run produced (the content of ``upscale_report.json``)."""

    profile: list[LayerSaturation]
    plan: ExpansionPlan
    init: str
    output_dir: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            **self.extra,
            "output_dir": self.output_dir,
            "init": self.init,
            "plan": self.plan.to_dict(),
            "ranking": ranking(self.profile),
            "analysis": [vars(p) for p in self.profile],
        }


def write_report(result: UpscaleResult, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return path
