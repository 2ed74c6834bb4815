"""kat.losses.uld.uld_loss_chunked and fused_linear_uld_loss_chunked against the full-sort oracle uld_loss."""
from __future__ import annotations

import pytest
import torch

from kat.losses.uld import fused_linear_uld_loss_chunked, uld_loss, uld_loss_chunked


def _pair(n, vs, vt, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, vs, generator=g) * scale).to(dtype)
    t = (torch.randn(n, vt, generator=g) * scale).to(dtype)
    return s, t


@pytest.mark.parametrize("n,vs,vt,chunk", [(7, 1000, 1000, 3), (33, 3203, 2999, 8), (16, 32_000, 32_003, 16)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_oracle_value_and_gradient(n, vs, vt, chunk, reduction):
    s, t = _pair(n, vs, vt, 3.0, n + vs)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(1)) > 0.3
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    kw = dict(student_temperature=0.7, teacher_temperature=1.3, mask=mask, reduction=reduction)
    ref = uld_loss(a, t, **kw)
    got = uld_loss_chunked(b, t, chunk_rows=chunk, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    w = torch.randn_like(ref)  # a random upstream gradient exercises the per-row scaling
    (ref * w).sum().backward()
    (got * w).sum().backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7)


def test_extremes_ties_and_bf16():
    s, t = _pair(6, 4099, 4099, 1.0, 5)
    s[0] = 0.0  # all equal: ties everywhere
    t[1] = 0.0
    s[2, 7] = 1e4  # one-hot
    t[3] = -1e4
    t[3, 0] = 1e4
    for dtype in (torch.float32, torch.bfloat16):
        a = s.to(dtype).clone().requires_grad_(True)
        b = s.to(dtype).clone().requires_grad_(True)
        uld_loss(a, t.to(dtype)).backward()
        out = uld_loss_chunked(b, t.to(dtype), chunk_rows=4)
        out.backward()
        torch.testing.assert_close(out, uld_loss(s.to(dtype), t.to(dtype)), rtol=1e-5, atol=1e-6)
        assert b.grad.dtype == dtype and torch.isfinite(b.grad.float()).all()
        torch.testing.assert_close(b.grad.float(), a.grad.float(), rtol=2e-2, atol=1e-6)


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
    """Value and the gradients of hidden, weight and bias equal the oracle's on h @ W.T + b."""
    h, w, b, t = _fused_case(n, hid, vs, vt, n + vs, bias=True)
    mask = torch.rand(n, generator=torch.Generator().manual_seed(2)) > 0.3
    kw = dict(student_temperature=0.7, teacher_temperature=1.3, mask=mask, reduction=reduction)
    leaves_ref = [x.clone().requires_grad_(True) for x in (h, w, b)]
    leaves_got = [x.clone().requires_grad_(True) for x in (h, w, b)]
    ref = uld_loss(torch.nn.functional.linear(*leaves_ref), t, **kw)
    got = fused_linear_uld_loss_chunked(leaves_got[0], leaves_got[1], t, lm_head_bias=leaves_got[2],
                                        chunk_rows=chunk, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (ref * 1.7).backward()  # a non-unit upstream gradient exercises the backward scaling
    (got * 1.7).backward()
    for name, a, c in zip(("hidden", "weight", "bias"), leaves_ref, leaves_got):
        cos = torch.nn.functional.cosine_similarity(a.grad.flatten(), c.grad.flatten(), dim=0)
        assert cos > 0.99999, (name, cos)
        torch.testing.assert_close(c.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_linear_bf16_extremes_and_frozen_head():
    h, w, _, t = _fused_case(6, 32, 4099, 4099, 11, dtype=torch.bfloat16)
    h[0] = 0.0  # student row of equal logits (ties everywhere)
    t[1] = 0.0
    t[2] = -1e4
    t[2, 0] = 1e4  # one-hot teacher
    hr, hg = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    ref = uld_loss(hr @ w.t(), t)
    got = fused_linear_uld_loss_chunked(hg, w, t, chunk_rows=4)  # weight frozen: no grad_W kept
    ref.backward()
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    assert hg.grad.dtype == torch.bfloat16 and torch.isfinite(hg.grad.float()).all()
    cos = torch.nn.functional.cosine_similarity(hg.grad.float().flatten(), hr.grad.float().flatten(), dim=0)
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
