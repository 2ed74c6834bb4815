"""The policy update of one RL step: PPO passes over the rollout batch, in micro-batches, without Lightning.

The RL loss lives in two files: the per-token maths (ratio, clipping, aggregation, KL, entropy) in
:mod:`kat.losses.grpo` (and its fused Triton twin ``kat_kernels.grpo.fused_policy_loss``), and this file, which
feeds it the rollouts. Specification: ``docs/algorithms.md`` §5 (loss) and ``docs/rl.md`` (the update).

* :func:`loss_kwargs`, :func:`wants_reference`, :func:`select_loss_impl`: ``algorithm.loss`` and ``loss.impl``
  -> the loss settings (:class:`LossSpec`);
* :class:`UpdateConfig`: ``stage.module.update`` (``ppo_epochs``, ``mini_batches``, ``micro_batch_size``,
  ``grad_clip``);
* :func:`update_tensors`: the per-token inputs of the loss (behaviour log-probs, advantages, masks);
* :func:`micro_loss` -> :func:`accumulate_gradients` -> :func:`update`: one micro-batch's loss; the summed
  gradients of one optimizer step; ``ppo_epochs`` × ``mini_batches`` optimizer steps.

Every micro-batch loss is normalised by the counts of its whole mini-batch (``kat.losses.grpo.global_counts``)
and the gradients are *summed*, so the step's token-mean is exact whatever the split (Lightning's automatic
optimisation would average per micro-batch instead). The functions take the model, the rollouts, tensors and the
optimizer (anything with ``zero_grad``/``step``) plus optional ``backward``/``clip`` callables, so they run under
a Lightning module (``manual_backward``, ``clip_gradients``) and in a plain test alike.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kat.losses import grpo as G
from kat.models.forward import head_weight
from kat.rl.credit import Credit, forced_token_old_logp
from kat.rollout import hf as hf_rollout
from kat_kernels import interpreter_requested

__all__ = ["LOSS_IMPLS", "LOSS_KEYS", "LossSpec", "UpdateConfig", "accumulate_gradients", "distributed",
           "loss_kwargs", "micro_loss", "reference_logprobs", "select_loss_impl", "update", "update_tensors",
           "wants_reference"]

LOSS_IMPLS = ("auto", "triton", "torch")
LOSS_KEYS = ("clip_eps_low", "clip_eps_high", "clip_ratio_c", "log_ratio_clamp", "ratio_level", "loss_agg",
             "norm_const", "kl_coef", "kl_estimator")


# ==============================================================================================================
# settings
# ==============================================================================================================
def loss_kwargs(loss, max_new_tokens: int) -> dict:
    """``kat.losses.grpo.policy_loss`` keyword arguments from the typed ``algorithm.loss`` node (kat.rl.config:
    every key present; its schema rejects any other), read by attribute. ``norm_const`` null is the rollout budget,
    so ``seq-mean-token-sum-norm`` does not depend on the micro-batch's padded width."""
    kw = {k: getattr(loss, k) for k in LOSS_KEYS}
    if kw["norm_const"] is None:
        kw["norm_const"] = float(max_new_tokens)
    G._choice("algorithm.loss.loss_agg", kw["loss_agg"], G.LOSS_AGGREGATIONS)
    G._choice("algorithm.loss.ratio_level", kw["ratio_level"], G.RATIO_LEVELS)
    G._choice("algorithm.loss.kl_estimator", kw["kl_estimator"], G.KL_ESTIMATORS)
    return kw


def wants_reference(algorithm) -> bool:
    """Keep a frozen reference model: ``algorithm.loss.reference`` true/false, or auto (iff ``kl_coef > 0``);
    AdaptThink's reference accuracy (``algorithm.ref_acc.samples > 0``) always needs one. ``algorithm``: the typed
    node (kat.rl.config)."""
    loss = algorithm.loss
    ref = loss.reference
    if int(algorithm.ref_acc.samples or 0) > 0:
        return True
    if ref == "auto" or ref is None:
        return float(loss.kl_coef) != 0.0
    if not isinstance(ref, bool):
        raise ValueError(f"algorithm.loss.reference must be true, false or auto, got {ref!r}")
    if not ref and float(loss.kl_coef) != 0.0:
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
    interp = interpreter_requested()
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


@dataclass(frozen=True)
class LossSpec:
    """What :func:`micro_loss` needs besides the tensors: ``policy_loss`` keywords (:func:`loss_kwargs`), the
    implementation (``torch`` | ``triton``), the sampling temperature and the pad id."""

    kw: Mapping
    impl: str = "torch"
    temperature: float = 1.0
    pad_id: int = 0


@dataclass(frozen=True)
class UpdateConfig:
    """``stage.module.update``: ``ppo_epochs`` passes × ``mini_batches`` optimizer steps per rollout batch, in
    micro-batches of ``micro_batch_size`` rows; ``grad_clip`` = global grad-norm clip per optimizer step."""

    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 32  # conf/stage/rl.yaml's value (was 64 here)
    grad_clip: float | None = 1.0  # conf/stage/rl.yaml's value (was None here)

    def __post_init__(self) -> None:
        for k in ("ppo_epochs", "mini_batches", "micro_batch_size"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"stage.module.update.{k} must be >= 1, got {getattr(self, k)}")

    @classmethod
    def from_config(cls, update) -> "UpdateConfig":
        """From the typed ``stage.module.update`` node (kat.rl.config.RLUpdateConfig), read by attribute."""
        gc = update.grad_clip
        return cls(ppo_epochs=int(update.ppo_epochs), mini_batches=int(update.mini_batches),
                   micro_batch_size=int(update.micro_batch_size), grad_clip=None if not gc else float(gc))


def distributed() -> bool:
    """More than one process in an initialised default process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


# ==============================================================================================================
# the loss inputs
# ==============================================================================================================
@torch.no_grad()
def reference_logprobs(ref_model, roll: hf_rollout.Rollouts, *, pad_id: int, temperature: float,
                       batch_size: int) -> Tensor:
    """``log π_ref`` of the response tokens ``[N, T]`` (frozen reference, eval mode, no grad)."""
    lp = hf_rollout.response_logprobs(ref_model, roll.prompt_ids, roll.response_ids, pad_id=pad_id,
                                      temperature=temperature, batch_size=batch_size)
    return torch.nn.functional.pad(lp, (0, roll.old_logp.shape[1] - lp.shape[1]))


def update_tensors(roll: hf_rollout.Rollouts, credit: Credit, *, group_size: int, pad_id: int,
                   forced: bool = False, ref_logp: Tensor | None = None) -> dict:
    """The per-token inputs of the loss, ``[N, T]`` on the CPU: ``old`` (behaviour log-probs; AdaptThink's forced
    mode token gets ``log 0.5``), ``adv``, ``mask`` (response tokens of groups not skipped), ``ref`` and ``dec``
    (the decision-term tokens, or None)."""
    _, rmask = roll.response_tensors(pad_id)
    keep_rows = (~credit.skipped).repeat_interleave(group_size)  # (N,)
    mask = rmask & keep_rows[:, None]  # (N, T)
    old = roll.old_logp
    if forced:
        old = forced_token_old_logp(old, roll.forced, prob=0.5)
    return {"old": old, "adv": credit.advantages.cpu().float(), "mask": mask, "ref": ref_logp,
            "dec": None if credit.decision_mask is None else credit.decision_mask.cpu() & mask}


# ==============================================================================================================
# micro-batch -> optimizer step -> update
# ==============================================================================================================
def micro_loss(model, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict, counts: G.GlobalCounts,
               decision_weight: float, *, loss: LossSpec, device) -> tuple[Tensor, G.PolicyLossStats, Tensor]:
    """Loss of one micro-batch (already divided by the mini-batch's global counts), its stats, and the
    summed entropy over its valid tokens. ``tensors``: ``old, adv, mask, ref, dec`` ``[N, T]`` (CPU)."""
    pk = hf_rollout.pack([roll.prompt_ids[i] for i in rows], [roll.response_ids[i] for i in rows], loss.pad_id,
                         device=device)
    T = pk.response_ids.shape[1]
    idx = torch.tensor(list(rows), dtype=torch.long)

    def sl(name):
        t = tensors.get(name)
        return None if t is None else t[idx, :T].to(device)

    old, adv, m, ref, dec = sl("old"), sl("adv"), sl("mask"), sl("ref"), sl("dec")
    kw = dict(loss.kw)
    temperature = loss.temperature
    if loss.impl == "triton":
        from kat_kernels.grpo import fused_policy_loss

        hidden = hf_rollout.response_hidden(model, pk)  # (n, T, H)
        w = G.aggregation_weights(m, kw["loss_agg"], counts=counts, norm_const=kw["norm_const"],
                                  decision_mask=dec, decision_weight=decision_weight)
        head = head_weight(model)  # gathered by the root forward of response_hidden
        out = fused_policy_loss(
            hidden, head.to(hidden.dtype), pk.response_ids, old, adv, m, ref_logp=ref, token_weights=w,
            temperature=temperature, clip_eps_low=kw["clip_eps_low"], clip_eps_high=kw["clip_eps_high"],
            clip_ratio_c=kw["clip_ratio_c"], log_ratio_clamp=kw["log_ratio_clamp"],
            kl_coef=kw["kl_coef"], kl_estimator=kw["kl_estimator"], compute_entropy=True,
        )
        stats = G.policy_stats(out.logp, old, adv, m, ref_logp=ref, clip_eps_low=kw["clip_eps_low"],
                               clip_eps_high=kw["clip_eps_high"], clip_ratio_c=kw["clip_ratio_c"],
                               log_ratio_clamp=kw["log_ratio_clamp"],
                               kl_estimator=kw["kl_estimator"])
        ent = torch.where(m, out.entropy, 0.0).sum()
        return out.loss, stats, ent
    logits = hf_rollout.response_logits(model, pk)  # (n, T, V)
    logp = G.selective_log_softmax(logits, pk.response_ids, temperature=temperature)  # (n, T)
    lo, stats = G.policy_loss(logp, old, adv, m, ref_logp=ref, counts=counts, decision_mask=dec,
                              decision_weight=decision_weight, **kw)
    with torch.no_grad():
        ent = torch.where(m, G.entropy_from_logits(logits.detach(), temperature=temperature), 0.0).sum()
    return lo, stats, ent


def accumulate_gradients(model, roll: hf_rollout.Rollouts, rows: Sequence[int], tensors: dict,
                         decision_weight: float, *, loss: LossSpec, micro_batch_size: int, device,
                         backward: Callable[[Tensor], None] | None = None) -> dict:
    """Forward/backward of the rows of one optimizer step in micro-batches (rows sorted by length first, so
    a micro-batch pads little); gradients are *summed* into ``.grad`` and every micro-batch loss is
    normalised by the counts of all of ``rows`` (``global_counts``), so the result does not depend on
    ``micro_batch_size`` or the order. ``backward(loss)`` defaults to ``loss.backward()``. Returns summed stats."""
    mbs = int(micro_batch_size)
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
        lo, st, ent = micro_loss(model, roll, r, tensors, counts, decision_weight, loss=loss, device=device)
        if backward is not None:
            backward(lo)
        else:
            lo.backward()
        n = float(st.num_tokens)
        acc["loss"] += float(lo.detach())
        acc["pg_loss"] += float(st.pg_loss) if st.pg_loss is not None else float(lo.detach())
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


def _grad_norm(params: Iterable[torch.nn.Parameter]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0


def update(model, roll: hf_rollout.Rollouts, tensors: dict, decision_weight: float, *, group_size: int,
           cfg: UpdateConfig, loss: LossSpec, optimizer, device, seed: int = 0,
           step: int | Callable[[], int] = 0, scheduler=None,
           parameters: Callable[[], Iterable[torch.nn.Parameter]] | None = None,
           backward: Callable[[Tensor], None] | None = None,
           clip: Callable[[float], None] | None = None) -> dict:
    """``cfg.ppo_epochs`` × ``cfg.mini_batches`` optimizer steps on the rollout batch (groups shuffled per pass,
    deterministic in ``(seed, step, epoch)``, when there is more than one step); returns token-weighted stats.
    ``step``: the optimizer steps taken so far, or a callable read at each pass (Lightning's ``global_step``, which
    each ``optimizer.step()`` advances).

    ``optimizer``: ``zero_grad(set_to_none=True)`` and ``step()``; ``scheduler.step()`` after each; ``parameters()``
    the trainable parameters (grad norm; default: those of ``model`` that require grad); ``clip(max_norm)``
    (default ``torch.nn.utils.clip_grad_norm_`` over ``parameters()``) when ``cfg.grad_clip`` is set."""
    step_now = step if callable(step) else (lambda: step)
    params = parameters or (lambda: [p for p in model.parameters() if p.requires_grad])
    if clip is None:
        def clip(max_norm: float) -> None:
            torch.nn.utils.clip_grad_norm_(list(params()), max_norm)
    N = len(roll)
    mask = tensors["mask"]
    n_groups = N // group_size
    n_mb = cfg.mini_batches
    tot: dict = {"tokens": 0.0}
    grad_norms = []
    for epoch in range(cfg.ppo_epochs):
        order = list(range(n_groups))
        if cfg.ppo_epochs > 1 or n_mb > 1:
            random.Random(f"kat-rl-mb/{seed}/{step_now()}/{epoch}").shuffle(order)
        size = math.ceil(n_groups / n_mb)
        for c in range(0, n_groups, size):
            gids = order[c : c + size]
            rows = [g * group_size + j for g in gids for j in range(group_size)]
            optimizer.zero_grad(set_to_none=True)
            # every rank runs the same collectives (global_counts): only a single process may skip
            if bool(mask[rows].any()) or distributed():
                st = accumulate_gradients(model, roll, rows, tensors, decision_weight, loss=loss,
                                          micro_batch_size=cfg.micro_batch_size, device=device, backward=backward)
                for k, v in st.items():
                    if k == "ratio_max":
                        tot[k] = max(tot.get(k, 0.0), v)
                    elif k == "ratio_min":
                        tot[k] = min(tot.get(k, math.inf), v)
                    else:
                        tot[k] = tot.get(k, 0.0) + v
                grad_norms.append(_grad_norm(params()))
                if cfg.grad_clip:
                    clip(float(cfg.grad_clip))
            # no valid token (every group skipped): no parameter has a gradient, AdamW skips them all, but the
            # step still counts so trainer.max_steps bounds the run
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
    tot["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else 0.0
    tot["updates"] = cfg.ppo_epochs * math.ceil(n_groups / max(1, math.ceil(n_groups / n_mb)))
    return tot
