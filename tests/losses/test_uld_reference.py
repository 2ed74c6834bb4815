"""kat.losses.uld: the pure-torch ULD oracle, its top-k + tail form and the top-k bounds."""
from __future__ import annotations

import math

import pytest
import torch

from kat.losses.uld import uld_loss, uld_loss_topk, uld_topk_bounds, uld_topk_lower_bound, uld_topk_upper_bound
from numerics import (accum, assert_close_to_oracle, reduced_loss_bound, row_coef, softmax_error, uld64,
                      uld_error, uld_topk64, unit_roundoff)

U32 = unit_roundoff(torch.float32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _zipf_like(n: int, v: int, seed: int, noise: float = 1.0) -> torch.Tensor:
    """(n, v) logits with a Zipf-shaped profile (p_r ∝ r^-1.1 up to noise) at random token positions."""
    g = _gen(seed)
    base = -1.1 * torch.log(torch.arange(1, v + 1, dtype=torch.float32))
    rows = [base[torch.randperm(v, generator=g)] for _ in range(n)]
    return torch.stack(rows) + noise * torch.randn(n, v, generator=g)


def _uld_by_integral(a: torch.Tensor, b: torch.Tensor) -> float:
    """∫_0^1 |N_a(x) − N_b(x)| dx with N(x) = #{i : p_i > x}, integrated exactly between breakpoints."""
    pts = torch.cat([a, b, torch.tensor([0.0, 1.0])]).double().unique()  # ascending breakpoints
    total = 0.0
    for lo, hi in zip(pts[:-1].tolist(), pts[1:].tolist()):
        mid = 0.5 * (lo + hi)
        total += abs(int((a.double() > mid).sum()) - int((b.double() > mid).sum())) * (hi - lo)
    return total


def test_hand_computed_example_and_padding():
    # p_S = (0.5, 0.3, 0.2), p_T = (0.1, 0.6, 0.2, 0.1): sorted (0.5,0.3,0.2,0) vs (0.6,0.2,0.1,0.1)
    s = torch.tensor([[0.5, 0.3, 0.2]]).log()
    t = torch.tensor([[0.1, 0.6, 0.2, 0.1]]).log()
    want = 0.1 + 0.1 + 0.1 + 0.1
    got = uld_loss(s, t)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(want, abs=1e-6)
    assert uld_loss(t, s).item() == pytest.approx(want, abs=1e-6), "ULD is symmetric"


def test_sort_free_identity_matches_sorted_l1():
    s = torch.randn(3, 40, generator=_gen(1)) * 2
    t = torch.randn(3, 57, generator=_gen(2)) * 2
    got = uld_loss(s, t, reduction="none")
    # the integral is evaluated in float64 on float64 probabilities; the tolerance is the fp32 evaluation's
    # rounding bound (numerics.uld_error: softmax of 40/57 terms, a 57-term sorted L1)
    bound = uld_error(s.double(), t).loss_row
    want = torch.tensor([_uld_by_integral(torch.softmax(s[i].double(), -1), torch.softmax(t[i].double(), -1))
                         for i in range(3)], dtype=torch.float64)
    assert_close_to_oracle(got, want, bound, name="sorted L1 vs integral")


def test_properties_identity_permutation_bounds_temperature():
    s = torch.randn(6, 300, generator=_gen(3)) * 3
    t = torch.randn(6, 300, generator=_gen(4)) * 3
    assert torch.equal(uld_loss(s, s, reduction="none"), torch.zeros(6))
    # permutation invariance: both fp32 evaluations lie within the rounding bound of the same float64 value
    err = uld_error(s.double(), t).loss_row
    want = uld64(s, t, reduction="none")
    perm = torch.randperm(300, generator=_gen(5))
    got = uld_loss(s, t, reduction="none")
    assert_close_to_oracle(uld_loss(s[:, perm], t, reduction="none"), want, err, name="permuted")
    assert_close_to_oracle(got, want, err, name="unpermuted")
    # ULD ≤ L1 ≤ 2 hold exactly; in fp32 each side is off by at most its rounding bound. The L1 of two
    # 300-term softmaxes: Σ|Δp| + Σ|Δq| (numerics.softmax_error) + the subtraction and the 300-term sum.
    p64, q64 = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    l1_64 = (p64 - q64).abs().sum(-1)
    l1_err = ((p64 * softmax_error(s.double(), 2 * U32 * s.double().abs())).sum(-1)
              + (q64 * softmax_error(t.double(), 2 * U32 * t.double().abs())).sum(-1)
              + (U32 + accum(300)) * l1_64)
    l1 = (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().sum(-1)
    assert (got.double() <= l1.double() + err + l1_err).all() and (got.double() <= 2.0 + err).all()
    assert (got >= 0).all()  # a sum of absolute values
    # temperature: dividing the logits first (in fp32, the same two roundings as inside) is the same loss
    err_t = uld_error(s.double(), t, student_temperature=0.7, teacher_temperature=2.0).loss_row
    want_t = uld64(s, t, student_temperature=0.7, teacher_temperature=2.0, reduction="none")
    assert_close_to_oracle(uld_loss(s, t, student_temperature=0.7, teacher_temperature=2.0, reduction="none"),
                           want_t, err_t, name="with temperatures")
    assert_close_to_oracle(uld_loss(s / 0.7, t / 2.0, reduction="none"), want_t, err_t, name="logits divided")


def test_reductions_mask_and_zero_rows():
    s = torch.randn(5, 50, generator=_gen(6), requires_grad=True)
    t = torch.randn(5, 70, generator=_gen(7))
    mask = torch.tensor([True, False, True, True, False])
    per_row = uld_loss(s, t, reduction="none")
    assert per_row.shape == (5,)
    masked = uld_loss(s, t, mask=mask, reduction="none")
    assert torch.equal(masked[~mask], torch.zeros(2))
    torch.testing.assert_close(masked[mask], per_row[mask])
    torch.testing.assert_close(uld_loss(s, t, mask=mask, reduction="sum"), per_row[mask].sum())
    torch.testing.assert_close(uld_loss(s, t, mask=mask), per_row[mask].mean())
    none = torch.zeros(5, dtype=torch.bool)
    zero = uld_loss(s, t, mask=none)
    assert zero.item() == 0.0 and not torch.isnan(zero) and zero.grad_fn is not None
    zero.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_gradient_matches_closed_form_and_teacher_is_detached():
    s = (torch.randn(4, 64, generator=_gen(8)) * 2).requires_grad_(True)
    t = (torch.randn(4, 80, generator=_gen(9)) * 2).requires_grad_(True)
    tau_s = 0.7
    uld_loss(s, t, student_temperature=tau_s, teacher_temperature=2.0, reduction="sum").backward()
    assert t.grad is None
    with torch.no_grad():  # the closed form, in float64
        p = torch.softmax(s.double() / tau_s, -1)  # (4, 64)
        q = torch.softmax(t.double() / 2.0, -1)  # (4, 80)
        order = p.argsort(-1, descending=True)
        tq = q.sort(-1, descending=True).values[:, :64]  # teacher value at each student rank
        g_sorted = torch.sign(p.gather(-1, order) - tq)  # (4, 64) sign at each student rank
        g = torch.empty_like(p).scatter_(-1, order, g_sorted)
        want = p * (g - (p * g).sum(-1, keepdim=True)) / tau_s
    # the fp32 autograd gradient is within the rounding bound of the closed form (numerics.uld_error:
    # softmax of 64/80 terms, S = Σ p·g over 64 terms; columns at near-ties get the range of subgradients)
    bound = uld_error(s.double(), t, student_temperature=tau_s, teacher_temperature=2.0).dlogits
    assert_close_to_oracle(s.grad, want, bound, name="grad")


@pytest.mark.parametrize("n,vs,vt,k", [(7, 1000, 1003, None), (4, 151_936, 152_064, None), (9, 999, 1200, 64),
                                       (4, 151_936, 152_064, 64)])
def test_float32_oracle_within_rounding_of_float64(n, vs, vt, k):
    """uld_loss / uld_loss_topk (fp32 by design) against their float64 transcriptions, at an odd and a real
    (Qwen-size) vocabulary: value and gradient within the rounding bound of numerics.uld_error (softmax over
    V_S terms, sorted L1 over max(V_S, V_T) or k ranks, the top-k tails)."""
    s = torch.randn(n, vs, generator=_gen(30)) * 3
    t = torch.randn(n, vt, generator=_gen(31)) * 3
    mask = torch.arange(n) != 1
    s32 = s.clone().requires_grad_(True)
    s64 = s.double().requires_grad_(True)
    if k is None:
        kw = dict(student_temperature=0.8, teacher_temperature=1.2, mask=mask)
        got, want = uld_loss(s32, t, **kw), uld64(s64, t, **kw)
        per_row = uld64(s, t, student_temperature=0.8, teacher_temperature=1.2, reduction="none")
        err = uld_error(s64, t, student_temperature=0.8, teacher_temperature=1.2, row_coef=row_coef(mask, n, "mean"))
    else:
        top, tail = _teacher_cache(t, k)  # fp32 cache values are the inputs of both
        got = uld_loss_topk(s32, top, tail, student_temperature=0.8, mask=mask)
        want = uld_topk64(s64, top, tail, student_temperature=0.8, mask=mask)
        per_row = uld_topk64(s, top, tail, student_temperature=0.8, reduction="none")
        err = uld_error(s64, top, topk=True, teacher_tail_mass=tail, student_temperature=0.8,
                        row_coef=row_coef(mask, n, "mean"))
    got.backward()
    want.backward()
    assert_close_to_oracle(got, want, reduced_loss_bound(per_row, err.loss_row, row_coef(mask, n, "mean"), "mean"),
                           name="loss")
    assert_close_to_oracle(s32.grad, s64.grad, err.dlogits, name="grad")


def test_low_precision_inputs_are_computed_in_fp32():
    s = torch.randn(3, 100, generator=_gen(10)) * 3
    t = torch.randn(3, 90, generator=_gen(11)) * 3
    s16, t16 = s.bfloat16(), t.bfloat16()
    got = uld_loss(s16, t16, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, uld_loss(s16.float(), t16.float(), reduction="none"))
    s16.requires_grad_(True)
    uld_loss(s16, t16).backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


def test_extreme_and_equal_logits_are_finite():
    s = torch.zeros(2, 20)
    s[1, 0] = 1e4
    t = torch.zeros(2, 20)
    t[1, 3] = -1e4
    s.requires_grad_(True)
    loss = uld_loss(s, t, reduction="none")
    assert torch.isfinite(loss).all()
    assert loss[0].item() == 0.0
    assert loss[1].item() == pytest.approx(2 * 18 / 19, abs=1e-6)  # (1, 0, ..) vs (1/19 × 19, 0)
    loss.sum().backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("bad", [
    dict(reduction="avg"), dict(student_temperature=0.0), dict(teacher_temperature=-1.0),
    dict(student_temperature=float("nan")), dict(mask=torch.ones(3, dtype=torch.bool)),
    dict(mask=torch.ones(4))])
def test_bad_arguments_raise(bad):
    s, t = torch.randn(4, 10), torch.randn(4, 12)
    with pytest.raises((ValueError, TypeError)):
        uld_loss(s, t, **bad)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="student_logits"):
        uld_loss(torch.randn(4), torch.randn(4, 3))
    with pytest.raises(ValueError, match="same number of rows"):
        uld_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="teacher_logits"):
        uld_loss(torch.randn(4, 3), torch.ones(4, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# top-k + tail bucket and bounds
# ----------------------------------------------------------------------------------------------------------------
def _teacher_cache(t: torch.Tensor, k: int, shuffle_seed: int | None = None):
    logp = torch.log_softmax(t.float(), -1)
    top = logp.topk(k, -1).values  # (N, k) descending
    if shuffle_seed is not None:
        top = top[:, torch.randperm(k, generator=_gen(shuffle_seed))]
    tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
    return top, tail


def _cache_error(t: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(N,) bound on Σ_r |b_r − b64_r| + |τ_T − τ_T64| between the fp32 cache of _teacher_cache and the exact one
    (top-k of the float64 log-softmax): the fp32 log-softmax is off by ≤ log(1 + ε) in log space
    (numerics.softmax_error; the r-th largest moves no more), and τ_T = 1 − Σ exp(top) adds accum(k) + u."""
    lp_err = torch.log1p(softmax_error(t.double(), 0.0)).amax(-1)  # (N,)
    b = top.double().exp()
    head = (b * torch.expm1(lp_err[:, None])).sum(-1)
    return 2 * head + (accum(top.shape[1]) + 2 * U32) * b.sum(-1) + U32


@pytest.mark.parametrize("maker", ["gauss1", "gauss3", "zipf"])
def test_topk_bounds_bracket_exact_uld(maker):
    n, v = 8, 2000
    if maker == "zipf":
        s, t = _zipf_like(n, v, 12), _zipf_like(n, v, 13)
    else:
        scale = 1.0 if maker == "gauss1" else 3.0
        s = torch.randn(n, v, generator=_gen(14)) * scale
        t = torch.randn(n, v, generator=_gen(15)) * scale
    exact = uld_loss(s, t, reduction="none").double()
    exact_err = uld_error(s.double(), t).loss_row
    for k in (1, 16, 64, 256, 1024):
        top, tail = _teacher_cache(t, k)
        lo, hi = uld_topk_bounds(s, top, tail)
        # lower ≤ ULD ≤ upper hold exactly for the exact cache. Slack: each fp32 evaluation's rounding bound
        # (numerics.uld_error; the upper form has τ_S + τ_T instead of |τ_S − τ_T|: ≤ 2u·4 more) plus the
        # distance between the fp32 cache and the exact one (_cache_error)
        e = uld_error(s.double(), top, topk=True, teacher_tail_mass=tail).loss_row
        slack = exact_err + e + _cache_error(t, top)
        assert (lo.double() <= exact + slack).all(), (maker, k)
        assert (exact <= hi.double() + slack + 8 * U32).all(), (maker, k)
        torch.testing.assert_close(lo, uld_loss_topk(s, top, tail, reduction="none"))
        torch.testing.assert_close(uld_topk_lower_bound(s, top, tail), lo)
        torch.testing.assert_close(uld_topk_upper_bound(s, top, tail), hi)


def test_topk_tail_error_shrinks_with_k_on_zipf_logits():
    """Reports (in the assertion messages) the top-k + tail relative error at several k."""
    n, v = 16, 8000
    s = _zipf_like(n, v, 16) * 1.5
    t = s + 0.5 * torch.randn(n, v, generator=_gen(17))  # a student close to its teacher
    exact = uld_loss(s, t).item()
    errs = {}
    for k in (16, 64, 256, 1024):
        top, tail = _teacher_cache(t, k)
        errs[k] = abs(uld_loss_topk(s, top, tail).item() - exact) / exact
    assert errs[1024] <= errs[16], errs
    assert errs[64] < 0.2 and errs[1024] < 0.05, errs


def test_topk_full_k_equals_exact_and_gradients_agree():
    s = (torch.randn(5, 60, generator=_gen(18)) * 2).requires_grad_(True)
    t = torch.randn(5, 60, generator=_gen(19)) * 2
    top, tail = _teacher_cache(t, 60, shuffle_seed=3)  # unsorted cache rows are accepted
    got = uld_loss_topk(s, top, None, student_temperature=1.0)  # tail derived from the log-probs
    got.backward()
    # with k = V both tails are 0 and the top-k form is the exact ULD: compare with the float64 oracle of the
    # full teacher. Bound: the fp32 top-k evaluation on a cache whose log-probs are off by the fp32
    # log-softmax's error (numerics.uld_error with teacher_err; near-ties get the range of subgradients).
    # atol 1e-12: in float64 the two forms differ by the 60-term tails 1 − Σp (≲ 60·2^-53).
    s64 = s.detach().double().requires_grad_(True)
    want = uld64(s64, t)
    want.backward()
    lp64 = torch.log_softmax(t.double(), -1)
    err = uld_error(s64, lp64, topk=True, teacher_err=torch.log1p(softmax_error(t.double(), 0.0)),
                    row_coef=row_coef(None, 5, "mean"))
    per_row = uld64(s.detach(), t, reduction="none")
    assert_close_to_oracle(got, want, reduced_loss_bound(per_row, err.loss_row, row_coef(None, 5, "mean"), "mean"),
                           atol=1e-12, name="loss")
    assert_close_to_oracle(s.grad, s64.grad, err.dlogits, atol=1e-12, name="grad")


def test_topk_k_larger_than_student_vocab_and_mask():
    s = torch.randn(3, 10, generator=_gen(20))
    t = torch.randn(3, 30, generator=_gen(21))
    top, tail = _teacher_cache(t, 20)
    mask = torch.tensor([True, False, True])
    per_row = uld_loss_topk(s, top, tail, mask=mask, reduction="none")
    assert per_row[1].item() == 0.0 and torch.isfinite(per_row).all()
    lo, hi = uld_topk_bounds(s, top, tail, mask=mask)
    exact = uld_loss(s, t, reduction="none").double()
    # slack as in test_topk_bounds_bracket_exact_uld: the rounding bounds of both fp32 evaluations and the
    # distance of the fp32 cache from the exact one
    slack = (uld_error(s.double(), t).loss_row + uld_error(s.double(), top, topk=True, teacher_tail_mass=tail).loss_row
             + _cache_error(t, top))
    assert (lo.double()[mask] <= (exact + slack)[mask]).all()
    assert (exact[mask] <= (hi.double() + slack + 8 * U32)[mask]).all()
    with pytest.raises(ValueError, match="teacher_tail_mass"):
        uld_loss_topk(s, top, torch.zeros(2))


def test_topk_tail_term_value():
    # student top-1 = 0.7, tail 0.3; teacher top-1 = 0.5, tail 0.5 -> |0.7-0.5| + |0.3-0.5| = 0.4
    s = torch.tensor([[0.7, 0.2, 0.1]]).log()
    top = torch.tensor([[math.log(0.5)]])
    assert uld_loss_topk(s, top, torch.tensor([0.5])).item() == pytest.approx(0.4, abs=1e-6)
    lo, hi = uld_topk_bounds(s, top, torch.tensor([0.5]))
    assert lo.item() == pytest.approx(0.4, abs=1e-6) and hi.item() == pytest.approx(0.2 + 0.3 + 0.5, abs=1e-6)
