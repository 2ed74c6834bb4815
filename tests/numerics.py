"""Rounding-error bounds for checking a float32 (or bf16) result against a float64 oracle.

A test that compares two fp32 computations of the same quantity with a hand-picked ``rtol`` fails on the first
machine whose kernels sum in another order (AVX2 vs AVX-512 lanes, 1 vs 2 threads, MKL's code paths). Here the
reference is computed in float64 (its own error, ≲ 2^-53 per operation, is negligible and ignored) and each
tolerance is a bound on the error of the low-precision computation, built from the sizes involved:

* ``u``: unit roundoff of the working dtype (:func:`unit_roundoff`: 2^-24 fp32, 2^-8 bf16, 2^-11 fp16).
* ``accum(n)``: a sum or dot product of ``n`` terms, in any order (sequential, pairwise, SIMD lanes, split
  over threads), has error ≤ ``accum(n) · Σ|terms|`` with
  ``accum(n) = min(γ_n, exp(λ·√n·u + n·u²/(1−u)) − 1)``, ``γ_n = n·u/(1 − n·u)``.
  γ_n is the worst case (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1); the second form is
  the probabilistic bound of Higham & Mary (A new approach to probabilistic rounding error analysis, SIAM J.
  Sci. Comput. 41(5), 2019). To first order the error is a martingale Σ_k δ_k·s_k (|δ_k| ≤ u, s_k the partial
  sums, |s_k| ≤ Σ|terms|), so by Azuma–Hoeffding it exceeds λ·√n·u·Σ|terms| with probability ≤ 2·exp(−λ²/2)
  (Ipsen & Zhou, Probabilistic error analysis for inner products, SIAM J. Matrix Anal. Appl., 2020); Higham &
  Mary's own proof union-bounds the n partial products and gets ≤ 2n·exp(−λ²(1−u)²/2). λ = :data:`LAMBDA` = 8
  makes that 2.5e-14 per element (8e-10 with the factor n at n = 32,000), so the ~10^7 elements compared across
  the suite fail by chance with probability ≲ 1e-6 (λ = 6 would give ~0.1). The bound is on Σ|terms|, not on
  |Σ terms|, which is what makes it hold under cancellation. Measured errors stay well below it: set
  KAT_NUMERICS_REPORT=<file> to log the worst |error|/bound of every check.
* A matrix product ``A @ B`` with inner size K: ``accum(K) · (|A| @ |B|)`` per element (:func:`matmul_bound`).

:func:`assert_close_to_oracle` then checks ``|got − ref| ≤ bound + atol`` element by element and names the
worst element when it fails. The ULD part (:func:`uld64`, :func:`uld_topk64`, :func:`uld_error`,
:func:`linear_uld_oracle`) is the float64 transcription of the ULD loss and the bound of its fp32 evaluation;
the GRPO part (:func:`group_advantage_bound`, :func:`policy_oracle`) does the same for the group advantages
and the policy loss; both are shared by tests/losses and tests/kernels. Where a function is piecewise (sorted
ranks, clips, clamps), a branch counts as *decided* only when it is the same at every point within the
rounding error; elsewhere any branch is a valid result and the bound allows all of them.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

__all__ = ["LAMBDA", "unit_roundoff", "accum", "matmul_bound", "assert_close_to_oracle", "uld64", "uld_topk64",
           "softmax_error", "uld_error", "ULDError", "rounding_model", "row_coef", "reduced_loss_bound",
           "linear_uld_oracle", "LinearULDOracle", "lse_error", "group_advantage_bound", "policy_oracle",
           "PolicyOracle"]

#: Probabilistic bound constant λ (see the module docstring): P(an element exceeds its bound) ≤ 2·exp(−λ²/2).
LAMBDA = 8.0

_U = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the machine epsilon: |fl(x) − x| ≤ u·|x| for one rounding to ``dtype``."""
    return _U[dtype]


def accum(n: int, dtype: torch.dtype = torch.float32) -> float:
    """c such that a sum/dot product of ``n`` terms computed in ``dtype`` has |error| ≤ c·Σ|terms|."""
    u = unit_roundoff(dtype)
    n = max(int(n), 1)
    gamma = n * u / (1.0 - n * u) if n * u < 1.0 else math.inf
    return min(gamma, math.expm1(LAMBDA * math.sqrt(n) * u + n * u * u / (1.0 - u)))


def matmul_bound(a_abs: torch.Tensor, b_abs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-element bound on |fl(A @ B) − A @ B| for exact A, B (pass |A|, |B|) accumulated in ``dtype``."""
    return accum(a_abs.shape[-1], dtype) * (a_abs.double() @ b_abs.double())


def assert_close_to_oracle(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor | float, *, atol: float = 0.0,
                           name: str = "value") -> float:
    """Assert |got − ref| ≤ bound + atol element-wise (got any float dtype, ref float64); return the worst ratio
    |got − ref| / (bound + atol) (≤ 1 when the assertion holds), for reporting margins."""
    got64 = got.detach().double().cpu()
    ref64 = ref.detach().double().cpu()
    bound = torch.as_tensor(bound, dtype=torch.float64).cpu().expand_as(ref64) + atol
    assert got64.shape == ref64.shape, f"{name}: shape {tuple(got64.shape)} != oracle {tuple(ref64.shape)}"
    assert bool(torch.isfinite(ref64).all()), f"{name}: the float64 oracle is not finite"
    assert bool(torch.isfinite(got64).all()), f"{name}: {int((~torch.isfinite(got64)).sum())} non-finite values"
    err = (got64 - ref64).abs()
    bad = err > bound
    ratio = err / bound.clamp_min(1e-300)
    worst = int(ratio.flatten().argmax()) if ratio.numel() else 0
    if bool(bad.any()):
        i = tuple(int(x) for x in torch.unravel_index(torch.tensor(worst), ref64.shape)) if ref64.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements exceed the rounding bound; worst at {i}: got "
            f"{got64[i].item():.9g}, float64 oracle {ref64[i].item():.9g}, |diff| {err[i].item():.3g} > bound "
            f"{bound[i].item():.3g} ({ratio[i].item():.3g}×)")
    worst_ratio = float(ratio.flatten()[worst]) if ratio.numel() else 0.0
    report = os.environ.get("KAT_NUMERICS_REPORT")  # a file to append "test name worst-ratio" lines to
    if report:
        with open(report, "a") as f:
            f.write(f"{os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}\t{name}\t{worst_ratio:.3g}\n")
    return worst_ratio


# ---------------------------------------------------------------------------------------------------------------
# ULD in float64 and the error of its fp32 evaluation
# ---------------------------------------------------------------------------------------------------------------
def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _reduce64(per_row: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    if mask is not None:
        per_row = torch.where(mask.to(per_row.device), per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    count = per_row.shape[0] if mask is None else int(mask.sum())
    return per_row.sum() / max(count, 1)


def uld64(student_logits, teacher_logits, *, student_temperature=1.0, teacher_temperature=1.0, mask=None,
          reduction="mean") -> torch.Tensor:
    """ULD by full sort, every step in float64 (inputs are upcast exactly; differentiable in the student).

    Written independently of ``kat.losses.uld.uld_loss``, which computes in float32 whatever its input dtype:
    per row Σ_r |sort↓(softmax(s/τ_S))_r − sort↓(softmax(t/τ_T))_r| with the shorter side zero-padded.
    """
    s = student_logits.double() if student_logits.dtype != torch.float64 else student_logits
    t = teacher_logits.detach().double().to(s.device)
    p_s = torch.softmax(s / student_temperature, dim=-1)
    p_t = torch.softmax(t / teacher_temperature, dim=-1)
    width = max(p_s.shape[1], p_t.shape[1])
    a = torch.sort(_pad(p_s, width), dim=-1, descending=True).values
    b = torch.sort(_pad(p_t, width), dim=-1, descending=True).values
    return _reduce64((a - b).abs().sum(dim=-1), mask, reduction)


def uld_topk64(student_logits, teacher_topk_logprobs, teacher_tail_mass=None, *, student_temperature=1.0,
               mask=None, reduction="mean") -> torch.Tensor:
    """Top-k + tail-bucket ULD in float64: Σ_{r≤k}|a_r − b_r| + |τ_S − τ_T| (a: the student's top-k
    probabilities, b: exp(log-probs) sorted, τ_S = 1 − Σa clamped at 0, τ_T given or 1 − Σb clamped to [0, 1])."""
    s = student_logits.double() if student_logits.dtype != torch.float64 else student_logits
    k = teacher_topk_logprobs.shape[1]
    b = torch.sort(teacher_topk_logprobs.detach().double().to(s.device).exp(), dim=-1, descending=True).values
    tail_t = (1.0 - b.sum(-1)).clamp(0.0, 1.0) if teacher_tail_mass is None else \
        teacher_tail_mass.detach().double().to(s.device)
    p = torch.softmax(s / student_temperature, dim=-1)
    a = _pad(torch.topk(p, min(k, p.shape[1]), dim=-1).values, k)
    tail_s = (1.0 - a.sum(-1)).clamp_min(0.0)
    return _reduce64((a - b).abs().sum(-1) + (tail_s - tail_t).abs(), mask, reduction)


def lse_error(x: torch.Tensor, x_err: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, 1) bound on |l̂se − lse(x)| of a ``dtype`` log-sum-exp along the last dimension (see softmax_error)."""
    u = unit_roundoff(dtype)
    v = x.shape[-1]
    x_err = torch.as_tensor(x_err, dtype=torch.float64).expand_as(x)
    p = torch.softmax(x, dim=-1)
    m = x.max(dim=-1, keepdim=True).values
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    shift = torch.exp(2 * x_err.amax(-1, keepdim=True)) * (p * x_err).sum(-1, keepdim=True)
    tiles = 3 * math.ceil(v / 512)  # online/tiled forms rescale each tile's partial sum: exp, product, sum
    return shift + u * (lse.abs() + (x - m).abs().amax(-1, keepdim=True) + 4 + tiles) + accum(v, dtype)


def softmax_error(x: torch.Tensor, x_err: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Relative error bound ε (N, V) of a ``dtype`` softmax along the last dimension: |p̂_j − p_j| ≤ ε_j·p_j + tiny
    (log1p(ε) bounds the error of the log-softmax x_j − lse).

    x: (N, V) float64, the exact softmax inputs (logits/τ); x_err: bound on |x̂ − x| for the inputs the
    implementation actually gets (matmul error of the logits/τ plus the roundings of the division by τ).
    In log space log p_j = x_j − lse(x), and by the mean value theorem |lse(x̂) − lse(x)| ≤ e^{2·max Δx}·Σ_i p_i·Δx_i
    (∇lse = p, and p moves by a factor ≤ e^{2·max Δx} on the segment), so the input error moves log p_j by
    ≤ Δx_j + e^{2·max Δx}·Σ_i p_i·Δx_i. The arithmetic adds, for either of the usual forms (exp(x − m)/Σ with m the
    row max, as torch and the Triton kernels compute it, or exp(x − lse) with lse = m + log Σ, from per-tile
    maxima or online): u·|x_j − m| (+ u·|x_j − lse|, u·|lse|, u·max|x − m| and 3u per 512-column tile for the
    rescalings), ≤ 2 ulp = 4u each for exp and log, accum(V) for the sum of V positive terms, 2u for the
    reciprocal and the product.
    """
    u = unit_roundoff(dtype)
    x_err = torch.as_tensor(x_err, dtype=torch.float64).expand_as(x)
    m = x.max(dim=-1, keepdim=True).values
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    own = x_err + u * ((x - m).abs() + (x - lse).abs() + 4)
    return torch.expm1(own + lse_error(x, x_err, dtype))


class ULDError(NamedTuple):
    """Bounds of the fp32 evaluation of ULD against the float64 oracle (see :func:`uld_error`)."""

    loss_row: torch.Tensor  # (N,) bound on |per_row − per_row64| of each row (before mask and reduction)
    dlogits: torch.Tensor  # (N, V_S) bound on |∂loss/∂logits − oracle| (times |row_coef|)
    decided: torch.Tensor  # (N, V_S) bool: the column's subgradient is the same at every point within rounding


def _sorted_desc(x: torch.Tensor) -> torch.Tensor:
    return torch.sort(x, dim=-1, descending=True).values


def _count_above(values: torch.Tensor, thresholds: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per row, #{i : values_i > threshold} (strict) or ≥ threshold, for each threshold."""
    asc = torch.sort(values, dim=-1).values.contiguous()
    return values.shape[-1] - torch.searchsorted(asc, thresholds.contiguous(), right=strict)


def uld_error(student_logits, teacher, *, student_temperature=1.0, teacher_temperature=1.0, logit_err=0.0,
              teacher_err=0.0, topk=False, teacher_tail_mass=None, row_coef=None, dtype=torch.float32) -> ULDError:
    """Bound the error of a ``dtype`` evaluation of ULD (full, or top-k + tail with ``topk=True``) and of its
    student-logit gradient against the float64 oracle :func:`uld64` / :func:`uld_topk64`.

    student_logits: (N, V_S) the logits the oracle uses (float64); logit_err: bound on how far the logits the
    implementation uses can be from them (0 when it is given them; see :func:`linear_uld_oracle`). teacher:
    (N, V_T) logits, or (N, k) log-probs when ``topk``; teacher_err: likewise for the teacher (e.g. a cache of
    fp32 log-probs against the float64 ones). row_coef: (N,) ∂loss/∂per_row (:func:`row_coef`).

    Derivation, per row, u = unit_roundoff(dtype): each probability is p̂_j ∈ [p_j(1−ε_j) − tiny, p_j(1+ε_j) + tiny]
    (:func:`softmax_error`; for a top-k cache b = exp(log-prob) has ε = 2 ulp + u·|lp|).

    * loss: sorting is 1-Lipschitz in l1 and |·| is 1-Lipschitz, so the sorted L1 moves by ≤ Σ_j |Δp_j| +
      Σ_j |Δq_j| ≤ Σ_j p_j·ε_j + Σ_j q_j·ε'_j (+ tiny per term); then the subtraction (u) and the sum of V terms
      (accum(V)) of Σ_r|a_r − b_r|. Top-k: the same for the head, plus the errors of the two tails
      (Σ p·ε + accum(V_S) + u and, when derived from the cache, Σ b·ε' + accum(k) + u).
    * gradient: ∂/∂z_j = p_j·(g_j − S)/τ_S with g_j the subgradient at column j's rank (sign(a_r − b_r); minus the
      tail sign for top-k) and S = Σ_i p_i·g_i. The r-th largest of the perturbed values lies between the r-th
      largest of the lower and of the upper ends, so the sign at rank r is *decided* when those intervals of
      the two sides do not overlap. Column j lands on a rank in
      [#{i : p̂_i surely > p̂_j}, #{i : p̂_i possibly ≥ p̂_j} − 1]; its g is decided when every rank there gives
      the same value. Elsewhere (ties, near-ties) any subgradient in the range is valid, and the bound allows
      the range's diameter D_j:
      |Δ∂_j| ≤ p_j(1+ε_j)/τ·[(|g_j − S| + D_j + Σ_i p_i(1+ε_i)D_i)(ε_j + 5u) + D_j + Σ_i p_i(1+ε_i)D_i
      + (Σ_i p_i ε_i + accum(V_S)(1 + max ε))·max|g|] (S summed in fp32 from perturbed terms; g − S, ×p and /τ
      rounded); when the top-k tail sign (or the clamp of τ_S at 0) is undecided, a shift c (|c| ≤ 2) of g on the
      head columns K moves ∂_j by p_j·c·(1[j∈K] − Σ_K p)/τ: ≤ 2p_j(τ_S + its error)/τ for j surely in K, ≤ 2p_j/τ
      otherwise. Finally × |row_coef| with 4u for the coefficient's own roundings.
    """
    u = unit_roundoff(dtype)
    tiny = torch.finfo(dtype).tiny
    s = student_logits.detach().double().cpu()
    n, vs = s.shape
    tau_s = float(student_temperature)
    x_s = s / tau_s
    # division by τ in dtype: τ is rounded once and the quotient once -> 2u·|x| (+ the logits' own error)
    err_s = torch.as_tensor(logit_err, dtype=torch.float64).cpu() / tau_s + 2 * u * x_s.abs()
    eps = softmax_error(x_s, err_s, dtype)  # (N, V_S) by column
    p = torch.softmax(x_s, dim=-1)
    p_lo, p_hi = p * (1 - eps) - tiny, p * (1 + eps) + tiny  # the fp32 probability of column j lies in between
    ss, idx = torch.sort(p, dim=-1, descending=True)
    abs_p_err = (p * eps).sum(-1) + vs * tiny  # (N,) ≥ Σ_j |Δp_j|
    t = teacher.detach().double().cpu()
    t_err = torch.as_tensor(teacher_err, dtype=torch.float64).cpu()
    if topk:
        k = t.shape[1]
        q = t.exp()  # (N, k) in dtype: ≤ 2 ulp for exp, u·|lp| for an exp2-scaled argument
        eps_q = torch.expm1(t_err + u * (2 * t.abs() + 4)).expand_as(t)
        head, width = k, max(k, vs)  # ranks < k are the head (the student is zero-padded when k > V_S)
        tail_t = (1.0 - q.sum(-1)).clamp(0.0, 1.0) if teacher_tail_mass is None else \
            teacher_tail_mass.detach().double().cpu()
        tail_t_err = ((q * eps_q).sum(-1) + accum(k, dtype) * q.sum(-1) + u) if teacher_tail_mass is None \
            else torch.zeros(n, dtype=torch.float64)
        tail_s = (1.0 - ss[:, :k].sum(-1)).clamp_min(0.0)
        tail_s_err = abs_p_err + accum(vs, dtype) + u  # either 1 − Σ_{r≤k} a_r or Σ_{r>k} a_r
        gap = tail_s - tail_t
        gap_err = tail_s_err + tail_t_err + u * gap.abs()
        sigma = torch.sign(gap).long()  # (N,)
    else:
        tau_t = float(teacher_temperature)
        x_t = t / tau_t
        eps_q = softmax_error(x_t, t_err / tau_t + 2 * u * x_t.abs(), dtype)
        q = torch.softmax(x_t, dim=-1)
        head = width = max(vs, t.shape[1])
        sigma = torch.zeros(n, dtype=torch.long)
    # by rank: the oracle's sorted values and the range of the fp32 r-th largest value of each side
    a64, b64 = _pad(ss, width), _pad(_sorted_desc(q), width)
    a_lo, a_hi = _pad(_sorted_desc(p_lo), width), _pad(_sorted_desc(p_hi), width)
    b_lo = _pad(_sorted_desc(q * (1 - eps_q) - tiny), width)
    b_hi = _pad(_sorted_desc(q * (1 + eps_q) + tiny), width)
    diff = a64 - b64  # (N, W)
    l1 = diff[:, :head].abs().sum(-1)
    q_err = (q * eps_q).sum(-1) + q.shape[1] * tiny
    if topk:
        loss64 = l1 + gap.abs()
        loss_row = abs_p_err + q_err + (u + accum(head, dtype)) * l1 + gap_err + u * loss64
    else:
        loss64 = l1
        loss_row = abs_p_err + q_err + (u + accum(width, dtype)) * l1 * (1 + 2 * u)
    plus, minus = a_lo > b_hi, a_hi < b_lo  # (N, W) the sign of a − b at rank r is surely +1 / −1
    exact_zero = (a_hi <= 0) & (b_hi <= 0)  # both sides exactly 0 (padding): sign 0
    sgn = torch.sign(diff).long()
    in_head = (torch.arange(width)[None, :] < head)
    g_rank = torch.where(in_head, sgn - sigma[:, None], torch.zeros_like(sgn))
    open_rank = in_head & ~(plus | minus | exact_zero)
    lo_val = torch.where(open_rank, -1 - sigma[:, None], g_rank)[:, :vs]  # range of g the fp32 run sees at r
    hi_val = torch.where(open_rank, 1 - sigma[:, None], g_rank)[:, :vs]
    # by column: the ranks column j can take, and the range of g over them
    first = _count_above(p_lo, p_hi, strict=True)  # (N, V_S) columns surely ahead of j
    last = _count_above(p_hi, p_lo, strict=False) - 1  # columns possibly ahead of j, j included, minus 1
    rank64 = torch.empty_like(idx).scatter_(-1, idx, torch.arange(vs)[None, :].expand(n, vs).contiguous())
    first, last = torch.minimum(first, rank64), torch.maximum(last, rank64)
    values = range(-2, 3) if topk else range(-1, 2)
    vmin = torch.full((n, vs), max(values) + 1, dtype=torch.long)
    vmax = torch.full((n, vs), min(values) - 1, dtype=torch.long)
    zero = torch.zeros(n, 1, dtype=torch.long)
    for val in values:
        cum = torch.cat([zero, ((lo_val <= val) & (val <= hi_val)).long().cumsum(-1)], dim=-1)  # (N, V_S+1)
        hit = (cum.gather(-1, last + 1) - cum.gather(-1, first)) > 0
        vmin = torch.where(hit & (vmin > val), torch.full_like(vmin, val), vmin)
        vmax = torch.where(hit & (vmax < val), torch.full_like(vmax, val), vmax)
    diam = (vmax - vmin).double()  # (N, V_S); 0 where the subgradient is decided
    g_col = g_rank[:, :vs].gather(-1, rank64).double()  # the oracle's g at each column
    gmax = 2.0 if topk else 1.0
    S = (p * g_col).sum(-1, keepdim=True)  # (N, 1)
    spread = (p * (1 + eps) * diam).sum(-1, keepdim=True)  # how far the undecided columns can move S
    inner = (((g_col - S).abs() + diam + spread) * (eps + 5 * u) + diam + spread
             + (abs_p_err[:, None] + accum(vs, dtype) * (1 + eps.amax(-1, keepdim=True))) * gmax)
    bound = p * (1 + eps) / tau_s * inner + tiny / tau_s
    if topk:
        undecided_tail = (gap.abs() <= gap_err) | (tail_s <= tail_s_err)  # the tail sign, or the clamp at 0
        shift = torch.where(last < head, (tail_s + tail_s_err)[:, None], torch.ones_like(p))
        bound = bound + torch.where(undecided_tail[:, None], 2 * p * (1 + eps) * shift / tau_s, torch.zeros_like(p))
    coef = torch.ones(n, dtype=torch.float64) if row_coef is None else torch.as_tensor(row_coef).double().cpu()
    # the row coefficient (1/n of the mean, the upstream gradient, the products with them): ≤ 4 roundings
    grad_mag = p * ((g_col - S).abs() + diam + spread) / tau_s
    bound = coef.abs()[:, None] * (bound * (1 + 4 * u) + 4 * u * grad_mag)
    return ULDError(loss_row=loss_row * (1 + 4 * u), dlogits=bound, decided=diam == 0)


def rounding_model(exact: torch.Tensor, err: torch.Tensor | float, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                 torch.Tensor]:
    """A value computed with |error| ≤ err and then rounded to ``dtype``: returns (v, e) with v = exact rounded
    to ``dtype`` (as float64) and e the bound on |computed − v|: 0 where no rounding boundary of ``dtype`` lies
    within err of ``exact`` (every computation then rounds to v), err + one spacing elsewhere."""
    exact = exact.detach().double()
    err = torch.as_tensor(err, dtype=torch.float64).expand_as(exact)
    low = exact.to(dtype)
    v = low.double()
    up = torch.nextafter(low, torch.full_like(low, math.inf)).double()
    down = torch.nextafter(low, torch.full_like(low, -math.inf)).double()
    dist = torch.minimum((exact - (v + up) / 2).abs(), (exact - (v + down) / 2).abs())
    spacing = torch.maximum(up - v, v - down)
    return v, torch.where(dist > err, torch.zeros_like(err), err + spacing)


def row_coef(mask: torch.Tensor | None, n: int, reduction: str, upstream: torch.Tensor | float = 1.0) -> torch.Tensor:
    """(N,) float64 ∂loss/∂per_row: the mask, 1/(selected rows) for "mean", times the upstream gradient."""
    m = torch.ones(n, dtype=torch.float64) if mask is None else mask.detach().cpu().double()
    if reduction == "mean":
        m = m / max(int(m.sum()), 1)
    return m * torch.as_tensor(upstream, dtype=torch.float64).detach().cpu()


def reduced_loss_bound(per_row64: torch.Tensor, loss_row: torch.Tensor, coef: torch.Tensor,
                       reduction: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound of the reduced loss Σ_i c_i·per_row_i (or the masked per-row vector for "none"): the rows' own
    errors, plus accum(N) for the N-term sum and 3u for the coefficient (1/n and the product)."""
    u = unit_roundoff(dtype)
    per_row64, loss_row, coef = per_row64.detach().cpu().double(), loss_row.cpu(), coef.cpu()
    if reduction == "none":
        return coef.abs() * (loss_row + 3 * u * per_row64.abs())
    return (coef.abs() * loss_row).sum() + (accum(coef.numel(), dtype) + 3 * u) * (coef.abs() * per_row64.abs()).sum()


class LinearULDOracle(NamedTuple):
    """float64 oracle of a fused linear + ULD loss and the bounds of its low-precision evaluation."""

    loss: torch.Tensor  # () float64
    loss_bound: torch.Tensor  # ()
    grads: tuple  # float64 gradients of (hidden, weight, bias or None) for the upstream gradient given
    bounds: tuple  # their element-wise bounds
    undecided: int  # student columns whose subgradient rounding can change (ties, near-ties)


def linear_uld_oracle(hidden, weight, bias, teacher, *, student_temperature=1.0, teacher_temperature=1.0,
                      mask=None, reduction="mean", upstream=1.0, teacher_topk_logprobs=None,
                      teacher_tail_mass=None, bias_rounded_separately=False, dz_rounding=1.0) -> LinearULDOracle:
    """ULD of hidden @ weight.T (+ bias) in float64 with autograd, and the bounds of an implementation that

    * forms the logits in the parameters' dtype d: an fp32-accumulated product of H (+1 for the bias) terms,
      |error| ≤ accum(H + 1)·(|h| @ |W|ᵀ + |b|); for d = fp32 that is the whole logit error; for a 16-bit d the
      product is rounded to d (and, with ``bias_rounded_separately``, the bias is then added and rounded again):
      the oracle takes the logits rounded the same way (:func:`rounding_model`: exactly what any fp32
      accumulation rounds to, except within the accumulation error of a rounding boundary, where one
      spacing is allowed), so the comparison measures the ULD and its gradient, not the 16-bit logits;
    * evaluates ULD and ∂loss/∂z in fp32 (:func:`uld_error`) and rounds ∂z to d (``dz_rounding``·u_d·|∂z|: 1
      for round-to-nearest, 2 for a conversion that truncates, as the Triton interpreter's does);
    * forms grad_h = ∂z @ W (V_S terms), grad_W = ∂zᵀ @ h and grad_b = Σ_rows ∂z (N terms) accumulated in fp32:
      |Δ(∂z @ W)| ≤ |Δ∂z| @ |W| + accum(V_S)·(|∂z| + |Δ∂z|) @ |W|, and likewise for the others;
    * scales them by the upstream gradient and rounds them to d: 2u_d of the same absolute product.
    The oracle's gradients pass straight through the rounding of the logits, as the implementations' do.
    """
    dt = hidden.dtype
    ud, u = unit_roundoff(dt), unit_roundoff(torch.float32)
    h = hidden.detach().cpu().double().requires_grad_(True)
    w = weight.detach().cpu().double().requires_grad_(True)
    b = None if bias is None else bias.detach().cpu().double().requires_grad_(True)
    n, hid = h.shape
    habs, wabs = h.detach().abs(), w.detach().abs()
    prod_abs = habs @ wabs.T
    bias_abs = 0 if b is None else b.detach().abs()
    z_exact = torch.nn.functional.linear(h, w, b)
    if ud > u:  # 16-bit logits
        if bias_rounded_separately and b is not None:
            z1, e1 = rounding_model(h.detach() @ w.detach().T, accum(hid, torch.float32) * prod_abs, dt)
            z_low, z_err = rounding_model(z1 + b.detach(), e1 + u * (z1.abs() + bias_abs), dt)
        else:
            z_low, z_err = rounding_model(z_exact, accum(hid + 1, torch.float32) * (prod_abs + bias_abs), dt)
        z = z_exact + (z_low - z_exact).detach()  # value: the rounded logits; gradient: straight through
    else:
        z, z_err = z_exact, accum(hid + 1, torch.float32) * (prod_abs + bias_abs)
    z.retain_grad()
    topk = teacher_topk_logprobs is not None
    kw = dict(student_temperature=student_temperature)
    m = None if mask is None else mask.detach().cpu()
    if topk:
        tail = None if teacher_tail_mass is None else teacher_tail_mass.detach().cpu()
        per_row = uld_topk64(z, teacher_topk_logprobs.detach().cpu(), tail, reduction="none", **kw)
        teacher_side = teacher_topk_logprobs
    else:
        per_row = uld64(z, teacher.detach().cpu(), teacher_temperature=teacher_temperature, reduction="none", **kw)
        teacher_side = teacher
    loss = _reduce64(per_row, m, reduction)
    (loss * torch.as_tensor(upstream, dtype=torch.float64)).backward()
    coef = row_coef(m, n, reduction, upstream)
    err = uld_error(z.detach(), teacher_side, teacher_temperature=teacher_temperature, logit_err=z_err, topk=topk,
                    teacher_tail_mass=teacher_tail_mass, row_coef=coef, **kw)
    loss_bound = reduced_loss_bound(per_row.detach(), err.loss_row, row_coef(m, n, reduction), reduction)
    loss_bound = loss_bound * (1 + u)
    g = z.grad.detach()
    e = err.dlogits + (dz_rounding * ud * (g.abs() + err.dlogits) if ud > u else 0.0)  # ∂z rounded to d
    a = g.abs() + e
    out = 2 * ud  # upstream scaling and the rounding to the parameters' dtype
    bh = e @ wabs + (accum(weight.shape[0]) + out) * (a @ wabs)
    bw = e.T @ habs + (accum(n) + out) * (a.T @ habs)
    bb = None if b is None else e.sum(0) + (accum(n) + out) * a.sum(0)
    grads = (h.grad.detach(), w.grad.detach(), None if b is None else b.grad.detach())
    return LinearULDOracle(loss.detach(), loss_bound, grads, (bh, bw, bb), int((~err.decided).sum()))


# ---------------------------------------------------------------------------------------------------------------
# GRPO: group advantages and the policy loss from hidden states
# ---------------------------------------------------------------------------------------------------------------
def _shifted_stats(x: torch.Tensor, e_x: torch.Tensor, u: float):
    """Errors of the shifted mean and the two-pass deviations of the rows of x (B, n), inputs off by e_x.

    dev = x − x_0 (u), Σdev (accum(n)), mean = x_0 + Σdev/n (u for /n, u for +), d = x − mean (u),
    Σd² (u per square, accum(n)). Returns the exact values and bounds: dev, e_dev, Σdev, e_sum, d, e_d, ss, e_ss."""
    n = x.shape[1]
    dev = x - x[:, :1]
    e_dev = e_x + e_x[:, :1] + u * (dev.abs() + e_x + e_x[:, :1])
    sdev = dev.sum(1, keepdim=True)
    e_sum = e_dev.sum(1, keepdim=True) + accum(n) * (dev.abs() + e_dev).sum(1, keepdim=True)
    mean = x[:, :1] + sdev / n
    e_mean = e_x[:, :1] + (e_sum + u * sdev.abs()) / n * (1 + u) + u * (mean.abs() + e_sum / n)
    d = x - mean
    e_d = e_x + e_mean + u * (d.abs() + e_x + e_mean)
    ss = (d * d).sum(1, keepdim=True)
    sq = (d.abs() + e_d) ** 2
    e_ss = (2 * d.abs() * e_d + e_d ** 2 + u * sq).sum(1, keepdim=True) + accum(n) * sq.sum(1, keepdim=True)
    return dev, e_dev, sdev, e_sum, d, e_d, ss, e_ss


def _std_error(ss: torch.Tensor, e_ss: torch.Tensor, n: int, u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Bessel std sqrt(ss/(n−1)) and the bound of its evaluation (÷ and sqrt rounded: u each;
    |√a − √b| ≤ min(|a − b|/√b, √|a − b|))."""
    var = ss / (n - 1)
    e_var = e_ss / (n - 1) * (1 + u) + u * (var + e_ss / (n - 1))
    std = var.sqrt()
    e_std = torch.minimum(e_var / std.clamp_min(1e-300), e_var.sqrt())
    return std, e_std + u * (std + e_std)


def group_advantage_bound(rewards: torch.Tensor, group_size: int, *, eps: float = 1e-6, scale: str = "group",
                          baseline: str = "mean", input_err: torch.Tensor | float = 0.0,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bound (B·G,) on |Â − A| for an fp32 evaluation of the group advantages of kat.losses.grpo.group_advantages
    (shifted mean, two-pass Bessel std, (r − baseline)/(std + eps)), against the float64 values of the same
    formula; ``input_err`` is the error of the rewards as the implementation reads them (e.g. 2u·|r| for fp64
    rewards converted to fp32) and the result is rounded to ``out_dtype``.

    With the errors of :func:`_shifted_stats` and :func:`_std_error` (group: n = G; batch: n = B·G):
    leave-one-out c = dev − (Σdev − dev)/(G − 1) adds its subtraction, division and difference roundings;
    A = c/(std + eps) with the denominator off by e_den = e_std + u·(std + eps) (the sum, and eps rounded to
    fp32): |ΔA| ≤ (e_c + |A|·e_den)/(den − e_den), plus u of the quotient. Equal rewards give d = dev = 0 exactly,
    so the bound (and the error) is 0 there.
    """
    u = unit_roundoff(torch.float32)
    r = rewards.detach().cpu().double()
    G = group_size
    rg = r.view(-1, G)
    e_in = torch.as_tensor(input_err, dtype=torch.float64).cpu().expand_as(r).reshape(-1, G)
    dev, e_dev, sdev, e_sum, d, e_d, ss, e_ss = _shifted_stats(rg, e_in, u)
    if baseline == "mean":
        c, e_c = d, e_d
    else:
        rest = (sdev - dev) / (G - 1)
        e_rest = (e_sum + e_dev + u * (sdev - dev).abs()) / (G - 1) * (1 + u) + u * rest.abs()
        c = dev - rest
        e_c = e_dev + e_rest + u * (c.abs() + e_dev + e_rest)
    if scale == "none":
        a, e_a = c, e_c
    else:
        if scale == "group":
            std, e_std = _std_error(ss, e_ss, G, u)
        else:
            *_, ss_b, e_ss_b = _shifted_stats(r.view(1, -1), e_in.reshape(1, -1), u)
            std, e_std = _std_error(ss_b, e_ss_b, r.numel(), u)
        den = std + eps
        e_den = e_std + u * (den + e_std) + u * eps
        a = c / den
        quot = (e_c + a.abs() * e_den) / (den - e_den)
        e_a = quot + u * (a.abs() + quot)
    uo = unit_roundoff(out_dtype) if out_dtype != torch.float64 else 0.0
    if uo > u:
        e_a = e_a + uo * (a.abs() + e_a)
    return e_a.reshape(-1)


class PolicyOracle(NamedTuple):
    """float64 oracle of the policy loss from hidden states and the bounds of its fp32/bf16 evaluation."""

    loss: torch.Tensor
    loss_bound: torch.Tensor
    logp: torch.Tensor  # (N,) float64
    logp_bound: torch.Tensor
    entropy: torch.Tensor
    entropy_bound: torch.Tensor
    grads: tuple  # (hidden, weight) float64, for the upstream gradient given
    bounds: tuple
    undecided: int  # tokens whose clip/clamp branch rounding can change


def policy_oracle(hidden, weight, tokens, old_logp, advantages, mask, *, ref_logp=None, token_weights=None,
                  num_tokens=None, temperature=1.0, clip_eps_low=0.2, clip_eps_high=0.2, clip_ratio_c=None,
                  log_ratio_clamp=20.0, kl_coef=0.0, kl_estimator="k3", upstream=1.0, dz_rounding=2.0,
                  weight_grad_roundings=1) -> PolicyOracle:
    """The token-level policy loss of kat.losses.grpo.policy_loss_from_hidden, every step in float64
    (logits h @ Wᵀ — rounded to the parameters' dtype d first when it is 16-bit, as both implementations form
    them, see :func:`rounding_model` —, log-softmax, kat.losses.grpo.ppo_clip_loss and kl_estimate on float64
    tensors, Σ w·ℓ with the implementations' fp32 token weights), with autograd, and the bounds of an
    evaluation in fp32 (u) from logits in d:

    * logits: accum(H)·(|h| @ |W|ᵀ) (+ the rounding model for 16-bit d); x = z/τ: + 2u·|x|;
    * log π and lse: :func:`softmax_error` in log space (V-term sums), entropy lse − Σp·x likewise;
    * ratio ρ = exp(clamp(log π − old)): relative expm1(Δlog π + u|log π − old| + 4u); the clip thresholds
      1 − ε_low, 1 + ε_high are rounded to fp32 (2u); pg = max(−Aρ, −A·clip(ρ)) (max, min, clamp are
      1-Lipschitz) and its products (2u); the KL estimators through their Lipschitz constants on the error
      interval (k3: |1 − e^{−x}| + e^{−x}·expm1(Δx)) plus their roundings;
    * the gradient ∂ℓ/∂log π = −A·ρ·[branch] + kl_coef·∂kl: a token is *undecided* when ρ (or the log-ratio,
      the k3 clamps) is within its error of a clip boundary; there either branch is valid and the bound
      allows both; then ∂z_v = w·∂ℓ/∂log π·(1[v = y] − p_v)/τ (p_v with its ε, 3 roundings, the add at y);
      ∂z rounded to d (``dz_rounding``·u_d: 2 for the Triton interpreter's truncation); grad_h = ∂z @ W (V terms),
      grad_W = ∂zᵀ @ h (N terms, ``weight_grad_roundings`` roundings to d of the running sum), both scaled by
      the upstream gradient and rounded to d (2u_d).
    The loss Σ w·ℓ over N tokens adds accum(N).
    """
    from kat.losses import grpo as R

    dt = hidden.dtype
    ud, u = unit_roundoff(dt), unit_roundoff(torch.float32)
    tau = float(temperature)
    H = hidden.shape[-1]
    h = hidden.detach().cpu().double().reshape(-1, H).requires_grad_(True)
    W = weight.detach().cpu().double().requires_grad_(True)
    n = h.shape[0]
    m = mask.detach().cpu().reshape(-1).bool()
    y = torch.where(m, tokens.detach().cpu().reshape(-1), torch.zeros_like(tokens.detach().cpu().reshape(-1)))
    habs, wabs = h.detach().abs(), W.detach().abs()
    z_exact = h @ W.T
    acc_err = accum(H) * (habs @ wabs.T)
    if ud > u:
        z_low, z_err = rounding_model(z_exact, acc_err, dt)
        z = z_exact + (z_low - z_exact).detach()
    else:
        z, z_err = z_exact, acc_err
    z.retain_grad()
    x = z / tau
    logp = torch.log_softmax(x, -1).gather(-1, y[:, None]).squeeze(-1)  # (N,)
    old = old_logp.detach().cpu().reshape(-1).float().double()
    adv = advantages.detach().cpu().reshape(-1).float().double()
    zero = torch.zeros((), dtype=torch.float64)
    clip = R.ppo_clip_loss(logp[None], old[None], adv[None], m[None], clip_eps_low=clip_eps_low,
                           clip_eps_high=clip_eps_high, clip_ratio_c=clip_ratio_c, log_ratio_clamp=log_ratio_clamp)
    per_tok = clip.loss[0]
    ref = None if ref_logp is None else ref_logp.detach().cpu().reshape(-1).float().double()
    if kl_coef != 0.0:
        kl = R.kl_estimate(torch.where(m, logp, zero), torch.where(m, ref, zero), kl_estimator)
        per_tok = per_tok + kl_coef * torch.where(m, kl, zero)
    if token_weights is not None:
        w = (token_weights.detach().cpu().reshape(-1).float() * m).double()
    else:
        cnt = float(m.sum().clamp(min=1)) if num_tokens is None else max(float(num_tokens), 1.0)
        w = (m.double() / cnt).float().double()  # both implementations round the weights to fp32
    loss = (per_tok * w).sum()
    (loss * upstream).backward()

    xd = x.detach()
    x_err = z_err / tau + 2 * u * xd.abs()
    eps_p = softmax_error(xd, x_err)  # (N, V)
    p = torch.softmax(xd, -1)
    e_lp = torch.log1p(eps_p.gather(-1, y[:, None]).squeeze(-1))  # (N,)
    lp = logp.detach()
    lse = torch.logsumexp(xd, -1)
    e_lse = lse_error(xd, x_err).squeeze(-1)
    # entropy lse − Σ p·x
    ent = lse - (p * xd).sum(-1)
    px = (p * xd.abs()).sum(-1)
    e_ent = e_lse + (p * eps_p * xd.abs() + p * x_err).sum(-1) + (accum(xd.shape[1]) + 2 * u) * px \
        + u * (ent.abs() + px + lse.abs())
    # ratio and surrogate. A branch (clamp, clip, dual clip) is decided when the value is farther from its
    # boundary than both errors; a decided clamp returns the boundary itself, so only its rounding remains.
    def beyond(v, e, thr):  # v surely above thr / surely below thr
        return v - e > thr, v + e < thr

    dlr = lp - old
    e_dlr = e_lp + u * (dlr.abs() + e_lp)
    C = float(log_ratio_clamp)
    lr = dlr.clamp(-C, C)
    clamped = (dlr.abs() - e_dlr > C)  # both evaluations return ±C exactly
    undecided = (dlr.abs() - C).abs() <= e_dlr
    e_lr = torch.where(clamped, torch.zeros_like(e_dlr), e_dlr)
    rho = lr.exp()
    e_rho = rho * torch.expm1(e_lr + 4 * u)
    lo_t, hi_t = 1.0 - clip_eps_low, 1.0 + clip_eps_high
    e_th = 2 * u * hi_t  # 1 − ε_low and 1 + ε_high rounded to fp32
    a_abs = adv.abs()
    # A > 0: pg = −A·min(ρ, 1 + ε_high); A < 0: pg = −A·min(max(ρ, 1 − ε_low), c) (c = ∞ without the dual clip)
    c_dual = math.inf if clip_ratio_c is None else float(clip_ratio_c)
    above_hi, below_hi = beyond(rho, e_rho + e_th, hi_t)
    above_lo, below_lo = beyond(rho, e_rho + e_th, lo_t)
    above_c, below_c = beyond(rho, e_rho + 2 * u * min(c_dual, 1e30), c_dual)
    pos = adv > 0
    neg = adv < 0
    ratio_branch = torch.where(pos, below_hi, above_lo & below_c)  # the surrogate follows ρ (gradient −A·ρ)
    const_branch = torch.where(pos, above_hi, below_lo | above_c)  # it is a clip constant (gradient 0)
    undecided |= (pos | neg) & ~(ratio_branch | const_branch)
    e_val = torch.where(ratio_branch, e_rho, torch.where(const_branch, e_th + 2 * u * min(c_dual, 1e30) * above_c,
                                                         e_rho + e_th + 2 * u * min(c_dual, 1e30)))
    e_pg = a_abs * e_val + 2 * u * clip.loss[0].detach().abs()  # the products with A and the max/min
    rho_active = ratio_branch & ~clamped
    e_dpg = torch.where(undecided, a_abs * (rho + e_rho),
                        torch.where(rho_active, a_abs * e_rho + u * a_abs * rho, torch.zeros_like(rho)))
    dpg_abs = torch.where(rho_active | undecided, a_abs * (rho + e_rho), torch.zeros_like(rho))
    pg_abs = clip.loss[0].detach().abs()
    e_loss_tok = e_pg
    if kl_coef != 0.0:
        xk = torch.where(m, lp - ref, zero)
        e_x = e_lp + u * (xk.abs() + e_lp)
        und = None
        if kl_estimator == "k1":
            e_kl, e_dkl, dkl_abs = e_x, torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        else:
            e_k2 = (xk.abs() + e_x) * e_x + 2 * u * (xk.abs() + e_x) ** 2
            e_kl, e_dkl, dkl_abs = e_k2, e_x, xk.abs() + e_x  # k2, and the k2 gradient of k3+
        if kl_estimator in ("k3", "k3+"):
            x_out = xk.abs() - e_x > 20.0  # input clamp decided: the clamp constant ±20 exactly
            e_xc = torch.where(x_out, torch.zeros_like(e_x), e_x)
            xc = xk.clamp(-20.0, 20.0)
            ex = torch.exp(-xc)
            e_raw = e_xc * ((1 - ex).abs() + ex * torch.expm1(e_xc)) + 4 * u * ex * torch.exp(e_xc) \
                + 2 * u * (ex * torch.exp(e_xc) + 1 + xc.abs() + e_xc)
            raw = ex - 1 + xc
            r_out = raw.abs() - e_raw > 10.0  # output clamp decided: ±10 exactly
            e_k3 = torch.where(r_out, torch.zeros_like(e_raw), e_raw)
            if kl_estimator == "k3":
                und = ((xk.abs() - 20.0).abs() <= e_x) | ((raw.abs() - 10.0).abs() <= e_raw)
                inside = ~(x_out | r_out)
                d3 = (1 - ex).abs()
                e_d3 = ex * torch.expm1(e_x + 4 * u) + u * (1 + ex)
                e_dkl = torch.where(und, d3 + e_d3, torch.where(inside, e_d3, torch.zeros_like(e_d3)))
                dkl_abs = torch.where(und | inside, d3 + e_d3, torch.zeros_like(d3))
                e_kl = e_k3
            else:  # k3+: k2 + (k3 − k2) detached -> the k3 value with two more roundings
                e_kl = e_k3 + 2 * e_k2 + 2 * u * (raw.abs().clamp(max=10.0) + e_k3 + (xk.abs() + e_x) ** 2)
        # ℓ = pg + kl_coef·kl: the product and the sum (2u of |pg| + kl_coef·|kl|)
        e_loss_tok = e_loss_tok + kl_coef * e_kl + 2 * u * (pg_abs + e_pg + kl_coef * (kl.detach().abs() + e_kl))
        e_dl = e_dpg + kl_coef * e_dkl + 2 * u * (dpg_abs + kl_coef * dkl_abs)
        dl_abs = dpg_abs + kl_coef * dkl_abs
        if und is not None:
            undecided |= und
    else:
        e_dl, dl_abs = e_dpg, dpg_abs
    e_dl, dl_abs = torch.where(m, e_dl, zero), torch.where(m, dl_abs, zero)
    e_loss_tok = torch.where(m, e_loss_tok, zero)
    # w·ℓ rounded (u), then the N-term sum
    loss_bound = (w.abs() * (e_loss_tok + u * (per_tok.detach().abs() + e_loss_tok))).sum() \
        + accum(n) * (w.abs() * (per_tok.detach().abs() + e_loss_tok)).sum()
    # ∂z_v = gs·(1[v = y] − p_v), gs = w·∂ℓ/∂log π/τ (3 roundings: product, 1/τ, its product)
    up = abs(float(upstream))
    gs_abs = w.abs()[:, None] * dl_abs[:, None] / tau
    e_gs = w.abs()[:, None] * (e_dl[:, None] + 3 * u * dl_abs[:, None]) / tau
    onehot = torch.zeros_like(p).scatter_(-1, y[:, None], 1.0)
    e_dz = e_gs * (onehot - p).abs() + gs_abs * (p * eps_p + torch.finfo(torch.float32).tiny) \
        + u * gs_abs * p + onehot * u * gs_abs * (1 + p)
    g = z.grad.detach() / up if up else z.grad.detach()  # ∂loss/∂z for upstream 1
    if ud > u:
        e_dz = e_dz + dz_rounding * ud * (g.abs() + e_dz) + dz_rounding * torch.finfo(dt).tiny * 2 * ud
    a = g.abs() + e_dz
    out = 2 * ud
    bh = up * (e_dz @ wabs + (accum(W.shape[0]) + out) * (a @ wabs))
    bw = up * (e_dz.T @ habs + (accum(n) + out + (weight_grad_roundings - 1) * ud) * (a.T @ habs))
    return PolicyOracle(loss.detach(), loss_bound * (1 + 2 * u), lp, e_lp, ent, e_ent,
                        (h.grad.detach().reshape(hidden.shape), W.grad.detach()), (bh.reshape(hidden.shape), bw),
                        int((undecided & m).sum()))
