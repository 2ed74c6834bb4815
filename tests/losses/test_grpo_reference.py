"""kat.losses.grpo (with kat.losses.advantages and kat.losses.aggregation): every estimator against hand-computed
numbers, plus micro-batch split invariance."""
from __future__ import annotations

import math

import pytest
import torch

from kat.losses import advantages as A
from kat.losses import aggregation as AG
from kat.losses import grpo as R
from numerics import (accum, assert_close_to_oracle, group_advantage_bound, lse_error, policy_oracle, softmax_error,
                      unit_roundoff)

EPS = 1e-6


# ----------------------------------------------------------------------------------------------------------------
# group advantages
# ----------------------------------------------------------------------------------------------------------------
def naive_group_advantages(r: torch.Tensor, G: int, eps: float, scale: str, baseline: str) -> torch.Tensor:
    """A loop over groups in float64, written independently of the implementation."""
    r = r.double().tolist()
    n = len(r)
    out = []
    mean_all = sum(r) / n
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in r) / (n - 1)) if n > 1 else 0.0
    for b in range(n // G):
        g = r[b * G : (b + 1) * G]
        if G == 1:
            out.append(0.0)
            continue
        mean = sum(g) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / (G - 1))
        for j, x in enumerate(g):
            base = mean if baseline == "mean" else (sum(g) - x) / (G - 1)
            c = x - base
            out.append(c / (std + eps) if scale == "group" else c / (std_all + eps) if scale == "batch" else c)
    return torch.tensor(out, dtype=torch.float64)


def test_group_advantages_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, Bessel var = 4·0.25/3 = 1/3 -> std 0.5773503; group 1: all equal -> 0 exactly
    a = A.group_advantages(r, 4)
    exp0 = 0.5 / (math.sqrt(1.0 / 3.0) + EPS)  # 0.8660239
    assert exp0 == pytest.approx(0.8660239, abs=1e-6)
    torch.testing.assert_close(a, torch.tensor([exp0, -exp0, -exp0, exp0, 0, 0, 0, 0]), rtol=1e-6, atol=1e-7)
    assert torch.equal(a[4:], torch.zeros(4))
    # batch: mean 1.25, Σ(r − 1.25)² = 2·0.0625 + 2·1.5625 + 4·0.5625 = 5.5 -> std sqrt(5.5/7) = 0.8864053
    ab = A.group_advantages(r, 4, scale="batch")
    expb = 0.5 / (math.sqrt(5.5 / 7.0) + EPS)
    assert expb == pytest.approx(0.5640754, abs=1e-6)
    torch.testing.assert_close(ab, torch.tensor([expb, -expb, -expb, expb, 0, 0, 0, 0]), rtol=1e-6, atol=1e-7)
    # none (Dr. GRPO): r − mean
    torch.testing.assert_close(A.group_advantages(r, 4, scale="none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # leave-one-out: r=1 vs others (0+0+1)/3 -> +2/3; r=0 vs (1+0+1)/3 -> −2/3
    torch.testing.assert_close(
        A.group_advantages(r, 4, scale="none", baseline="loo"),
        torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]),
    )
    # loo with group scale: (2/3)/(std 0.5773503 + eps)
    e = (2 / 3) / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(A.group_advantages(r, 4, baseline="loo")[:4], torch.tensor([e, -e, -e, e]))


def test_group_advantages_degenerate_groups():
    r = torch.tensor([0.3, 0.7, 1.1])
    for scale in A.ADVANTAGE_SCALES:
        for baseline in A.ADVANTAGE_BASELINES:
            assert torch.equal(A.group_advantages(r, 1, scale=scale, baseline=baseline), torch.zeros(3))
    # equal rewards that do not sum exactly in floating point still give exact zeros, never NaN
    eq = torch.full((14,), 0.1)
    for scale in A.ADVANTAGE_SCALES:
        for baseline in A.ADVANTAGE_BASELINES:
            out = A.group_advantages(eq, 7, scale=scale, baseline=baseline)
            assert torch.equal(out, torch.zeros(14)), (scale, baseline)
    assert torch.equal(A.group_advantages(torch.tensor([]), 4), torch.zeros(0))


def test_group_advantages_dtypes():
    assert A.group_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32
    assert A.group_advantages(torch.tensor([True, False]), 2).tolist() == pytest.approx([0.7071061, -0.7071061])
    assert A.group_advantages(torch.randn(8, dtype=torch.bfloat16), 4).dtype == torch.bfloat16
    assert A.group_advantages(torch.randn(8, dtype=torch.float64), 4).dtype == torch.float64


@pytest.mark.parametrize("B,G", [(7, 5), (1024, 16), (3, 2)])
@pytest.mark.parametrize("scale", A.ADVANTAGE_SCALES)
@pytest.mark.parametrize("baseline", A.ADVANTAGE_BASELINES)
def test_group_advantages_random_vs_naive(B, G, scale, baseline):
    g = torch.Generator().manual_seed(B * 100 + G)
    r = torch.randn(B * G, generator=g)
    r[:G] = 0.25  # one equal-reward group
    got = A.group_advantages(r, G, scale=scale, baseline=baseline)
    want = naive_group_advantages(r, G, EPS, scale, baseline)  # float64
    # bound of the fp32 evaluation: shifted mean and two-pass Bessel std over G (group) or B·G (batch) terms,
    # the leave-one-out difference, the division by std + eps (numerics.group_advantage_bound)
    assert_close_to_oracle(got, want, group_advantage_bound(r, G, eps=EPS, scale=scale, baseline=baseline))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.zeros(2, 3), group_size=3), "1-D"),
        (dict(rewards=torch.zeros(7), group_size=3), "multiple of group_size"),
        (dict(rewards=torch.zeros(6), group_size=0), "group_size"),
        (dict(rewards=torch.zeros(6), group_size=True), "group_size"),
        (dict(rewards=torch.zeros(6), group_size=3, scale="seq"), "scale"),
        (dict(rewards=torch.zeros(6), group_size=3, baseline="median"), "baseline"),
        (dict(rewards=torch.zeros(6), group_size=3, eps=-1.0), "eps"),
        (dict(rewards=torch.tensor([1.0, float("nan")]), group_size=2), "finite"),
    ],
)
def test_group_advantages_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        A.group_advantages(**kwargs)


def test_broadcast_advantages():
    out = A.broadcast_advantages(torch.tensor([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert torch.equal(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------------------
# clipped policy loss
# ----------------------------------------------------------------------------------------------------------------
def _hand_case():
    # ρ = 1.5, 0.5, 1.1, 4 with A = +1, −1, +1, −2; a fifth, masked token holds NaN
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), math.log(4.0), float("nan")]],
                        dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 5, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -2.0, float("nan")]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    return logp, old, adv, mask


def test_ppo_clip_hand_computed_with_dual_clip():
    logp, old, adv, mask = _hand_case()
    out = R.ppo_clip_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28, clip_ratio_c=3.0)
    # t0: A>0, ρ=1.5 > 1.28 -> −1.28 (clipped high); t1: A<0, ρ=0.5 < 0.8 -> max(0.5, 0.8) = 0.8 (clipped low)
    # t2: inside -> −1.1; t3: A<0, max(8, 2.56) = 8 -> dual min(8, 2·3) = 6; t4 masked -> 0
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[-1.28, 0.8, -1.1, 6.0, 0.0]], dtype=torch.float64))
    out.loss.sum().backward()
    # gradient −A·ρ only where no clip binds (t2: −1.1)
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.1, 0.0, 0.0]], dtype=torch.float64))
    assert out.clip_frac_low.item() == pytest.approx(0.25)
    assert out.clip_frac_high.item() == pytest.approx(0.25)
    assert out.clip_frac_dual.item() == pytest.approx(0.25)
    assert out.clip_frac.item() == pytest.approx(0.75)
    # approx_kl = mean((ρ−1) − ln ρ) = (0.0945349 + 0.1931472 + 0.0046898 + 1.6137056)/4
    assert out.approx_kl.item() == pytest.approx(0.4765194, abs=1e-6)
    assert out.ratio_mean.item() == pytest.approx(1.775)
    assert (out.ratio_min.item(), out.ratio_max.item()) == pytest.approx((0.5, 4.0))


def test_ppo_clip_without_dual_clip():
    logp, old, adv, mask = _hand_case()
    out = R.ppo_clip_loss(logp, old, adv, mask, clip_eps_low=0.2, clip_eps_high=0.28)
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[-1.28, 0.8, -1.1, 8.0, 0.0]], dtype=torch.float64))
    out.loss.sum().backward()
    # t3 is unclipped now: gradient −A·ρ = 2·4 = 8
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -1.1, 8.0, 0.0]], dtype=torch.float64))
    assert out.clip_frac.item() == pytest.approx(0.5)
    assert out.clip_frac_dual.item() == 0.0


def test_ppo_clip_log_ratio_clamp_and_symmetry_defaults():
    # log-ratio 2 clamped at 1: ρ = e, A = −1 -> loss max(e, 1.2) = e, no gradient through the clamp
    logp = torch.tensor([[2.0]], requires_grad=True)
    out = R.ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool),
                          log_ratio_clamp=1.0)
    assert out.loss.item() == pytest.approx(math.e)
    out.loss.sum().backward()
    assert logp.grad.item() == 0.0
    # advantages [B] broadcast like [B, T]
    lp = torch.randn(3, 4)
    a = R.ppo_clip_loss(lp, lp * 0.9, torch.tensor([1.0, -1.0, 0.5]), torch.ones(3, 4)).loss
    b = R.ppo_clip_loss(lp, lp * 0.9, torch.tensor([1.0, -1.0, 0.5])[:, None].expand(3, 4), torch.ones(3, 4)).loss
    assert torch.equal(a, b)


def test_ppo_clip_sequence_level_ratio():
    # row 0: log-ratios 0.1, 0.3 -> s = exp(0.2) = 1.2214 (< 1.28: unclipped), A = 1; row 1 masked after t0
    logp = torch.tensor([[0.1, 0.3], [-0.5, 9.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 2, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False]])
    out = R.ppo_clip_loss(logp, old, torch.tensor([1.0, 1.0], dtype=torch.float64), mask,
                          clip_eps_high=0.28, ratio_level="sequence")
    s0, s1 = math.exp(0.2), math.exp(-0.5)
    torch.testing.assert_close(out.ratio, torch.tensor([[s0, s0], [s1, s1]], dtype=torch.float64))
    torch.testing.assert_close(out.loss.detach(), torch.tensor([[-s0, -s0], [-s1, 0.0]], dtype=torch.float64))
    loss = AG.aggregate(out.loss, mask, "seq-mean-token-mean")
    loss.backward()
    # GSPO gradient: −A·s_i·(1/|y_i|)·∇logπ per token, /N_seq = 2
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4], [-s1 / 2, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(clip_eps_low=1.0), "clip_eps_low"),
        (dict(clip_eps_high=-0.1), "clip_eps_high"),
        (dict(clip_ratio_c=1.0), "clip_ratio_c"),
        (dict(log_ratio_clamp=0.0), "log_ratio_clamp"),
        (dict(ratio_level="seq"), "ratio_level"),
    ],
)
def test_ppo_clip_bad_args(kwargs, match):
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=match):
        R.ppo_clip_loss(x, x, torch.zeros(2), x.bool(), **kwargs)


def test_ppo_clip_shape_errors():
    with pytest.raises(ValueError, match="old_logp"):
        R.ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        R.ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3))


# ----------------------------------------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------------------------------------
X = [0.5, -1.0, 25.0, -3.0, 0.0]


@pytest.mark.parametrize(
    "est,value,grad",
    [
        ("k1", X, [1.0] * 5),
        ("k2", [0.125, 0.5, 312.5, 4.5, 0.0], X),
        # k3 = e^{−x} − 1 + x: 0.1065307, e − 2, (x clamped to 20: 19.0 -> 10), (e³ − 4 = 16.09 -> 10), 0
        ("k3", [0.1065307, 0.7182818, 10.0, 10.0, 0.0], [0.3934693, -1.7182818, 0.0, 0.0, 0.0]),
        ("k3+", [0.1065307, 0.7182818, 10.0, 10.0, 0.0], X),
    ],
)
def test_kl_estimators_hand_computed(est, value, grad):
    logp = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    kl = R.kl_estimate(logp, torch.zeros(5, dtype=torch.float64), est)
    torch.testing.assert_close(kl.detach(), torch.tensor(value, dtype=torch.float64), atol=1e-6, rtol=0)
    kl.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-6, rtol=0)


def test_kl_estimator_errors():
    with pytest.raises(ValueError, match="kl_estimator"):
        R.kl_estimate(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(ValueError, match="ref_logp"):
        R.kl_estimate(torch.zeros(2), torch.zeros(3))


# ----------------------------------------------------------------------------------------------------------------
# aggregation
# ----------------------------------------------------------------------------------------------------------------
def test_aggregation_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert AG.aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert AG.aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert AG.aggregate(loss, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert AG.aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 3))  # C = T = 3
    assert AG.aggregate(loss, mask, "seq-mean-token-sum-norm", norm_const=5).item() == pytest.approx(1.0)
    # given step-global counts
    c = AG.GlobalCounts(torch.tensor(8.0), torch.tensor(4.0), torch.tensor(0.0))
    assert AG.aggregate(loss, mask, "token-mean", counts=c).item() == pytest.approx(10 / 8)
    assert AG.aggregate(loss, mask, "seq-mean-token-mean", counts=c).item() == pytest.approx(6 / 4)
    with pytest.raises(ValueError, match="loss_agg"):
        AG.aggregate(loss, mask, "sum")


def test_aggregation_decision_term_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    dec = torch.tensor([[1, 0, 0], [1, 0, 0]])  # the first token of each row is the decision token
    # main token-mean over {2, 3, 5} = 10/3; decision: 0.1 · mean(1, 4) = 0.25
    got = AG.aggregate(loss, mask, "token-mean", decision_mask=dec, decision_weight=0.1)
    assert got.item() == pytest.approx(10 / 3 + 0.25)
    w = AG.aggregation_weights(mask, "token-mean", decision_mask=dec, decision_weight=0.1)
    torch.testing.assert_close(w, torch.tensor([[0.05, 1 / 3, 1 / 3], [0.05, 1 / 3, 0.0]]))


def test_global_counts_local_and_single_rank_process_group(tmp_path):
    m1 = torch.tensor([[1, 1, 0], [0, 0, 0]])
    m2 = torch.tensor([[1, 1, 1]])
    d1 = torch.tensor([[1, 0, 0], [0, 0, 0]])
    d2 = torch.tensor([[0, 0, 0]])
    c = AG.global_counts([m1, m2])
    assert (c.tokens.item(), c.seqs.item(), c.decision_seqs.item()) == (5, 2, 0)
    c = AG.global_counts([m1, m2], decision_masks=[d1, d2])
    assert (c.tokens.item(), c.seqs.item(), c.decision_seqs.item()) == (4, 2, 1)
    with pytest.raises(ValueError, match="decision_masks"):
        AG.global_counts([m1, m2], decision_masks=[d1])
    # the all_reduce path, on a one-rank gloo group (a world of one sums to itself)
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        c = AG.global_counts([m1, m2])
        assert (c.tokens.item(), c.seqs.item()) == (5, 2)
    finally:
        dist.destroy_process_group()


def _loss_and_grad(logp, old, adv, mask, ref, dec, **kw):
    lp = logp.clone().requires_grad_(True)
    loss, _ = R.policy_loss(lp, old, adv, mask, ref_logp=ref, decision_mask=dec, **kw)
    loss.backward()
    return loss.detach(), lp.grad


@pytest.mark.parametrize("loss_agg", AG.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("with_decision", [False, True])
def test_micro_batch_and_rank_split_invariance(loss_agg, with_decision):
    g = torch.Generator().manual_seed(7)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([9, 3, 5, 1, 7, 4])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    dec = (torch.arange(T)[None, :] == 0).expand(B, T) if with_decision else None
    kw = dict(loss_agg=loss_agg, kl_coef=0.05, kl_estimator="k3", clip_ratio_c=3.0, norm_const=9.0,
              decision_weight=0.3, clip_eps_high=0.28)
    full_loss, full_grad = _loss_and_grad(logp, old, adv, mask, ref, dec, **kw)
    # micro-batches [2, 1, 3] on one rank, normalised by the step's counts
    splits = [slice(0, 2), slice(2, 3), slice(3, 6)]
    counts = AG.global_counts([mask[s] for s in splits],
                             decision_masks=None if dec is None else [dec[s] for s in splits])
    tot_loss, grads = 0.0, []
    for s in splits:
        l, gr = _loss_and_grad(logp[s], old[s], adv[s], mask[s], ref[s], None if dec is None else dec[s],
                               counts=counts, **kw)
        tot_loss += l
        grads.append(gr)
    torch.testing.assert_close(tot_loss, full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads), full_grad, rtol=1e-12, atol=1e-12)
    # two data-parallel ranks of 3 rows each: counts /W because DDP averages gradients across ranks
    W = 2
    ranks = [slice(0, 3), slice(3, 6)]
    glob = AG.global_counts([mask[s] for s in ranks], decision_masks=None if dec is None else [dec[s] for s in ranks])
    per_rank = AG.GlobalCounts(*(x / W for x in glob))
    rank_losses, rank_grads = [], []
    for s in ranks:
        l, gr = _loss_and_grad(logp[s], old[s], adv[s], mask[s], ref[s], None if dec is None else dec[s],
                               counts=per_rank, **kw)
        rank_losses.append(l)
        rank_grads.append(gr / W)  # the all-reduce mean, restricted to this rank's rows
    torch.testing.assert_close(sum(rank_losses) / W, full_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(rank_grads), full_grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# policy_loss entry, stats, log-softmax helpers
# ----------------------------------------------------------------------------------------------------------------
def test_policy_loss_composes_clip_kl_and_aggregation():
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(4, 6, generator=g)
    old = logp + 0.3 * torch.randn(4, 6, generator=g)
    ref = logp + 0.3 * torch.randn(4, 6, generator=g)
    adv = torch.randn(4, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    loss, st = R.policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.1, kl_estimator="k2", clip_ratio_c=2.0)
    clip = R.ppo_clip_loss(logp, old, adv, mask, clip_ratio_c=2.0)
    kl = R.kl_estimate(logp, ref, "k2")
    want = AG.aggregate(clip.loss + 0.1 * kl, mask)
    # the same fp32 per-token terms summed in another association: Σw·pg + 0.1·Σw·kl against Σw·(pg + 0.1·kl).
    # Each side's 24-term sums are off by ≤ accum(24)·Σ|terms|, and the per-token products/sums by 3u.
    w = AG.aggregation_weights(mask, "token-mean").double()
    terms = (w * (clip.loss.double().abs() + 0.1 * kl.double().abs()) * mask).sum()
    assert_close_to_oracle(loss, want.double(), (2 * accum(24) + 3 * unit_roundoff(torch.float32)) * terms)
    torch.testing.assert_close(st.pg_loss, AG.aggregate(clip.loss, mask))
    torch.testing.assert_close(st.kl, R.masked_mean(kl, mask))
    assert st.num_tokens.item() == int(mask.sum())
    assert st.clip_frac.item() == clip.clip_frac.item()
    # the KL is logged even with kl_coef = 0, and is None without a reference
    _, st0 = R.policy_loss(logp, old, adv, mask, ref_logp=ref)
    assert st0.kl is not None and st0.kl.item() > 0
    assert R.policy_loss(logp, old, adv, mask)[1].kl is None
    with pytest.raises(ValueError, match="ref_logp"):
        R.policy_loss(logp, old, adv, mask, kl_coef=0.1)
    ps = R.policy_stats(logp, old, adv, mask, ref_logp=ref, kl_estimator="k2", clip_ratio_c=2.0)
    assert ps.pg_loss is None and ps.clip_frac.item() == st.clip_frac.item()
    torch.testing.assert_close(ps.kl, st.kl)


def test_empty_mask_gives_zero_stats_not_nan():
    x = torch.zeros(2, 3)
    loss, st = R.policy_loss(x, x, torch.ones(2), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert st.clip_frac.item() == 0.0 and st.ratio_mean.item() == 0.0 and st.ratio_min.item() == 1.0


@pytest.mark.parametrize("shape", [(3, 7, 123), (2, 3, 151_936)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_log_softmax_and_entropy(dtype, shape):
    g = torch.Generator().manual_seed(1)
    v = shape[-1]
    logits = (torch.randn(*shape, generator=g) * 3).to(dtype)
    idx = torch.randint(0, v, shape[:-1], generator=g)
    # float64 oracle on the same (dtype) logits; both functions compute in fp32 (16-bit inputs upcast exactly)
    u = unit_roundoff(torch.float32)
    x = logits.double().reshape(-1, v) / 0.7
    x_err = 2 * u * x.abs()  # the division by τ in fp32: τ and the quotient rounded
    want = torch.log_softmax(x, -1).gather(-1, idx.reshape(-1, 1)).squeeze(-1)
    # log π = x_y − lse: the log-space bound of numerics.softmax_error (V-term sum, exp/log, subtractions)
    bound = torch.log1p(softmax_error(x, x_err)).gather(-1, idx.reshape(-1, 1)).squeeze(-1)
    got = R.selective_log_softmax(logits, idx, temperature=0.7, chunk_size=5)
    assert_close_to_oracle(got.reshape(-1), want, bound, name="log-prob")
    # entropy lse − Σ p·x: lse's bound, Σ_v (|Δp_v|·|x_v| + p_v·Δx_v), the V-term sum and the last subtraction
    p = torch.softmax(x, -1)
    lse = torch.logsumexp(x, -1)
    ent = lse - (p * x).sum(-1)
    px = (p * x.abs()).sum(-1)
    ent_bound = (lse_error(x, x_err).squeeze(-1) + (p * softmax_error(x, x_err) * x.abs() + p * x_err).sum(-1)
                 + (accum(v) + 2 * u) * px + u * (ent.abs() + px + lse.abs()))
    assert_close_to_oracle(R.entropy_from_logits(logits, temperature=0.7, chunk_size=4).reshape(-1), ent, ent_bound,
                           name="entropy")
    # uniform logits: entropy log V
    assert R.entropy_from_logits(torch.zeros(2, 64)).tolist() == pytest.approx([math.log(64)] * 2)
    with pytest.raises(ValueError, match="index"):
        R.selective_log_softmax(logits, idx[:, :-1])


def test_policy_loss_from_hidden_matches_composition():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    W = torch.randn(40, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.2
    old = torch.randn(2, 5, generator=g) - 3
    ref = torch.randn(2, 5, generator=g) - 3
    adv = torch.randn(2, 5, generator=g)
    out = R.policy_loss_from_hidden(h, W, torch.where(mask, y, -100), old, adv, mask, ref_logp=ref, kl_coef=0.2,
                                    clip_ratio_c=3.0, temperature=0.9, compute_entropy=True, num_tokens=11)
    logp = R.selective_log_softmax(h @ W.t(), y, temperature=0.9)
    counts = AG.GlobalCounts(torch.tensor(11.0), torch.tensor(2.0), torch.tensor(0.0))
    want, _ = R.policy_loss(logp, old, adv, mask, ref_logp=ref, kl_coef=0.2, clip_ratio_c=3.0, counts=counts)
    # both against the float64 oracle (numerics.policy_oracle: logits over H = 16 terms, log-softmax over
    # V = 40, the clipped ratio and k3 with their roundings, the 10-token weighted sum)
    o = policy_oracle(h, W, torch.where(mask, y, -100), old, adv, mask, ref_logp=ref, kl_coef=0.2, clip_ratio_c=3.0,
                      temperature=0.9, num_tokens=11)
    assert_close_to_oracle(out.loss, o.loss, o.loss_bound, name="from hidden")
    assert_close_to_oracle(want, o.loss, o.loss_bound, name="composition")
    m = mask.reshape(-1)
    assert_close_to_oracle(out.logp.reshape(-1)[m], o.logp[m], o.logp_bound[m], name="from hidden logp")
    assert_close_to_oracle(logp.reshape(-1)[m], o.logp[m], o.logp_bound[m], name="composition logp")
    assert_close_to_oracle(out.entropy.reshape(-1), o.entropy, o.entropy_bound, name="from hidden entropy")
    assert_close_to_oracle(R.entropy_from_logits(h @ W.t(), temperature=0.9).reshape(-1), o.entropy,
                           o.entropy_bound, name="composition entropy")


def test_bf16_logp_is_weighted_in_fp32():
    g = torch.Generator().manual_seed(9)
    logp = -torch.rand(3, 700, generator=g)
    mask = torch.ones(3, 700, dtype=torch.bool)
    adv = torch.randn(3, generator=g)
    loss16, _ = R.policy_loss(logp.bfloat16(), logp.bfloat16(), adv, mask)
    loss32, _ = R.policy_loss(logp.bfloat16().float(), logp.bfloat16().float(), adv, mask)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-6, atol=1e-7)
