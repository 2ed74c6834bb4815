"""kat_kernels.uld and kat_kernels.fused_linear_uld (Triton) against the oracle kat.losses.uld.

On CPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 must be set before triton decorates them,
i.e. before ``kat_kernels.uld`` is imported. It is set here only when there is no CUDA device (on a GPU machine
the same tests run compiled, plus the full-size ones marked ``gpu``); it has no effect on code that does not
launch Triton kernels. Acceptance (task contract): loss relative error ≤ 1e-3 and gradient cosine ≥ 0.999 on
columns whose student probability is not tied within its row; no NaN/Inf anywhere. The kernel sorts exactly,
so its errors are at fp32 rounding level: every comparison is against the float64 oracle (tests/numerics.py),
element by element within the rounding bound of an fp32 evaluation, on top of the contract's two numbers.
"""
from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kat.losses import uld as R  # noqa: E402
from numerics import (assert_close_to_oracle, linear_uld_oracle, reduced_loss_bound, row_coef, uld64,  # noqa: E402
                      uld_error, uld_topk64, unit_roundoff)

if "kat_kernels.uld" in sys.modules and not torch.cuda.is_available():
    K = importlib.reload(sys.modules["kat_kernels.uld"])  # imported earlier without the interpreter
else:
    from kat_kernels import uld as K  # noqa: E402
if "kat_kernels.fused_linear_uld" in sys.modules and not torch.cuda.is_available():
    FK = importlib.reload(sys.modules["kat_kernels.fused_linear_uld"])  # rebinds the helpers of the reloaded K
else:
    from kat_kernels import fused_linear_uld as FK  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _untied_columns(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, V) bool: the column's student probability (fp32, as the oracle computes it) is unique in its row."""
    p = torch.softmax(logits.float() / temperature, -1)
    sp, order = p.sort(-1)
    dup = torch.zeros_like(sp, dtype=torch.bool)
    same = sp[:, 1:] == sp[:, :-1]
    dup[:, 1:] |= same
    dup[:, :-1] |= same
    return ~torch.empty_like(dup).scatter_(-1, order, dup)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    if a.norm() == 0 and b.norm() == 0:
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _compare(s, t, *, ts=1.0, tt=1.0, mask=None, reduction="mean", topk=None, tail=None):
    """Run the kernel and the float64 oracle on the same inputs; check the loss and the gradient element-wise
    within the fp32 rounding bound (numerics.uld_error: softmax over V_S / V_T terms, sorted L1 over
    max(V_S, V_T) or k ranks; near-ties get the range of valid subgradients; a 16-bit gradient adds its
    roundings to the student dtype, see below) and the invariants; return
    (loss_rel_err, grad_cosine) against the oracle for the contract's thresholds."""
    n = s.shape[0]
    s_k = s.clone().requires_grad_(True)
    s64 = s.detach().double().cpu().requires_grad_(True)
    m = None if mask is None else mask.cpu()
    if reduction == "none":
        w = torch.rand(n, generator=_gen(0)) + 0.5  # a non-trivial grad_output
    else:
        w = torch.tensor(1.0)
    if topk is None:
        got = K.uld_loss(s_k, t, student_temperature=ts, teacher_temperature=tt, mask=mask, reduction=reduction)
        want = uld64(s64, t.cpu(), student_temperature=ts, teacher_temperature=tt, mask=m, reduction=reduction)
        per_row = uld64(s, t, student_temperature=ts, teacher_temperature=tt, reduction="none")
        err = uld_error(s64, t, student_temperature=ts, teacher_temperature=tt, row_coef=row_coef(m, n, reduction, w))
    else:
        got = K.uld_loss_topk(s_k, topk, tail, student_temperature=ts, mask=mask, reduction=reduction)
        want = uld_topk64(s64, topk.cpu(), None if tail is None else tail.cpu(), student_temperature=ts, mask=m,
                          reduction=reduction)
        per_row = uld_topk64(s, topk, tail, student_temperature=ts, reduction="none")
        err = uld_error(s64, topk, topk=True, teacher_tail_mass=tail, student_temperature=ts,
                        row_coef=row_coef(m, n, reduction, w))
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    (got * w.to(got.device)).sum().backward()
    (want * w.double()).sum().backward()
    assert s_k.grad is not None and s_k.grad.dtype == s.dtype and torch.isfinite(s_k.grad.float()).all()
    assert_close_to_oracle(got, want, reduced_loss_bound(per_row, err.loss_row, row_coef(m, n, reduction), reduction),
                           name="loss")
    u = unit_roundoff(s.dtype) if s.dtype != torch.float32 else 0.0
    # 16-bit: ∂ is stored in the student dtype (the Triton interpreter truncates fp32 -> bf16/fp16: up to one
    # spacing, 2u; compiled kernels round to nearest), then backward casts the upstream gradient and multiplies
    # in that dtype (u each): 4u in all, and as many smallest subnormals (2^-24 for fp16: ∂ reaches them)
    sub = 4 * torch.finfo(s.dtype).tiny * 2 * u
    assert_close_to_oracle(s_k.grad, s64.grad, err.dlogits + 4 * u * (s64.grad.abs() + err.dlogits), atol=sub,
                           name="grad")
    rel = float((got.detach().cpu().double() - want.detach()).abs().sum() / want.detach().abs().sum().clamp_min(1e-12))
    keep = _untied_columns(s, ts).cpu()
    cos = _cosine(s_k.grad.float().cpu()[keep], s64.grad[keep])
    if mask is not None:
        assert torch.equal(s_k.grad[~mask], torch.zeros_like(s_k.grad[~mask])), "masked rows must get 0"
    return rel, cos


def _logits(n, v, scale, seed, dtype=torch.float32):
    return (torch.randn(n, v, generator=_gen(seed)) * scale).to(dtype).to(DEV)


# ----------------------------------------------------------------------------------------------------------------
# fast tier (interpreter on CPU)
# ----------------------------------------------------------------------------------------------------------------
def test_module_mode():
    assert K.is_interpreted() == (not torch.cuda.is_available())


@pytest.mark.parametrize("n,vs,vt,dtype,ts,tt,scale,reduction", [
    (7, 1000, 1000, torch.float32, 1.0, 1.0, 3.0, "mean"),
    (33, 3203, 3203, torch.bfloat16, 1.0, 1.0, 1.0, "sum"),
    (17, 500, 777, torch.bfloat16, 0.7, 2.0, 3.0, "none"),
    (9, 777, 500, torch.float32, 2.0, 0.7, 10.0, "mean"),
    (5, 300, 300, torch.float16, 1.0, 1.0, 2.0, "none"),
    (2, 151_936, 152_064, torch.bfloat16, 0.9, 1.1, 3.0, "mean"),  # the real (Qwen) vocabularies, ~8 s interpreted
])
def test_matches_reference(n, vs, vt, dtype, ts, tt, scale, reduction):
    s = _logits(n, vs, scale, 1, dtype)
    t = _logits(n, vt, scale, 2, dtype)
    rel, cos = _compare(s, t, ts=ts, tt=tt, reduction=reduction)
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)


def test_close_distributions_mask_and_teacher_without_grad():
    """Student ≈ teacher (the regime where histogram estimators fail) with a row mask."""
    s = _logits(11, 1200, 1.0, 3)
    t = (s + 0.01 * _logits(11, 1200, 1.0, 4)).requires_grad_(True)
    mask = torch.tensor([True, False] * 5 + [True], device=DEV)
    rel, cos = _compare(s, t, mask=mask, reduction="mean")
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)
    assert t.grad is None


def test_multi_tile_and_multi_chunk_paths(monkeypatch):
    """Force 256-column tiles and 3-row chunks so the cross-tile scan and the row chunking are exercised."""
    monkeypatch.setattr(K, "_INTERPRETER_TILE", 256)
    s = _logits(8, 1000, 3.0, 5, torch.bfloat16)
    t = _logits(8, 900, 3.0, 6, torch.float32)
    per_row = K._Side.scratch_bytes_per_row(1000, torch.bfloat16, True) + \
        K._Side.scratch_bytes_per_row(900, torch.float32, False)
    monkeypatch.setattr(K, "SCRATCH_BYTES", 3 * per_row)
    rel, cos = _compare(s, t, ts=0.9, tt=1.3, reduction="none")
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)


def test_extreme_equal_and_tied_logits():
    v = 600
    s = torch.zeros(4, v, device=DEV)
    t = torch.zeros(4, v, device=DEV)
    s[1, 7], t[1, 9] = 1e4, 1e4  # one-hot on different tokens -> loss 0
    s[2, :] = -1e4
    s[2, 0] = 1e4  # student one-hot, teacher uniform
    s[3] = torch.randint(-3, 3, (v,), generator=_gen(7)).float().to(DEV)  # heavy ties
    t[3] = torch.randint(-3, 3, (v,), generator=_gen(8)).float().to(DEV)
    s_k = s.clone().requires_grad_(True)
    got = K.uld_loss(s_k, t, reduction="none")
    s64 = s.double().cpu().requires_grad_(True)
    want = uld64(s64, t, reduction="none")
    assert torch.isfinite(got).all()
    assert got[0].item() == 0.0 and got[1].item() == 0.0
    err = uld_error(s64, t)  # fp32 rounding bound; the tied columns get the range of valid subgradients
    assert_close_to_oracle(got, want, err.loss_row, name="loss")
    got.sum().backward()
    want.sum().backward()
    assert torch.isfinite(s_k.grad).all()
    assert torch.equal(s_k.grad[0], torch.zeros(v, device=DEV)), "identical uniform rows: zero gradient"
    assert_close_to_oracle(s_k.grad, s64.grad, err.dlogits, name="grad")


def test_zero_selected_rows_and_reductions():
    s = _logits(4, 200, 2.0, 9).requires_grad_(True)
    t = _logits(4, 250, 2.0, 10)
    loss = K.uld_loss(s, t, mask=torch.zeros(4, dtype=torch.bool, device=DEV))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    for reduction in ("mean", "sum"):
        rel, cos = _compare(s.detach(), t, reduction=reduction,
                            mask=torch.tensor([True, True, False, True], device=DEV))
        assert rel <= 1e-3 and cos >= 0.999
    with torch.no_grad():  # forward only: no gradient buffer, same loss (within the fp32 rounding bound)
        assert_close_to_oracle(K.uld_loss(s, t, reduction="none"), uld64(s, t, reduction="none"),
                               uld_error(s.double(), t).loss_row, name="forward only")


@pytest.mark.parametrize("k", [1, 128, 400])
def test_topk_matches_reference(k):
    s = _logits(6, 400, 3.0, 11, torch.bfloat16)
    logp = torch.log_softmax(_logits(6, 500, 3.0, 12).float(), -1)
    top = logp.topk(k, -1).values
    top = top[:, torch.randperm(k, generator=_gen(13)).to(DEV)]  # the cache need not be sorted
    tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=DEV)
    rel, cos = _compare(s, top, ts=1.3, topk=top, tail=None if k == 128 else tail, mask=mask)
    assert rel <= 1e-3 and cos >= 0.999, (k, rel, cos)


def _fused_reference(h, w, b, teacher, *, topk=None, tail=None, ts=1.0, tt=1.0, mask=None, reduction="mean"):
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    if topk is not None:
        return R.uld_loss_topk(logits, topk, tail, student_temperature=ts, mask=mask, reduction=reduction)
    return R.uld_loss(logits, teacher, student_temperature=ts, teacher_temperature=tt, mask=mask,
                      reduction=reduction)


@pytest.mark.parametrize("dtype,bias,reduction,chunk", [
    (torch.float32, True, "mean", 4), (torch.float32, False, "sum", None), (torch.bfloat16, True, "mean", 5)])
def test_fused_linear_matches_eager(dtype, bias, reduction, chunk):
    """Against the float64 oracle of ULD(h @ W.T + b) (numerics.linear_uld_oracle: the kernel forms the logits
    as h_c @ W.T, adds the bias separately, writes ∂z over them in the parameters' dtype, truncating under the
    interpreter; grad_h = ∂z @ W over V_S = 300 terms, grad_W, grad_b over N = 13). Plus the contract numbers."""
    n, hdim, vs, vt = 13, 24, 300, 350
    h = (torch.randn(n, hdim, generator=_gen(14))).to(dtype).to(DEV)
    w = (torch.randn(vs, hdim, generator=_gen(15)) * 0.5).to(dtype).to(DEV)
    b = (torch.randn(vs, generator=_gen(16)) * 0.1).to(dtype).to(DEV) if bias else None
    t = _logits(n, vt, 3.0, 17, dtype)
    mask = torch.ones(n, dtype=torch.bool, device=DEV)
    mask[[2, 7]] = False
    leaves_k = [x.clone().requires_grad_(True) for x in (h, w) + ((b,) if bias else ())]
    got = FK.fused_linear_uld_loss(leaves_k[0], leaves_k[1], t, lm_head_bias=leaves_k[2] if bias else None,
                                  student_temperature=0.8, teacher_temperature=1.5, mask=mask,
                                  reduction=reduction, chunk_size=chunk)
    (2.0 * got).backward()
    ref = linear_uld_oracle(h, w, b, t, student_temperature=0.8, teacher_temperature=1.5, mask=mask,
                            reduction=reduction, upstream=2.0, bias_rounded_separately=True, dz_rounding=2.0)
    assert_close_to_oracle(got, ref.loss, ref.loss_bound, name="loss")
    assert abs(got.item() - ref.loss.item()) <= 1e-3 * abs(ref.loss.item()) + 1e-6  # contract
    for name, leaf, want, bound in zip(("hidden", "weight", "bias"), leaves_k, ref.grads, ref.bounds):
        assert leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad.float()).all()
        assert_close_to_oracle(leaf.grad, want, bound, name=name)
        assert _cosine(leaf.grad.cpu(), want) >= 0.999, _cosine(leaf.grad.cpu(), want)  # contract


def test_fused_linear_topk_and_mtp_depths_share_weight():
    """Two depths sharing one lm_head: per-depth calls; weight gradients add up as in the eager graph. Each
    depth against its float64 oracle; the shared weight's bound is the sum of both plus the fp32 addition of
    the two contributions (u of their absolute sum), the loss's likewise."""
    n, hdim, vs, k = 10, 16, 200, 32
    w = torch.randn(vs, hdim, generator=_gen(18), device="cpu").to(DEV)
    hs = [torch.randn(n, hdim, generator=_gen(19 + d)).to(DEV) for d in range(2)]
    logp = torch.log_softmax(_logits(n, 260, 3.0, 21), -1)
    top = logp.topk(k, -1).values
    tail = (1.0 - top.exp().sum(-1)).clamp_min(0.0)
    teacher = _logits(n, 260, 3.0, 22)
    w_k = w.clone().requires_grad_(True)
    h_k = [x.clone().requires_grad_(True) for x in hs]
    got = FK.fused_linear_uld_loss(h_k[0], w_k, teacher) + \
        0.3 * FK.fused_linear_uld_loss(h_k[1], w_k, teacher_topk_logprobs=top, teacher_tail_mass=tail, chunk_size=3)
    got.backward()
    r0 = linear_uld_oracle(hs[0], w, None, teacher)
    r1 = linear_uld_oracle(hs[1], w, None, None, teacher_topk_logprobs=top, teacher_tail_mass=tail, upstream=0.3)
    u = unit_roundoff(torch.float32)
    want = r0.loss + 0.3 * r1.loss
    assert_close_to_oracle(got, want, r0.loss_bound + 0.3 * r1.loss_bound + 2 * u * (r0.loss + 0.3 * r1.loss).abs(),
                           name="loss")
    assert abs(got.item() - want.item()) <= 1e-3 * want.item()  # contract
    assert_close_to_oracle(h_k[0].grad, r0.grads[0], r0.bounds[0], name="hidden depth 0")
    assert_close_to_oracle(h_k[1].grad, r1.grads[0], r1.bounds[0], name="hidden depth 1")
    w_want = r0.grads[1] + r1.grads[1]
    w_bound = r0.bounds[1] + r1.bounds[1] + u * (r0.grads[1].abs() + r1.grads[1].abs() + r0.bounds[1] + r1.bounds[1])
    assert_close_to_oracle(w_k.grad, w_want, w_bound, name="shared weight")
    for a, c in zip(h_k + [w_k], [r0.grads[0], r1.grads[0], w_want]):
        assert _cosine(a.grad.cpu(), c) >= 0.999  # contract


def test_bad_arguments_raise():
    s, t = _logits(3, 20, 1.0, 23), _logits(3, 30, 1.0, 24)
    with pytest.raises(ValueError, match="reduction"):
        K.uld_loss(s, t, reduction="avg")
    with pytest.raises(ValueError, match="student_temperature"):
        K.uld_loss(s, t, student_temperature=0.0)
    with pytest.raises(ValueError, match="same number of rows"):
        K.uld_loss(s, t[:2])
    with pytest.raises(TypeError, match="teacher_logits"):
        K.uld_loss(s, t.double())
    with pytest.raises(ValueError, match="mask"):
        K.uld_loss(s, t, mask=torch.ones(2, dtype=torch.bool, device=DEV))
    h, w = _logits(3, 8, 1.0, 25), _logits(20, 8, 1.0, 26)
    with pytest.raises(ValueError, match="exactly one"):
        FK.fused_linear_uld_loss(h, w)
    with pytest.raises(ValueError, match="reduction"):
        FK.fused_linear_uld_loss(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="lm_head_weight"):
        FK.fused_linear_uld_loss(h, w[:, :5], t)
    with pytest.raises(ValueError, match="teacher_temperature"):
        FK.fused_linear_uld_loss(h, w, teacher_topk_logprobs=t, teacher_temperature=2.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cpu_tensors_are_refused_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(K, "is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        K.uld_loss(torch.randn(2, 5), torch.randn(2, 5))
    with pytest.raises(RuntimeError, match="CUDA"):
        FK.fused_linear_uld_loss(torch.randn(2, 4), torch.randn(5, 4), torch.randn(2, 5))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "uld.py"  # a script, not part of kat_kernels
    spec = importlib.util.spec_from_file_location("kat_bench_uld", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    assert bench.main(["--shapes", "8x100"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# GPU tier: full sizes (compiled kernels)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,v", [(16, 151_936), (33, 32_003)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 3.0, 10.0])
def test_full_size_matches_reference_gpu(n, v, dtype, scale):
    s = _logits(n, v, scale, 30, dtype)
    t = _logits(n, v, scale, 31, dtype)
    rel, cos = _compare(s, t, ts=1.0, tt=1.0)
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)
    close = (s.float() + 0.01 * scale * _logits(n, v, 1.0, 32)).to(dtype)
    rel, cos = _compare(s, close, ts=0.7, tt=2.0, reduction="none")
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)


@pytest.mark.gpu
@gpu
def test_full_size_extreme_unequal_vocab_and_fused_gpu():
    s = _logits(16, 151_936, 3.0, 33, torch.bfloat16)
    t = _logits(16, 152_064, 3.0, 34, torch.bfloat16)
    s[0] = 0.0
    t[0] = 0.0
    s[1, 5] = 1e4
    t[1] = -1e4
    t[1, 0] = 1e4
    rel, cos = _compare(s, t, reduction="none")
    assert rel <= 1e-3 and cos >= 0.999, (rel, cos)
    h = _logits(512, 896, 1.0, 35, torch.bfloat16)
    w = _logits(151_936, 896, 0.05, 36, torch.bfloat16)
    teacher = _logits(512, 151_936, 3.0, 37, torch.bfloat16)
    h_k, w_k = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h_r, w_r = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    got = FK.fused_linear_uld_loss(h_k, w_k, teacher)
    want = _fused_reference(h_r, w_r, None, teacher)
    assert abs(got.item() - want.item()) <= 1e-3 * want.item()
    got.backward()
    want.backward()
    assert _cosine(h_k.grad, h_r.grad) >= 0.999 and _cosine(w_k.grad, w_r.grad) >= 0.999
