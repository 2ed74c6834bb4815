"""kat.losses.uld: the pure-torch ULD oracle, its top-k + tail form and the top-k bounds."""
from __future__ import annotations

import math

import pytest
import torch

from kat.losses.uld import uld_loss, uld_loss_topk, uld_topk_bounds, uld_topk_lower_bound, uld_topk_upper_bound


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
    for i in range(3):
        ps, pt = torch.softmax(s[i], -1), torch.softmax(t[i], -1)
        assert got[i].item() == pytest.approx(_uld_by_integral(ps, pt), rel=1e-5)


def test_properties_identity_permutation_bounds_temperature():
    s = torch.randn(6, 300, generator=_gen(3)) * 3
    t = torch.randn(6, 300, generator=_gen(4)) * 3
    assert torch.equal(uld_loss(s, s, reduction="none"), torch.zeros(6))
    perm = torch.randperm(300, generator=_gen(5))
    torch.testing.assert_close(uld_loss(s[:, perm], t, reduction="none"), uld_loss(s, t, reduction="none"))
    l1 = (torch.softmax(s, -1) - torch.softmax(t, -1)).abs().sum(-1)
    got = uld_loss(s, t, reduction="none")
    assert (got <= l1 + 1e-6).all() and (got <= 2.0).all() and (got >= 0).all()
    torch.testing.assert_close(
        uld_loss(s, t, student_temperature=0.7, teacher_temperature=2.0, reduction="none"),
        uld_loss(s / 0.7, t / 2.0, reduction="none"))


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
    with torch.no_grad():
        p = torch.softmax(s / tau_s, -1)  # (4, 64)
        q = torch.softmax(t / 2.0, -1)  # (4, 80)
        order = p.argsort(-1, descending=True)
        tq = q.sort(-1, descending=True).values[:, :64]  # teacher value at each student rank
        g_sorted = torch.sign(p.gather(-1, order) - tq)  # (4, 64) sign at each student rank
        g = torch.empty_like(p).scatter_(-1, order, g_sorted)
        want = p * (g - (p * g).sum(-1, keepdim=True)) / tau_s
    torch.testing.assert_close(s.grad, want, rtol=1e-4, atol=1e-7)


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


@pytest.mark.parametrize("maker", ["gauss1", "gauss3", "zipf"])
def test_topk_bounds_bracket_exact_uld(maker):
    n, v = 8, 2000
    if maker == "zipf":
        s, t = _zipf_like(n, v, 12), _zipf_like(n, v, 13)
    else:
        scale = 1.0 if maker == "gauss1" else 3.0
        s = torch.randn(n, v, generator=_gen(14)) * scale
        t = torch.randn(n, v, generator=_gen(15)) * scale
    exact = uld_loss(s, t, reduction="none")
    for k in (1, 16, 64, 256, 1024):
        top, tail = _teacher_cache(t, k)
        lo, hi = uld_topk_bounds(s, top, tail)
        assert (lo <= exact + 1e-6).all(), (maker, k)
        assert (exact <= hi + 1e-6).all(), (maker, k)
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
    want = uld_loss(s.detach().requires_grad_(True), t)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)
    got.backward()
    s2 = s.detach().clone().requires_grad_(True)
    uld_loss(s2, t).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_topk_k_larger_than_student_vocab_and_mask():
    s = torch.randn(3, 10, generator=_gen(20))
    t = torch.randn(3, 30, generator=_gen(21))
    top, tail = _teacher_cache(t, 20)
    mask = torch.tensor([True, False, True])
    per_row = uld_loss_topk(s, top, tail, mask=mask, reduction="none")
    assert per_row[1].item() == 0.0 and torch.isfinite(per_row).all()
    lo, hi = uld_topk_bounds(s, top, tail, mask=mask)
    exact = uld_loss(s, t, reduction="none")
    assert (lo[mask] <= exact[mask] + 1e-6).all() and (exact[mask] <= hi[mask] + 1e-6).all()
    with pytest.raises(ValueError, match="teacher_tail_mass"):
        uld_loss_topk(s, top, torch.zeros(2))


def test_topk_tail_term_value():
    # student top-1 = 0.7, tail 0.3; teacher top-1 = 0.5, tail 0.5 -> |0.7-0.5| + |0.3-0.5| = 0.4
    s = torch.tensor([[0.7, 0.2, 0.1]]).log()
    top = torch.tensor([[math.log(0.5)]])
    assert uld_loss_topk(s, top, torch.tensor([0.5])).item() == pytest.approx(0.4, abs=1e-6)
    lo, hi = uld_topk_bounds(s, top, torch.tensor([0.5]))
    assert lo.item() == pytest.approx(0.4, abs=1e-6) and hi.item() == pytest.approx(0.2 + 0.3 + 0.5, abs=1e-6)
