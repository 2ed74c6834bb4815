"""Triton kernels for GRPO-family RL (import name ``kat_kernels.grpo``; imports only torch and triton).

Math and departures: ``docs/algorithms.md`` §2, §3, §4, §6.4 and §9. The pure-torch twins (the oracles the tests
compare against) are ``kat.losses.grpo.group_advantages``, ``kat.rl.credit.step_credit_advantages`` and
``kat.losses.grpo.policy_loss_from_hidden``.

* :func:`group_advantages` (contract, same signature and result as the reference)::

      c_i = r_i − mean_g (or the leave-one-out mean);  A_i = c_i/(std_g + eps) | c_i/(std_batch + eps) | c_i

  One launch over tiles of ``[BLOCK_B groups, BLOCK_G]`` computes the mean (shifted by the group's first reward,
  so equal rewards give exactly 0), the Bessel std, the scale and eps. ``scale="batch"`` is two launches: a
  one-program reduction for the batch mean and Bessel std, then the tile kernel. ``G == 1`` launches nothing.

* :func:`step_credit_advantages`: per-token Step-SRPO advantage ``[B*G, T]`` (judge advantage on segment 1,
  answer advantage on segment 2, 0 elsewhere) in one launch over (group, column tile); from segment ids or from
  boundaries + response mask. ``scale="batch"``: one extra reduction launch for both batch stds.

* :func:`fused_policy_loss`: the clipped policy loss (+ optional KL to a reference) straight from hidden states
  and the output-head weight, Liger's fused-linear pattern. Per row chunk: ``z = h_c·Wᵀ`` (one GEMM, input
  dtype), then a row kernel with an online max / sum / Σp·z over the vocabulary gives ``lse``, the sampled
  token's ``logπ = z_y/τ − lse``, the entropy ``lse − E_p[z/τ]``, the per-token loss and
  ``g = ∂L/∂logπ`` (zero where a clip or clamp binds), and overwrites ``z`` with ``∂L/∂z = g·(onehot_y − p)/τ``;
  then ``∂L/∂h_c = ∂L/∂z·W`` and ``∂L/∂W += (∂L/∂z)ᵀ·h_c``. The gradients are finished in the forward and only
  scaled by the upstream gradient in the backward; the ``[N, V]`` log-probs never exist.

Kernels never fall back: CPU tensors are refused unless Triton runs in interpreter mode (``TRITON_INTERPRET=1``
set before this module is imported), which is how the tests run on CPU.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from kat_kernels import interpreter_requested

__all__ = [
    "FusedPolicyLoss",
    "FusedPolicyLossFunction",
    "fused_policy_loss",
    "group_advantages",
    "step_credit_advantages",
]

# Triton decides interpreter mode when the @triton.jit decorators below run, i.e. now.
_INTERPRET = interpreter_requested()

_SCALES = {"group": 0, "batch": 1, "none": 2}
_BASELINES = {"mean": False, "loo": True}
_KL = {"k1": 1, "k2": 2, "k3": 3, "k3+": 4}
_TILE = 4096  # elements per program tile in the advantage kernels


# ==============================================================================================================
# kernels
# ==============================================================================================================
@triton.jit
def _batch_std_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Program k: Bessel std of row k of a contiguous ``[K, n]`` array, mean shifted by its first entry."""
    pid = tl.program_id(0).to(tl.int64)
    base = x_ptr + pid * n
    shift = tl.load(base).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < n
        x = tl.load(base + offs, mask=msk, other=0.0).to(tl.float32)
        acc += tl.where(msk, x - shift, 0.0)
    mean = shift + tl.sum(acc, axis=0) / n
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        msk = offs < n
        x = tl.load(base + offs, mask=msk, other=0.0).to(tl.float32)
        d = tl.where(msk, x - mean, 0.0)
        acc2 += d * d
    tl.store(out_ptr + pid, tl.sqrt(tl.sum(acc2, axis=0) / (n - 1)))


@triton.jit
def _group_adv_kernel(
    r_ptr, out_ptr, bstd_ptr, n_groups, G, eps,
    SCALE: tl.constexpr, LOO: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """One tile of ``BLOCK_B`` groups × ``BLOCK_G`` rollouts: ``A = (r − baseline)/(std + eps)``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,) group index
    cols = tl.arange(0, BLOCK_G)  # (BLOCK_G,) rollout in group
    rmask = rows < n_groups
    m = rmask[:, None] & (cols < G)[None, :]
    offs = rows[:, None] * G + cols[None, :]
    r = tl.load(r_ptr + offs, mask=m, other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_G)
    shift = tl.load(r_ptr + rows * G, mask=rmask, other=0.0).to(tl.float32)  # (BLOCK_B,)
    dev = tl.where(m, r - shift[:, None], 0.0)
    dsum = tl.sum(dev, axis=1)
    mean = shift + dsum / G
    d = tl.where(m, r - mean[:, None], 0.0)
    if LOO:
        centred = dev - (dsum[:, None] - dev) / (G - 1)
    else:
        centred = d
    if SCALE == 0:
        std = tl.sqrt(tl.sum(d * d, axis=1) / (G - 1))
        adv = centred / (std[:, None] + eps)
    elif SCALE == 1:
        adv = centred / (tl.load(bstd_ptr) + eps)
    else:
        adv = centred
    tl.store(out_ptr + offs, adv, mask=m)


@triton.jit
def _group_adv_vec(r_ptr, base, G, eps, bstd, SCALE: tl.constexpr, BLOCK_G: tl.constexpr):
    """Advantages ``(BLOCK_G,)`` of the group starting at row ``base`` (mean baseline)."""
    cols = tl.arange(0, BLOCK_G)
    m = cols < G
    r = tl.load(r_ptr + base + cols, mask=m, other=0.0).to(tl.float32)
    shift = tl.load(r_ptr + base).to(tl.float32)
    mean = shift + tl.sum(tl.where(m, r - shift, 0.0), axis=0) / G
    d = tl.where(m, r - mean, 0.0)
    if SCALE == 0:
        adv = d / (tl.sqrt(tl.sum(d * d, axis=0) / (G - 1)) + eps)
    elif SCALE == 1:
        adv = d / (bstd + eps)
    else:
        adv = d
    return adv


@triton.jit
def _step_credit_kernel(
    j_ptr, a_ptr, seg_ptr, bnd_ptr, mask_ptr, out_ptr, bstd_ptr,
    G, T, seg_stride, mask_stride, eps,
    SCALE: tl.constexpr, FROM_BOUNDARIES: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Program (group b, column tile c): writes ``out[b*G : b*G+G, c*BLOCK_T : (c+1)*BLOCK_T]``."""
    b = tl.program_id(0).to(tl.int64)
    base = b * G
    if SCALE == 1:
        bstd_j = tl.load(bstd_ptr)
        bstd_a = tl.load(bstd_ptr + 1)
    else:
        bstd_j = 0.0
        bstd_a = 0.0
    adv_j = _group_adv_vec(j_ptr, base, G, eps, bstd_j, SCALE, BLOCK_G)  # (BLOCK_G,)
    adv_a = _group_adv_vec(a_ptr, base, G, eps, bstd_a, SCALE, BLOCK_G)
    rows = base + tl.arange(0, BLOCK_G)  # (BLOCK_G,) rollout rows
    cols = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    m = (tl.arange(0, BLOCK_G) < G)[:, None] & (cols < T)[None, :]
    if FROM_BOUNDARIES:
        k = tl.load(bnd_ptr + rows, mask=tl.arange(0, BLOCK_G) < G, other=0)
        valid = tl.load(mask_ptr + rows[:, None] * mask_stride + cols[None, :], mask=m, other=0) != 0
        seg = tl.where(valid, tl.where(cols[None, :] < k[:, None], 1, 2), 0)
    else:
        seg = tl.load(seg_ptr + rows[:, None] * seg_stride + cols[None, :], mask=m, other=0)
    out = tl.where(seg == 1, adv_j[:, None], tl.where(seg == 2, adv_a[:, None], 0.0))
    tl.store(out_ptr + rows[:, None] * T + cols[None, :], out, mask=m)


@triton.jit
def _policy_row_kernel(
    z_ptr, z_stride, y_ptr, old_ptr, adv_ptr, w_ptr, ref_ptr, loss_ptr, logp_ptr, ent_ptr,
    V, inv_temp, eps_low, eps_high, clip_c, log_ratio_clamp, kl_coef,
    USE_DUAL: tl.constexpr, KL_EST: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One token row of a chunk. Reads the logits row ``z``, writes loss/logπ/entropy and (with COMPUTE_GRAD)
    overwrites ``z`` with ``∂L/∂z``. ``w`` is the token's aggregation weight (0 = no loss, no gradient)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    y = tl.load(y_ptr + row).to(tl.int64)
    y = tl.where((y >= 0) & (y < V), y, 0)  # masked rows may carry any id (e.g. -100); their weight is 0
    w = tl.load(w_ptr + row).to(tl.float32)
    active = w != 0.0

    # pass 1: online max m, Σ exp(x − m) = s, Σ exp(x − m)·x = t over the row (x = z/τ)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        msk = offs < V
        x = tl.load(z_row + offs, mask=msk, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.where(msk, tl.exp(x - m_new), 0.0)
        s = s * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * tl.where(msk, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    entropy = lse - t / s
    logp = tl.load(z_row + y).to(tl.float32) * inv_temp - lse

    # clipped surrogate and its derivative w.r.t. logπ
    old = tl.load(old_ptr + row).to(tl.float32)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    diff = logp - old
    lr = tl.minimum(tl.maximum(diff, -log_ratio_clamp), log_ratio_clamp)
    in_range = (diff >= -log_ratio_clamp) & (diff <= log_ratio_clamp)
    ratio = tl.exp(lr)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    pg = tl.maximum(-adv * ratio, -adv * clipped_ratio)
    clipped = ((adv > 0.0) & (ratio > 1.0 + eps_high)) | ((adv < 0.0) & (ratio < 1.0 - eps_low))
    dpg = tl.where(clipped | (~in_range), 0.0, -adv * ratio)
    if USE_DUAL:
        pg3 = -adv * clip_c
        dual = (adv < 0.0) & (pg > pg3)
        pg = tl.where(dual, pg3, pg)
        dpg = tl.where(dual, 0.0, dpg)
    loss_tok = pg
    dloss = dpg
    if KL_EST != 0:
        # d = log π − log π_ref (a scalar; named apart from the block-valued x of the loops: the compiler
        # refuses a name that changes from scalar to block inside a later loop)
        d = logp - tl.load(ref_ptr + row).to(tl.float32)
        if KL_EST == 1:
            kl = d
            dkl = 1.0
        elif KL_EST == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            xc = tl.minimum(tl.maximum(d, -20.0), 20.0)
            ex = tl.exp(-xc)
            raw = ex - 1.0 + xc
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            if KL_EST == 3:
                inside = (d >= -20.0) & (d <= 20.0) & (raw >= -10.0) & (raw <= 10.0)
                dkl = tl.where(inside, 1.0 - ex, 0.0)
            else:  # k3+: k3 value, k2 gradient
                dkl = d
        loss_tok = loss_tok + kl_coef * kl
        dloss = dloss + kl_coef * dkl
    tl.store(loss_ptr + row, tl.where(active, w * loss_tok, 0.0))
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, entropy)

    if COMPUTE_GRAD:
        # pass 2: ∂L/∂z_v = g·(1[v = y] − p_v)/τ, written over the logits
        gs = tl.where(active, w * dloss, 0.0) * inv_temp
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            msk = offs < V
            x = tl.load(z_row + offs, mask=msk, other=0.0).to(tl.float32) * inv_temp
            dz = -gs * tl.exp(x - lse)
            dz = tl.where(offs == y, dz + gs, dz)
            tl.store(z_row + offs, dz.to(z_ptr.dtype.element_ty), mask=msk)


# ==============================================================================================================
# host-side helpers
# ==============================================================================================================
def _check_device(*tensors: Tensor) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(
                f"kat_kernels.grpo needs CUDA tensors, got a tensor on {t.device}; on CPU set TRITON_INTERPRET=1 "
                "before importing kat_kernels (tests) or use the torch reference (loss.impl=torch)"
            )


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_group_args(rewards: Tensor, group_size: int, eps: float) -> None:
    if not isinstance(rewards, Tensor):
        raise TypeError(f"rewards must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G] (prompt-major), got shape {tuple(rewards.shape)}")
    if rewards.is_complex():
        raise TypeError(f"rewards must be real, got {rewards.dtype}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}")
    if not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")


def _float_rewards(*rewards: Tensor) -> Tensor | tuple[Tensor, ...]:
    """Float, contiguous copies of the reward vectors, checked finite with one host sync for all of them."""
    rs = tuple((r if r.dtype.is_floating_point else r.float()).contiguous() for r in rewards)
    finite = torch.stack([torch.isfinite(r).all() for r in rs]) if len(rs) > 1 else torch.isfinite(rs[0]).all()
    if not bool(finite.all()):
        raise ValueError("rewards must be finite (drop ungradable groups before computing advantages)")
    return rs if len(rs) > 1 else rs[0]


def _batch_stds(stack: Tensor) -> Tensor:
    """``[K, n]`` -> ``[K]`` fp32 Bessel stds, one program per row."""
    out = torch.empty(stack.shape[0], dtype=torch.float32, device=stack.device)
    n = stack.shape[1]
    _batch_std_kernel[(stack.shape[0],)](stack, out, n, BLOCK=min(1024, triton.next_power_of_2(n)))
    return out


# ==============================================================================================================
# public API
# ==============================================================================================================
def group_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6, scale: str = "group", baseline: str = "mean"
) -> Tensor:
    """Triton twin of ``kat.losses.grpo.group_advantages`` (contract): same arguments, same result (fp32 math,
    returned in the rewards' dtype, fp32 for integer/bool rewards). See the module docstring for launches."""
    _check_group_args(rewards, group_size, eps)
    _choice("scale", scale, _SCALES)
    _choice("baseline", baseline, _BASELINES)
    out_dtype = rewards.dtype if rewards.dtype.is_floating_point else torch.float32
    if group_size == 1 or rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=out_dtype, device=rewards.device)
    _check_device(rewards)
    r = _float_rewards(rewards)
    G = group_size
    n_groups = r.numel() // G
    block_g = triton.next_power_of_2(G)
    block_b = max(1, min(triton.next_power_of_2(n_groups), _TILE // block_g))
    bstd = _batch_stds(r.view(1, -1)) if scale == "batch" else r
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    _group_adv_kernel[(triton.cdiv(n_groups, block_b),)](
        r, out, bstd, n_groups, G, float(eps),
        SCALE=_SCALES[scale], LOO=_BASELINES[baseline], BLOCK_B=block_b, BLOCK_G=block_g,
    )
    return out.to(out_dtype)


def step_credit_advantages(
    judge_rewards: Tensor,
    answer_rewards: Tensor,
    segment_ids: Tensor | None,
    group_size: int,
    *,
    boundaries: Tensor | None = None,
    response_mask: Tensor | None = None,
    eps: float = 1e-6,
    scale: str = "group",
) -> Tensor:
    """Triton twin of ``kat.rl.credit.step_credit_advantages``: ``[B*G, T]`` fp32 with the judge
    advantage on segment 1, the answer advantage on segment 2 and 0 elsewhere; segments from ``segment_ids``
    or from ``boundaries [B*G]`` (first column of segment 2) and ``response_mask [B*G, T]``."""
    if judge_rewards.shape != answer_rewards.shape or judge_rewards.dim() != 1:
        raise ValueError(
            f"judge_rewards and answer_rewards must both be [B*G], got {tuple(judge_rewards.shape)} "
            f"and {tuple(answer_rewards.shape)}"
        )
    rows = judge_rewards.shape[0]
    _check_group_args(judge_rewards, group_size, eps)
    _choice("scale", scale, _SCALES)
    if segment_ids is not None:
        if boundaries is not None or response_mask is not None:
            raise ValueError("give either segment_ids or (boundaries, response_mask), not both")
        if segment_ids.dim() != 2 or segment_ids.shape[0] != rows:
            raise ValueError(f"segment_ids must be [{rows}, T], got shape {tuple(segment_ids.shape)}")
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        if segment_ids.numel() and bool(((segment_ids < 0) | (segment_ids > 2)).any()):
            raise ValueError("segment_ids must hold only 0 (padding), 1 (judge + mode) or 2 (thinking/answer)")
        T = segment_ids.shape[1]
        dev = segment_ids.device
    else:
        if boundaries is None or response_mask is None:
            raise ValueError("segment_ids is None: boundaries and response_mask are both required")
        if response_mask.dim() != 2 or response_mask.shape[0] != rows:
            raise ValueError(f"response_mask must be [{rows}, T], got shape {tuple(response_mask.shape)}")
        if boundaries.shape != (rows,):
            raise ValueError(f"boundaries must be [{rows}], got shape {tuple(boundaries.shape)}")
        T = response_mask.shape[1]
        dev = response_mask.device
    if group_size == 1 or rows == 0 or T == 0:
        return torch.zeros((rows, T), dtype=torch.float32, device=dev)  # advantages are 0 everywhere
    _check_device(judge_rewards, answer_rewards, segment_ids, boundaries, response_mask)
    j, a = _float_rewards(judge_rewards, answer_rewards)  # one finiteness check (one host sync) for both
    j, a = j.to(dev), a.to(dev)
    # every element is written by the kernel (its grid covers all rows and columns): no memset needed
    out = torch.empty((rows, T), dtype=torch.float32, device=dev)
    G = group_size
    bstd = _batch_stds(torch.stack([j.float(), a.float()])) if scale == "batch" else j
    block_g = triton.next_power_of_2(G)
    block_t = max(1, min(triton.next_power_of_2(T), _TILE // block_g))
    if segment_ids is not None:
        seg = segment_ids.contiguous()
        bnd, msk, seg_stride, mask_stride = seg, seg, seg.stride(0), 0
    else:
        msk = response_mask.contiguous()
        msk = msk.view(torch.uint8) if msk.dtype == torch.bool else msk
        bnd = boundaries.to(device=dev, dtype=torch.int64).contiguous()
        seg, seg_stride, mask_stride = bnd, 0, msk.stride(0)
    _step_credit_kernel[(rows // G, triton.cdiv(T, block_t))](
        j, a, seg, bnd, msk, out, bstd, G, T, seg_stride, mask_stride, float(eps),
        SCALE=_SCALES[scale], FROM_BOUNDARIES=segment_ids is None, BLOCK_G=block_g, BLOCK_T=block_t,
    )
    return out


class FusedPolicyLoss(NamedTuple):
    """Result of :func:`fused_policy_loss` (fields as ``kat.losses.grpo.HiddenPolicyLoss``)."""

    loss: Tensor  # () Σ w·(pg + kl_coef·kl), differentiable w.r.t. hidden and weight
    logp: Tensor  # (...) fp32 log-prob of the sampled tokens (no grad)
    entropy: Tensor | None  # (...) fp32 entropy (no grad), None unless compute_entropy


def _default_chunk(n_rows: int, vocab: int, elt: int) -> int:
    """Rows per chunk: the largest power of two whose logits stay within 256 MiB, at least 16."""
    rows = max(16, 1 << max(0, int(math.floor(math.log2(max(1, (256 << 20) // (vocab * elt)))))))
    return min(rows, max(1, n_rows))


class FusedPolicyLossFunction(torch.autograd.Function):
    """``forward(hidden [N, H], weight [V, H], tokens, old_logp, advantages, token_weights, ref_logp [N], ...)``
    -> ``(loss (), logp [N], entropy [N])``; gradients for ``hidden`` and ``weight`` only."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, old_logp, advantages, token_weights, ref_logp, temperature,
                clip_eps_low, clip_eps_high, clip_ratio_c, log_ratio_clamp, kl_coef, kl_est, chunk_size,
                grad_weight_fp32):
        N, H = hidden.shape
        V = weight.shape[0]
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        compute_grad = need_h or need_w
        dev = hidden.device
        loss_rows = torch.empty(N, dtype=torch.float32, device=dev)
        logp = torch.empty(N, dtype=torch.float32, device=dev)
        ent = torch.empty(N, dtype=torch.float32, device=dev)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32 if grad_weight_fp32 else weight.dtype, device=dev)
        block_v = min(8192, triton.next_power_of_2(V))
        num_warps = 8 if block_v >= 4096 else 4
        ref = ref_logp if ref_logp is not None else old_logp
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            h_c = hidden[s:e]  # (n, H)
            z = h_c @ weight.t()  # (n, V) input dtype, contiguous
            _policy_row_kernel[(e - s,)](
                z, z.stride(0), tokens[s:e], old_logp[s:e], advantages[s:e], token_weights[s:e], ref[s:e],
                loss_rows[s:e], logp[s:e], ent[s:e],
                V, 1.0 / temperature, clip_eps_low, clip_eps_high,
                clip_ratio_c if clip_ratio_c is not None else 0.0, log_ratio_clamp, kl_coef,
                USE_DUAL=clip_ratio_c is not None, KL_EST=kl_est, COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
                num_warps=num_warps,
            )
            if need_h:
                torch.mm(z, weight, out=grad_h[s:e])  # (n, H)
            if need_w:
                if grad_w.dtype == z.dtype:
                    grad_w.addmm_(z.t(), h_c)  # (V, H)
                else:
                    grad_w.add_(z.t() @ h_c)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(logp, ent)
        return loss_rows.sum(), logp, ent

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_ent):
        # the saved gradients are scaled in place (no extra [V, H] buffer), so a second backward would be wrong
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("fused_policy_loss supports one backward per forward (no retain_graph reuse)")
        ctx.backward_done = True
        grad_h, grad_w = ctx.saved_tensors
        gh = gw = None
        if grad_h is not None:
            gh = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            gw = grad_w.mul_(grad_loss.to(grad_w.dtype)).to(ctx.weight_dtype)
        return (gh, gw) + (None,) * 14


def fused_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    num_tokens: Tensor | float | None = None,
    token_weights: Tensor | None = None,
    temperature: float = 1.0,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float = 20.0,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    compute_entropy: bool = False,
    chunk_size: int | None = None,
    grad_weight_fp32: bool = False,
) -> FusedPolicyLoss:
    """Fused clipped policy loss from hidden states (twin of ``kat.losses.grpo.policy_loss_from_hidden``).

    ``hidden [..., H]``, ``weight [V, H]`` (the output head); ``tokens`` (sampled ids), ``old_logp``,
    ``advantages`` (per token), ``mask``, ``ref_logp``, ``token_weights``: ``[...]``. Per token
    ``ℓ = max(−A·ρ, −A·clip(ρ, 1−eps_low, 1+eps_high))`` (then ``min(·, −A·c)`` for ``A < 0`` with the dual clip)
    ``+ kl_coef·kl``, ``ρ = exp(clamp(logπ − logπ_old, ±log_ratio_clamp))``; ``loss = Σ w·ℓ`` with
    ``w = token_weights·mask`` if given, else ``mask/num_tokens`` (token-mean; pass the step-global count from
    ``kat.losses.grpo.global_counts``; default: this call's valid tokens). Token-level ratio only.

    ``grad_weight_fp32`` accumulates the head gradient over chunks in fp32 (slower, more exact for bf16);
    the default accumulates in the weight's dtype as Liger does. Stats (clip fractions, ratios, KL) come from
    ``kat.losses.grpo.policy_stats`` on the returned ``logp``.
    """
    if hidden.dim() < 2 or hidden.shape[:-1] != tokens.shape:
        raise ValueError(f"tokens must have shape {tuple(hidden.shape[:-1])}, got {tuple(tokens.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    for name, t in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask), ("ref_logp", ref_logp),
                    ("token_weights", token_weights)):
        if t is not None and t.shape != tokens.shape:
            raise ValueError(f"{name} must have shape {tuple(tokens.shape)}, got {tuple(t.shape)}")
    if tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    _choice("kl_estimator", kl_estimator, _KL)
    if kl_coef != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when kl_coef != 0")
    if not 0.0 <= clip_eps_low < 1.0:
        raise ValueError(f"clip_eps_low must be in [0, 1), got {clip_eps_low}")
    if not clip_eps_high >= 0.0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {clip_ratio_c}")
    if not log_ratio_clamp > 0.0:
        raise ValueError(f"log_ratio_clamp must be > 0, got {log_ratio_clamp}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_device(hidden, weight, tokens, old_logp, advantages, mask, ref_logp, token_weights)

    H = hidden.shape[-1]
    V = weight.shape[0]
    h = hidden.reshape(-1, H)
    if not h.is_contiguous():
        h = h.contiguous()
    w_head = weight if weight.is_contiguous() else weight.contiguous()
    m = mask.reshape(-1).bool()
    y = tokens.reshape(-1).long()
    if m.any() and bool(((y < 0) | (y >= V))[m].any()):
        raise ValueError(f"tokens must be ids in [0, {V}) where mask is True")
    if token_weights is not None:
        tw = token_weights.reshape(-1).float() * m
    else:
        if num_tokens is None:
            n = m.sum().clamp(min=1).to(torch.float64)
        elif isinstance(num_tokens, Tensor):
            n = num_tokens.to(device=h.device, dtype=torch.float64).reshape(()).clamp(min=1)
        else:
            if not num_tokens > 0:
                raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
            n = torch.tensor(float(num_tokens), dtype=torch.float64, device=h.device)
        tw = (m.to(torch.float64) / n).float()
    zero = torch.zeros((), dtype=torch.float32, device=h.device)
    old = torch.where(m, old_logp.reshape(-1).float(), zero).contiguous()
    adv = torch.where(m, advantages.reshape(-1).float(), zero).contiguous()
    ref = None if ref_logp is None else torch.where(m, ref_logp.reshape(-1).float(), zero).contiguous()
    kl_est = _KL[kl_estimator] if (kl_coef != 0.0) else 0
    chunk = chunk_size or _default_chunk(h.shape[0], V, h.element_size())
    loss, logp, ent = FusedPolicyLossFunction.apply(
        h, w_head, y.contiguous(), old, adv, tw.contiguous(), ref, float(temperature), float(clip_eps_low),
        float(clip_eps_high), None if clip_ratio_c is None else float(clip_ratio_c), float(log_ratio_clamp),
        float(kl_coef), kl_est, int(chunk), bool(grad_weight_fp32),
    )
    return FusedPolicyLoss(
        loss=loss, logp=logp.reshape(tokens.shape), entropy=ent.reshape(tokens.shape) if compute_entropy else None
    )
