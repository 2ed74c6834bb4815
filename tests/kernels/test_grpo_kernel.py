"""kat_kernels.grpo against the torch references (kat.losses.grpo, kat.rl.credit).

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton decorates them,
i.e. before ``kat_kernels.grpo`` is imported. It is set here only when there is no CUDA device (on a GPU machine
the same tests run compiled), and it has no effect on code that does not launch Triton kernels.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kat.losses import grpo as R  # noqa: E402
from kat.rl import credit as S  # noqa: E402
from kat_kernels import grpo as K  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# group advantages (contract: same signature and result)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,G", [(7, 5), (1024, 16), (1, 3), (5, 64)])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("baseline", ["mean", "loo"])
def test_group_advantages_matches_reference(B, G, scale, baseline):
    r = torch.randn(B * G, generator=_gen(B + G))
    r[:G] = 0.7  # an equal-reward group
    if B > 2:
        r[G : 2 * G] = torch.tensor([0.0, 1.0] * (G // 2) + [1.0] * (G % 2))  # a binary group
    r = r.to(DEV)
    got = K.group_advantages(r, G, scale=scale, baseline=baseline)
    want = R.group_advantages(r, G, scale=scale, baseline=baseline)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[:G], torch.zeros(G, device=DEV)), "equal rewards must give exactly 0"
    assert torch.isfinite(got).all()


def test_group_advantages_degenerate_and_dtypes():
    r = torch.randn(12, generator=_gen(0)).to(DEV)
    for scale in ("group", "batch", "none"):
        assert torch.equal(K.group_advantages(r, 1, scale=scale), torch.zeros(12, device=DEV))
    const = torch.full((12,), 3.3, device=DEV)
    assert torch.equal(K.group_advantages(const, 4, scale="batch"), torch.zeros(12, device=DEV))
    ints = torch.tensor([1, 0, 0, 1, 1, 1], device=DEV)
    torch.testing.assert_close(K.group_advantages(ints, 3), R.group_advantages(ints, 3))
    bf = torch.randn(16, generator=_gen(1)).to(DEV, torch.bfloat16)
    assert K.group_advantages(bf, 4).dtype == torch.bfloat16
    torch.testing.assert_close(K.group_advantages(bf, 4), R.group_advantages(bf, 4))
    f64 = torch.randn(16, generator=_gen(2), dtype=torch.float64).to(DEV)
    torch.testing.assert_close(K.group_advantages(f64, 8), R.group_advantages(f64, 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.zeros(2, 3), group_size=3), "1-D"),
        (dict(rewards=torch.zeros(7), group_size=3), "multiple of group_size"),
        (dict(rewards=torch.zeros(6), group_size=0), "group_size"),
        (dict(rewards=torch.zeros(6), group_size=3, scale="seq"), "scale"),
        (dict(rewards=torch.zeros(6), group_size=3, baseline="x"), "baseline"),
        (dict(rewards=torch.tensor([1.0, float("inf")]), group_size=2), "finite"),
    ],
)
def test_group_advantages_bad_args_same_errors(kwargs, match):
    for fn in (K.group_advantages, R.group_advantages):
        with pytest.raises(ValueError, match=match):
            fn(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# step credit
# ----------------------------------------------------------------------------------------------------------------
def _credit_inputs(B, G, T, seed):
    g = _gen(seed)
    j = torch.randint(-1, 2, (B * G,), generator=g).float()
    a = torch.rand(B * G, generator=g) * 2 - 0.5
    j[:G] = 1.0  # equal judge rewards in group 0
    lengths = torch.randint(0, T + 1, (B * G,), generator=g)
    bnd = torch.minimum(torch.randint(0, 6, (B * G,), generator=g), lengths)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    seg = S.segment_ids_from_boundaries(bnd, mask)
    return j.to(DEV), a.to(DEV), seg.to(DEV), bnd.to(DEV), mask.to(DEV)


@pytest.mark.parametrize(
    "B,G,T,scale",
    [(5, 3, 37, s) for s in ("group", "batch", "none")]
    + [(2, 1, 9, "group"), (96, 16, 300, "group"), (96, 16, 300, "batch")],  # realistic G and T (interpreter-sized B)
)
def test_step_credit_matches_reference(B, G, T, scale):
    j, a, seg, bnd, mask = _credit_inputs(B, G, T, B * T)
    want = S.step_credit_advantages(j, a, seg, G, scale=scale)
    got = K.step_credit_advantages(j, a, seg, G, scale=scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got_b = K.step_credit_advantages(j, a, None, G, boundaries=bnd, response_mask=mask, scale=scale)
    torch.testing.assert_close(got_b, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[seg == 0], torch.zeros(int((seg == 0).sum()), device=DEV)), "masked tokens must be 0"
    if G > 1:
        assert torch.equal(got[:G][seg[:G] == 1], torch.zeros(int((seg[:G] == 1).sum()), device=DEV))


def test_step_credit_hand_example_and_errors():
    # judge [1, −1, −1] and answer [1.5, 0, 0.5]: the hand-computed case of tests/rewards
    j = torch.tensor([1.0, -1.0, -1.0], device=DEV)
    a = torch.tensor([1.5, 0.0, 0.5], device=DEV)
    seg = torch.tensor([[1, 1, 2, 2, 0], [1, 2, 2, 2, 2], [1, 1, 1, 2, 0]], device=DEV)
    got = K.step_credit_advantages(j, a, seg, 3)
    assert got[0, 0].item() == pytest.approx(1.1546995, abs=1e-6)
    assert got[0, 2].item() == pytest.approx(1.0910881, abs=1e-6)
    torch.testing.assert_close(got, S.step_credit_advantages(j, a, seg, 3))
    with pytest.raises(ValueError, match="only 0"):
        K.step_credit_advantages(j, a, seg * 2, 3)
    with pytest.raises(ValueError, match="not both"):
        K.step_credit_advantages(j, a, seg, 3, boundaries=torch.zeros(3, device=DEV), response_mask=seg > 0)
    with pytest.raises(ValueError, match="boundaries"):
        K.step_credit_advantages(j, a, None, 3, response_mask=seg > 0)


# ----------------------------------------------------------------------------------------------------------------
# fused policy loss
# ----------------------------------------------------------------------------------------------------------------
def _loss_inputs(N, H, V, dtype, seed, masked_frac=0.2):
    g = _gen(seed)
    h = (torch.randn(N, H, generator=g) * 0.5).to(DEV, dtype)
    W = (torch.randn(V, H, generator=g) * 0.5).to(DEV, dtype)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    mask = (torch.rand(N, generator=g) > masked_frac).to(DEV)
    with torch.no_grad():
        lp = R.selective_log_softmax(h @ W.t(), y)
    old = lp + 0.3 * torch.randn(N, generator=g).to(DEV)  # ratios spread over the clip range
    ref = lp + 0.3 * torch.randn(N, generator=g).to(DEV)
    adv = torch.randn(N, generator=g).to(DEV)
    y = torch.where(mask, y, torch.full_like(y, -100))  # ignored ids on masked rows
    return h, W, y, old, adv, mask, ref


def _both(h, W, y, old, adv, mask, ref, chunk_size=None, **kw):
    out = []
    for impl in ("kernel", "torch"):
        hh = h.detach().clone().requires_grad_(True)
        ww = W.detach().clone().requires_grad_(True)
        if impl == "kernel":
            res = K.fused_policy_loss(hh, ww, y, old, adv, mask, ref_logp=ref, compute_entropy=True,
                                      chunk_size=chunk_size, **kw)
        else:
            res = R.policy_loss_from_hidden(hh, ww, y, old, adv, mask, ref_logp=ref, compute_entropy=True, **kw)
        res.loss.backward()
        out.append((res.loss.detach().float(), res.logp, res.entropy, hh.grad.float(), ww.grad.float()))
    return out


def _assert_close_results(k, t, mask, tol, ptol=1e-5):
    (lk, pk, ek, hk, wk), (lt, pt, et, ht, wt) = k, t
    torch.testing.assert_close(lk, lt, **tol)
    torch.testing.assert_close(pk[mask], pt[mask], rtol=ptol, atol=ptol)
    torch.testing.assert_close(ek, et, rtol=ptol, atol=ptol)
    torch.testing.assert_close(hk, ht, **tol)
    torch.testing.assert_close(wk, wt, **tol)


FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(clip_eps_high=0.28, clip_ratio_c=3.0, temperature=0.7),
        dict(kl_coef=0.1, kl_estimator="k1"),
        dict(kl_coef=0.1, kl_estimator="k2", clip_eps_low=0.1),
        dict(kl_coef=0.1, kl_estimator="k3", clip_ratio_c=2.0, num_tokens=100.0),
        dict(kl_coef=0.1, kl_estimator="k3+", log_ratio_clamp=0.25),
    ],
    ids=["plain", "cliphigher-dual-temp", "k1", "k2", "k3-dual-globaln", "k3plus-clamp"],
)
def test_fused_policy_loss_fp32_odd_shape(kw):
    inputs = _loss_inputs(37, 29, 523, torch.float32, seed=11)
    k, t = _both(*inputs, chunk_size=8, **kw)
    _assert_close_results(k, t, inputs[5], FP32)


def test_fused_policy_loss_chunking_and_token_weights():
    h, W, y, old, adv, mask, ref = _loss_inputs(24, 16, 301, torch.float32, seed=3)
    a = K.fused_policy_loss(h, W, y, old, adv, mask, chunk_size=1).loss
    b = K.fused_policy_loss(h, W, y, old, adv, mask, chunk_size=7).loss
    c = K.fused_policy_loss(h, W, y, old, adv, mask).loss
    torch.testing.assert_close(a, b, **FP32)
    torch.testing.assert_close(a, c, **FP32)
    # sequence-level aggregation through per-token weights ([4, 6] view of the 24 tokens)
    w = R.aggregation_weights(mask.view(4, 6), "seq-mean-token-mean").view(-1)
    k, t = _both(h, W, y, old, adv, mask, ref, token_weights=w)
    _assert_close_results(k, t, mask, FP32)


def test_fused_policy_loss_batched_shape_and_grad_scaling():
    h, W, y, old, adv, mask, ref = _loss_inputs(30, 16, 200, torch.float32, seed=5)
    shp = (5, 6)
    hh = h.view(5, 6, 16).clone().requires_grad_(True)
    ww = W.clone().requires_grad_(True)
    out = K.fused_policy_loss(hh, ww, y.view(shp), old.view(shp), adv.view(shp), mask.view(shp))
    assert out.logp.shape == shp and out.entropy is None
    (3.0 * out.loss).backward()
    h2 = h.clone().requires_grad_(True)
    w2 = W.clone().requires_grad_(True)
    ref_out = R.policy_loss_from_hidden(h2, w2, y, old, adv, mask)
    (3.0 * ref_out.loss).backward()
    torch.testing.assert_close(out.loss, ref_out.loss, **FP32)
    torch.testing.assert_close(hh.grad.view(30, 16), h2.grad, **FP32)
    torch.testing.assert_close(ww.grad, w2.grad, **FP32)
    # forward only (nothing needs a gradient): same loss
    with torch.no_grad():
        torch.testing.assert_close(K.fused_policy_loss(h, W, y, old, adv, mask).loss, ref_out.loss, **FP32)


def test_fused_policy_loss_real_vocab_fp32():
    inputs = _loss_inputs(6, 32, 151_936, torch.float32, seed=7)
    k, t = _both(*inputs, kl_coef=0.05, clip_ratio_c=3.0, clip_eps_high=0.28)
    _assert_close_results(k, t, inputs[5], FP32)


def test_fused_policy_loss_bf16_odd_shape():
    inputs = _loss_inputs(37, 29, 523, torch.bfloat16, seed=13)
    k, t = _both(*inputs, chunk_size=8, kl_coef=0.1, clip_ratio_c=3.0, clip_eps_high=0.28)
    _assert_close_results(k, t, inputs[5], BF16)
    # fp32 accumulation of the head gradient over chunks: same result, returned in the weight's dtype
    h, W, y, old, adv, mask, ref = inputs
    ww = W.detach().clone().requires_grad_(True)
    K.fused_policy_loss(h, ww, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, clip_ratio_c=3.0, clip_eps_high=0.28,
                        chunk_size=8, grad_weight_fp32=True).loss.backward()
    assert ww.grad.dtype == torch.bfloat16
    torch.testing.assert_close(ww.grad.float(), t[4], **BF16)


def test_fused_policy_loss_bad_args():
    h, W, y, old, adv, mask, ref = _loss_inputs(6, 8, 17, torch.float32, seed=1)
    with pytest.raises(ValueError, match="tokens"):
        K.fused_policy_loss(h, W, y[:5], old, adv, mask)
    with pytest.raises(ValueError, match="weight"):
        K.fused_policy_loss(h, W[:, :4], y, old, adv, mask)
    with pytest.raises(ValueError, match="ref_logp"):
        K.fused_policy_loss(h, W, y, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        K.fused_policy_loss(h, W, y, old, adv, mask, clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="kl_estimator"):
        K.fused_policy_loss(h, W, y, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k4")
    bad = torch.where(mask, torch.full_like(y, 17), y)
    with pytest.raises(ValueError, match="tokens must be ids"):
        K.fused_policy_loss(h, W, bad, old, adv, mask)


# ----------------------------------------------------------------------------------------------------------------
# full size (GPU only)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
def test_gpu_advantages_full_size():
    r = torch.randint(0, 2, (1024 * 16,), device="cuda").float()
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(K.group_advantages(r, 16, scale=scale), R.group_advantages(r, 16, scale=scale),
                                   rtol=1e-5, atol=1e-6)
    j, a, seg, bnd, mask = _credit_inputs(1024, 16, 2048, 0)
    torch.testing.assert_close(K.step_credit_advantages(j, a, seg, 16), S.step_credit_advantages(j, a, seg, 16),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@gpu
def test_gpu_fused_policy_loss_full_size_bf16():
    inputs = _loss_inputs(8 * 2048, 896, 151_936, torch.bfloat16, seed=0)
    k, t = _both(*inputs, kl_coef=0.04, clip_eps_high=0.28)
    _assert_close_results(k, t, inputs[5], BF16, ptol=1e-4)
