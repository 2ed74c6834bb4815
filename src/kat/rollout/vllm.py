"""RL rollouts with a colocated vLLM engine (``rollout=vllm``; GPU, optional extra).

**Status: written against vLLM's documented offline API (vLLM docs ``features/sleep_mode.md``,
``examples/offline_inference/rlhf_utils.py``), never run by the kat team** — vLLM cannot be installed on our
CPU machines. docs/rl.md says exactly what was and was not exercised. Importing this module never imports
vLLM; :class:`VLLMEngine` raises :class:`VLLMUnavailableError` with the install hint when it is missing.

The engine lives in the trainer's process and shares the GPU with it (TRL's "colocate" mode):

* built once from an HF checkpoint directory (``model.path``; a model built from config is saved to a
  temporary directory first) with ``enable_sleep_mode=True``, ``distributed_executor_backend=
  "external_launcher"`` (in-process, no engine subprocess) and a kat worker extension
  (:class:`KatWorkerExtension`) whose ``kat_load_weights`` writes tensors into vLLM's model;
* per RL step (:meth:`VLLMEngine.sample`): ``wake_up(tags=["weights"])`` → push the policy's current
  weights (``load_weights`` through ``collective_rpc``) → ``wake_up(tags=["kv_cache"])`` →
  ``reset_prefix_cache()`` (cached blocks were computed with the old weights) → ``generate`` → ``sleep(level)``
  so the trainer gets the memory back for the update. Waking weights before the KV cache avoids the wake-up
  OOM of vLLM RFC #15254; pushing after every wake also covers level-2 sleep, which discards the weights
  (vLLM #29341: without a reload a level-2 engine samples gibberish).
* sampling: ``SamplingParams(n=G, temperature, top_p, max_tokens, stop_token_ids=[EOS, </answer>],
  skip_special_tokens=False, logprobs=0, seed)``; the sampled token's log-prob comes back with each token
  (``logprobs_mode="processed_logprobs"``: after temperature, the distribution actually sampled).
  ``rollout.logprobs=recompute`` (default) ignores them and recomputes ``log π_old`` with a no-grad HF forward,
  as for ``rollout=hf``: vLLM's kernels differ from the trainer's in the last bits and the mismatch compounds
  over long responses (huggingface/trl issue #4772).

Limits: one GPU per engine (``tensor_parallel_size=1``); under DDP every rank holds its own engine and
samples its own prompts; FSDP-sharded policies would need a full-state gather before the push (not done).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from kat.rollout.hf import LOGPROB_SOURCES, Rollouts, cut_at_stop, response_logprobs, stop_token_ids
from kat.utils import get_logger

log = get_logger(__name__)

INSTALL_HINT = (
    "rollout=vllm needs vLLM on a CUDA machine: `pip install vllm` (kat's optional extra `gpu`), "
    "or use the default rollout=hf"
)


class VLLMUnavailableError(ImportError):
    """vLLM (or CUDA) is missing but ``rollout=vllm`` was selected."""


def vllm_available() -> bool:
    """True when ``import vllm`` would succeed (checked without importing it)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm  # noqa: F401  (optional dependency)
    except ImportError as e:
        raise VLLMUnavailableError(f"{INSTALL_HINT} (import vllm failed: {e})") from None
    return vllm


class KatWorkerExtension:
    """Mixed into vLLM's GPU worker via ``worker_extension_cls`` (so it works whatever the worker class is).

    ``kat_load_weights(named)`` copies ``[(hf_name, tensor), ...]`` into the served model with the model's own
    ``load_weights`` (which maps HF names, fuses q/k/v and gate/up, skips a tied ``lm_head``).
    """

    def kat_load_weights(self, named: Sequence[tuple[str, torch.Tensor]]) -> int:
        model = self.model_runner.model  # type: ignore[attr-defined]  (provided by vLLM's worker)
        loaded = model.load_weights(weights=list(named))
        return len(loaded) if loaded is not None else len(named)


class VLLMEngine:
    """Colocated vLLM sampler with the interface of ``kat.rollout.hf.sample`` (see the module docstring)."""

    def __init__(self, model, tokenizer, cfg: Any, *, model_path: str | None = None, seed: int = 0):
        if not torch.cuda.is_available():
            raise VLLMUnavailableError(f"{INSTALL_HINT} (no CUDA device)")
        vllm = _import_vllm()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.sleep_level = int(cfg.sleep_level)
        if self.sleep_level not in (1, 2):
            raise ValueError(f"rollout.sleep_level must be 1 or 2, got {self.sleep_level}")
        self._tmp = None
        if not model_path:
            # built from config: vLLM loads from disk, so write the initial weights once
            from kat.models import hf as hf_models

            self._tmp = tempfile.TemporaryDirectory(prefix="kat-vllm-")
            hf_models.save(model, tokenizer, self._tmp.name)
            model_path = self._tmp.name
        if not Path(model_path).is_dir():
            raise FileNotFoundError(f"rollout=vllm: model path {model_path!r} is not a local HF checkpoint dir")
        # in-process engine (no engine-core subprocess), rendezvous vars for a single-process launch
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(int(cfg.master_port)))):
                os.environ.setdefault(k, v)
        self.llm = vllm.LLM(
            model=model_path,
            tokenizer=model_path,
            dtype=str(cfg.dtype),
            gpu_memory_utilization=float(cfg.gpu_memory_utilization),
            max_model_len=int(cfg.max_model_len),
            enable_prefix_caching=bool(cfg.enable_prefix_caching),
            enable_sleep_mode=True,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            seed=int(seed),
            logprobs_mode="processed_logprobs",
            worker_extension_cls="kat.rollout.vllm.KatWorkerExtension",
            enforce_eager=bool(cfg.enforce_eager),
        )
        self._vllm = vllm
        self.sleeping = False
        self.pushes = 0
        self.sleep()  # the trainer owns the memory until the first rollout

    # ------------------------------------------------------------------ memory and weights
    def sleep(self) -> None:
        if not self.sleeping:
            self.llm.sleep(level=self.sleep_level)
            self.sleeping = True

    def wake_and_push(self, model) -> None:
        """Wake weights, push ``model``'s current parameters, wake the KV cache, reset the prefix cache."""
        if self.sleeping:
            self.llm.wake_up(tags=["weights"])
        dtype = next(model.parameters()).dtype
        named = [(n, t.detach().to("cuda", dtype=dtype)) for n, t in model.state_dict().items()]
        self.llm.collective_rpc("kat_load_weights", args=(named,))
        if self.sleeping:
            self.llm.wake_up(tags=["kv_cache"])
            self.sleeping = False
        self.llm.reset_prefix_cache()  # blocks cached with the previous weights are stale
        self.pushes += 1

    # ------------------------------------------------------------------ sampling
    def sample(self, model, tokenizer, prompts: Sequence[str], *, group_size: int, max_new_tokens: int = 128,
               temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
               force_modes: Sequence[str | None] | None = None, max_judge_tokens: int = 64,
               logprobs: str = "recompute", logprob_batch_size: int = 64) -> Rollouts:
        """As ``kat.rollout.hf.sample``; forced modes are not supported by this engine (use rollout=hf)."""
        del batch_size, max_judge_tokens  # vLLM schedules its own batches
        if force_modes is not None and any(m is not None for m in force_modes):
            raise NotImplementedError("rollout=vllm does not force mode tokens; use rollout=hf for "
                                      "algorithm.force_modes")
        if logprobs not in LOGPROB_SOURCES:
            raise ValueError(f"logprobs must be one of {LOGPROB_SOURCES}, got {logprobs!r}")
        self.wake_and_push(model)
        stops = stop_token_ids(tokenizer)
        params = self._vllm.SamplingParams(
            n=group_size, temperature=temperature, top_p=top_p, top_k=-1 if not self.cfg.top_k else
            int(self.cfg.top_k), max_tokens=max_new_tokens, stop_token_ids=stops,
            skip_special_tokens=False, logprobs=0 if logprobs == "sampler" else None,
        )
        p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        try:
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in p_ids], params, use_tqdm=False)
        finally:
            self.sleep()
        rows_prompt, resp, trunc, samp = [], [], [], []
        stop_set = set(stops)
        for ids, out in zip(p_ids, outs):
            for c in out.outputs:  # n completions, in order: prompt-major rows
                tok = list(c.token_ids)
                stop = c.stop_reason
                if c.finish_reason == "stop" and isinstance(stop, int) and (not tok or tok[-1] != stop):
                    tok.append(stop)  # keep the stop token in the response, as rollout=hf does
                cut, _ = cut_at_stop(tok, stop_set, None)
                rows_prompt.append(ids)
                resp.append(cut)
                trunc.append(c.finish_reason == "length")
                if logprobs == "sampler":
                    lp = [next(iter(d.values())).logprob if d else float("nan") for d in (c.logprobs or [])]
                    samp.append(lp[: len(cut)])
        N = len(resp)
        T = max([len(r) for r in resp] + [1])
        if logprobs == "sampler":
            old = torch.zeros((N, T), dtype=torch.float32)
            for k, lp in enumerate(samp):
                old[k, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
            if bool(torch.isnan(old).any()):  # an appended stop token has no sampler log-prob
                fixed = response_logprobs(model, rows_prompt, resp, pad_id=tokenizer.pad_token_id,
                                          temperature=temperature, batch_size=logprob_batch_size)
                old = torch.where(torch.isnan(old), torch.nn.functional.pad(fixed, (0, T - fixed.shape[1])), old)
        else:
            old = response_logprobs(model, rows_prompt, resp, pad_id=tokenizer.pad_token_id,
                                    temperature=temperature, batch_size=logprob_batch_size)
            old = torch.nn.functional.pad(old, (0, T - old.shape[1]))
        texts = [tokenizer.decode(r, skip_special_tokens=False) for r in resp]
        return Rollouts(prompt_ids=rows_prompt, response_ids=resp, texts=texts, truncated=trunc, old_logp=old,
                        forced=torch.zeros((N, T), dtype=torch.bool), group_size=group_size,
                        logprobs_source=logprobs)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
