"""Stage 3, RL (``+stage=rl``): Step-SRPO and the GRPO family over verifiable rewards, as a LightningModule.

The algorithm itself lives in :mod:`kat.rl` (no Lightning there); this module holds the Lightning hooks, the
engine, the grader and the checkpointed state. One RL step (:meth:`RL.training_step`, manual optimisation;
docs/rl.md):

1. **prompts** — the dataloader's batch of raw samples, minus prompts removed by SRPO History Resampling
   (topped up with random prompts still in play, so every step trains ``data.batch_size`` prompts;
   :func:`kat.rl.sampling.select_prompts`);
2. **rollout** — ``rollout.group_size`` temperature samples per prompt from the engine (``rollout=hf``: HF
   ``generate`` on the policy; ``rollout=vllm``: a colocated vLLM engine that receives the current weights),
   with the behaviour policy's per-token log-probs (``rollout.logprobs``);
3. **grade** — ``kat.rewards.grade_batch`` (bounded by ``reward.timeout_s`` per item), memoised by
   (sample, answer block) in :class:`kat.rewards.cache.GradeCache`;
4. **credit** — :func:`kat.rl.credit.assign_credit` (``algorithm.name``, settings ``algorithm.credit``): rewards
   and per-token advantages; DAPO dynamic sampling generates more rounds until the batch holds
   ``data.batch_size`` groups with non-zero accuracy std (:func:`kat.rl.sampling.collect`); groups with an
   ungradable sample are dropped from loss and metrics;
5. **update** — :func:`kat.rl.update.update`: ``update.ppo_epochs`` passes × ``update.mini_batches`` optimizer
   steps in micro-batches of ``update.micro_batch_size`` rows (exact token-mean whatever the split); optional
   in-loss KL to a frozen copy of the starting policy; ``loss.impl=auto|triton|torch`` picks the fused Triton
   loss (CUDA, token-level ratio, plain output head) or the torch reference, and logs which ran;
6. **log** — :func:`kat.rl.metrics.step_metrics` (``rl/*``) plus timings, at ``global_step``.

Validation (greedy, held-out split, ``val/*`` overall and per level) runs before the first update, every
``trainer.val_check_interval`` steps and after the last update. At the end, PNG plots of think-on rate and
mean tokens per step (overall and per level; :func:`kat.tracking.plots.plot_rl_history`) are written to
``<output>/plots`` and logged to MLflow. The History Resampling state, the AdaptThink reference accuracies and the
metric history are saved in the Lightning checkpoint, so ``ckpt_path=last`` resumes them.

The policy runs without dropout (``eval()`` mode) in rollouts, log-prob recomputation and update alike, so
with ``ppo_epochs = mini_batches = 1`` the importance ratio of the only update is 1 up to float noise.

Configuration is read in one place, :meth:`RL.__init__` via :meth:`RL.from_config`: ``algorithm.*`` (one
``conf/algorithm/<name>.yaml`` owns every setting of its estimator) -> :class:`kat.rl.credit` config,
:class:`kat.rl.sampling.SamplingConfig`, :func:`kat.rl.update.loss_kwargs`; ``stage.module.update`` ->
:class:`kat.rl.update.UpdateConfig`; ``reward.*`` -> verifier settings only.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Sequence

import torch

from kat import metrics
from kat.data import schema, templates
from kat.models.tokenizer import render_prompt
from kat.rewards.cache import GradeCache
from kat.rl import sampling as S
from kat.rl import update as U
from kat.rl.credit import (Credit, RolloutBatch, assign_credit, build_credit_config, is_correct,
                           segment_ids_from_tokens)
from kat.rl.metrics import step_metrics
from kat.rl.update import select_loss_impl
from kat.rollout import hf as hf_rollout
from kat.trainer import fsdp
from kat.stages.base import KatStage, as_dict
from kat.utils import get_logger

log = get_logger(__name__)


class RL(KatStage):
    """The RL stage (see the module docstring). Construct with :meth:`from_config`."""

    def __init__(self, model, tokenizer, *, optim: dict, val: dict, rollout, algorithm, reward, update,
                 loss_impl: str, seed: int, model_path: str | None, validate_at_start: bool, validate_at_end: bool,
                 plots: bool, log_samples: int):
        """``rollout``, ``algorithm``, ``reward``, ``update``: the typed config nodes (kat.rl.config schemas: every
        key is present, read by attribute) or objects with the same attributes."""
        super().__init__(model, tokenizer, optim=optim, val=val)
        self.automatic_optimization = False
        # ---- settings: the rl/ dataclasses, from the config groups (rollout, algorithm, reward, update)
        self.rollout_cfg = rollout
        self.reward_cfg = reward  # verifier settings (timeouts, workers, cache, math, code)
        self.seed = int(seed)
        self.model_path = model_path
        self.validate_at_start = bool(validate_at_start)
        self.validate_at_end = bool(validate_at_end)
        self.make_plots = bool(plots)
        self.log_samples = int(log_samples)

        self.algo = str(algorithm.name)
        self.credit_cfg = build_credit_config(algorithm)
        self.group_size = int(rollout.group_size)
        if self.group_size < 2:
            raise ValueError(f"rollout.group_size must be >= 2 (group-relative credit), got {self.group_size}")
        self.temperature = float(rollout.temperature)
        self.max_new_tokens = int(rollout.max_new_tokens)
        self.loss_kw = U.loss_kwargs(algorithm.loss, self.max_new_tokens)
        self.loss_impl_requested = str(loss_impl)
        self.loss_impl: str | None = None  # decided in on_fit_start (needs the device)
        self.update_cfg = U.UpdateConfig.from_config(update)
        self.sampling_cfg = S.SamplingConfig.from_algorithm(algorithm)
        self.history_resampler = S.HistoryResampler() if self.sampling_cfg.history else None
        self.dynamic_sampler = S.DynamicSampler(self.sampling_cfg.max_gen_batches) if self.sampling_cfg.dynamic \
            else None
        self.force = self.sampling_cfg.force_modes
        self.ref_acc_samples = int(algorithm.ref_acc.samples)
        self.ref_acc_mode = str(algorithm.ref_acc.mode)
        if self.algo == "adaptthink" and self.ref_acc_samples < 1:
            raise ValueError("algorithm=adaptthink needs algorithm.ref_acc.samples >= 1 (reference accuracy)")
        self.ref_acc_cache: dict[str, float] = {}
        # frozen reference (not a registered submodule: not optimised, not in the checkpoint; moved in on_fit_start)
        ref = copy.deepcopy(model).eval().requires_grad_(False) if U.wants_reference(algorithm) else None
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
    def from_config(cls, cfg, model, tokenizer) -> "RL":
        m = cfg.stage.module
        if cfg.rollout.engine == "vllm":
            from kat.rollout.vllm import INSTALL_HINT, VLLMUnavailableError, vllm_available

            if not vllm_available():
                raise VLLMUnavailableError(f"{INSTALL_HINT} (vllm is not installed)")
        path = cfg.model.path
        if not path:
            log.warning("RL from a model built from config (model.path is null): its rollouts are random text and "
                        "every reward is the format penalty; pass model.path=<ColdStart checkpoint> for a real run")
        return cls(
            model, tokenizer, optim=as_dict(cfg.optim), val=as_dict(m.val), rollout=cfg.rollout,
            algorithm=cfg.algorithm, reward=cfg.reward, update=m["update"],  # m.update: the mapping method
            loss_impl=str(cfg.loss.impl), seed=int(cfg.seed), model_path=path,
            validate_at_start=bool(m.validate_at_start), validate_at_end=bool(m.validate_at_end),
            plots=bool(m.plots), log_samples=int(m.log_samples),
        )

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: list[dict], batch_idx: int):
        t_step = time.perf_counter()
        self.model.eval()  # no dropout in rollouts, recomputation and update alike (see the module docstring)
        samples = self.select_prompts(batch)  # 1. prompts
        if not samples:
            log.warning("no prompts left in play (History Resampling removed them all): stopping")
            self.trainer.should_stop = True
            return None
        col = self.collect(samples)  # 2.-4. rollout -> grade -> credit (+ dynamic sampling rounds)
        self.record_history(col["history_records"])
        self._batches_done += 1
        t0 = time.perf_counter()
        st = self.update(col["rollouts"], col["credit"])  # 5. update
        t_update = time.perf_counter() - t0
        self.log_step(col, st, t_update=t_update, step_s=time.perf_counter() - t_step)  # 6. log
        return None

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self) -> None:
        # HF loads checkpoints in eval mode; training_step switches dropout off itself (no "eval mode" warning)
        self.model.train()
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        ratio_level = self.loss_kw["ratio_level"]
        self.loss_impl, why = select_loss_impl(self.loss_impl_requested, self.model, ratio_level)
        log.info(f"policy loss: {self.loss_impl} ({why}); algorithm={self.algo}, reference model: "
                 f"{'yes' if self.ref_model is not None else 'no'}")
        for lg in self.loggers:
            lg.log_hyperparams({"loss/impl_used": self.loss_impl})
        self.engine = self._build_engine()

    def _build_engine(self):
        engine = self.rollout_cfg.engine
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
        """``n`` random training samples still in play, deterministic in (seed, step, tag)."""
        return S.draw_prompts(self.prompt_pool(), n, exclude_ids, self.history_resampler,
                              f"kat-rl/{self.seed}/{self.global_step}/{tag}")

    def select_prompts(self, batch: Sequence[dict]) -> list[dict]:
        """The batch minus prompts removed by History Resampling, topped up to its size."""
        return S.select_prompts(batch, self.history_resampler, lambda n, ex: self._draw(n, ex, "topup"))

    def record_history(self, records: list[tuple[list[str], list[bool]]]) -> None:
        """Feed this step's records to History Resampling (under DDP: every rank's, so all exclude the same)."""
        S.record_history(self.history_resampler, records, self.group_size, distributed=U.distributed())

    # ------------------------------------------------------------------ rollouts, grading, credit
    def _render(self, samples: Sequence[dict]) -> list[str]:
        return [render_prompt(self.tokenizer, schema.prompt_messages(s)) for s in samples]

    def _sample(self, samples: Sequence[dict]) -> hf_rollout.Rollouts:
        rc = self.rollout_cfg
        fm = S.forced_modes(self.group_size, len(samples)) if self.force else None
        return self.engine.sample(
            self.model, self.tokenizer, self._render(samples), group_size=self.group_size,
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=float(rc.top_p),
            batch_size=int(rc.batch_size), force_modes=fm, max_judge_tokens=int(rc.max_judge_tokens),
            logprobs=str(rc.logprobs), logprob_batch_size=int(rc.logprob_batch_size),
        )

    def _grade(self, rows: Sequence[dict], texts: Sequence[str]) -> tuple[list, dict]:
        rw = self.reward_cfg
        scores, stats, hits = self.grade_cache.grade(
            rows, texts, use_cache=bool(rw.cache), max_workers=int(rw.workers),
            timeout_s=float(rw.timeout_s), code_cfg=rw.code, math_cfg=rw.math,
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
                batch_size=int(self.rollout_cfg.batch_size),
            )
            rows = [s for s in need for _ in range(k)]
            scores, _ = self._grade(rows, [c.text for c in comps])
            thr = float(self.credit_cfg.correct_threshold)
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
        """Rollout → grade → credit for one step (:func:`kat.rl.sampling.collect`, with DAPO dynamic sampling
        rounds when enabled)."""
        return S.collect(samples, group_size=self.group_size, cfg=self.sampling_cfg, dynamic=self.dynamic_sampler,
                         rollout=self._sample, grade=self._grade, credit=self._credit, draw=self._draw)

    # ------------------------------------------------------------------ update (kat.rl.update)
    def loss_spec(self) -> U.LossSpec:
        return U.LossSpec(kw=self.loss_kw, impl=str(self.loss_impl or "torch"), temperature=self.temperature,
                          pad_id=self.tokenizer.pad_token_id)

    def _backward(self):
        return self.manual_backward if self._trainer is not None else None

    def reference_logprobs(self, roll: hf_rollout.Rollouts) -> torch.Tensor:
        """``log π_ref`` of the response tokens ``[N, T]`` (frozen reference, eval mode, no grad)."""
        return U.reference_logprobs(self.ref_model, roll, pad_id=self.tokenizer.pad_token_id,
                                    temperature=self.temperature, batch_size=self.update_cfg.micro_batch_size)

    def micro_loss(self, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict, counts, decision_weight: float):
        return U.micro_loss(self.model, roll, rows, tensors, counts, decision_weight, loss=self.loss_spec(),
                            device=self.device)

    def accumulate_gradients(self, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict,
                             decision_weight: float, micro_batch_size: int | None = None) -> dict:
        """:func:`kat.rl.update.accumulate_gradients` on the policy (``manual_backward`` under a Trainer)."""
        return U.accumulate_gradients(self.model, roll, rows, tensors, decision_weight, loss=self.loss_spec(),
                                      micro_batch_size=int(micro_batch_size or self.update_cfg.micro_batch_size),
                                      device=self.device, backward=self._backward())

    def update(self, roll: hf_rollout.Rollouts | None, credit: Credit | None) -> dict:
        """:func:`kat.rl.update.update`: ``ppo_epochs`` × ``mini_batches`` optimizer steps on the rollout batch;
        returns token-weighted stats. No credit (dynamic sampling kept nothing, ``on_unfilled=partial``): an empty
        optimizer step, so ``trainer.max_steps`` still bounds the run."""
        opt = self.optimizers()
        if credit is None:
            opt.zero_grad(set_to_none=True)
            opt.step()
            return {"tokens": 0.0, "grad_norm": 0.0, "updates": 1}
        tensors = U.update_tensors(roll, credit, group_size=self.group_size, pad_id=self.tokenizer.pad_token_id,
                                   forced=self.force,
                                   ref_logp=self.reference_logprobs(roll) if self.ref_model is not None else None)
        return U.update(
            self.model, roll, tensors, credit.decision_weight, group_size=self.group_size, cfg=self.update_cfg,
            loss=self.loss_spec(), optimizer=opt, device=self.device, seed=self.seed,
            step=lambda: int(self.global_step), scheduler=self.lr_schedulers(),
            parameters=self.trainable_parameters, backward=self._backward(),
            clip=lambda v: self.clip_gradients(opt, gradient_clip_val=v, gradient_clip_algorithm="norm"),
        )

    # ------------------------------------------------------------------ logging
    def step_metrics(self, col: dict, st: dict) -> dict[str, float]:
        """The ``rl/*`` metrics of one step (:func:`kat.rl.metrics.step_metrics`; docs/rl.md)."""
        return step_metrics(col, st, group_size=self.group_size, history_resampler=self.history_resampler,
                            has_reference=self.ref_model is not None)

    def log_step(self, col: dict, st: dict, *, t_update: float, step_s: float) -> None:
        """Metrics and timings of the step just finished, to the loggers, the plot history and the log."""
        out = self.step_metrics(col, st)
        n_gen = sum(r.tokens for r in col["all_rows"])
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

    def log_step_metrics(self, out: dict[str, float]) -> None:
        """Log at ``global_step`` (the RL step just finished, 1-based; validation before the first update is step 0)
        straight through the loggers: Lightning's own step counter for ``self.log`` lags one batch behind here."""
        step = int(self.global_step)
        for lg in self.loggers:
            lg.log_metrics(out, step=step)
        for k, v in out.items():
            self.trainer.callback_metrics[k] = torch.tensor(v)

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
        """:func:`kat.tracking.plots.plot_rl_history` of this run; PNGs logged to MLflow under ``plots/``."""
        from lightning.pytorch.loggers import MLFlowLogger

        from kat.tracking import plots

        paths = plots.plot_rl_history(self.history, self.val_history, directory, self.algo)
        if not paths:
            return []
        for lg in self.loggers:
            if isinstance(lg, MLFlowLogger):
                for p in paths:
                    lg.experiment.log_artifact(lg.run_id, str(p), artifact_path="plots")
        log.info(f"plots: {', '.join(str(p) for p in paths)}")
        return paths


StepSRPO = RL  # the class's former name (kat.stages.step_srpo.StepSRPO)
