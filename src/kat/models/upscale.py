"""Depth upscaling, planning: layer-saturation analysis, layer selection and the expansion plan (docs/upscale.md).

KAT-V1 (arXiv 2507.08297) grows Qwen2.5-32B (64 decoder layers) to 40B (80 layers) before continued
training, choosing the layers to duplicate by how little they change their input, as in the Yi report
(arXiv 2403.04652; 01-ai's "Dive deeper into Yi-9B"). This module and :mod:`kat.models.upscale_expand` hold
the pieces as plain functions:

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
* **Expansion** — applying a plan to a model or a checkpoint (the layer surgery) is in
  :mod:`kat.models.upscale_expand`.

Supported ``model_type``: qwen2, qwen3, llama, mistral (:data:`ARCHS`); anything else raises
:class:`UnsupportedArchitecture` naming what is supported.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SELECTIONS = ("single", "block")
HIST_BINS = 20_000  # percentile histogram over [-1, 1]: bin width 1e-4
PERCENTILES = (5, 50, 95)
# state-dict names of decoder-layer tensors: "model.layers.{i}.{rest}" (CausalLM) or "layers.{i}.{rest}" (base model)
LAYER_KEY = re.compile(r"^((?:model\.)?layers\.)(\d+)\.(.+)$")
EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REPORT_FILE = "upscale_report.json"


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
