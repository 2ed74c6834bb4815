"""kat_kernels.grpo against the torch references (kat.losses.grpo, kat.rl.credit).

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton decorates them,
i.e. before ``kat_kernels.grpo`` is imported. It is set here only when there is no CUDA device (on a GPU machine
the same tests run compiled), and it has no effect on code that does not launch Triton kernels.

Every comparison is against a float64 oracle (the references run on float64 tensors, or tests/numerics.py),
element by element within the rounding bound of the fp32 (or bf16) evaluation derived there from the sizes
involved; the torch references are checked against the same oracle.
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
from numerics import assert_close_to_oracle, group_advantage_bound, policy_oracle, unit_roundoff  # noqa: E402

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
    ref = R.group_advantages(r, G, scale=scale, baseline=baseline)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # float64 oracle: the reference on float64 rewards; bound: fp32 shifted mean and two-pass std over G
    # (group) or B·G (batch) terms, the division by std + eps (numerics.group_advantage_bound)
    want = R.group_advantages(r.double(), G, scale=scale, baseline=baseline)
    bound = group_advantage_bound(r, G, scale=scale, baseline=baseline)
    assert_close_to_oracle(got, want, bound, name="kernel")
    assert_close_to_oracle(ref, want, bound, name="torch reference")
    assert torch.equal(got[:G], torch.zeros(G, device=DEV)), "equal rewards must give exactly 0"
    assert torch.isfinite(got).all()


def test_group_advantages_degenerate_and_dtypes():
    r = torch.randn(12, generator=_gen(0)).to(DEV)
    for scale in ("group", "batch", "none"):
        assert torch.equal(K.group_advantages(r, 1, scale=scale), torch.zeros(12, device=DEV))
    const = torch.full((12,), 3.3, device=DEV)
    assert torch.equal(K.group_advantages(const, 4, scale="batch"), torch.zeros(12, device=DEV))
    ints = torch.tensor([1, 0, 0, 1, 1, 1], device=DEV)
    assert_close_to_oracle(K.group_advantages(ints, 3), R.group_advantages(ints.double(), 3),
                           group_advantage_bound(ints, 3), name="int rewards")
    bf = torch.randn(16, generator=_gen(1)).to(DEV, torch.bfloat16)
    assert K.group_advantages(bf, 4).dtype == torch.bfloat16
    # fp32 math, then one rounding to bf16 (u = 2^-8)
    assert_close_to_oracle(K.group_advantages(bf, 4), R.group_advantages(bf.double(), 4),
                           group_advantage_bound(bf, 4, out_dtype=torch.bfloat16), name="bf16 rewards")
    f64 = torch.randn(16, generator=_gen(2), dtype=torch.float64).to(DEV)
    # the kernel reads fp64 rewards as fp32 (≤ one spacing: 2u·|r|) and computes in fp32
    assert_close_to_oracle(K.group_advantages(f64, 8), R.group_advantages(f64, 8),
                           group_advantage_bound(f64, 8, input_err=2 * unit_roundoff(torch.float32) * f64.abs()),
                           name="fp64 rewards")


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
    ref = S.step_credit_advantages(j, a, seg, G, scale=scale)
    got = K.step_credit_advantages(j, a, seg, G, scale=scale)
    # float64 oracle: the group advantages of both reward vectors in float64, placed by segment; bound: the
    # group advantages' fp32 bound (numerics.group_advantage_bound) of the row's segment
    segc = seg.cpu()
    adv_j, adv_a = (R.group_advantages(x.double(), G, scale=scale)[:, None] for x in (j, a))
    b_j, b_a = (group_advantage_bound(x, G, scale=scale)[:, None] for x in (j, a))
    zero = torch.zeros((), dtype=torch.float64)
    want = torch.where(segc == 1, adv_j.cpu(), torch.where(segc == 2, adv_a.cpu(), zero))
    bound = torch.where(segc == 1, b_j, torch.where(segc == 2, b_a, zero))
    assert_close_to_oracle(got, want, bound, name="kernel")
    assert_close_to_oracle(ref, want, bound, name="torch reference")
    got_b = K.step_credit_advantages(j, a, None, G, boundaries=bnd, response_mask=mask, scale=scale)
    assert_close_to_oracle(got_b, want, bound, name="kernel from boundaries")
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
    """Kernel against the torch reference (GPU full size only: the float64 oracle does not fit there)."""
    (lk, pk, ek, hk, wk), (lt, pt, et, ht, wt) = k, t
    torch.testing.assert_close(lk, lt, **tol)
    torch.testing.assert_close(pk[mask], pt[mask], rtol=ptol, atol=ptol)
    torch.testing.assert_close(ek, et, rtol=ptol, atol=ptol)
    torch.testing.assert_close(hk, ht, **tol)
    torch.testing.assert_close(wk, wt, **tol)


BF16 = dict(rtol=5e-2, atol=5e-3)


def _check_oracle(h, W, y, old, adv, mask, ref, *, chunk_size=None, upstream=1.0, impls=("kernel", "torch"),
                  weight_grad_roundings=None, **kw):
    """Kernel and torch reference against the float64 oracle (numerics.policy_oracle: logits over H terms,
    log-softmax and entropy over V terms, the clipped ratio and KL with their branch decisions, grad_h over V
    and grad_W over N terms; the kernel's ∂z is truncated to a 16-bit dtype under the interpreter)."""
    bw16 = weight_grad_roundings or {"kernel": 1, "torch": 1}
    for impl in impls:
        hh = h.detach().clone().requires_grad_(True)
        ww = W.detach().clone().requires_grad_(True)
        if impl == "kernel":
            res = K.fused_policy_loss(hh, ww, y, old, adv, mask, ref_logp=ref, compute_entropy=True,
                                      chunk_size=chunk_size, **kw)
        else:
            kw_t = {k: v for k, v in kw.items() if k != "grad_weight_fp32"}
            res = R.policy_loss_from_hidden(hh, ww, y, old, adv, mask, ref_logp=ref, compute_entropy=True, **kw_t)
        (upstream * res.loss).backward()
        kw_o = {k: v for k, v in kw.items() if k != "grad_weight_fp32"}
        o = policy_oracle(h, W, y, old, adv, mask, ref_logp=ref, upstream=upstream,
                          dz_rounding=2.0 if impl == "kernel" else 1.0, weight_grad_roundings=bw16[impl], **kw_o)
        m = mask.reshape(-1).cpu()
        assert_close_to_oracle(res.loss, o.loss, o.loss_bound, name=f"{impl} loss")
        assert_close_to_oracle(res.logp.reshape(-1).cpu()[m], o.logp[m], o.logp_bound[m], name=f"{impl} logp")
        assert_close_to_oracle(res.entropy.reshape(-1), o.entropy, o.entropy_bound, name=f"{impl} entropy")
        assert_close_to_oracle(hh.grad, o.grads[0], o.bounds[0], name=f"{impl} grad hidden")
        assert_close_to_oracle(ww.grad, o.grads[1], o.bounds[1], name=f"{impl} grad weight")


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
    _check_oracle(*inputs, chunk_size=8, **kw)


def test_fused_policy_loss_chunking_and_token_weights():
    h, W, y, old, adv, mask, ref = _loss_inputs(24, 16, 301, torch.float32, seed=3)
    o = policy_oracle(h, W, y, old, adv, mask)
    for chunk in (1, 7, None):  # the chunking changes nothing beyond rounding
        assert_close_to_oracle(K.fused_policy_loss(h, W, y, old, adv, mask, chunk_size=chunk).loss, o.loss,
                               o.loss_bound, name=f"chunk {chunk}")
    # sequence-level aggregation through per-token weights ([4, 6] view of the 24 tokens)
    w = R.aggregation_weights(mask.view(4, 6), "seq-mean-token-mean").view(-1)
    _check_oracle(h, W, y, old, adv, mask, ref, token_weights=w)


def test_fused_policy_loss_batched_shape_and_grad_scaling():
    h, W, y, old, adv, mask, ref = _loss_inputs(30, 16, 200, torch.float32, seed=5)
    shp = (5, 6)
    hh = h.view(5, 6, 16).clone().requires_grad_(True)
    ww = W.clone().requires_grad_(True)
    out = K.fused_policy_loss(hh, ww, y.view(shp), old.view(shp), adv.view(shp), mask.view(shp))
    assert out.logp.shape == shp and out.entropy is None
    (3.0 * out.loss).backward()
    o = policy_oracle(h.view(5, 6, 16), W, y.view(shp), old.view(shp), adv.view(shp), mask.view(shp), upstream=3.0)
    assert_close_to_oracle(out.loss, o.loss, o.loss_bound, name="loss")
    assert_close_to_oracle(hh.grad, o.grads[0], o.bounds[0], name="grad hidden")
    assert_close_to_oracle(ww.grad, o.grads[1], o.bounds[1], name="grad weight")
    _check_oracle(h, W, y, old, adv, mask, None, impls=("torch",), upstream=3.0)
    # forward only (nothing needs a gradient): same loss
    with torch.no_grad():
        assert_close_to_oracle(K.fused_policy_loss(h, W, y, old, adv, mask).loss, o.loss, o.loss_bound,
                               name="forward only")


def test_fused_policy_loss_real_vocab_fp32():
    inputs = _loss_inputs(6, 32, 151_936, torch.float32, seed=7)
    _check_oracle(*inputs, kl_coef=0.05, clip_ratio_c=3.0, clip_eps_high=0.28)


def test_fused_policy_loss_bf16_odd_shape():
    inputs = _loss_inputs(37, 29, 523, torch.bfloat16, seed=13)
    kw = dict(kl_coef=0.1, clip_ratio_c=3.0, clip_eps_high=0.28)
    # the kernel accumulates the bf16 head gradient over the 5 chunks of 8 rows in bf16 (5 roundings of the
    # running sum); autograd forms it in one bf16 product
    _check_oracle(*inputs, chunk_size=8, weight_grad_roundings={"kernel": 5, "torch": 1}, **kw)
    # fp32 accumulation of the head gradient over chunks: one bf16 rounding per chunk product, returned in bf16
    h, W, y, old, adv, mask, ref = inputs
    ww = W.detach().clone().requires_grad_(True)
    out = K.fused_policy_loss(h, ww, y, old, adv, mask, ref_logp=ref, chunk_size=8, grad_weight_fp32=True, **kw)
    out.loss.backward()
    assert ww.grad.dtype == torch.bfloat16
    o = policy_oracle(h, W, y, old, adv, mask, ref_logp=ref, weight_grad_roundings=1, **kw)
    assert_close_to_oracle(ww.grad, o.grads[1], o.bounds[1], name="grad weight (fp32 accumulation)")


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
