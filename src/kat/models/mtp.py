"""Multi-Token-Prediction (MTP) modules, DeepSeek-V3 style, around any HF causal LM.

Depth ``k`` (1..D) at position ``i`` combines the previous depth's hidden state with the embedding of
token ``t_{i+k}`` and predicts token ``t_{i+k+1}`` (the main head, depth 0, predicts ``t_{i+1}``)::

    h^0_i  = main model's final hidden state (after its final norm: what the LM head reads)
    h'^k_i = eh_proj_k [ enorm_k(Emb(t_{i+k})) ; hnorm_k(h^{k-1}_i) ]          (B, T, 2d) -> (B, T, d)
    h^k    = TRM_k(h'^k)            one decoder layer of the model's own class, causal, same RoPE positions
    logits^k_i = Head(norm_k(h^k_i))                    Emb and Head are the main model's (shared)

Choices (DeepSeek-V3 Technical Report, arXiv 2412.19437; docs/distill.md §2), with the departures marked:

* **Concatenation order** ``[emb; hidden]`` as Megatron-LM and vLLM's ``deepseek_mtp`` do (the paper
  writes ``[hidden; emb]``); the order only permutes ``eh_proj``'s columns, and matching vLLM keeps a
  path open to MTP speculative decoding.
* **Per-depth output norm** ``norm_k`` before the shared head, as V3's ``shared_head.norm``; the main
  model's final norm is *not* reused (it belongs to depth 0 and would couple the depths).
* ``h^0`` is the main model's *normed* final hidden state (the tensor the LM head reads, as in vLLM);
  ``hnorm_1`` re-normalises it, so the extra norm is harmless.
* Positions: depth k keeps the main sequence's position ids (RoPE only sees relative offsets, so the
  left roll Megatron applies to position ids changes nothing for attention); the causal mask is the
  main model's (same padding mask). For the last ``k`` positions ``t_{i+k}`` does not exist: its
  embedding is zero (Megatron's zero fill); those positions never carry a loss.
* ``h^k`` passed to depth k+1 is the block output before ``norm_k`` (V3).
* New blocks are initialised like HF initialises the model (normal(0, initializer_range) for
  linear layers, ones for norms), not copied from the last main layer.

The heads are saved beside the HF checkpoint (:data:`HEADS_FILE`, :data:`CONFIG_FILE`) and are
droppable: plain ``transformers`` loads the main model from the same directory and ignores them.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kat.models.forward import base_model, lm_logits
from kat.utils import get_logger

log = get_logger(__name__)

HEADS_FILE = "mtp_heads.safetensors"
CONFIG_FILE = "mtp_config.json"
FORMAT_VERSION = 1


class RMSNorm(nn.Module):
    """``w · x / sqrt(mean(x²) + eps)`` computed in fp32 (as HF's Llama/Qwen2 RMSNorm), weight init 1."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class MTPDepth(nn.Module):
    """One MTP depth: ``enorm``, ``hnorm``, ``eh_proj`` (2d -> d, no bias), a decoder ``block``, ``norm``."""

    def __init__(self, config, layer_cls: type, layer_idx: int):
        super().__init__()
        d = int(config.hidden_size)
        eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self.enorm = RMSNorm(d, eps)
        self.hnorm = RMSNorm(d, eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = layer_cls(config, layer_idx)
        self.norm = RMSNorm(d, eps)

    def forward(self, e: torch.Tensor, h: torch.Tensor, mask, position_ids: torch.Tensor,
                pos_emb) -> tuple[torch.Tensor, torch.Tensor]:
        """``e`` = Emb(t_{i+k}) (B, T, d), ``h`` = previous depth's hidden (B, T, d) -> (h^k, norm_k(h^k)).

        A module forward (not loose calls to the parts) so that FSDP2, which gathers a unit's weights in
        its forward hook, sees each depth as one unit."""
        x = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h).to(e.dtype)], dim=-1))  # (B, T, d)
        x = self.block(x, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb)
        if isinstance(x, tuple):  # older transformers return (hidden, ...)
            x = x[0]
        return x, self.norm(x)


def _layer_config(config, depth: int):
    """A copy of ``config`` whose layer list has room for ``depth`` extra full-attention layers."""
    cfg = copy.deepcopy(config)
    n = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types is not None:
        cfg.layer_types = list(types) + ["full_attention"] * depth
    cfg.num_hidden_layers = n + depth
    return cfg


def causal_mask(model, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor | None:
    """The model's own full-attention causal mask for ``hidden`` (B, T, d), as its decoder builds it."""
    from transformers import masking_utils

    fn = masking_utils.create_causal_mask
    params = inspect.signature(fn).parameters
    kw = {"config": model.config, "attention_mask": attention_mask, "position_ids": position_ids}
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    if "cache" in params:
        kw["cache"] = None
    if "past_key_values" in params:
        kw["past_key_values"] = None
    if "cache_position" in params:
        kw["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kw)


class MTPHeads(nn.Module):
    """``D`` sequential MTP depths for an HF causal LM (the LM itself is passed to :meth:`forward`,
    not owned, so its state dict and ``save_pretrained`` are untouched)."""

    def __init__(self, model, depth: int):
        super().__init__()
        if int(depth) < 1:
            raise ValueError(f"model.mtp_depth must be >= 1 to build MTP heads, got {depth}")
        base = base_model(model)
        self.depth = int(depth)
        self.hidden_size = int(model.config.hidden_size)
        self.layer_cls = type(base.layers[0])
        self.base_layers = int(model.config.num_hidden_layers)
        cfg = _layer_config(model.config, self.depth)
        self.depths = nn.ModuleList(
            [MTPDepth(cfg, self.layer_cls, self.base_layers + k) for k in range(self.depth)])
        self.reset_parameters(float(getattr(model.config, "initializer_range", 0.02)))
        ref = next(model.parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif m is not self and hasattr(m, "weight") and isinstance(getattr(m, "weight"), nn.Parameter) \
                    and m.weight.ndim == 1:  # RMSNorm-like
                nn.init.ones_(m.weight)

    def forward(self, model, hidden: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per depth k = 1..D the normed hidden states ``norm_k(h^k)`` (B, T, d) for the shared head.

        ``hidden`` (B, T, d) is the main model's final (normed) hidden state, ``input_ids`` (B, T) the
        same tokens the main model read; row i of depth k's output predicts ``input_ids[:, i+k+1]``.
        """
        if hidden.dim() != 3 or input_ids.shape != hidden.shape[:2]:
            raise ValueError(f"hidden must be (B, T, d) and input_ids (B, T); got {tuple(hidden.shape)} "
                             f"and {tuple(input_ids.shape)}")
        B, T, _ = hidden.shape
        base = base_model(model)
        embed = model.get_input_embeddings()
        if position_ids is None:
            position_ids = torch.arange(T, device=hidden.device).unsqueeze(0).expand(B, T)
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None:
            raise TypeError(f"{type(base).__name__} has no rotary_emb: MTP blocks need the model's RoPE")
        pos_emb = rotary(hidden, position_ids)
        mask = causal_mask(model, hidden, attention_mask, position_ids)
        emb_all = embed(input_ids)  # (B, T, d)
        outs: list[torch.Tensor] = []
        h = hidden
        for k, dep in enumerate(self.depths, start=1):
            # Emb(t_{i+k}): roll left by k, zero for the last k positions (no such token)
            e = torch.zeros_like(emb_all)
            if k < T:
                e[:, : T - k] = emb_all[:, k:]
            h, normed = dep(e, h, mask, position_ids, pos_emb)
            outs.append(normed)
        return outs

    def config_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "depth": self.depth, "hidden_size": self.hidden_size,
                "layer_class": self.layer_cls.__name__, "concat_order": "emb,hidden",
                "hidden_input": "final_normed", "output_norm": "per_depth"}


def save_heads(heads: MTPHeads, directory: str | Path, state: dict | None = None) -> Path:
    """Write ``mtp_heads.safetensors`` + ``mtp_config.json`` into ``directory`` (atomically).

    ``state``: the heads' full state dict when they are sharded (gathered by the caller)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (state if state is not None else heads.state_dict()).items()}
    tmp = directory / (HEADS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "kat-mtp"})  # the depth is in mtp_config.json
    os.replace(tmp, directory / HEADS_FILE)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(heads.config_dict(), indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_FILE)
    return directory / HEADS_FILE


def has_heads(directory: str | Path | None) -> bool:
    return bool(directory) and (Path(directory) / HEADS_FILE).exists()


def build_heads(model, depth: int, path: str | Path | None = None) -> MTPHeads | None:
    """MTP heads for ``model`` with ``depth`` depths (None when depth is 0).

    When ``path`` holds saved heads, the first ``min(saved, depth)`` depths are restored (logged);
    further depths start fresh. A hidden-size or block-class mismatch is an error.
    """
    depth = int(depth or 0)
    if depth < 0:
        raise ValueError(f"model.mtp_depth must be >= 0, got {depth}")
    if depth == 0:
        if has_heads(path):
            log.info(f"{path} has MTP heads; model.mtp_depth=0, so they are not loaded (dropped)")
        return None
    heads = MTPHeads(model, depth)
    if not has_heads(path):
        log.info(f"MTP: {depth} new depth(s) ({n_params(heads) / 1e6:.3f}M parameters, random init)")
        return heads
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path / HEADS_FILE} exists but {cfg_file} is missing")
    saved = json.loads(cfg_file.read_text())
    if int(saved.get("hidden_size", -1)) != heads.hidden_size:
        raise ValueError(f"MTP heads in {path} have hidden_size {saved.get('hidden_size')}, "
                         f"the model has {heads.hidden_size}")
    if saved.get("layer_class") not in (None, heads.layer_cls.__name__):
        raise ValueError(f"MTP heads in {path} use blocks of {saved.get('layer_class')}, "
                         f"the model's decoder layer is {heads.layer_cls.__name__}")
    try:
        state = load_file(str(path / HEADS_FILE))
    except Exception as e:
        raise ValueError(f"cannot read MTP heads {path / HEADS_FILE}: {e}") from e
    n = min(int(saved["depth"]), depth)
    keep = {k: v for k, v in state.items() if int(k.split(".")[1]) < n}
    missing, unexpected = heads.load_state_dict(keep, strict=False)
    missing = [m for m in missing if int(m.split(".")[1]) < n]
    if missing or unexpected:
        raise ValueError(f"MTP heads in {path} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    msg = f"MTP: restored {n} depth(s) from {path / HEADS_FILE}"
    if depth > n:
        msg += f"; depth(s) {n + 1}..{depth} start fresh"
    if int(saved["depth"]) > depth:
        msg += f"; saved depth(s) {depth + 1}..{saved['depth']} dropped"
    log.info(msg)
    return heads


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shift_targets(labels: torch.Tensor, k: int, ignore_index: int = -100) -> torch.Tensor:
    """Targets of depth ``k`` (0 = main head): ``out[:, i] = labels[:, i+k+1]``, ``ignore_index`` past the end.

    (B, T) -> (B, T). This is Megatron-LM's roll + rolled mask (docs/distill.md §2) in one step.
    """
    out = torch.full_like(labels, ignore_index)
    s = k + 1
    if s < labels.shape[1]:
        out[:, : labels.shape[1] - s] = labels[:, s:]
    return out


def mtp_logits(model, hiddens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The shared head on each depth's hidden states: list of (B, T, V)."""
    return [lm_logits(model, h) for h in hiddens]
