"""Forwards of an HF causal LM that are correct whether or not the model is sharded by FSDP2.

FSDP2 (``fully_shard``) gathers a unit's parameters in that unit's forward pre-hook. kat shards every decoder
layer as its own unit and the whole model as the root unit, so the root owns what is left: the input
embedding, the final norm and the output head. Those are gathered only when the **root** module's forward runs
(``model(...)``), and they stay gathered until the backward pass is over: the root unit does not reshard after
its forward (its parameters are needed again right away for the backward). Two consequences, which every
forward in kat respects:

* Never call the decoder stack (``model.model``) directly: before the root's forward the embedding is a sharded
  ``DTensor`` and the lookup fails with "got mixed torch.Tensor and DTensor" (after a root forward it happens to
  work, until the next backward reshards it: exactly the bug of the second RL micro-batch). :func:`final_hidden`
  and :func:`response_logits`-style callers go through ``model(...)`` instead.
* Code that reads the head weight itself (the fused losses, :func:`lm_logits` on selected rows, the MTP depths
  that reuse the embedding) does so **after** a root forward in the same step; :func:`head_weight` checks it.

Unsharded models take the same path, so there is one code path to test. The only extra cost is the head on one
position per row (``logits_to_keep=1``), which HF computes inside the root forward.
"""
from __future__ import annotations

import torch
from torch import nn


def base_model(model) -> nn.Module:
    """The decoder stack of an HF causal LM (``model.model`` for Llama/Qwen2-style models)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model or not hasattr(base, "layers"):
        raise TypeError(f"{type(model).__name__}: expected an HF causal LM with a decoder stack "
                        "(model.base_model.layers), e.g. Qwen2ForCausalLM or LlamaForCausalLM")
    return base


def _not_sharded(t: torch.Tensor, what: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        raise RuntimeError(f"{what} is still an FSDP shard (DTensor): read it only after a forward of the root "
                           "module (model(...)) in the same step, which gathers the root's parameters "
                           "(see kat.models.forward)")
    return t


def head_weight(model) -> torch.Tensor:
    """The output head's weight ``[V, d]`` as the root forward left it (gathered when sharded)."""
    return _not_sharded(model.get_output_embeddings().weight, "the output head's weight")


def lm_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's output head on ``hidden`` (…, d) -> (…, V), with its logit post-processing.

    Applies ``config.logit_scale`` (Cohere-style) and ``config.final_logit_softcapping`` (Gemma-2
    style) when set, so a head called on selected rows computes what ``model(...).logits`` would.
    Call it after a root forward of ``model`` (:func:`final_hidden`) when the model may be sharded.
    """
    head = model.get_output_embeddings()
    _not_sharded(head.weight, "the output head's weight")
    logits = head(hidden)
    scale = getattr(model.config, "logit_scale", None)
    if scale is not None:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return logits


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The final hidden states after the last norm (what the head reads): ``[B, T, d]``.

    Runs the **root** forward (so FSDP2 gathers the embedding, norm and head) and takes the decoder stack's
    output with a forward hook, not ``output_hidden_states`` (which would keep every layer's activations alive
    in no-grad forwards). The head runs on the last position only (``logits_to_keep=1``).
    """
    got: dict[str, torch.Tensor] = {}

    def grab(_module, _inputs, output):
        got["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = base_model(model).register_forward_hook(grab)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
              logits_to_keep=1)
    finally:
        handle.remove()
    if "h" not in got:
        raise RuntimeError(f"{type(model).__name__}'s forward did not call its decoder stack "
                           f"{type(base_model(model)).__name__}")
    return got["h"]


def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None,
                keep: int) -> torch.Tensor:
    """Logits at the last ``keep`` positions, ``[B, keep, V]``, from the root forward (head and logit
    post-processing as the model defines them; no ``[B, T, V]`` beyond those positions)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                logits_to_keep=int(keep))
    return out.logits
