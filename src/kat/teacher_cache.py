"""``python -m kat.teacher_cache teacher=tiny teacher.path=DIR cache.dir=OUT cache.k=64 [data=...]``

Writes the offline teacher cache that ``teacher=offline teacher.cache_dir=OUT`` distils from: for every
answer token of every training example (built exactly as ``+stage=distill`` builds them: same data
config, template, modes, tokenizer and seed), the teacher's top-k token ids (int32), log-probs at
``cache.temperature`` (fp16 or fp32, descending) and the tail mass 1 − Σ top-k, in sharded
safetensors files with a manifest (format: :mod:`kat.models.topk_cache`, docs/distill.md).

* Duplicate examples (identical token sequences) are stored once.
* Each shard is written to a temporary file and renamed; the manifest records it with its sha256 as
  soon as it is complete. Re-running the same command resumes: finished shards are verified and
  kept, the rest are computed. A manifest written for another teacher, tokenizer, k, temperature,
  dtype or data is an error (nothing is mixed).
* ``cache.backend=hf`` (default; CPU or GPU) runs the teacher with HF transformers.
  ``cache.backend=vllm`` uses vLLM's offline API (``prompt_logprobs=k``, ``max_logprobs >= k``,
  ``enable_prefix_caching=False``: cached prefix blocks return no prompt logprobs; vLLM docs, offline inference).
  vLLM is an optional GPU extra (``kat[gpu]``),
  not installed on the CPU machines; that path is written against vLLM's documented API and has not
  been run here.

The last line of stdout is the cache folder.
"""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from kat.models import teacher as T
from kat.models import topk_cache as C
from kat.config import CONF_DIR
from kat.utils import configure_threads, get_logger, git_commit

log = get_logger(__name__)


def student_rows(model_cfg: Any, tokenizer) -> int:
    """Logit rows of the student the cache is written for (its config's vocab_size, else len(tokenizer))."""
    path = model_cfg.path
    if path:
        import json

        cfg_file = Path(path) / "config.json"
        if cfg_file.exists():
            return max(int(json.loads(cfg_file.read_text()).get("vocab_size", len(tokenizer))), len(tokenizer))
    return len(tokenizer)


def training_examples(cfg: DictConfig, tokenizer) -> list[dict]:
    """The distill stage's training examples for ``cfg.data`` (same builder as kat.train)."""
    from kat.data.datamodule import KatDataModule

    dm = KatDataModule(cfg.data, tokenizer, stage="distill", seed=int(cfg.seed))
    dm.setup()
    return list(dm.train_set.items)


def unique_examples(examples: Sequence[dict]) -> tuple[list[dict], list[bytes]]:
    """First occurrences of distinct token sequences, with their keys (order preserved)."""
    seen: set[bytes] = set()
    out, keys = [], []
    for ex in examples:
        key = C.example_key(ex["input_ids"], ex["labels"])
        if key not in seen:
            seen.add(key)
            out.append(ex)
            keys.append(key)
    return out, keys


def _pad(batch: Sequence[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), n), C.IGNORE, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), n), dtype=torch.long)  # (B, T)
    for i, e in enumerate(batch):
        L = len(e["input_ids"])
        ids[i, :L] = torch.tensor(e["input_ids"])
        labels[i, :L] = torch.tensor(e["labels"])
        mask[i, :L] = 1
    return ids.to(device), labels.to(device), mask.to(device)


@torch.no_grad()
def hf_topk(teacher: T.OnlineTeacher, examples: Sequence[dict], *, k: int, temperature: float, batch_size: int,
            pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per example ``(ids (R, k) int32, logprobs (R, k) fp32, tail (R,) fp32)`` from an online teacher.

    logprobs = top-k of log_softmax(z / temperature) over the teacher's (sliced) columns;
    tail = 1 − Σ exp(top-k) computed as −expm1(logsumexp(top-k)) (accurate when the tail is tiny).
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    out: list[Any] = [None] * len(examples)
    for s in range(0, len(order), batch_size):
        idx = order[s: s + batch_size]
        batch = [examples[i] for i in idx]
        ids, labels, mask = _pad(batch, pad_id, teacher.device)
        rows = T.answer_positions(labels)  # (N, 2)
        mode_on = torch.tensor([e.get("mode") == "on" for e in batch], device=teacher.device)
        z = teacher.logits(ids, mask, rows, mode_on=mode_on)  # (N, V) fp32
        lp = torch.log_softmax(z / temperature, dim=-1)
        top_lp, top_id = lp.topk(k, dim=-1)  # (N, k), sorted descending
        tail = (-torch.expm1(torch.logsumexp(top_lp, dim=-1))).clamp_(0.0, 1.0)  # (N,)
        counts = torch.bincount(rows[:, 0], minlength=len(batch)).tolist()
        start = 0
        for j, c in enumerate(counts):
            out[idx[j]] = (top_id[start: start + c].int().cpu(), top_lp[start: start + c].cpu(),
                           tail[start: start + c].cpu())
            start += c
    return out


def vllm_topk(model_path: str, examples: Sequence[dict], *, k: int, temperature: float, vcfg: Any,
              seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same rows from vLLM's prompt log-probs (GPU). Not run on kat's CPU machines (no vLLM there).

    vLLM returns, per prompt position j ≥ 1, the top ``prompt_logprobs`` entries of the distribution
    of token j given tokens < j (raw, temperature-1 log-probs by default), plus the actual token when
    it is outside the top k. Row p of kat's cache (predicting token p+1) is ``prompt_logprobs[p+1]``.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:  # clean import guard: vLLM is the optional GPU extra
        raise RuntimeError("cache.backend=vllm needs vLLM (pip install 'kat[gpu]' on a CUDA machine); "
                           "use cache.backend=hf otherwise") from e
    if abs(temperature - 1.0) > 1e-12:
        raise ValueError("cache.backend=vllm writes temperature-1 log-probs (vLLM's raw_logprobs); "
                         f"cache.temperature={temperature} needs cache.backend=hf")
    llm = LLM(model=model_path, dtype=str(vcfg.get("dtype", "auto")),
              tensor_parallel_size=int(vcfg.get("tensor_parallel_size", 1)),
              gpu_memory_utilization=float(vcfg.get("gpu_memory_utilization", 0.8)),
              max_model_len=vcfg.get("max_model_len"), seed=seed, max_logprobs=k,
              enable_prefix_caching=False)  # cached prefix blocks would yield no prompt log-probs
    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k)
    prompts = [{"prompt_token_ids": list(e["input_ids"])} for e in examples]
    results = llm.generate(prompts, params)
    out = []
    for e, res in zip(examples, results):
        labels = torch.tensor(e["labels"])
        pos = T.answer_positions(labels).tolist()
        ids = torch.empty(len(pos), k, dtype=torch.int32)
        lps = torch.empty(len(pos), k, dtype=torch.float32)
        for r, p in enumerate(pos):
            entries = res.prompt_logprobs[p + 1]
            best = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)[:k]
            if len(best) < k:
                raise RuntimeError(f"vLLM returned {len(best)} < k={k} prompt log-probs; raise max_logprobs")
            ids[r] = torch.tensor([t for t, _ in best], dtype=torch.int32)
            lps[r] = torch.tensor([lp.logprob for _, lp in best], dtype=torch.float32)
        tail = (-torch.expm1(torch.logsumexp(lps, dim=-1))).clamp_(0.0, 1.0)
        out.append((ids, lps, tail))
    return out


def write(cfg: DictConfig, on_shard: Callable[[int], None] | None = None) -> Path:
    """Write (or finish) the cache described by ``cfg``; return its folder. ``on_shard(j)`` runs after
    each shard is recorded (tests use it to simulate an interruption)."""
    from kat.models import hf

    c = cfg.cache
    k, temperature = int(c.k), float(c.temperature)
    if k < 1:
        raise ValueError(f"cache.k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"cache.temperature must be > 0, got {temperature}")
    dtype = {"float16": torch.float16, "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}.get(
        str(c.dtype))
    if dtype is None:
        raise ValueError(f"cache.dtype must be float16 or float32, got {c.dtype!r}")
    if cfg.teacher.kind == "offline":
        raise ValueError("kat.teacher_cache needs a model teacher: teacher=tiny (teacher.path=DIR) or teacher=dual")
    backend = str(c.get("backend", "hf"))
    if backend not in ("hf", "vllm"):
        raise ValueError(f"cache.backend must be hf or vllm, got {backend!r}")

    tokenizer = hf.load_tokenizer(cfg.model)
    examples = training_examples(cfg, tokenizer)
    uniq, keys = unique_examples(examples)
    dev = str(c.get("device", "auto"))
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if dev == "auto" else dev)
    torch.manual_seed(int(cfg.seed))  # an untrained teacher (path null) is then reproducible
    teacher = T.build_teacher(cfg.teacher, tokenizer, student_rows=student_rows(cfg.model, tokenizer)).to(device)
    if teacher.cross:
        raise ValueError("kat.teacher_cache needs a teacher with the student's tokenizer (rows are keyed by the "
                         "student's tokens); distil a foreign-tokenizer teacher online (teacher=tiny teacher.align=...)")
    if k > teacher.columns:
        raise ValueError(f"cache.k={k} exceeds the teacher's {teacher.columns} vocabulary columns")
    if backend == "vllm" and teacher.kind != "online":
        raise ValueError("cache.backend=vllm supports one teacher (teacher=tiny with teacher.path); use hf for dual")
    identity = {"teacher": teacher.fingerprint(), "tokenizer": C.tokenizer_fingerprint(tokenizer), "k": k,
                "temperature": temperature, "data": C.data_fingerprint(examples),
                "vocab_columns": teacher.columns, "logprob_dtype": str(dtype).replace("torch.", "")}
    extra = {"teacher_paths": teacher.paths, "backend": backend, "created": datetime.datetime.now().isoformat(),
             "kat_git_commit": git_commit(), "n_examples": len(examples),
             "data_config": OmegaConf.to_container(cfg.data, resolve=True)}
    writer = C.CacheWriter(c.dir, identity, n_examples=len(uniq), shard_size=int(c.shard_size), extra=extra)
    try:
        todo = writer.pending()
        log.info(f"teacher cache {writer.dir}: {len(examples)} examples ({len(uniq)} distinct), {writer.n_shards} "
                 f"shard(s), {writer.n_shards - len(todo)} already done; k={k}, temperature={temperature}, "
                 f"backend={backend}, device={device}")
        for j in todo:
            a, b = writer.shard_range(j)
            part = uniq[a:b]
            if backend == "hf":
                rows = hf_topk(teacher, part, k=k, temperature=temperature, batch_size=int(c.batch_size),
                               pad_id=tokenizer.pad_token_id)
            else:
                rows = vllm_topk(teacher.paths["single"], part, k=k, temperature=temperature,
                                 vcfg=c.get("vllm") or {}, seed=int(cfg.seed))
            counts = [r[0].shape[0] for r in rows]
            offsets = torch.zeros(len(rows) + 1, dtype=torch.int64)
            offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
            writer.write_shard(
                j, keys=torch.tensor([list(kk) for kk in keys[a:b]], dtype=torch.uint8), offsets=offsets,
                ids=torch.cat([r[0] for r in rows]).to(torch.int32),
                logprobs=torch.cat([r[1] for r in rows]).to(dtype),
                tail=torch.cat([r[2] for r in rows]).to(torch.float32))
            log.info(f"shard {j + 1}/{writer.n_shards}: {b - a} examples, {int(offsets[-1])} rows")
            if on_shard is not None:
                on_shard(j)
    finally:
        writer.close()
    log.info(f"teacher cache complete: {writer.dir}")
    return writer.dir


@hydra.main(config_path=CONF_DIR, config_name="teacher_cache", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_threads()
    try:
        path = write(cfg)
    except (C.CacheError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(Path(path).resolve(), flush=True)


if __name__ == "__main__":
    main()
