"""Loading, building and saving causal LMs (any local HF checkpoint, or a tiny Qwen2 from config).

``load(model_cfg)`` is what every stage calls with the ``model`` config group:

* ``model=tiny`` / ``model=tiny_teacher``: a Qwen2-shaped model built from ``model.arch`` with the
  embedded character tokenizer, or, when ``model.path`` is set, the trained checkpoint in that dir.
* ``model=hf model.path=DIR``: any local HF causal LM and its tokenizer; kat's special tokens are
  added and the embeddings resized when the tokenizer grew.

Checkpoints are written with ``save_pretrained`` (model + tokenizer + generation config) so the next
stage, plain transformers and vLLM load them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kat.data.templates import ANSWER_CLOSE
from kat.models.tokenizer import add_special_tokens, build_char_tokenizer
from kat.utils import get_logger

log = get_logger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "auto": "auto"}


def torch_dtype(name: str | None):
    if name is None:
        return None
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


# tokenizer_class values that name no model-specific tokenizer: load tokenizer.json with the generic fast class.
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(model_cfg: Any):
    """The tokenizer for ``model_cfg``: from ``model.path`` when set, else the embedded char tokenizer."""
    path = _get(model_cfg, "path")
    if path:
        from transformers import AutoTokenizer

        _check_dir(path)
        tok_cfg = Path(path) / "tokenizer_config.json"
        cls = json.loads(tok_cfg.read_text()).get("tokenizer_class") if tok_cfg.exists() else None
        if cls in GENERIC_TOKENIZER_CLASSES:
            # A tokenizer saved from a bare tokenizers.Tokenizer (kat's char tokenizer) says only "TokenizersBackend";
            # AutoTokenizer then falls back to the class of config.json's model type (Qwen2Tokenizer), whose
            # byte-level pre-tokenizer silently drops spaces and newlines. Load the saved tokenizer.json as it is.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    else:
        tok = build_char_tokenizer()
    add_special_tokens(tok)
    return tok


def _check_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model.path={path!r} is not a directory (expected a local HF checkpoint dir)")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model.path={path!r} has no config.json (expected a save_pretrained dir)")


def build_from_config(arch: dict, tokenizer, dtype=torch.float32, attn_implementation: str = "sdpa"):
    """A randomly initialised Qwen2 causal LM sized by ``arch`` (Qwen2Config fields)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    arch = dict(arch)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **arch,
    )
    config._attn_implementation = attn_implementation
    model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def load(model_cfg: Any, tokenizer=None):
    """Return ``(model, tokenizer)`` for the ``model`` config group (see module docstring)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_cfg)
    path = _get(model_cfg, "path")
    dtype = torch_dtype(_get(model_cfg, "dtype", "float32"))
    attn = _get(model_cfg, "attn_implementation", "sdpa")
    if path:
        from transformers import AutoModelForCausalLM

        _check_dir(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            log.info(f"resizing embeddings {rows} -> {len(tokenizer)} for kat's special tokens")
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        log.info(f"loaded {type(model).__name__} from {path} ({n_params(model) / 1e6:.2f}M parameters)")
    else:
        arch = _get(model_cfg, "arch")
        if not arch:
            raise ValueError("model.path is not set and model.arch is empty: set model.path=DIR (a local HF model)")
        model = build_from_config(arch, tokenizer, dtype=dtype if dtype != "auto" else torch.float32,
                                  attn_implementation=attn)
        log.warning(
            f"model '{_get(model_cfg, 'name', 'tiny')}' built from config with random weights "
            f"({n_params(model) / 1e6:.2f}M parameters): untrained (set model.path to start from a checkpoint)"
        )
    configure_generation(model, tokenizer)
    return model, tokenizer


def configure_generation(model, tokenizer) -> None:
    """Stop at EOS or ``</answer>``; pad with the tokenizer's pad token."""
    gc = model.generation_config
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)]
    gc.eos_token_id = [i for i in stop if i is not None]
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = None
    # sampling settings are passed explicitly by kat; keep the saved config neutral
    gc.do_sample = False
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None


def save(model, tokenizer, directory: str | Path) -> Path:
    """``save_pretrained`` model and tokenizer into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
