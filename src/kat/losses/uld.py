"""Universal Logit Distillation (ULD) loss: the plain-PyTorch oracle.

ULD (Boizard et al., arXiv 2402.12030) compares two next-token distributions that live on *different*
vocabularies by sorting each one and taking the L1 distance between the sorted vectors, so no token map is
needed. Per aligned position (one row)::

    ULD(s, t) = Σ_r | sort↓(softmax(s / τ_S))[r] − sort↓(softmax(t / τ_T))[r] |,   r = 1..max(V_S, V_T)

where the shorter sorted vector is zero-padded to the longer one. With a shared vocabulary ULD ≤ 2·TVD ≤ 2.

Deviations from the paper's reference code (Nicolas-BZRD/llm-recipes, ``DistillationLoss``), all deliberate:

* one row per *aligned* position: span detection, EOS skipping and cross-tokenizer alignment happen before this
  function (see :mod:`kat.data.align`); the paper's code mixes them into the loss;
* separate student and teacher temperatures (the paper uses one, default 1);
* a row ``mask`` and a ``reduction`` (the paper means over the shorter answer, then over the batch);
* no weighting: the ``distil_factor`` (1.5 in the paper) and the CE term are the caller's business.

Everything is computed in float32 whatever the input dtype; the teacher is detached (no gradient flows to it).
At ties of the sorted vectors ``torch.abs``/``torch.sort`` pick one valid subgradient.

Top-k + tail bucket (offline teacher caches)
--------------------------------------------
A teacher cache holds per token only the teacher's top-k log-probs at temperature 1 and the tail mass
``τ_T = 1 − Σ top-k``. Write ``a`` (student) and ``b`` (teacher) for the sorted probabilities and
``τ_S = Σ_{r>k} a_r``. Splitting the exact sum at rank k::

    ULD = Σ_{r≤k} |a_r − b_r|  +  Σ_{r>k} |a_r − b_r|

The first sum is known exactly from top-k information. By the triangle inequality and |x − y| ≤ x + y for
non-negative x, y, the unknown tail sum lies in ``[|τ_S − τ_T|, τ_S + τ_T]``. Hence

    lower = Σ_{r≤k} |a_r − b_r| + |τ_S − τ_T|  ≤  ULD  ≤  Σ_{r≤k} |a_r − b_r| + τ_S + τ_T = upper

``uld_loss_topk`` returns the lower bound (the "tail bucket" form: the tail masses compared as one extra
entry); it is exact when all of one side's tail mass is matched rank by rank by the other side's, and it
is the form docs/uld.md §2 recommends (≈1 % relative error at k = 64 on Zipf-like logits).
``uld_topk_bounds`` returns both bounds.
"""
from __future__ import annotations

import torch

__all__ = ["uld_loss", "uld_loss_chunked", "fused_linear_uld_loss_chunked", "uld_loss_topk", "uld_topk_bounds",
           "uld_topk_lower_bound", "uld_topk_upper_bound"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_temperature(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return value


def _check_logits(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, V], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got {tuple(x.shape)}")


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Both (N, V) float logits with the same N on the same device."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must have the same number of rows, got "
                         f"{student_logits.shape[0]} and {teacher_logits.shape[0]}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits is on {student_logits.device} but teacher_logits is on "
                         f"{teacher_logits.device}")


def _check_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Return a bool mask [N] on ``device`` (all True when ``mask`` is None)."""
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor of shape [{n}], got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [{n}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
    return mask


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _reduce(per_row: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """per_row (N,) fp32 -> reduced loss; masked rows are exact zeros that keep the graph connected."""
    per_row = torch.where(mask, per_row, torch.zeros_like(per_row))  # (N,)
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    # "mean" over the selected rows; 0 selected rows -> 0 (still attached to the student graph).
    return total / mask.sum().clamp_min(1).to(total.dtype)


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the last dimension of x (N, V) to ``width`` columns."""
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Exact ULD by full sort (the oracle for every faster implementation).

    Args:
        student_logits: (N, V_S) student logits; any float dtype.
        teacher_logits: (N, V_T) teacher logits; any float dtype; detached.
        student_temperature: τ_S > 0, probabilities are softmax(s / τ_S).
        teacher_temperature: τ_T > 0, probabilities are softmax(t / τ_T).
        mask: optional (N,) bool; only True rows count.
        reduction: "mean" (over selected rows; 0 selected rows -> 0), "sum", or "none" -> (N,) with masked
            rows 0.

    Returns:
        fp32 loss: a scalar, or (N,) for ``reduction="none"``.
    """
    _check_pair(student_logits, teacher_logits)
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    _check_reduction(reduction)
    n = student_logits.shape[0]
    mask = _check_mask(mask, n, student_logits.device)

    p_s = torch.softmax(student_logits.float() / tau_s, dim=-1)  # (N, V_S)
    p_t = torch.softmax(teacher_logits.detach().float() / tau_t, dim=-1)  # (N, V_T)
    width = max(p_s.shape[1], p_t.shape[1])
    sorted_s = torch.sort(_pad_to(p_s, width), dim=-1, descending=True).values  # (N, V)
    sorted_t = torch.sort(_pad_to(p_t, width), dim=-1, descending=True).values  # (N, V)
    per_row = (sorted_s - sorted_t).abs().sum(dim=-1)  # (N,)
    return _reduce(per_row, mask, reduction)


def _sorted_l1_rows(s: torch.Tensor, t: torch.Tensor, tau_s: float, tau_t: float,
                    want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact ULD of each row of one block, and its gradient with respect to the student logits.

    s: (c, V_S) student logits, t: (c, V_T) teacher logits (any float dtype) -> per_row (c,) fp32 and, when
    ``want_grad``, ∂per_row[i]/∂s[i] (c, V_S) fp32 (else None). Same sorts and subgradient as :func:`uld_loss`.
    """
    width = max(s.shape[1], t.shape[1])
    p_s = torch.softmax(s.float() / tau_s, dim=-1)  # (c, V_S)
    p_t = torch.softmax(t.float() / tau_t, dim=-1)  # (c, V_T)
    sorted_s, idx = torch.sort(_pad_to(p_s, width), dim=-1, descending=True)  # (c, V), (c, V)
    diff = sorted_s - torch.sort(_pad_to(p_t, width), dim=-1, descending=True).values  # (c, V)
    del p_t, sorted_s
    per_row = diff.abs().sum(dim=-1)  # (c,)
    if not want_grad:
        return per_row, None
    # ∂/∂p_s[i] = sign(diff at the rank of i) (sign(0) = 0, as torch.abs); padded columns dropped
    g_p = torch.zeros_like(diff).scatter_(-1, idx, torch.sign(diff))[:, :s.shape[1]]  # (c, V_S)
    del diff, idx
    # softmax backward: ∂/∂s = p ⊙ (g − Σ p g) / τ_S
    g_p -= (p_s * g_p).sum(dim=-1, keepdim=True)
    return per_row, g_p.mul_(p_s).div_(tau_s)


class _ChunkedULD(torch.autograd.Function):
    """Per-row exact ULD, computed ``chunk`` rows at a time; the gradient is formed in forward (per chunk) and
    kept in the student logits' dtype, so peak extra memory is a few (chunk, V) fp32 buffers plus that gradient."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, tau_s: float, tau_t: float, chunk: int) -> torch.Tensor:
        n = s.shape[0]
        per_row = torch.empty(n, dtype=torch.float32, device=s.device)  # (N,)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None  # (N, V_S): ∂ per_row / ∂ s
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            per_row[a:b], g = _sorted_l1_rows(s[a:b], t[a:b], tau_s, tau_t, grad is not None)
            if grad is not None:
                grad[a:b] = g.to(grad.dtype)
        if grad is not None:
            ctx.save_for_backward(grad)
        return per_row

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):  # grad_rows: (N,)
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.to(grad.dtype)[:, None], None, None, None, None


def uld_loss_chunked(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_rows: int = 1024,
) -> torch.Tensor:
    """Exact ULD like :func:`uld_loss` (same arguments and result), in bounded memory.

    :func:`uld_loss` keeps every (N, V) fp32 softmax, sort and index tensor alive for autograd (≈ 30 GiB at
    4096 × 151,936). This version processes ``chunk_rows`` rows at a time and computes the gradient during
    the forward pass, keeping only that gradient (N, V_S) in the student logits' dtype. Same sorts, same
    subgradient at ties; the gradient is stored in the logits' dtype (bf16 logits give a bf16 gradient).
    """
    _check_pair(student_logits, teacher_logits)
    if int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    _check_reduction(reduction)
    mask = _check_mask(mask, student_logits.shape[0], student_logits.device)
    per_row = _ChunkedULD.apply(student_logits, teacher_logits.detach(), tau_s, tau_t, int(chunk_rows))  # (N,)
    return _reduce(per_row, mask, reduction)


class _FusedLinearChunkedULD(torch.autograd.Function):
    """ULD of ``hidden @ weight.T (+ bias)`` a block of rows at a time; every gradient is formed in forward.

    ``coef`` (N,) fp32 is ∂loss/∂per_row (the mask and the reduction folded in), so the weight gradient can be
    accumulated block by block; backward only scales the stored gradients by the upstream scalar."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, tau_s: float, tau_t: float, coef: torch.Tensor,
                chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None  # (N, H)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None  # (V_S, H)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None  # (V_S,)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            logits = torch.nn.functional.linear(hidden[a:b], weight, bias)  # (c, V_S), only this block exists
            per_row, g = _sorted_l1_rows(logits, teacher[a:b], tau_s, tau_t, need_h or need_w or need_b)
            del logits
            c = coef[a:b]  # (c,)
            loss += torch.where(c != 0, c * per_row, torch.zeros_like(per_row)).sum()  # masked rows are exact 0
            if g is None:
                continue
            g.mul_(c[:, None])  # (c, V_S) fp32: ∂loss/∂logits of this block
            if need_h:
                grad_h[a:b] = g.to(weight.dtype) @ weight  # (c, H)
            if need_w:
                grad_w.addmm_(g.t(), hidden[a:b].float())  # (V_S, H), accumulated in fp32
            if need_b:
                grad_b += g.sum(dim=0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # grad_out: () upstream gradient of the scalar loss
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h * grad_out.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        grad_b = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def fused_linear_uld_loss_chunked(
    student_hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Exact ULD of ``student_hidden @ lm_head_weight.T (+ bias)`` against teacher logits, in plain torch,
    without the (N, V_S) student logits ever existing at full size (the Liger fused-linear pattern).

    Equal to ``uld_loss(F.linear(student_hidden, lm_head_weight, lm_head_bias), teacher_logits, ...)`` in value
    and gradients (same sorts, same subgradient at ties). ``chunk_rows`` rows at a time: their logits, softmax
    and sorts are formed, the loss and ∂loss/∂logits computed, then grad_hidden = dlogits W and
    grad_W += dlogits^T h (fp32). All gradients are computed in forward; backward only scales them.
    Peak extra memory: the fp32 grad_W (V_S × H) plus ~40 B × chunk_rows × max(V_S, V_T) of block buffers.

    Args:
        student_hidden: (N, H) final hidden states (after the final norm); float32, bfloat16 or float16.
        lm_head_weight: (V_S, H), same dtype and device.
        teacher_logits: (N, V_T) any float dtype; detached.
        lm_head_bias: optional (V_S,).
        mask, student_temperature, teacher_temperature: as :func:`uld_loss`.
        reduction: "mean" or "sum" ("none" is not supported: grad_W is accumulated in forward).
        chunk_rows: rows per block; default Liger's rule, next_pow2(ceil(N / ceil(V_S / H))).
    """
    if not isinstance(student_hidden, torch.Tensor) or student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must have shape [N, H], got "
                         f"{tuple(getattr(student_hidden, 'shape', ()))}")
    n, hid = student_hidden.shape
    if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hid:
        raise ValueError(f"lm_head_weight must have shape [V_S, {hid}], got "
                         f"{tuple(getattr(lm_head_weight, 'shape', ()))}")
    if student_hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or lm_head_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_hidden and lm_head_weight must share one float dtype (float32, bfloat16 or "
                        f"float16), got {student_hidden.dtype} and {lm_head_weight.dtype}")
    if lm_head_weight.device != student_hidden.device:
        raise ValueError(f"lm_head_weight is on {lm_head_weight.device} but student_hidden is on "
                         f"{student_hidden.device}")
    if lm_head_bias is not None and (not isinstance(lm_head_bias, torch.Tensor)
                                     or lm_head_bias.shape != (lm_head_weight.shape[0],)):
        raise ValueError(f"lm_head_bias must have shape [{lm_head_weight.shape[0]}], got "
                         f"{tuple(getattr(lm_head_bias, 'shape', ()))}")
    _check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape[0] != n or teacher_logits.device != student_hidden.device:
        raise ValueError(f"teacher_logits must have {n} rows on {student_hidden.device}, got "
                         f"{tuple(teacher_logits.shape)} on {teacher_logits.device}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' for the fused-linear ULD, got {reduction!r}")
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    mask = _check_mask(mask, n, student_hidden.device)
    if chunk_rows is None:
        per_block = -(-n // max(1, -(-lm_head_weight.shape[0] // hid)))  # ceil(N / ceil(V_S / H))
        chunk_rows = 1 << max(0, per_block - 1).bit_length()  # next power of two
    elif int(chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    coef = mask.float()  # (N,) ∂loss/∂per_row
    if reduction == "mean":
        coef = coef / mask.sum().clamp_min(1).float()
    return _FusedLinearChunkedULD.apply(student_hidden, lm_head_weight, lm_head_bias, teacher_logits.detach(),
                                        tau_s, tau_t, coef, int(chunk_rows))


def _topk_parts(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_mass: torch.Tensor | None,
    student_temperature: float,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate and return (head_l1 (N,), tail_s (N,), tail_t (N,), mask (N,)) for the top-k forms."""
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_topk_logprobs", teacher_topk_logprobs)
    n, k = teacher_topk_logprobs.shape
    if student_logits.shape[0] != n:
        raise ValueError(f"student_logits and teacher_topk_logprobs must have the same number of rows, got "
                         f"{student_logits.shape[0]} and {n}")
    if student_logits.device != teacher_topk_logprobs.device:
        raise ValueError(f"student_logits is on {student_logits.device} but teacher_topk_logprobs is on "
                         f"{teacher_topk_logprobs.device}")
    tau_s = _check_temperature("student_temperature", student_temperature)
    mask = _check_mask(mask, n, student_logits.device)

    b = torch.sort(teacher_topk_logprobs.detach().float().exp(), dim=-1, descending=True).values  # (N, k)
    if teacher_tail_mass is None:
        tail_t = (1.0 - b.sum(dim=-1)).clamp(0.0, 1.0)  # (N,)
    else:
        if not isinstance(teacher_tail_mass, torch.Tensor) or teacher_tail_mass.shape != (n,):
            raise ValueError(f"teacher_tail_mass must be a tensor of shape [{n}], got "
                             f"{tuple(getattr(teacher_tail_mass, 'shape', ()))}")
        if not teacher_tail_mass.is_floating_point():
            raise TypeError(f"teacher_tail_mass must be floating point, got {teacher_tail_mass.dtype}")
        tail_t = teacher_tail_mass.detach().float().to(student_logits.device)  # (N,)

    p_s = torch.softmax(student_logits.float() / tau_s, dim=-1)  # (N, V_S)
    k_s = min(k, p_s.shape[1])
    a = _pad_to(torch.topk(p_s, k_s, dim=-1).values, k)  # (N, k), sorted descending
    head_l1 = (a - b).abs().sum(dim=-1)  # (N,)
    tail_s = (1.0 - a.sum(dim=-1)).clamp_min(0.0)  # (N,) student mass outside its top-k
    return head_l1, tail_s, tail_t, mask


def uld_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_mass: torch.Tensor | None,
    *,
    student_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Top-k + tail-bucket ULD against an offline teacher cache (the lower bound of the exact ULD).

    Per row: ``Σ_{r≤k} |a_r − b_r| + |τ_S − τ_T|`` with a = the student's top-k probabilities (full softmax at
    τ_S, sorted descending), b = exp(teacher_topk_logprobs) sorted descending (any input order is accepted),
    τ_S = 1 − Σ a, τ_T = teacher_tail_mass (or 1 − Σ b, clamped to [0, 1], when None). When k > V_S the student
    side is zero-padded. The cache is at teacher temperature 1, so there is no teacher temperature here.

    Args:
        student_logits: (N, V_S).
        teacher_topk_logprobs: (N, k) natural-log probabilities of the teacher's top-k tokens.
        teacher_tail_mass: (N,) or None.
        student_temperature, mask, reduction: as in :func:`uld_loss`.
    """
    _check_reduction(reduction)
    head_l1, tail_s, tail_t, mask = _topk_parts(student_logits, teacher_topk_logprobs, teacher_tail_mass,
                                                 student_temperature, mask)
    per_row = head_l1 + (tail_s - tail_t).abs()  # (N,)
    return _reduce(per_row, mask, reduction)


def uld_topk_bounds(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_mass: torch.Tensor | None,
    *,
    student_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lower, upper) bounds (N,), (N,) of the exact full-vocabulary ULD given top-k information only.

    lower = Σ_{r≤k}|a_r − b_r| + |τ_S − τ_T| (= ``uld_loss_topk(..., reduction="none")``),
    upper = Σ_{r≤k}|a_r − b_r| + τ_S + τ_T.  Masked rows are 0 in both.
    """
    head_l1, tail_s, tail_t, mask = _topk_parts(student_logits, teacher_topk_logprobs, teacher_tail_mass,
                                                 student_temperature, mask)
    lower = _reduce(head_l1 + (tail_s - tail_t).abs(), mask, "none")  # (N,)
    upper = _reduce(head_l1 + tail_s + tail_t, mask, "none")  # (N,)
    return lower, upper


def uld_topk_lower_bound(*args, **kwargs) -> torch.Tensor:
    """Per-row lower bound (N,) of the exact ULD from top-k information; see :func:`uld_topk_bounds`."""
    return uld_topk_bounds(*args, **kwargs)[0]


def uld_topk_upper_bound(*args, **kwargs) -> torch.Tensor:
    """Per-row upper bound (N,) of the exact ULD from top-k information; see :func:`uld_topk_bounds`."""
    return uld_topk_bounds(*args, **kwargs)[1]

