"""kat.losses.uld.uld_loss_chunked against the full-sort oracle uld_loss: values and gradients."""
from __future__ import annotations

import pytest
import torch

from kat.losses.uld import uld_loss, uld_loss_chunked


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
