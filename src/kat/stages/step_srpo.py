"""Stage 3, RL (``+stage=rl``): Step-SRPO and the GRPO family over verifiable rewards.

One training step (``training_step``), with manual optimisation (docs/rl.md):

1. **prompts** — the dataloader's batch of raw samples, minus prompts removed by SRPO History Resampling
   (topped up with random prompts still in play, so every step trains ``data.batch_size`` prompts);
2. **rollout** — ``rollout.group_size`` temperature samples per prompt from the engine (``rollout=hf``: HF
   ``generate`` on the policy; ``rollout=vllm``: a colocated vLLM engine that receives the current weights),
   with the behaviour policy's per-token log-probs (``rollout.logprobs``);
3. **grade** — ``kat.rewards.grade_batch`` (bounded by ``reward.timeout_s`` per item), memoised by
   (sample, answer block) since every verifier reads only the answer block;
4. **credit** — ``kat.rewards.step_srpo.assign_credit(algorithm.name, …)``: rewards and per-token advantages
   (Step-SRPO: judge advantage on judge + mode tokens, answer advantage on thinking + answer tokens);
   DAPO dynamic sampling generates more rounds until the batch holds ``data.batch_size`` groups with
   non-zero accuracy std; groups with an ungradable sample are dropped from loss and metrics;
5. **update** — ``update.ppo_epochs`` passes × ``update.mini_batches`` optimizer steps; each mini-batch is run
   in micro-batches of ``update.micro_batch_size`` rows whose losses are *summed*, each normalised by the
   mini-batch's global token count (``kat.losses.grpo.global_counts``), so the step's token-mean is exact
   whatever the split — Lightning's automatic optimisation would average per micro-batch instead;
   optional in-loss KL to a frozen copy of the starting policy; ``loss.impl=auto|triton|torch`` picks the
   fused Triton loss (CUDA, token-level ratio, plain output head) or the torch reference, and logs which ran.

Validation (greedy, held-out split, ``val/*`` overall and per level) runs before the first update, every
``trainer.val_check_interval`` steps and after the last update. At the end, PNG plots of think-on rate and
mean tokens per step (overall and per level; the paper's Figures 5–8) are written to ``<output>/plots`` and
logged to MLflow. The History Resampling state, the AdaptThink reference accuracies and the metric history
are saved in the Lightning checkpoint, so ``ckpt_path=last`` resumes them.

The policy runs without dropout (``eval()`` mode) in rollouts, log-prob recomputation and update alike, so
with ``ppo_epochs = mini_batches = 1`` the importance ratio of the only update is 1 up to float noise.
"""
from __future__ import annotations

import copy
import math
import os
import random
import time
from collections import OrderedDict
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from kat import metrics, rewards
from kat.data import schema, templates
from kat.data.resampling import DynamicSampler, HistoryResampler, zero_std_groups
from kat.losses import grpo as G
from kat.models.forward import head_weight
from kat.models.tokenizer import render_prompt
from kat.rewards.step_srpo import (
    ALGORITHMS,
    Credit,
    RolloutBatch,
    assign_credit,
    forced_token_old_logp,
    is_correct,
    segment_ids_from_tokens,
)
from kat.rollout import hf as hf_rollout
from kat.stages import fsdp
from kat.stages.base import KatStage, as_dict
from kat.utils import get_logger

log = get_logger(__name__)

LOSS_IMPLS = ("auto", "triton", "torch")
STEP_SRPO_REWARD_KEYS = ("judge_weight", "modulation", "margin", "format_penalty", "correct_threshold",
                         "efficiency_weight")
LOSS_KEYS = ("clip_eps_low", "clip_eps_high", "clip_ratio_c", "log_ratio_clamp", "ratio_level", "loss_agg",
             "norm_const", "kl_coef", "kl_estimator")


# ==============================================================================================================
# config helpers (pure; unit-tested)
# ==============================================================================================================
def build_credit_config(algorithm: dict, reward: dict):
    """The credit dataclass of ``algorithm.name`` from ``algorithm.credit`` (+ the Step-SRPO weights in
    ``reward`` for ``step_srpo``). Unknown keys are an error naming them."""
    name = algorithm.get("name")
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm.name must be one of {tuple(ALGORITHMS)}, got {name!r}")
    cls, _ = ALGORITHMS[name]
    kw = dict(algorithm.get("credit") or {})
    if name == "step_srpo":
        for k in STEP_SRPO_REWARD_KEYS:
            if k in reward:
                kw[k] = reward[k]
    known = {f.name for f in fields(cls)}
    extra = sorted(set(kw) - known)
    if extra:
        raise ValueError(f"unknown algorithm.credit key(s) {extra} for {name}; known: {sorted(known)}")
    return cls(**kw)


def loss_kwargs(algorithm: dict, max_new_tokens: int) -> dict:
    """``kat.losses.grpo.policy_loss`` keyword arguments from ``algorithm.loss`` (``norm_const`` defaults to the
    rollout budget so ``seq-mean-token-sum-norm`` does not depend on the micro-batch's padded width)."""
    cfg = dict(algorithm.get("loss") or {})
    extra = sorted(set(cfg) - set(LOSS_KEYS) - {"reference"})
    if extra:
        raise ValueError(f"unknown algorithm.loss key(s) {extra}; known: {sorted(LOSS_KEYS + ('reference',))}")
    kw = {k: cfg[k] for k in LOSS_KEYS if k in cfg}
    if kw.get("norm_const") is None:
        kw["norm_const"] = float(max_new_tokens)
    G._choice("algorithm.loss.loss_agg", kw.get("loss_agg", "token-mean"), G.LOSS_AGGREGATIONS)
    G._choice("algorithm.loss.ratio_level", kw.get("ratio_level", "token"), G.RATIO_LEVELS)
    G._choice("algorithm.loss.kl_estimator", kw.get("kl_estimator", "k3"), G.KL_ESTIMATORS)
    return kw


def wants_reference(algorithm: dict) -> bool:
    """Keep a frozen reference model: ``algorithm.loss.reference`` true/false, or auto (iff ``kl_coef > 0``);
    AdaptThink's reference accuracy always needs one."""
    loss = algorithm.get("loss") or {}
    ref = loss.get("reference", "auto")
    if int((algorithm.get("ref_acc") or {}).get("samples", 0) or 0) > 0:
        return True
    if ref == "auto" or ref is None:
        return float(loss.get("kl_coef", 0.0)) != 0.0
    if not isinstance(ref, bool):
        raise ValueError(f"algorithm.loss.reference must be true, false or auto, got {ref!r}")
    if not ref and float(loss.get("kl_coef", 0.0)) != 0.0:
        raise ValueError("algorithm.loss.kl_coef > 0 needs a reference model (algorithm.loss.reference=false)")
    return ref


def select_loss_impl(requested: str, model, ratio_level: str) -> tuple[str, str]:
    """``loss.impl``: ``(impl, why)``. ``auto`` picks the fused Triton loss when it can compute exactly this
    objective on CUDA (token-level ratio, a plain output head without logit scaling or soft-capping), else the
    torch reference; ``triton`` also runs on CPU under Triton's (slow) interpreter, and raises when it cannot
    (kernels never fall back)."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"loss.impl must be one of {LOSS_IMPLS}, got {requested!r}")
    if requested == "torch":
        return "torch", "loss.impl=torch"
    reasons = []
    p = next(model.parameters())
    interp = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    if not p.is_cuda and not (interp and requested == "triton"):
        reasons.append("the policy is not on CUDA")
    if ratio_level != "token":
        reasons.append(f"ratio_level={ratio_level} (the kernel computes token-level ratios only)")
    cfg = getattr(model, "config", None)
    if getattr(cfg, "logit_scale", None) is not None or getattr(cfg, "final_logit_softcapping", None) is not None:
        reasons.append("the model scales or soft-caps its logits (the kernel would compute another objective)")
    if not reasons:
        try:
            import kat_kernels.grpo  # noqa: F401
        except Exception as e:  # triton missing or broken
            reasons.append(f"kat_kernels.grpo does not import ({e})")
    if requested == "triton":
        if reasons:
            raise ValueError("loss.impl=triton cannot run here: " + "; ".join(reasons))
        return "triton", "loss.impl=triton"
    return ("triton", "auto: CUDA") if not reasons else ("torch", "auto: " + "; ".join(reasons))


def forced_modes(group_size: int, n_prompts: int) -> list[str]:
    """AdaptThink's split: the first ``G//2`` rows of each group forced off, the rest on."""
    return [("off" if j < group_size // 2 else "on") for _ in range(n_prompts) for j in range(group_size)]


# ==============================================================================================================
# grading with a memo
# ==============================================================================================================
class GradeCache:
    """Scores memoised by (sample identity, answer block): every verifier reads only the answer block
    (docs/verifiers.md), so the same answer to the same sample always gets the same score. Scores from a
    ``grade_batch`` call that had timeouts or errors are not stored (they might not be reproducible)."""

    def __init__(self, max_items: int = 200_000):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()
        self.hits = 0
        self.lookups = 0

    @staticmethod
    def key(sample: dict, completion: str) -> tuple:
        gold = (sample.get("domain"), sample.get("answer"), sample.get("tests"),
                tuple(sample.get("choices") or ()))
        return (str(sample.get("id")), hash(gold), templates.answer_block(completion))

    def grade(self, samples: Sequence[dict], completions: Sequence[str], *, use_cache: bool = True,
              **grade_kw) -> tuple[list, rewards.RewardStats, int]:
        """Scores aligned with the inputs, the grading pass's stats (unique items only) and the cache hits."""
        keys = [self.key(s, c) for s, c in zip(samples, completions)]
        todo: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            if (not use_cache or k not in self._d) and k not in todo:
                todo[k] = i
        hits = sum(1 for k in keys if use_cache and k in self._d)
        self.lookups += len(keys)
        self.hits += hits
        idx = list(todo.values())
        res = rewards.grade_batch([samples[i] for i in idx], [completions[i] for i in idx], **grade_kw)
        fresh = dict(zip(todo.keys(), res.scores))
        if use_cache and res.stats.timeouts == 0 and res.stats.errors == 0:
            for k, v in fresh.items():
                self._d[k] = v
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)
        scores = [fresh[k] if k in fresh else self._d[k] for k in keys]
        return scores, res.stats, hits


# ==============================================================================================================
# the module
# ==============================================================================================================
class StepSRPO(KatStage):
    """The RL stage (see the module docstring). Construct with :meth:`from_config`."""

    def __init__(self, model, tokenizer, *, optim: dict, val: dict, rollout: dict, algorithm: dict, reward: dict,
                 update: dict, loss_impl: str = "auto", seed: int = 0, model_path: str | None = None,
                 validate_at_start: bool = True, validate_at_end: bool = True, plots: bool = True,
                 log_samples: int = 0):
        super().__init__(model, tokenizer, optim=optim, val=val)
        self.automatic_optimization = False
        self.rollout_cfg = dict(rollout)
        self.algorithm = dict(algorithm)
        self.reward_cfg = dict(reward)
        self.update_cfg = dict(update)
        self.seed = int(seed)
        self.model_path = model_path
        self.validate_at_start = bool(validate_at_start)
        self.validate_at_end = bool(validate_at_end)
        self.make_plots = bool(plots)
        self.log_samples = int(log_samples)

        self.algo = str(algorithm["name"])
        self.credit_cfg = build_credit_config(self.algorithm, self.reward_cfg)
        self.group_size = int(rollout.get("group_size", 8))
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (group-relative credit), got {self.group_size}")
        self.temperature = float(rollout.get("temperature", 1.0))
        self.max_new_tokens = int(rollout.get("max_new_tokens", 96))
        self.loss_kw = loss_kwargs(self.algorithm, self.max_new_tokens)
        self.loss_impl_requested = str(loss_impl)
        self.loss_impl: str | None = None  # decided in on_fit_start (needs the device)
        for k, lo in (("ppo_epochs", 1), ("mini_batches", 1), ("micro_batch_size", 1)):
            if int(self.update_cfg.get(k, 1)) < lo:
                raise ValueError(f"stage.module.update.{k} must be >= {lo}, got {self.update_cfg.get(k)}")
        res = dict(self.algorithm.get("resampling") or {})
        self.history_resampler = HistoryResampler() if res.get("history") else None
        self.dynamic_sampler = DynamicSampler(int(res.get("max_gen_batches", 10))) if res.get("dynamic") else None
        self.force = bool(self.algorithm.get("force_modes", False))
        ref_acc = dict(self.algorithm.get("ref_acc") or {})
        self.ref_acc_samples = int(ref_acc.get("samples", 0) or 0)
        self.ref_acc_mode = str(ref_acc.get("mode", "on"))
        if self.algo == "adaptthink" and self.ref_acc_samples < 1:
            raise ValueError("algorithm=adaptthink needs algorithm.ref_acc.samples >= 1 (reference accuracy)")
        self.ref_acc_cache: dict[str, float] = {}
        # frozen reference (not a registered submodule: not optimised, not in the checkpoint; moved in on_fit_start)
        ref = copy.deepcopy(model).eval().requires_grad_(False) if wants_reference(self.algorithm) else None
        object.__setattr__(self, "ref_model", ref)
        self.grade_cache = GradeCache()
        self.engine = None
        self.mode_ids = [tokenizer.convert_tokens_to_ids(templates.THINK_ON),
                         tokenizer.convert_tokens_to_ids(templates.THINK_OFF)]
        self.history: list[dict] = []  # per RL step: behaviour metrics for the plots
        self.val_history: list[dict] = []  # per validation: {"step", "summary"}
        self._last_val_step: int | None = None
        self._batches_done = 0  # training batches (RL steps) consumed: the datamodule skips them on resume
        self._prompt_pool: list[dict] | None = None  # set by tests; else the datamodule's training samples

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg, model, tokenizer) -> "StepSRPO":
        m = cfg.stage.module
        rollout = as_dict(cfg.rollout)
        if rollout.get("engine") == "vllm":
            from kat.rollout.vllm import INSTALL_HINT, VLLMUnavailableError, vllm_available

            if not vllm_available():
                raise VLLMUnavailableError(f"{INSTALL_HINT} (vllm is not installed)")
        path = cfg.model.get("path")
        if not path:
            log.warning("RL from a model built from config (model.path is null): its rollouts are random text and "
                        "every reward is the format penalty; pass model.path=<ColdStart checkpoint> for a real run")
        return cls(
            model, tokenizer, optim=as_dict(cfg.optim), val=as_dict(m.val), rollout=rollout,
            algorithm=as_dict(cfg.algorithm), reward=as_dict(cfg.reward), update=as_dict(m["update"]),
            loss_impl=str(cfg.loss.impl), seed=int(cfg.seed), model_path=path,
            validate_at_start=bool(m.get("validate_at_start", True)),
            validate_at_end=bool(m.get("validate_at_end", True)),
            plots=bool(m.get("plots", True)), log_samples=int(m.get("log_samples", 0)),
        )

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self) -> None:
        # HF loads checkpoints in eval mode; training_step switches dropout off itself (no "eval mode" warning)
        self.model.train()
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        self.loss_impl, why = select_loss_impl(self.loss_impl_requested, self.model, self.loss_kw.get("ratio_level",
                                                                                                       "token"))
        log.info(f"policy loss: {self.loss_impl} ({why}); algorithm={self.algo}, reference model: "
                 f"{'yes' if self.ref_model is not None else 'no'}")
        for lg in self.loggers:
            lg.log_hyperparams({"loss/impl_used": self.loss_impl})
        self.engine = self._build_engine()

    def _build_engine(self):
        engine = self.rollout_cfg.get("engine", "hf")
        if engine == "hf":
            return hf_rollout.HFEngine()
        if engine == "vllm":
            from kat.rollout.vllm import VLLMEngine

            return VLLMEngine(self.model, self.tokenizer, self.rollout_cfg, model_path=self.model_path, seed=self.seed)
        raise ValueError(f"rollout.engine must be hf or vllm, got {engine!r}")

    def on_train_start(self) -> None:
        if self.validate_at_start and self.global_step == 0:
            self.validate_now()

    def on_train_epoch_end(self) -> None:
        # Lightning also ends the epoch when max_steps stops training mid-epoch: that is no epoch of prompts
        done = bool(self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if self.history_resampler is not None and done:
            n = self.history_resampler.end_epoch()
            log.info(f"History Resampling: epoch {self.history_resampler.epoch} ended, {n} prompts all-correct "
                     f"removed ({len(self.history_resampler.excluded)} in total)")

    def on_train_end(self) -> None:
        if self.validate_at_end and self._last_val_step != self.global_step:
            self.validate_now()
        if self.make_plots and self.trainer.is_global_zero:
            self.write_plots(Path(self.trainer.default_root_dir) / "plots")
        if self.engine is not None:
            self.engine.close()

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_end(self) -> None:
        """As KatStage's, but logged at ``global_step`` through the loggers, like every other RL metric (the
        validation loop's ``self.log`` would land one step behind under manual optimisation)."""
        if self.trainer.sanity_checking:
            self._val_sums = {}
            return
        for k, mode in enumerate(self.val_modes()):
            sums = self._val_sums.get(mode)
            if sums is None:
                continue
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")  # across ranks
            self._publish_val(k, mode, metrics.summary_from_sums(sums))
        self._val_sums = {}
        self._record_val()

    def _publish_val(self, k: int, mode: str, summary: dict) -> None:
        self.last_val[mode] = summary
        flat = metrics.flat(summary, prefix="val" if k == 0 else f"val_{mode}")
        for lg in self.loggers:
            lg.log_metrics(flat, step=int(self.global_step))
        for name, v in flat.items():
            self.trainer.callback_metrics[name] = torch.tensor(v)
        log.info(f"[step {self.global_step}] validation (mode={mode}): "
                 + "; ".join(f"{g}: on={m['think_on_rate']:.2f} acc={m['acc']:.2f} tok={m['tokens_mean']:.1f}"
                             for g, m in summary.items()))

    def _record_val(self) -> None:
        self._last_val_step = int(self.global_step)
        first = self.val_modes()[0]
        if first in self.last_val:
            self.val_history.append({"step": int(self.global_step), "summary": self.last_val[first]})

    def validate_now(self) -> None:
        """Greedy validation on the held-out split outside Lightning's loop (step 0 and the end), logged through
        the loggers at the current step (rank 0 generates and logs; the other ranks wait — or, when the policy is
        FSDP-sharded and every forward needs every rank, generate the same samples alongside and discard them)."""
        samples = list(getattr(self.trainer.datamodule, "val_samples", []) or [])
        sharded = fsdp.is_sharded(self.model) and self.trainer.world_size > 1
        if samples and (self.trainer.is_global_zero or sharded):
            for k, mode in enumerate(self.val_modes()):
                records = self.evaluate(samples, mode)  # the validation path of every stage (KatStage)
                if self.trainer.is_global_zero:
                    self._publish_val(k, mode, metrics.summarize(records))
            if self.trainer.is_global_zero:
                self._record_val()
        self.trainer.strategy.barrier()

    # ------------------------------------------------------------------ prompts
    def prompt_pool(self) -> list[dict]:
        if self._prompt_pool is not None:
            return self._prompt_pool
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ts = getattr(dm, "train_set", None)
        return list(getattr(ts, "items", []) or [])

    def _draw(self, n: int, exclude_ids: set[str], tag: str) -> list[dict]:
        """``n`` random training samples still in play (not excluded by History Resampling, not in
        ``exclude_ids``), deterministic in (seed, step, tag)."""
        pool = [s for s in self.prompt_pool() if str(s.get("id")) not in exclude_ids
                and (self.history_resampler is None or self.history_resampler.keep(str(s.get("id"))))]
        rng = random.Random(f"kat-rl/{self.seed}/{self.global_step}/{tag}")
        return rng.sample(pool, min(n, len(pool)))

    def select_prompts(self, batch: Sequence[dict]) -> list[dict]:
        """The batch minus prompts removed by History Resampling, topped up to its size."""
        if self.history_resampler is None:
            return list(batch)
        kept = [s for s in batch if self.history_resampler.keep(str(s.get("id")))]
        if len(kept) < len(batch):
            kept += self._draw(len(batch) - len(kept), {str(s.get("id")) for s in kept}, "topup")
        return kept

    # ------------------------------------------------------------------ rollouts, grading, credit
    def _render(self, samples: Sequence[dict]) -> list[str]:
        return [render_prompt(self.tokenizer, schema.prompt_messages(s)) for s in samples]

    def _sample(self, samples: Sequence[dict]) -> hf_rollout.Rollouts:
        rc = self.rollout_cfg
        fm = forced_modes(self.group_size, len(samples)) if self.force else None
        return self.engine.sample(
            self.model, self.tokenizer, self._render(samples), group_size=self.group_size,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=float(rc.get("top_p", 1.0)),
            batch_size=int(rc.get("batch_size", 64)), force_modes=fm,
            max_judge_tokens=int(rc.get("max_judge_tokens", 32)),
            logprobs=str(rc.get("logprobs", "recompute")), logprob_batch_size=int(rc.get("logprob_batch_size", 64)),
        )

    def _grade(self, rows: Sequence[dict], texts: Sequence[str]) -> tuple[list, dict]:
        rw = self.reward_cfg
        scores, stats, hits = self.grade_cache.grade(
            rows, texts, use_cache=bool(rw.get("cache", True)), max_workers=int(rw.get("workers", 2)),
            timeout_s=float(rw.get("timeout_s", 5.0)), code_cfg=rw.get("code"), math_cfg=rw.get("math"),
        )
        return scores, {"timeouts": stats.timeouts, "errors": stats.errors, "graded": stats.n, "cache_hits": hits}

    def reference_accuracy(self, samples: Sequence[dict]) -> list[float]:
        """AdaptThink's ``R̄_ref(b)``: the frozen reference's accuracy on each prompt (``ref_acc.samples``
        samples in mode ``ref_acc.mode``), computed once per prompt id and cached (saved in checkpoints)."""
        need = []
        for s in samples:
            sid = str(s.get("id"))
            if sid not in self.ref_acc_cache and sid not in {str(x.get("id")) for x in need}:
                need.append(s)
        if need:
            k = self.ref_acc_samples
            comps = hf_rollout.generate(
                self.ref_model, self.tokenizer, self._render(need), max_new_tokens=self.max_new_tokens, do_sample=True,
                temperature=self.temperature, num_return_sequences=k, force_mode=self.ref_acc_mode,
                batch_size=int(self.rollout_cfg.get("batch_size", 64)),
            )
            rows = [s for s in need for _ in range(k)]
            scores, _ = self._grade(rows, [c.text for c in comps])
            thr = float(getattr(self.credit_cfg, "correct_threshold", 1.0))
            for b, s in enumerate(need):
                ok = [is_correct(sc, templates.parse(c.text).well_formed, thr)
                      for sc, c in zip(scores[b * k : (b + 1) * k], comps[b * k : (b + 1) * k])]
                self.ref_acc_cache[str(s.get("id"))] = sum(ok) / k
        return [self.ref_acc_cache[str(s.get("id"))] for s in samples]

    def _credit(self, samples: Sequence[dict], roll: hf_rollout.Rollouts,
                scores: Sequence) -> tuple[RolloutBatch, Credit]:
        parsed = [templates.parse(t) for t in roll.texts]
        ids, mask = roll.response_tensors(self.tokenizer.pad_token_id)
        seg = segment_ids_from_tokens(ids, mask, self.mode_ids)  # (N, T)
        batch = RolloutBatch(
            group_size=self.group_size, modes=[p.mode for p in parsed], scores=list(scores),
            well_formed=[p.well_formed for p in parsed], segment_ids=seg,
            priors=[s.get("mode") if s.get("mode") in ("on", "off") else None for s in samples],
            ref_acc=self.reference_accuracy(samples) if self.algo == "adaptthink" else None,
        )
        return batch, assign_credit(self.algo, batch, self.credit_cfg)

    def collect(self, samples: Sequence[dict]) -> dict:
        """Rollout → grade → credit for one step, with DAPO dynamic sampling rounds when enabled.

        Returns ``rollouts`` (the trained groups), ``samples`` (one per group), ``credit``, ``batch`` and, for
        the behaviour metrics, every generated row (``all_*``) and per-round zero-std counts."""
        G_ = self.group_size
        B = len(samples)
        dyn = self.dynamic_sampler
        if dyn is not None:
            dyn.reset()
        cur = list(samples)
        parts: list[tuple[list[dict], hf_rollout.Rollouts, list]] = []
        all_rows: list[dict] = []
        zero_std = groups_seen = 0
        grade_info = {"timeouts": 0, "errors": 0, "graded": 0, "cache_hits": 0}
        t_roll = t_grade = 0.0
        rounds = 0
        used_ids = {str(s.get("id")) for s in cur}
        res_cfg = self.algorithm.get("resampling") or {}
        on_unfilled = str(res_cfg.get("on_unfilled", "error"))
        if on_unfilled not in ("error", "partial"):
            raise ValueError(f"algorithm.resampling.on_unfilled must be error or partial, got {on_unfilled!r}")
        dyn_metric = str(res_cfg.get("dynamic_metric", "acc"))
        if dyn_metric not in ("acc", "reward"):
            raise ValueError(f"algorithm.resampling.dynamic_metric must be acc or reward, got {dyn_metric!r}")
        out_hr: list[tuple[list[str], list[bool]]] = []  # History Resampling records of this step
        while True:
            rounds += 1
            t0 = time.perf_counter()
            roll = self._sample(cur)
            t_roll += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = [s for s in cur for _ in range(G_)]
            scores, gi = self._grade(rows, roll.texts)
            for k in grade_info:
                grade_info[k] += gi[k]
            batch, credit = self._credit(cur, roll, scores)
            t_grade += time.perf_counter() - t0
            if self.history_resampler is not None:
                out_hr.append(([str(s.get("id")) for s in cur], credit.correct.tolist()))
            keep_g = ~credit.skipped  # (B,)
            zs = zero_std_groups(credit.reward, G_) & keep_g
            zero_std += int(zs.sum())
            groups_seen += int(keep_g.sum())
            self._behaviour_rows(all_rows, cur, roll, batch, credit)
            if dyn is None:
                parts.append((cur, roll, scores))
                break
            keep_g = keep_g & dyn.filter(credit.correct if dyn_metric == "acc" else credit.reward, G_)
            gids = [b for b in range(len(cur)) if bool(keep_g[b])]
            if gids:
                rows_idx = [b * G_ + j for b in gids for j in range(G_)]
                parts.append(([cur[b] for b in gids], roll.select(rows_idx), [scores[i] for i in rows_idx]))
            kept = sum(len(p[0]) for p in parts)
            if kept >= B:
                break
            if dyn.max_gen_batches and dyn.gen_batches >= dyn.max_gen_batches:
                if on_unfilled == "partial":
                    break
                raise RuntimeError(
                    f"dynamic sampling: {dyn.gen_batches} generation rounds kept {kept} of {B} groups with non-zero "
                    f"{dyn_metric} std; raise algorithm.resampling.max_gen_batches, set "
                    "algorithm.resampling.on_unfilled=partial, or check the data")
            cur = self._draw(B, used_ids, f"dyn{rounds}")
            used_ids |= {str(s.get("id")) for s in cur}
            if not cur:
                log.warning("dynamic sampling: no prompts left to draw; training on the groups kept so far")
                break
        out = {"all_rows": all_rows, "zero_std": zero_std, "groups_seen": groups_seen, "rounds": rounds,
               "grade": grade_info, "t_rollout": t_roll, "t_grade": t_grade, "history_records": out_hr}
        if not parts:
            out.update(rollouts=None, samples=[], credit=None, batch=None)
            return out
        t0 = time.perf_counter()
        samp = [s for p in parts for s in p[0]][:B]
        roll = hf_rollout.Rollouts.concat([p[1] for p in parts])
        roll = roll.select(range(len(samp) * G_)) if len(roll) > len(samp) * G_ else roll
        scores = [x for p in parts for x in p[2]][: len(samp) * G_]
        batch, credit = self._credit(samp, roll, scores) if dyn is not None else (batch, credit)
        out["t_grade"] += time.perf_counter() - t0 if dyn is not None else 0.0
        out.update(rollouts=roll, samples=samp, credit=credit, batch=batch)
        return out

    def record_history(self, records: list[tuple[list[str], list[bool]]]) -> None:
        """Feed this step's (prompt ids, correct) records to History Resampling; under DDP every rank records
        every rank's rollouts (one all-gather per step), so all ranks exclude the same prompts."""
        hr = self.history_resampler
        if hr is None:
            return
        if _distributed():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        for ids, correct in records:
            hr.record(ids, correct, self.group_size)

    def _behaviour_rows(self, out: list, samples, roll, batch: RolloutBatch, credit: Credit) -> None:
        G_ = self.group_size
        for i in range(len(roll)):
            b = i // G_
            if bool(credit.skipped[b]):
                continue
            s = samples[b]
            out.append({"level": s.get("level"), "domain": s.get("domain"), "mode": batch.modes[i],
                        "correct": bool(credit.correct[i]), "tokens": len(roll.response_ids[i]),
                        "well_formed": bool(batch.well_formed[i]), "truncated": bool(roll.truncated[i])})

    # ------------------------------------------------------------------ loss
    @torch.no_grad()
    def reference_logprobs(self, roll: hf_rollout.Rollouts) -> torch.Tensor:
        """``log π_ref`` of the response tokens ``[N, T]`` (frozen reference, eval mode, no grad)."""
        lp = hf_rollout.response_logprobs(self.ref_model, roll.prompt_ids, roll.response_ids,
                                          pad_id=self.tokenizer.pad_token_id, temperature=self.temperature,
                                          batch_size=int(self.update_cfg.get("micro_batch_size", 64)))
        return torch.nn.functional.pad(lp, (0, roll.old_logp.shape[1] - lp.shape[1]))

    def micro_loss(self, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict, counts: G.GlobalCounts,
                   decision_weight: float) -> tuple[torch.Tensor, G.PolicyLossStats, torch.Tensor]:
        """Loss of one micro-batch (already divided by the mini-batch's global counts), its stats, and the
        summed entropy over its valid tokens. ``tensors``: ``old, adv, mask, ref, dec`` ``[N, T]`` (CPU)."""
        pad = self.tokenizer.pad_token_id
        pk = hf_rollout.pack([roll.prompt_ids[i] for i in rows], [roll.response_ids[i] for i in rows], pad,
                             device=self.device)
        T = pk.response_ids.shape[1]
        idx = torch.tensor(list(rows), dtype=torch.long)

        def sl(name):
            t = tensors.get(name)
            return None if t is None else t[idx, :T].to(self.device)

        old, adv, m, ref, dec = sl("old"), sl("adv"), sl("mask"), sl("ref"), sl("dec")
        kw = dict(self.loss_kw)
        if self.loss_impl == "triton":
            from kat_kernels.grpo import fused_policy_loss

            hidden = hf_rollout.response_hidden(self.model, pk)  # (n, T, H)
            w = G.aggregation_weights(m, kw["loss_agg"], counts=counts, norm_const=kw.get("norm_const"),
                                      decision_mask=dec, decision_weight=decision_weight)
            head = head_weight(self.model)  # gathered by the root forward of response_hidden
            out = fused_policy_loss(
                hidden, head.to(hidden.dtype), pk.response_ids, old, adv, m, ref_logp=ref, token_weights=w,
                temperature=self.temperature, clip_eps_low=kw["clip_eps_low"], clip_eps_high=kw["clip_eps_high"],
                clip_ratio_c=kw.get("clip_ratio_c"), log_ratio_clamp=kw.get("log_ratio_clamp", 20.0),
                kl_coef=kw.get("kl_coef", 0.0), kl_estimator=kw.get("kl_estimator", "k3"), compute_entropy=True,
            )
            stats = G.policy_stats(out.logp, old, adv, m, ref_logp=ref, clip_eps_low=kw["clip_eps_low"],
                                   clip_eps_high=kw["clip_eps_high"], clip_ratio_c=kw.get("clip_ratio_c"),
                                   log_ratio_clamp=kw.get("log_ratio_clamp", 20.0),
                                   kl_estimator=kw.get("kl_estimator", "k3"))
            ent = torch.where(m, out.entropy, 0.0).sum()
            return out.loss, stats, ent
        logits = hf_rollout.response_logits(self.model, pk)  # (n, T, V)
        logp = G.selective_log_softmax(logits, pk.response_ids, temperature=self.temperature)  # (n, T)
        loss, stats = G.policy_loss(logp, old, adv, m, ref_logp=ref, counts=counts, decision_mask=dec,
                                    decision_weight=decision_weight, **kw)
        with torch.no_grad():
            ent = torch.where(m, G.entropy_from_logits(logits.detach(), temperature=self.temperature), 0.0).sum()
        return loss, stats, ent

    def accumulate_gradients(self, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict,
                             decision_weight: float, micro_batch_size: int | None = None) -> dict:
        """Forward/backward of the rows of one optimizer step in micro-batches (rows sorted by length first, so
        a micro-batch pads little); gradients are *summed* into ``.grad`` and every micro-batch loss is
        normalised by the counts of all of ``rows`` (``global_counts``), so the result does not depend on
        ``micro_batch_size`` or the order. Returns summed stats."""
        mbs = int(micro_batch_size or self.update_cfg.get("micro_batch_size", 64))
        # rows of similar length share a micro-batch (less padding); the sum over micro-batches is order-free
        rows = sorted(rows, key=lambda i: (len(roll.prompt_ids[i]) + len(roll.response_ids[i]), i))
        micro = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
        idx = [torch.tensor(r, dtype=torch.long) for r in micro]
        masks = [tensors["mask"][i] for i in idx]
        decs = None if tensors.get("dec") is None else [tensors["dec"][i] for i in idx]
        counts = G.global_counts(masks, decision_masks=decs)
        acc = {"loss": 0.0, "tokens": 0.0, "entropy_sum": 0.0, "clip_frac": 0.0, "clip_frac_low": 0.0,
               "clip_frac_high": 0.0, "clip_frac_dual": 0.0, "approx_kl": 0.0, "kl": 0.0, "ratio_max": 0.0,
               "ratio_min": math.inf, "pg_loss": 0.0}
        for r in micro:
            loss, st, ent = self.micro_loss(roll, r, tensors, counts, decision_weight)
            if self._trainer is not None:
                self.manual_backward(loss)
            else:
                loss.backward()
            n = float(st.num_tokens)
            acc["loss"] += float(loss.detach())
            acc["pg_loss"] += float(st.pg_loss) if st.pg_loss is not None else float(loss.detach())
            acc["tokens"] += n
            acc["entropy_sum"] += float(ent)
            for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "approx_kl"):
                acc[k] += float(getattr(st, k)) * n
            if st.kl is not None:
                acc["kl"] += float(st.kl) * n
            if n > 0:
                acc["ratio_max"] = max(acc["ratio_max"], float(st.ratio_max))
                acc["ratio_min"] = min(acc["ratio_min"], float(st.ratio_min))
        return acc

    def update(self, roll: hf_rollout.Rollouts, credit: Credit) -> dict:
        """``ppo_epochs`` × ``mini_batches`` optimizer steps on the rollout batch; returns token-weighted stats."""
        G_ = self.group_size
        N = len(roll)
        ids, rmask = roll.response_tensors(self.tokenizer.pad_token_id)
        keep_rows = (~credit.skipped).repeat_interleave(G_)  # (N,)
        mask = rmask & keep_rows[:, None]  # (N, T)
        old = roll.old_logp
        if self.force:
            old = forced_token_old_logp(old, roll.forced, prob=0.5)
        tensors = {"old": old, "adv": credit.advantages.cpu().float(), "mask": mask,
                   "ref": self.reference_logprobs(roll) if self.ref_model is not None else None,
                   "dec": None if credit.decision_mask is None else credit.decision_mask.cpu() & mask}
        opt = self.optimizers()
        sch = self.lr_schedulers()
        ppo_epochs = int(self.update_cfg.get("ppo_epochs", 1))
        n_mb = int(self.update_cfg.get("mini_batches", 1))
        gc = self.update_cfg.get("grad_clip")
        n_groups = N // G_
        tot = {"tokens": 0.0}
        grad_norms = []
        for epoch in range(ppo_epochs):
            order = list(range(n_groups))
            if ppo_epochs > 1 or n_mb > 1:
                random.Random(f"kat-rl-mb/{self.seed}/{self.global_step}/{epoch}").shuffle(order)
            size = math.ceil(n_groups / n_mb)
            for c in range(0, n_groups, size):
                gids = order[c : c + size]
                rows = [g * G_ + j for g in gids for j in range(G_)]
                opt.zero_grad(set_to_none=True)
                # every rank runs the same collectives (global_counts): only a single process may skip
                if bool(mask[rows].any()) or _distributed():
                    st = self.accumulate_gradients(roll, rows, tensors, credit.decision_weight)
                    for k, v in st.items():
                        if k == "ratio_max":
                            tot[k] = max(tot.get(k, 0.0), v)
                        elif k == "ratio_min":
                            tot[k] = min(tot.get(k, math.inf), v)
                        else:
                            tot[k] = tot.get(k, 0.0) + v
                    grads = [p.grad for p in self.trainable_parameters() if p.grad is not None]
                    grad_norms.append(float(torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0)
                    if gc:
                        self.clip_gradients(opt, gradient_clip_val=float(gc), gradient_clip_algorithm="norm")
                # no valid token (every group skipped): no parameter has a gradient, AdamW skips them all, but the
                # step still counts so trainer.max_steps bounds the run
                opt.step()
                if sch is not None:
                    sch.step()
        tot["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
        tot["updates"] = ppo_epochs * math.ceil(n_groups / max(1, math.ceil(n_groups / n_mb)))
        return tot

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: list[dict], batch_idx: int):
        t_step = time.perf_counter()
        self.model.eval()  # no dropout in rollouts, recomputation and update alike (see the module docstring)
        samples = self.select_prompts(batch)
        if not samples:
            log.warning("no prompts left in play (History Resampling removed them all): stopping")
            self.trainer.should_stop = True
            return None
        col = self.collect(samples)
        self.record_history(col["history_records"])
        self._batches_done += 1
        t0 = time.perf_counter()
        if col["credit"] is not None:
            st = self.update(col["rollouts"], col["credit"])
        else:  # dynamic sampling kept nothing (on_unfilled=partial): an empty step
            opt = self.optimizers()
            opt.zero_grad(set_to_none=True)
            opt.step()
            st = {"tokens": 0.0, "grad_norm": 0.0, "updates": 1}
        t_update = time.perf_counter() - t0
        step_s = time.perf_counter() - t_step
        out = self.step_metrics(col, st)
        n_gen = sum(r["tokens"] for r in col["all_rows"])
        out.update({"timing/rollout_s": col["t_rollout"], "timing/grade_s": col["t_grade"],
                    "timing/update_s": t_update, "timing/step_s": step_s,
                    "perf/tokens_per_s": n_gen / max(step_s, 1e-9)})
        self.log_step_metrics(out)
        self.history.append({"step": int(self.global_step), **{k: v for k, v in out.items()
                                                                 if k.startswith("rl/") and "/domain_" not in k}})
        if self.log_samples and (self.global_step % 10 == 1 or self.global_step <= 1) and col["rollouts"] is not None:
            for t in col["rollouts"].texts[: self.log_samples]:
                log.info(f"[step {self.global_step}] sample: {t!r}")
        if self.global_step % 10 == 0 or self.global_step <= 1:
            log.info(f"[step {self.global_step}] reward={out.get('rl/reward_mean', float('nan')):.3f} "
                     f"acc={out['rl/acc']:.3f} think_on={out['rl/think_on_rate']:.3f} "
                     f"tokens={out['rl/tokens_mean']:.1f} ({step_s:.2f}s: rollout {col['t_rollout']:.2f}, grade "
                     f"{col['t_grade']:.2f}, update {t_update:.2f})")
        return None

    def log_step_metrics(self, out: dict[str, float]) -> None:
        """Log at ``global_step`` (the RL step just finished, 1-based; validation before the first update is step 0)
        straight through the loggers: Lightning's own step counter for ``self.log`` lags one batch behind here."""
        step = int(self.global_step)
        for lg in self.loggers:
            lg.log_metrics(out, step=step)
        for k, v in out.items():
            self.trainer.callback_metrics[k] = torch.tensor(v)

    def step_metrics(self, col: dict, st: dict) -> dict[str, float]:
        """The ``rl/*`` metrics of one step (DESIGN §6, docs/rl.md)."""
        rows = col["all_rows"]
        out: dict[str, float] = {}

        def block(rs: list[dict], suffix: str = "") -> None:
            n = len(rs)
            if n == 0:
                return
            out[f"rl/think_on_rate{suffix}"] = sum(r["mode"] == "on" for r in rs) / n
            out[f"rl/acc{suffix}"] = sum(r["correct"] for r in rs) / n
            out[f"rl/tokens_mean{suffix}"] = sum(r["tokens"] for r in rs) / n

        block(rows)
        if not rows:
            out.update({"rl/think_on_rate": 0.0, "rl/acc": 0.0, "rl/tokens_mean": 0.0})
        for lv in sorted({r["level"] for r in rows if r["level"] is not None}):
            block([r for r in rows if r["level"] == lv], f"/level_{lv}")
        for dom in sorted({r["domain"] for r in rows if r["domain"] is not None}):
            rs = [r for r in rows if r["domain"] == dom]
            out[f"rl/think_on_rate/domain_{dom}"] = sum(r["mode"] == "on" for r in rs) / len(rs)
        for mode in ("on", "off"):  # NaN when no rollout chose this mode (undefined, not 0)
            rs = [r for r in rows if r["mode"] == mode]
            out[f"rl/tokens_think_{mode}"] = sum(r["tokens"] for r in rs) / len(rs) if rs else math.nan
            out[f"rl/acc_think_{mode}"] = sum(r["correct"] for r in rs) / len(rs) if rs else math.nan
        if rows:
            out["rl/format_error_rate"] = sum(not r["well_formed"] for r in rows) / len(rows)
            out["rl/truncation_rate"] = sum(r["truncated"] for r in rows) / len(rows)
        credit: Credit | None = col["credit"]
        if credit is not None:
            G_ = self.group_size
            keep = (~credit.skipped).repeat_interleave(G_)
            if bool(keep.any()):
                out["rl/reward_mean"] = float(credit.reward[keep].mean())
                out["rl/reward_std"] = float(credit.reward[keep].std()) if int(keep.sum()) > 1 else 0.0
                out["rl/reward_answer"] = float(credit.answer_reward[keep].mean())
                if credit.judge_reward is not None:
                    out["rl/reward_judge"] = float(credit.judge_reward[keep].mean())
                cg = credit.correct.view(-1, G_)[~credit.skipped]  # (B', G)
                out["rl/frac_all_correct"] = float(cg.all(1).float().mean())
                out["rl/frac_all_wrong"] = float((~cg).all(1).float().mean())
                out["rl/frac_mixed"] = 1.0 - out["rl/frac_all_correct"] - out["rl/frac_all_wrong"]
            out["rl/skipped_groups"] = float(credit.skipped.sum())
        out["rl/frac_zero_std"] = col["zero_std"] / max(1, col["groups_seen"])
        out["rl/gen_rounds"] = float(col["rounds"])
        hr = self.history_resampler
        out["rl/resampled_out"] = float(hr.last_resampled_out) if hr is not None else 0.0
        if hr is not None:
            out["rl/resampled_total"] = float(len(hr.excluded))
        n = st.get("tokens", 0.0)
        if n > 0:
            out["rl/clip_frac"] = st["clip_frac"] / n
            out["rl/clip_frac_low"] = st["clip_frac_low"] / n
            out["rl/clip_frac_high"] = st["clip_frac_high"] / n
            out["rl/approx_kl"] = st["approx_kl"] / n
            out["rl/entropy"] = st["entropy_sum"] / n
            out["rl/ratio_max"] = st["ratio_max"]
            out["rl/pg_loss"] = st["pg_loss"] / max(1, st.get("updates", 1))
            out["train/loss"] = st["loss"] / max(1, st.get("updates", 1))  # pg + KL term, per optimizer step
            if self.ref_model is not None:
                out["rl/kl"] = st["kl"] / n
        out["rl/grad_norm"] = st.get("grad_norm", 0.0)
        g = col["grade"]
        out["rl/grade_timeouts"] = float(g["timeouts"])
        out["rl/grade_cache_hit_rate"] = g["cache_hits"] / max(1, len(rows) if rows else 1)
        return out

    # ------------------------------------------------------------------ checkpoint state
    def batches_consumed(self) -> int:
        """Prompt batches consumed so far (one per RL step, whatever the optimizer steps per batch)."""
        return int(self._batches_done)

    def frozen_models(self) -> list[torch.nn.Module]:
        return [self.ref_model] if self.ref_model is not None else []

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # RNG states
        checkpoint["kat_rl"] = {
            "batches_done": int(self._batches_done),
            "algorithm": self.algo,
            "history_resampler": None if self.history_resampler is None else self.history_resampler.state_dict(),
            "ref_acc": dict(self.ref_acc_cache),
            "history": list(self.history),
            "val_history": list(self.val_history),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        st = checkpoint.get("kat_rl")
        if st is None:
            log.warning("checkpoint has no RL state (kat_rl): resampling state and metric history start empty")
            return
        if st.get("history_resampler") is not None:
            if self.history_resampler is None:
                log.warning("checkpoint holds History Resampling state but algorithm.resampling.history is off: "
                            "ignored")
            else:
                self.history_resampler.load_state_dict(st["history_resampler"])
                log.info(f"restored History Resampling: epoch {self.history_resampler.epoch}, "
                         f"{len(self.history_resampler.excluded)} prompts excluded")
        self._batches_done = int(st.get("batches_done", checkpoint.get("global_step", 0)))
        self.ref_acc_cache = {str(k): float(v) for k, v in (st.get("ref_acc") or {}).items()}
        self.history = list(st.get("history") or [])
        self.val_history = list(st.get("val_history") or [])

    # ------------------------------------------------------------------ plots
    def write_plots(self, directory: Path) -> list[Path]:
        """Think-on rate and mean tokens per step, overall and per level (rollouts, moving average over 10
        steps; validation points as markers), plus accuracy; PNGs logged to MLflow under ``plots/``."""
        if not self.history:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from lightning.pytorch.loggers import MLFlowLogger

        directory.mkdir(parents=True, exist_ok=True)
        steps = [h["step"] for h in self.history]
        levels = sorted({int(k.rsplit("_", 1)[1]) for h in self.history for k in h if "/level_" in k})
        paths = []
        for metric, title, fname in (("think_on_rate", "think-on rate", "think_on_rate.png"),
                                     ("tokens_mean", "mean generated tokens", "tokens_mean.png"),
                                     ("acc", "accuracy", "accuracy.png")):
            fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
            cmap = plt.get_cmap("viridis")
            series = [("all", f"rl/{metric}", "black", 2.2)] + [
                (f"level {lv}", f"rl/{metric}/level_{lv}", cmap(k / max(1, len(levels) - 1)), 1.2)
                for k, lv in enumerate(levels)]
            for label, key, color, lw in series:
                xs = [s for s, h in zip(steps, self.history) if key in h]
                ys = [h[key] for h in self.history if key in h]
                if ys:
                    ax.plot(xs, _moving_average(ys, 10), label=label, color=color, linewidth=lw)
            for v in self.val_history:
                s = v["summary"]
                for k, lv in enumerate(levels):
                    b = s.get(f"level_{lv}")
                    if b is not None:
                        ax.scatter([v["step"]], [b[metric]], color=cmap(k / max(1, len(levels) - 1)), marker="o",
                                   s=18, zorder=3)
                if "all" in s:
                    ax.scatter([v["step"]], [s["all"][metric]], color="black", marker="D", s=22, zorder=3)
            ax.set_xlabel("RL step")
            ax.set_ylabel(title)
            ax.set_title(f"{title} per RL step ({self.algo})", fontsize=10)
            fig.text(0.01, 0.01, "lines: sampled rollouts, 10-step moving mean; markers: greedy held-out validation",
                     fontsize=7, color="0.35")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, ncol=2)
            fig.tight_layout()
            p = directory / fname
            fig.savefig(p)
            plt.close(fig)
            paths.append(p)
        for lg in self.loggers:
            if isinstance(lg, MLFlowLogger):
                for p in paths:
                    lg.experiment.log_artifact(lg.run_id, str(p), artifact_path="plots")
        log.info(f"plots: {', '.join(str(p) for p in paths)}")
        return paths


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _moving_average(ys: Sequence[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out
