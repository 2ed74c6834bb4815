"""Benchmark: whole training steps of a Qwen2.5-0.5B-shaped student through kat's own code paths.

    python benchmarks/train_step.py                               # H100/H200 defaults, all cases
    python benchmarks/train_step.py --cases sft,distill --out bench.md
    python benchmarks/train_step.py --tiny --device cpu           # CPU smoke run (set TRITON_INTERPRET=1)

Prints one markdown table (rows also appear one by one on stderr as they finish; ``--out`` rewrites the
table file after every case, so a run killed half-way keeps the rows it finished). A case that fails prints
an ``error: <message>`` row (traceback on stderr), frees its memory and the next case runs. A training case
that runs out of GPU memory is retried with half the batch (down to 1) and its note says so.

Model: ``Qwen2ForCausalLM`` built from a ``Qwen2Config`` (hidden 896, MLP 4864, 24 layers, 14 heads, 2 KV
heads, vocabulary 151,936, tied embeddings, SDPA attention), random init on the device, no download.
``--tiny``: hidden 64, MLP 128, 2 layers, 4 heads, 2 KV heads, vocabulary 512, batch 2 × 64 tokens.

Precision (``--precision``; default ``bf16`` on CUDA, ``fp32`` on CPU): ``bf16`` = bf16 parameters, no autocast,
AdamW states in bf16 — what kat runs with ``model=hf`` (``model.dtype: bfloat16``) and the default
``trainer.precision: 32-true``; ``mixed`` = fp32 parameters under ``torch.autocast(bf16)`` (Lightning's
``bf16-mixed``); ``fp32`` = no reduced precision. Frozen teachers are bf16 on CUDA, fp32 on CPU
(``teacher.dtype: auto``). Optimizer: ``torch.optim.AdamW`` (fused on CUDA; kat's
``configure_optimizers`` builds the same groups — decay on ≥2-D parameters — without ``fused``), lr 1e-5,
betas (0.9, 0.95).

Cases (``--cases``, run in the order given):

* ``sft`` — plain transformers: ``model(input_ids, attention_mask, labels=input_ids).loss`` (full logits),
  backward, AdamW step, on B × T tokens.
* ``distill`` — :class:`kat.stages.distill.Distill` built as ``from_config`` builds it (student, MTP depth 1
  from :func:`kat.models.mtp.build_heads`, a same-shaped frozen :class:`kat.models.teacher.OnlineTeacher`
  whose teacher is moved to the device as ``on_fit_start`` does), ``loss.impl=triton`` (Triton ULD kernel of
  ``kat_kernels.uld`` via :func:`kat.stages.distill.resolve_uld`); one step = ``module.compute_losses(batch)``
  (teacher forward, student + MTP forward, CE + ULD at depths 0 and 1) + backward + grad-norm clip 1.0
  (``trainer.gradient_clip_val``) + AdamW step. Batch: random ids, labels on the answer half of each row
  (positions T/2 … T-1), so N = B·T/2 loss rows per depth.
* ``distill_eager`` — the same with ``loss.impl=torch`` (the eager reference :func:`kat.losses.uld.uld_loss`).
* ``distill_chunked`` — the same with ``loss.impl=chunked`` (:func:`kat.losses.uld.uld_loss_chunked`: exact,
  rows in blocks, gradient formed in forward). ``distill_fsdp_chunked`` — that under FSDP2.
* ``distill_fsdp`` — ``distill`` with the student wrapped by FSDP2 as ``strategy=fsdp`` does
  (:func:`kat.trainer.fsdp.shard_model`: ``fully_shard`` per decoder layer, the MTP depths
  (``Distill.fsdp_extra_units``), then the root; ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``
  on CUDA) on a world of 1 (``init_process_group`` nccl on CUDA, gloo on CPU, rank 0, world 1, 127.0.0.1 and
  a free port).
* ``distill_fsdp_mtp_plain`` — the same with the MTP depths left unwrapped (plain modules; for comparison).
* ``rl_update`` — :meth:`kat.stages.rl.RL.accumulate_gradients` (Step-SRPO module built with
  ``conf/algorithm/step_srpo.yaml`` and ``update.micro_batch_size`` 32 of ``conf/stage/rl.yaml``;
  ``loss.impl=auto``: the fused Triton policy loss of ``kat_kernels.grpo`` on CUDA) on synthetic rollouts:
  ``--rl-prompts`` × ``--group-size`` rows, ``--prompt-len`` prompt + ``--new-tokens`` response tokens each,
  random old log-probs and advantages; + grad-norm clip 1.0 (``update.grad_clip``) + AdamW step.
* ``rl_update_eager`` — the same with ``loss.impl=torch`` (logits materialised, kat.losses.grpo.policy_loss).
* ``rollout`` — :func:`kat.rollout.hf.sample` (HF ``generate``, sampling at temperature 1, top-p 1, then the
  default ``logprobs=recompute`` no-grad forward) of ``--rl-prompts`` prompts × ``--group-size`` samples,
  ``--prompt-len`` prompt tokens, ``--new-tokens`` new tokens; tokens = generated tokens (a random model
  rarely samples a stop id, so ≈ rows × new tokens). Warm-up: one call with 4 new tokens; then
  ``--rollout-steps`` timed calls. A minimal in-file tokenizer maps the prompt strings to fixed random ids.

Columns: ms/step = median over ``--steps`` steps after ``--warmup`` (``torch.cuda.synchronize`` +
``time.perf_counter`` around each step, as kat's Throughput callback); tokens/s = non-padding input tokens
per step / step time (rollout: generated tokens); peak memory = ``torch.cuda.max_memory_allocated`` since
the case started (models, optimizer state and activations; "–" on CPU). The script sets
``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless the environment already sets it.

MFU (kat.trainer.callbacks.Throughput, docs/design.md §6) = tokens/s × FLOPs per token / peak, peak ``--peak-tflops``
(989 TFLOP/s dense bf16, H100/H200); FLOPs per token = 6·N + 6·L·d·T for the trained model (N = trainable
parameters, embeddings and head included, tied weights once, MTP heads included; L layers, d hidden size,
T sequence length) + 2·N_t + 2·L_t·d_t·T for the teacher forward (``Distill.teacher_flops_per_token``).
RL update: T = packed prompt + response width. Rollout (not a kat metric): 2·N + 2·L·d·T per generated
token with T = prompt + new tokens — the decode forward only; the prefill and the log-prob recompute are
not counted, so it understates the work done.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import socket
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository (benchmarks/ is one level down)
DEFAULT_CASES = ("sft,distill,distill_chunked,distill_eager,rl_update,rl_update_eager,rollout,distill_fsdp,"
                 "distill_fsdp_chunked")
CASES = ("sft", "distill", "distill_chunked", "distill_eager", "distill_fsdp", "distill_fsdp_chunked",
         "distill_fsdp_mtp_plain", "rl_update", "rl_update_eager", "rollout")
DISTILL_IMPL = {"distill_eager": "torch", "distill_chunked": "chunked", "distill_fsdp_chunked": "chunked"}

#: Qwen2.5-0.5B's shape (its config.json), random init
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151_936, max_position_embeddings=32_768, rope_theta=1_000_000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=1024, rope_theta=10_000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True, use_sliding_window=False)
#: run-size defaults per profile (flags override)
PROFILES = {
    "full": dict(batch=4, seq=4096, rl_prompts=8, group_size=8, prompt_len=128, new_tokens=256),
    "tiny": dict(batch=2, seq=64, rl_prompts=2, group_size=2, prompt_len=8, new_tokens=8),
}


# ============================================================================================== table
@dataclass
class Row:
    case: str
    shape: str = "–"
    ms: float | None = None
    tokens_s: float | None = None
    mfu: float | None = None  # fraction
    mem_gib: float | None = None
    note: str = ""


HEADER = ("case", "shape (B×T)", "ms/step", "tokens/s", "MFU %", "peak mem GiB", "note")


def fmt_row(r: Row) -> str:
    def num(x, f):
        return "–" if x is None else format(x, f)

    cells = (r.case, r.shape, num(r.ms, ".1f"), num(r.tokens_s, ",.0f"),
             num(None if r.mfu is None else 100 * r.mfu, ".1f"), num(r.mem_gib, ".2f"), r.note.replace("|", "/"))
    return "| " + " | ".join(cells) + " |"


def table(rows: list[Row], title: str) -> str:
    lines = [title, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += [fmt_row(r) for r in rows]
    return "\n".join(lines) + "\n"


# ============================================================================================== context
@dataclass
class Ctx:
    device: torch.device
    precision: str  # bf16 | mixed | fp32
    arch: dict
    steps: int
    warmup: int
    peak_flops: float
    args: argparse.Namespace
    notes: list[str] = field(default_factory=list)

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self):
        if self.precision == "mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def build_model(ctx: Ctx, seed: int, dtype: torch.dtype | None = None):
    """A randomly initialised Qwen2ForCausalLM on ``ctx.device`` (SDPA attention)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(**ctx.arch, bos_token_id=None, eos_token_id=ctx.arch["vocab_size"] - 1,
                      pad_token_id=ctx.arch["vocab_size"] - 3)
    cfg._attn_implementation = "sdpa"
    with torch.device(ctx.device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype or ctx.param_dtype)


def adamw(params, ctx: Ctx) -> torch.optim.Optimizer:
    """kat's groups (decay on >= 2-D parameters; weight decay 0 here), fused on CUDA. FSDP2 shards (DTensors)
    and plain parameters go to separate groups: one fused/foreach kernel cannot mix the two."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.requires_grad]
    groups = []
    for sharded in (False, True):
        for decay in (True, False):
            ps = [p for p in params if isinstance(p, DTensor) == sharded and (p.ndim >= 2) == decay]
            if ps:
                groups.append({"params": ps, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, fused=ctx.cuda)


def n_trainable(params) -> int:
    """Full (unsharded) parameter count, each tensor once (tied weights appear once in .parameters())."""
    return sum(int(torch.Size(p.shape).numel()) for p in params if p.requires_grad)


def train_flops_per_token(n: int, arch: dict, T: int) -> float:
    """6·N + 6·L·d·T (docs/design.md §6)."""
    return 6.0 * n + 6.0 * arch["num_hidden_layers"] * arch["hidden_size"] * T


def time_steps(ctx: Ctx, step: Callable[[], None], *, warmup: int | None = None, steps: int | None = None) -> float:
    """Median seconds of ``step()`` after warm-up (synchronize + perf_counter around each step)."""
    for _ in range(ctx.warmup if warmup is None else warmup):
        step()
    ctx.sync()
    times = []
    for _ in range(ctx.steps if steps is None else steps):
        ctx.sync()
        t0 = time.perf_counter()
        step()
        ctx.sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def finish(ctx: Ctx, row: Row, sec: float, tokens: float, flops_per_token: float) -> Row:
    row.ms = 1e3 * sec
    row.tokens_s = tokens / sec
    row.mfu = row.tokens_s * flops_per_token / ctx.peak_flops
    row.mem_gib = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None
    return row


def clip(params, max_norm: float = 1.0) -> None:
    """Global grad-norm clip. Gradients that mix DTensors (FSDP2 shards) and plain tensors (modules left
    unwrapped) cannot share one foreach kernel: their norms are taken per kind and combined."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    dt = [g for g in grads if isinstance(g, DTensor)]
    if not dt or len(dt) == len(grads):
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
        return
    plain = [g for g in grads if not isinstance(g, DTensor)]
    n_dt = torch.nn.utils.get_total_norm(dt)
    n_dt = n_dt.full_tensor() if isinstance(n_dt, DTensor) else n_dt
    total = float(torch.linalg.vector_norm(torch.stack([n_dt.float(), torch.nn.utils.get_total_norm(plain).float()])))
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        torch._foreach_mul_(dt, coef)
        torch._foreach_mul_(plain, coef)


# ============================================================================================== cases
def case_sft(ctx: Ctx, B: int, row: Row) -> Row:
    T, V = ctx.args.seq, ctx.arch["vocab_size"]
    model = build_model(ctx, seed=0)
    model.train()
    opt = adamw(model.parameters(), ctx)
    ids = torch.randint(0, V - 8, (B, T), device=ctx.device)  # (B, T)
    am = torch.ones_like(ids)  # (B, T)

    def step():
        with ctx.autocast():
            loss = model(input_ids=ids, attention_mask=am, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sec = time_steps(ctx, step)
    return finish(ctx, row, sec, B * T, train_flops_per_token(n_trainable(model.parameters()), ctx.arch, T))


def distill_batch(ctx: Ctx, B: int) -> dict:
    """Random ids; labels = ids on the answer half (positions T/2 … T-1), -100 on the prompt half."""
    T, V = ctx.args.seq, ctx.arch["vocab_size"]
    ids = torch.randint(0, V - 8, (B, T), device=ctx.device)  # (B, T)
    labels = torch.full_like(ids, -100)  # (B, T)
    labels[:, T // 2:] = ids[:, T // 2:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _WorldOfOne:
    """A one-process torch.distributed group (nccl on CUDA, gloo on CPU) and its 1-D device mesh."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mesh = None

    def __enter__(self) -> "_WorldOfOne":
        import datetime

        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if dist.is_initialized():
            raise RuntimeError("a process group is already initialised")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        cuda = self.device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60), **({"device_id": torch.device("cuda", self.device.index or 0)} if cuda else {}))
        self.mesh = init_device_mesh(self.device.type, (1,), mesh_dim_names=("data_parallel",))
        return self

    def __exit__(self, *exc) -> bool:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return False


def case_distill(ctx: Ctx, B: int, row: Row, impl: str, fsdp: bool = False, shard_mtp: bool = True) -> Row:
    from kat.models import mtp as mtp_lib
    from kat.models.teacher import OnlineTeacher
    from kat.trainer import fsdp as kat_fsdp
    from kat.stages.distill import Distill

    T = ctx.args.seq
    student = build_model(ctx, seed=0)
    heads = mtp_lib.build_heads(student, 1)  # MTP depth 1, random init, student's device and dtype
    t_model = build_model(ctx, seed=1, dtype=torch.float32)  # load_teacher_model loads fp32; .to() picks the dtype
    t_model.eval()
    t_model.requires_grad_(False)
    teacher = OnlineTeacher({"single": t_model}, columns=ctx.arch["vocab_size"], dtype="auto")
    module = Distill(student, None, optim={"lr": 1e-5}, val={}, teacher=teacher, mtp=heads,
                     loss=dict(load_yaml("conf/stage/distill.yaml")["loss"]), impl=impl)  # the stage's weights
    module.to(ctx.device)
    teacher.to(ctx.device)  # on_fit_start: bf16 on CUDA, fp32 on CPU (teacher.dtype=auto)
    module.model.train()
    module.mtp.train()
    module.ensure_uld(ctx.device)
    n = n_trainable(module.trainable_parameters())  # student + MTP, counted before sharding
    world = _WorldOfOne(ctx.device) if fsdp else nullcontext()
    with world:
        if fsdp:
            from types import SimpleNamespace

            # the KatFSDPStrategy attributes shard_model reads (strategy.fsdp defaults: mixed_precision auto)
            strategy = SimpleNamespace(mixed_precision="auto", activation_checkpointing=False,
                                       reshard_after_forward=True)
            extra = module.fsdp_extra_units() if shard_mtp else []
            kat_fsdp.shard_model(module.model, strategy, world.mesh, ctx.device, extra)
            mp = kat_fsdp._mp_policy(strategy, ctx.device)
            name = lambda d: str(d).replace("torch.", "")  # noqa: E731
            dt = ("no mixed precision" if mp.param_dtype is None
                  else f"params {name(mp.param_dtype)}, reduce {name(mp.reduce_dtype)}")
            row.note = (f"FSDP2 world 1, {dt}, MTP heads "
                        f"{'sharded' if shard_mtp else 'not wrapped (plain modules)'}; ")
        opt = adamw(module.trainable_parameters(), ctx)
        batch = distill_batch(ctx, B)

        def step():
            with ctx.autocast():
                terms = module.compute_losses(batch)
            terms["loss"].backward()
            clip(module.trainable_parameters())
            opt.step()
            opt.zero_grad(set_to_none=True)

        sec = time_steps(ctx, step)
        flops = train_flops_per_token(n, ctx.arch, T) + module.teacher_flops_per_token(T)
        row.note += f"ULD {module.uld_impl}; N rows/depth {B * (T - T // 2)}; MTP depth 1"
        return finish(ctx, row, sec, B * T, flops)


class BenchTokenizer:
    """The few tokenizer methods kat.rollout.hf and the RL stage call, over fixed random prompt ids.

    Special tags get ids at the top of the vocabulary (a random model samples them rarely): EOS = V-1,
    ``</answer>`` = V-2, pad = V-3, the other tags below them. ``encode(text)`` returns the ids registered
    for ``text``; ``decode`` returns a placeholder (no text is graded here).
    """

    def __init__(self, vocab: int):
        from kat.data.templates import ANSWER_CLOSE, SPECIAL_TOKENS

        self.eos_token_id, self.pad_token_id = vocab - 1, vocab - 3
        others = [t for t in SPECIAL_TOKENS if t != ANSWER_CLOSE]
        self._special = {ANSWER_CLOSE: vocab - 2, **{t: vocab - 4 - i for i, t in enumerate(others)}}
        self._prompts: dict[str, list[int]] = {}

    def add_prompt(self, text: str, ids: list[int]) -> None:
        self._prompts[text] = list(ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self._prompts[text])

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._special.get(token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return f"<{len(ids)} tokens>"


def rl_setup(ctx: Ctx, n_prompts: int):
    """Model (+ kat's generation config), tokenizer and ``n_prompts`` registered prompt strings."""
    from kat.models import hf

    a = ctx.args
    V = ctx.arch["vocab_size"]
    model = build_model(ctx, seed=0)
    tok = BenchTokenizer(V)
    hf.configure_generation(model, tok)
    gen = torch.Generator().manual_seed(1)
    prompts = []
    for i in range(n_prompts):
        text = f"prompt-{i}"
        tok.add_prompt(text, torch.randint(0, V - 16, (a.prompt_len,), generator=gen).tolist())
        prompts.append(text)
    return model, tok, prompts


def compose_rl(group_size: int, new_tokens: int, impl: str):
    """The composed ``+stage=rl`` config (the YAML's defaults, Step-SRPO) with this case's rollout shape."""
    from hydra import compose, initialize_config_dir

    import kat.config.lightning  # noqa: F401  (registers the config schemas, the Trainer's too)

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=["+stage=rl", f"rollout.group_size={group_size}",
                                           f"rollout.max_new_tokens={new_tokens}", f"loss.impl={impl}",
                                           "optim.lr=1e-5", "model.path=null"])


def load_yaml(rel: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / rel).read_text()) or {}


def case_rl_update(ctx: Ctx, n_prompts: int, row: Row, impl: str) -> Row:
    from kat.rollout import hf as R
    from kat.stages.rl import RL, select_loss_impl

    a = ctx.args
    G, P, Tn, V = a.group_size, a.prompt_len, a.new_tokens, ctx.arch["vocab_size"]
    model, tok, prompts = rl_setup(ctx, n_prompts)
    module = RL.from_config(compose_rl(G, Tn, impl), model, tok)  # the stage as +stage=rl builds it
    module.to(ctx.device)
    module.model.eval()  # the RL stage runs the policy without dropout in the update too
    module.loss_impl, why = select_loss_impl(impl, module.model, module.loss_kw.get("ratio_level", "token"))
    N = n_prompts * G
    gen = torch.Generator().manual_seed(2)
    prompt_rows = [tok.encode(p) for p in prompts for _ in range(G)]
    resp = [torch.randint(0, V - 16, (Tn,), generator=gen).tolist() for _ in range(N)]
    roll = R.Rollouts(prompt_ids=prompt_rows, response_ids=resp, texts=[""] * N, truncated=[True] * N,
                      old_logp=-2.0 * torch.rand(N, Tn, generator=gen),  # (N, T) fp32
                      forced=torch.zeros(N, Tn, dtype=torch.bool), group_size=G, logprobs_source="recompute")
    _, mask = roll.response_tensors(tok.pad_token_id)  # (N, T) bool
    tensors = {"old": roll.old_logp, "adv": torch.randn(N, Tn, generator=gen) * mask, "mask": mask,
               "ref": None, "dec": None}
    opt = adamw(module.trainable_parameters(), ctx)
    rows = list(range(N))
    clip_norm = module.update_cfg.grad_clip

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx.autocast():
            module.accumulate_gradients(roll, rows, tensors, decision_weight=1.0)
        if clip_norm:
            clip(module.trainable_parameters(), float(clip_norm))
        opt.step()

    sec = time_steps(ctx, step)
    tokens = sum(len(p) + len(r) for p, r in zip(prompt_rows, resp))
    row.note = f"policy loss {module.loss_impl} ({why}); micro-batch {module.update_cfg.micro_batch_size} rows"
    return finish(ctx, row, sec, tokens, train_flops_per_token(n_trainable(module.trainable_parameters()),
                                                               ctx.arch, P + Tn))


def case_rollout(ctx: Ctx, n_prompts: int, row: Row) -> Row:
    from kat.rollout import hf as R

    a = ctx.args
    model, tok, prompts = rl_setup(ctx, n_prompts)
    model.eval()
    kw = dict(group_size=a.group_size, temperature=1.0, top_p=1.0, batch_size=128, logprobs="recompute",
              logprob_batch_size=64)  # conf/rollout/hf.yaml
    with ctx.autocast():
        R.sample(model, tok, prompts, max_new_tokens=4, **kw)  # warm-up
    ctx.sync()
    times, tokens = [], []
    for _ in range(a.rollout_steps):
        ctx.sync()
        t0 = time.perf_counter()
        with ctx.autocast():
            roll = R.sample(model, tok, prompts, max_new_tokens=a.new_tokens, **kw)
        ctx.sync()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(len(r) for r in roll.response_ids))
    sec, tok_step = statistics.median(times), statistics.median(tokens)
    n = sum(p.numel() for p in model.parameters())
    flops = 2.0 * n + 2.0 * ctx.arch["num_hidden_layers"] * ctx.arch["hidden_size"] * (a.prompt_len + a.new_tokens)
    row.note = (f"{n_prompts} prompts × G {a.group_size}, {a.new_tokens} new tokens, {tok_step:.0f} generated/step "
                f"(median of {a.rollout_steps}); MFU = decode forward only")
    return finish(ctx, row, sec, tok_step, flops)


# ============================================================================================== runner
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _cleanup(ctx: Ctx) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


def run_case(ctx: Ctx, name: str, deadline: float) -> Row:
    """One case with OOM back-off (batch halved down to 1); never raises."""
    a = ctx.args
    rl = name in ("rollout", "rl_update", "rl_update_eager")
    size = a.rl_prompts if rl else a.batch
    ooms: list[str] = []

    def shape(s: int) -> str:
        return f"{s}×{a.group_size}×{a.prompt_len + a.new_tokens}" if rl else f"{s}×{a.seq}"

    while True:
        row = Row(case=name, shape=shape(size))
        if time.perf_counter() > deadline:
            row.note = "skipped: time budget (--budget-s) spent" + (f"; OOM at {', '.join(ooms)}" if ooms else "")
            return row
        _cleanup(ctx)
        err: BaseException | None = None
        try:
            if name == "sft":
                row = case_sft(ctx, size, row)
            elif name.startswith("distill"):
                row = case_distill(ctx, size, row, impl=DISTILL_IMPL.get(name, "triton"),
                                   fsdp=name.startswith("distill_fsdp"), shard_mtp=name != "distill_fsdp_mtp_plain")
            elif name in ("rl_update", "rl_update_eager"):
                row = case_rl_update(ctx, size, row, impl="torch" if name == "rl_update_eager" else a.rl_impl)
            elif name == "rollout":
                row = case_rollout(ctx, size, row)
            else:
                raise ValueError(f"unknown case {name!r}")
        except BaseException as e:  # noqa: BLE001 - a benchmark row must never end the run
            if isinstance(e, KeyboardInterrupt):
                raise
            print(f"[train_step] case {name} ({shape(size)}) failed:", file=sys.stderr)
            traceback.print_exc(file=sys.stderr)
            err = e
            e.__traceback__ = None  # drop the frames (and the tensors they hold) before retrying
        if err is None:
            if ooms:
                row.note = f"OOM at {', '.join(ooms)}; " + row.note
            return row
        oom = _is_oom(err)
        msg = _short(err)
        del err
        _cleanup(ctx)
        if oom and size > 1:
            ooms.append(shape(size))
            size //= 2
            continue
        row.ms = row.tokens_s = row.mfu = row.mem_gib = None
        row.note = f"error: {'OOM' if oom else msg}" + (f" (also OOM at {', '.join(ooms)})" if ooms else "")
        return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated, run in this order; of {','.join(CASES)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compiles here)")
    ap.add_argument("--batch", type=int, default=None, help="B of sft/distill (default 4; --tiny 2)")
    ap.add_argument("--seq", type=int, default=None, help="T of sft/distill (default 4096; --tiny 64)")
    ap.add_argument("--rl-prompts", type=int, default=None, help="prompts per RL batch (default 8; --tiny 2)")
    ap.add_argument("--group-size", type=int, default=None, help="samples per prompt G (default 8; --tiny 2)")
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --tiny 8)")
    ap.add_argument("--new-tokens", type=int, default=None, help="response tokens (default 256; --tiny 8)")
    ap.add_argument("--rollout-steps", type=int, default=1, help="timed generate calls (each is seconds long)")
    ap.add_argument("--rl-impl", choices=("auto", "triton", "torch"), default="auto", help="loss.impl of rl_update")
    ap.add_argument("--precision", choices=("auto", "bf16", "mixed", "fp32"), default="auto",
                    help="auto = bf16 on CUDA, fp32 on CPU (see the module docstring)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="MFU denominator (H100/H200 dense bf16)")
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="start no case (or OOM retry) after this many seconds; it gets a 'skipped' row")
    ap.add_argument("--tiny", action="store_true", help="tiny model and sizes (CPU smoke run)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    for k, v in PROFILES["tiny" if args.tiny else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if bad or not names:
        ap.error(f"--cases: unknown {bad or 'empty list'}; known: {','.join(CASES)}")
    args.case_list = names
    for k in ("steps", "batch", "seq", "rl_prompts", "group_size", "prompt_len", "new_tokens", "rollout_steps"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq < 4:
        ap.error(f"--seq must be >= 4 (prompt half + answer half), got {args.seq}")
    if args.group_size < 2:
        ap.error(f"--group-size must be >= 2 (StepSRPO needs group-relative credit), got {args.group_size}")
    if args.peak_tflops <= 0:
        ap.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        args.device = torch.device(dev)
    except RuntimeError as e:
        ap.error(f"--device {dev!r}: {e}")
    if args.device.type not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda[:N] or cpu, got {dev!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    if args.precision == "auto":
        args.precision = "bf16" if args.device.type == "cuda" else "fp32"
    return args


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # less fragmentation between cases of different shapes (read at the first CUDA allocation)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.device.type == "cuda":
        torch.cuda.set_device(torch.device(args.device).index or 0)
        torch.backends.cuda.matmul.allow_tf32 = True
    ctx = Ctx(device=args.device, precision=args.precision, arch=dict(TINY if args.tiny else QWEN25_05B),
              steps=args.steps, warmup=args.warmup, peak_flops=args.peak_tflops * 1e12, args=args)
    max_len = max(args.seq, args.prompt_len + args.new_tokens)
    ctx.arch["max_position_embeddings"] = max(ctx.arch["max_position_embeddings"], max_len)
    dev_name = torch.cuda.get_device_name(args.device) if ctx.cuda else "CPU"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    a = ctx.arch
    title = (f"## kat training-step benchmark — {dev_name}, torch {torch.__version__}, precision {args.precision}, "
             f"{'tiny' if args.tiny else 'Qwen2.5-0.5B-shaped'} model (d {a['hidden_size']}, L "
             f"{a['num_hidden_layers']}, V {a['vocab_size']:,}), median of {args.steps} after {args.warmup} "
             f"warm-up, MFU of {args.peak_tflops:g} TFLOP/s" + (", TRITON_INTERPRET=1" if interp else ""))
    deadline = t_start + args.budget_s
    rows: list[Row] = []
    for name in args.case_list:
        t0 = time.perf_counter()
        row = run_case(ctx, name, deadline)
        rows.append(row)
        print(f"[train_step] {fmt_row(row)}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(table(rows, title))
    text = table(rows, title)
    print(text, flush=True)
    print(f"[train_step] total {time.perf_counter() - t_start:.1f} s", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
