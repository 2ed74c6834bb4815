"""Fused linear + ULD in Triton: the ULD loss of ``student_hidden @ lm_head_weight.T`` without the N × V_S logits.

Public API (oracle: :func:`kat.losses.uld.uld_loss` on the materialised logits; the torch counterpart is
:func:`kat.losses.uld.fused_linear_uld_loss_chunked`; this module imports only torch and triton):

* ``fused_linear_uld_loss(student_hidden, lm_head_weight, teacher_logits=None, *, teacher_topk_logprobs=None,
  teacher_tail_mass=None, lm_head_bias=None, student_temperature=1.0, teacher_temperature=1.0, mask=None,
  reduction="mean", chunk_size=None)``  (student logits never exist beyond one chunk of rows)

Rows are processed a chunk at a time (the Liger fused-linear pattern); each chunk's logits go through the exact
sort-based ULD of :mod:`kat_kernels.uld` (its row engine ``_uld_rows``, argument checks and reductions), which
writes the logit gradient in place. Method and measurements: docs/uld.md.
"""
from __future__ import annotations

import torch
import triton

from kat_kernels import uld as _uld  # _uld.SCRATCH_BYTES is read at call time, so setting it bounds both modules
from kat_kernels.uld import (_check_2d_float, _check_device, _check_mask, _check_reduction, _check_temperature,
                             _check_topk, _grad_coef, _next_pow2, _reduce, _Side, _uld_rows)

__all__ = ["fused_linear_uld_loss"]


def _default_chunk(n: int, hidden: int, vs: int, teacher: torch.Tensor, student_dtype: torch.dtype) -> int:
    """Liger's rule (chunk × V_S ≈ N × H) raised so that the per-chunk scratch uses up to SCRATCH_BYTES."""
    liger = _next_pow2(triton.cdiv(n, triton.cdiv(vs, hidden)))
    per_row = (_Side.scratch_bytes_per_row(vs, student_dtype, True)
               + _Side.scratch_bytes_per_row(teacher.shape[1], teacher.dtype, False)
               + vs * torch.empty((), dtype=student_dtype).element_size())
    budget_rows = max(1, _uld.SCRATCH_BYTES // per_row)
    return max(1, min(n, max(liger, 1 << (budget_rows.bit_length() - 1))))


class _FusedLinearULDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, tail_t, teacher_logprob, tau_s, tau_t, mask, reduction,
                chunk):
        n = hidden.shape[0]
        keep = mask.to(torch.int8).contiguous()
        coef, n_sel = _grad_coef(mask, reduction)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
            bias is not None and ctx.needs_input_grad[2]
        need_any = need_h or need_w or need_b
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        per_row = torch.empty(n, dtype=torch.float32, device=hidden.device)
        teacher = teacher.detach()
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            h_c = hidden[c0:c1]  # (C, H)
            logits = h_c @ weight.t()  # (C, V_S)
            if bias is not None:
                logits += bias
            # dz overwrites the chunk's logits in place: the kernels have read them into the sort scratch.
            per_row[c0:c1] = _uld_rows(logits, teacher[c0:c1], keep[c0:c1], tau_s=tau_s, tau_t=tau_t,
                                       teacher_logprob=teacher_logprob,
                                       tail_t=None if tail_t is None else tail_t[c0:c1],
                                       coef=coef[c0:c1], dz=logits if need_any else None)
            if need_h:
                grad_h[c0:c1] = logits @ weight
            if need_w:
                if grad_w.dtype == logits.dtype:
                    grad_w.addmm_(logits.t(), h_c)
                else:
                    grad_w += (logits.t() @ h_c).float()
            if need_b:
                grad_b += logits.float().sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.used = False
        ctx.w_dtype = weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return _reduce(per_row, n_sel, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("kat_kernels.uld: backward through the same fused ULD call twice is not "
                               "supported (the stored gradients are scaled in place)")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_output.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = (grad_w * grad_output).to(ctx.w_dtype)
        if grad_b is not None:
            grad_b = (grad_b * grad_output).to(ctx.b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None


def fused_linear_uld_loss(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk_logprobs: torch.Tensor | None = None,
    teacher_tail_mass: torch.Tensor | None = None,
    lm_head_bias: torch.Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """ULD of ``student_hidden @ lm_head_weight.T (+ bias)`` against a teacher, without the N × V_S logits.

    Rows are processed ``chunk_size`` at a time (Liger fused-linear pattern): logits_c = h_c W^T, the kernels
    sort, compute the loss and write dlogits in place, then grad_h_c = dlogits W and grad_W += dlogits^T h_c
    (accumulated in fp32). All gradients are computed in the forward; backward only scales them.

    Exactly one teacher form must be given: ``teacher_logits`` (N, V_T) (full ULD, with
    ``teacher_temperature``) or ``teacher_topk_logprobs`` (N, k) with ``teacher_tail_mass`` (N,) or None
    (top-k + tail form; the cache is at temperature 1 so ``teacher_temperature`` must stay 1).

    MTP depths share ``lm_head_weight``: call this once per depth (each call holds its own fp32 grad_W of
    V_S × H until backward; autograd sums the weight gradients of the calls).

    Args:
        student_hidden: (N, H) final hidden states (after the final norm).
        lm_head_weight: (V_S, H).
        lm_head_bias: optional (V_S,).
        reduction: "mean" or "sum" ("none" is not supported: grad_W is accumulated in the forward).
        chunk_size: rows per chunk; default max(Liger's rule, rows whose scratch fits SCRATCH_BYTES).
    """
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must have shape [N, H], got "
                         f"{tuple(getattr(student_hidden, 'shape', ()))}")
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2 \
            or lm_head_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"lm_head_weight must have shape [V_S, {student_hidden.shape[1]}], got "
                         f"{tuple(getattr(lm_head_weight, 'shape', ()))}")
    if lm_head_weight.dtype != student_hidden.dtype:
        raise TypeError(f"lm_head_weight ({lm_head_weight.dtype}) and student_hidden ({student_hidden.dtype}) "
                        f"must have the same dtype")
    if student_hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"student_hidden must be float32, bfloat16 or float16, got {student_hidden.dtype}")
    _check_device("student_hidden", student_hidden)
    if lm_head_weight.device != student_hidden.device:
        raise ValueError(f"lm_head_weight is on {lm_head_weight.device} but student_hidden is on "
                         f"{student_hidden.device}")
    if lm_head_bias is not None and (not isinstance(lm_head_bias, torch.Tensor)
                                     or lm_head_bias.shape != (lm_head_weight.shape[0],)):
        raise ValueError(f"lm_head_bias must have shape [{lm_head_weight.shape[0]}], got "
                         f"{tuple(getattr(lm_head_bias, 'shape', ()))}")
    if (teacher_logits is None) == (teacher_topk_logprobs is None):
        raise ValueError("give exactly one of teacher_logits and teacher_topk_logprobs")
    _check_reduction(reduction, ("mean", "sum"))
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    n = student_hidden.shape[0]
    if teacher_logits is not None:
        _check_2d_float("teacher_logits", teacher_logits)
        if teacher_logits.shape[0] != n or teacher_logits.device != student_hidden.device:
            raise ValueError(f"teacher_logits must have {n} rows on {student_hidden.device}, got "
                             f"{tuple(teacher_logits.shape)} on {teacher_logits.device}")
        teacher, tail_t, logprob = teacher_logits, None, False
    else:
        if tau_t != 1.0:
            raise ValueError("teacher_temperature must be 1.0 with a top-k cache (it stores temperature-1 "
                             "log-probs)")
        tail_t = _check_topk(student_hidden, teacher_topk_logprobs, teacher_tail_mass)
        teacher, logprob = teacher_topk_logprobs, True
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()
    mask = _check_mask(mask, n, student_hidden.device)
    if chunk_size is None:
        chunk_size = _default_chunk(n, student_hidden.shape[1], lm_head_weight.shape[0], teacher,
                                    student_hidden.dtype)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _FusedLinearULDFunction.apply(student_hidden, lm_head_weight, lm_head_bias, teacher, tail_t, logprob,
                                         tau_s, tau_t, mask, reduction, int(max(1, chunk_size or 1)))
