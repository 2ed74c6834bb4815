"""kat.losses.uld.uld_loss_chunked and fused_linear_uld_loss_chunked against the full-sort oracle uld_loss."""
from __future__ import annotations

import pytest
import torch

from kat.losses.uld import fused_linear_uld_loss_chunked, uld_loss_chunked
from numerics import assert_close_to_oracle, linear_uld_oracle, reduced_loss_bound, row_coef, uld64, uld_error, \
    unit_roundoff


def _pair(n, vs, vt, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vs, generator=g) * scale).to(dtype)
    t = (torch.randn(n, vt, generator=g) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("n,vs,vt,chunk", [(7, 1000, 1000, 3), (33, 3203, 2999, 8), (16, 32_000, 32_003, 16)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle_value_and_gradient(n, vs, vt, chunk, reduction):
    """Value and gradient equal the float64 oracle within the rounding bound of an fp32 evaluation
    (numerics.uld_error: softmax over V = 1000..32003 terms, ULD over max(V_S, V_T) ranks; the gradient is
    compared where the subgradient is decided and allowed the range of valid subgradients elsewhere)."""
    s, t = _pair(n, vs, vt, 3.0, n + vs)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) > 0.3
    b = s.clone().requires_grad_(True)
    kw = dict(student_temperature=0.7, teacher_temperature=1.3)
    got = uld_loss_chunked(b, t, chunk_rows=chunk, mask=mask, reduction=reduction, **kw)
    w = torch.randn_like(got)  # a random upstream gradient exercises the per-row scaling
    (got * w).sum().backward()
    s64 = s.double().requires_grad_(True)
    ref = uld64(s64, t, mask=mask, reduction=reduction, **kw)
    (ref * w.double()).sum().backward()
    err = uld_error(s64, t, row_coef=row_coef(mask, n, reduction, w), **kw)
    per_row = uld64(s, t, reduction="none", **kw)
    assert_close_to_oracle(got, ref, reduced_loss_bound(per_row, err.loss_row, row_coef(mask, n, reduction),
                                                        reduction), name="loss")
    assert_close_to_oracle(b.grad, s64.grad, err.dlogits, name="grad")


def test_extremes_ties_and_bf16():
    s, t = _pair(6, 4099, 4099, 1.0, 5)
    s[0] = 0.0  # all equal: ties everywhere
    t[1] = 0.0
    s[2, 7] = 1e4  # one-hot
    t[3] = -1e4
    t[3, 0] = 1e4
    for dtype in (torch.float32, torch.bfloat16):
        sd, td = s.to(dtype), t.to(dtype)
        b = sd.clone().requires_grad_(True)
        out = uld_loss_chunked(b, td, chunk_rows=4)
        out.backward()
        # the float64 oracle on the same (dtype-rounded) inputs; the computation is fp32 for both dtypes
        s64 = sd.double().requires_grad_(True)
        ref = uld64(s64, td)
        ref.backward()
        err = uld_error(s64, td, row_coef=row_coef(None, 6, "mean"))
        assert_close_to_oracle(out, ref, reduced_loss_bound(uld64(sd, td, reduction="none"), err.loss_row,
                                                            row_coef(None, 6, "mean"), "mean"), name=f"{dtype} loss")
        assert b.grad.dtype == dtype and torch.isfinite(b.grad.float()).all()
        # the gradient is stored in dtype and backward scales it in dtype: three more roundings (∂, the row
        # coefficient, their product) of u_dtype each; row 0 is all ties (any subgradient is valid there)
        u = unit_roundoff(dtype) if dtype != torch.float32 else 0.0
        bound = err.dlogits + 3 * u * (s64.grad.abs() + err.dlogits)
        assert not bool(err.decided[0].any()) and bool(err.decided[1:].any())
        assert_close_to_oracle(b.grad, s64.grad, bound, name=f"{dtype} grad")


def test_teacher_gets_no_gradient_and_bad_input_is_named():
    s, t = _pair(3, 50, 50, 1.0, 9)
    t.requires_grad_(True)
    s.requires_grad_(True)
    uld_loss_chunked(s, t).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="chunk_rows"):
        uld_loss_chunked(s, t, chunk_rows=0)
    with pytest.raises(ValueError, match="same number of rows"):
        uld_loss_chunked(s, t[:2])


# ---- fused_linear_uld_loss_chunked: hidden states and the output head in, no full-size student logits ----

def _fused_case(n, hid, vs, vt, seed, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hid, generator=g).to(dtype)
    w = (torch.randn(vs, hid, generator=g) * 3.0 * hid ** -0.5).to(dtype)
    b = (torch.randn(vs, generator=g) * 0.5).to(dtype) if bias else None
    t = (torch.randn(n, vt, generator=g) * 3.0).to(dtype)
    return h, w, b, t


@pytest.mark.parametrize("n,hid,vs,vt,chunk", [(7, 16, 1000, 1003, 3), (33, 24, 3203, 2999, None),
                                                (16, 64, 32_000, 32_003, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_linear_matches_oracle_on_materialised_logits(n, hid, vs, vt, chunk, reduction):
    """Value and the gradients of hidden, weight and bias equal the float64 oracle on h @ W.T + b, within the
    rounding bound of the fp32 evaluation (numerics.linear_uld_oracle: logits with H+1 = 17..65 terms, ULD
    over V = 1003..32003 sorted ranks, grad_h = ∂z @ W with V_S terms, grad_W and grad_b with N terms)."""
    h, w, b, t = _fused_case(n, hid, vs, vt, n + vs, bias=True)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(2)) > 0.3
    kw = dict(student_temperature=0.7, teacher_temperature=1.3, mask=mask, reduction=reduction)
    leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    got = fused_linear_uld_loss_chunked(leaves[0], leaves[1], t, lm_head_bias=leaves[2], chunk_rows=chunk, **kw)
    (got * 1.7).backward()  # a non-unit upstream gradient exercises the backward scaling
    ref = linear_uld_oracle(h, w, b, t, upstream=1.7, **kw)
    assert_close_to_oracle(got, ref.loss, ref.loss_bound, name="loss")
    for name, leaf, want, bound in zip(("hidden", "weight", "bias"), leaves, ref.grads, ref.bounds):
        assert_close_to_oracle(leaf.grad, want, bound, name=name)
        cos = torch.nn.functional.cosine_similarity(leaf.grad.double().flatten(), want.flatten(), dim=0)
        assert cos > 0.99999, (name, cos)  # the direction, as before (now against the float64 oracle)


def test_fused_linear_bf16_extremes_and_frozen_head():
    """bf16 hidden and head: the oracle takes the logits rounded to bf16 as the implementation forms them
    (numerics.linear_uld_oracle), so the bound is the fp32 ULD's plus the bf16 roundings of ∂z and grad_h."""
    h, w, _, t = _fused_case(6, 32, 4099, 4099, 11, dtype=torch.bfloat16)
    h[0] = 0.0  # student row of equal logits (ties everywhere)
    t[1] = 0.0
    t[2] = -1e4
    t[2, 0] = 1e4  # one-hot teacher
    hg = h.clone().requires_grad_(True)
    got = fused_linear_uld_loss_chunked(hg, w, t, chunk_rows=4)  # weight frozen: no grad_W kept
    got.backward()
    ref = linear_uld_oracle(h, w, None, t)
    assert_close_to_oracle(got, ref.loss, ref.loss_bound, name="loss")
    assert hg.grad.dtype == torch.bfloat16 and torch.isfinite(hg.grad.float()).all()
    assert_close_to_oracle(hg.grad, ref.grads[0], ref.bounds[0], name="hidden")
    cos = torch.nn.functional.cosine_similarity(hg.grad.double().flatten(), ref.grads[0].flatten(), dim=0)
    assert cos > 0.999


def test_fused_linear_bad_input_is_named():
    h, w, _, t = _fused_case(3, 8, 50, 50, 4)
    with pytest.raises(ValueError, match=r"lm_head_weight must have shape \[V_S, 8\]"):
        fused_linear_uld_loss_chunked(h, w[:, :4], t)
    with pytest.raises(TypeError, match="share one float dtype"):
        fused_linear_uld_loss_chunked(h, w.double(), t)
    with pytest.raises(ValueError, match="teacher_logits must have 3 rows"):
        fused_linear_uld_loss_chunked(h, w, t[:2])
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        fused_linear_uld_loss_chunked(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_uld_loss_chunked(h, w, t, chunk_rows=0)
    with pytest.raises(ValueError, match="lm_head_bias must have shape"):
        fused_linear_uld_loss_chunked(h, w, t, lm_head_bias=torch.zeros(3))
