"""kat.rl.credit: segments, the Step-SRPO step credit and every estimator's credit through ``assign_credit``, on
hand-built groups (the reward rules themselves: tests/rl/test_shaping.py)."""
from __future__ import annotations

import math

import pytest
import torch

from kat.rl import credit as S

EPS = 1e-6


def _group():
    # rollouts: on ✓, on ✓, on ✗, off ✓, off ✓, malformed (no mode)
    modes = ["on", "on", "on", "off", "off", None]
    scores = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    wf = [True, True, True, True, True, False]
    return modes, scores, wf


# ----------------------------------------------------------------------------------------------------------------
# segments and step credit
# ----------------------------------------------------------------------------------------------------------------
def test_segment_ids_from_tokens_and_decision_mask():
    ON, OFF = 7, 8
    ids = torch.tensor([[3, 4, ON, 9, 9, 0], [3, 4, 5, 6, 0, 0], [OFF, 5, ON, 5, 5, 5]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    seg = S.segment_ids_from_tokens(ids, mask, [ON, OFF])
    assert seg.tolist() == [[1, 1, 1, 2, 2, 0], [2, 2, 2, 2, 0, 0], [1, 2, 2, 2, 2, 2]]
    assert S.decision_token_mask(seg).nonzero().tolist() == [[0, 2], [2, 0]]
    bnd = S.segment_ids_from_boundaries(torch.tensor([3, 0, 1]), mask)
    assert torch.equal(bnd, seg)


def _hand_credit():
    # G = 3. judge j = [1, −1, −1]: mean −1/3, Bessel std sqrt((16/9 + 4/9 + 4/9)/2) = sqrt(4/3)
    sj = math.sqrt(4 / 3)
    aj = [(4 / 3) / (sj + EPS), (-2 / 3) / (sj + EPS), (-2 / 3) / (sj + EPS)]
    assert aj[0] == pytest.approx(1.1546995, abs=1e-6)
    # answer r = [1.5, 0, 0.5]: mean 2/3, Bessel std sqrt((25/36 + 16/36 + 1/36)/2) = sqrt(7/12)
    sa = math.sqrt(7 / 12)
    aa = [(5 / 6) / (sa + EPS), (-2 / 3) / (sa + EPS), (-1 / 6) / (sa + EPS)]
    assert aa[0] == pytest.approx(1.0910881, abs=1e-6)
    seg = torch.tensor([[1, 1, 2, 2, 0], [1, 2, 2, 2, 2], [1, 1, 1, 2, 0]])
    want = torch.tensor([
        [aj[0], aj[0], aa[0], aa[0], 0.0],
        [aj[1], aa[1], aa[1], aa[1], aa[1]],
        [aj[2], aj[2], aj[2], aa[2], 0.0],
    ])
    return torch.tensor([1.0, -1.0, -1.0]), torch.tensor([1.5, 0.0, 0.5]), seg, want


def test_step_credit_hand_computed():
    j, a, seg, want = _hand_credit()
    torch.testing.assert_close(S.step_credit_advantages(j, a, seg, 3), want, rtol=1e-6, atol=1e-6)
    # the same from boundaries + response mask
    got = S.step_credit_advantages(j, a, None, 3, boundaries=torch.tensor([2, 1, 3]), response_mask=seg > 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_step_credit_errors_and_degenerate():
    j, a, seg, _ = _hand_credit()
    with pytest.raises(ValueError, match="not both"):
        S.step_credit_advantages(j, a, seg, 3, boundaries=torch.zeros(3), response_mask=seg > 0)
    with pytest.raises(ValueError, match="boundaries"):
        S.step_credit_advantages(j, a, None, 3)
    with pytest.raises(ValueError, match="only 0"):
        S.step_credit_advantages(j, a, seg + 1, 3)
    with pytest.raises(ValueError, match="integer"):
        S.step_credit_advantages(j, a, seg.float(), 3)
    with pytest.raises(ValueError, match="judge_rewards"):
        S.step_credit_advantages(j, a[:2], seg, 3)
    assert torch.equal(S.step_credit_advantages(j, a, seg, 1), torch.zeros(3, 5))


def _batch(modes, scores, wf, lengths, G, **kw):
    T = max(lengths) + 1
    seg = torch.zeros(len(modes), T, dtype=torch.long)
    for i, (n, md) in enumerate(zip(lengths, modes)):
        seg[i, :n] = 2
        if md is not None:
            seg[i, :2] = 1  # judge token + mode token
    return S.RolloutBatch(group_size=G, modes=modes, scores=scores, well_formed=wf, segment_ids=seg, **kw)


def test_assign_credit_grpo_dapo_adaptthink_thinkless():
    # GRPO: r = [1, 0, 0.5, 0]; mean 0.375, Bessel std sqrt(0.6875/3)
    b = _batch(["on", "off", "on", None], [1.0, 0.0, 0.5, 1.0], [True, True, True, False], [4, 5, 8, 3], 4)
    c = S.assign_credit("grpo", b)
    s = math.sqrt(0.6875 / 3)
    adv = torch.tensor([0.625, -0.375, 0.125, -0.375]) / (s + EPS)
    torch.testing.assert_close(c.advantages, adv[:, None] * (b.segment_ids > 0).float())
    assert c.reward.tolist() == [1.0, 0.0, 0.5, 0.0] and c.judge_reward is None and c.decision_mask is None
    # DAPO with the overlong penalty from the segment lengths [4, 5, 8, 3]; score 0.5 is not correct:
    # r = [1, −1, −1 − (8 − 6)/4 = −1.5, −1]
    c = S.assign_credit("dapo", b, overlong_max_len=10, overlong_cache_len=4)
    assert c.reward.tolist() == pytest.approx([1.0, -1.0, -1.5, -1.0])
    torch.testing.assert_close(c.advantages[:, 0], S.group_advantages(c.reward, 4))
    assert c.correct.tolist() == [True, False, False, False]
    # AdaptThink: A = r, no group normalisation; needs the reference accuracy
    ba = _batch(["off", "on", "off"], [1.0, 1.0, 0.0], [True] * 3, [2, 6, 3], 3, ref_acc=[0.5])
    c = S.assign_credit("adaptthink", ba)
    torch.testing.assert_close(c.advantages[:, 0], torch.tensor([0.55, 0.5, -0.45]))
    assert torch.equal(c.advantages[0, 2:], torch.zeros(5))
    with pytest.raises(ValueError, match="ref_acc"):
        S.assign_credit("adaptthink", b)
    # Thinkless: r = [1, 0.5, −1, −1], A = r − mean (−0.125); the mode token is the decision token
    bt = _batch(["off", "on", "on", None], [1.0, 1.0, 0.0, 1.0], [True, True, True, False], [3, 6, 6, 4], 4)
    c = S.assign_credit("thinkless", bt)
    torch.testing.assert_close(c.advantages[:, 0], torch.tensor([1.125, 0.625, -0.875, -0.875]))
    assert c.decision_mask.nonzero().tolist() == [[0, 1], [1, 1], [2, 1]] and c.decision_weight == 1e-3


def test_assign_credit_step_srpo_matches_its_parts_and_skips():
    modes, scores, wf = _group()
    g2 = (["on", "off", "off", "on", "on", "off"], [1.0, 1.0, None, 1.0, 0.0, 1.0], [True] * 6)  # ungradable
    b = _batch(modes + g2[0], scores + g2[1], wf + g2[2], [5, 7, 6, 3, 2, 4] * 2, 6, priors=["on", "off"])
    cfg = S.StepSRPOConfig(judge_weight=0.5)
    c = S.assign_credit("step_srpo", b, cfg)
    grp = S.step_srpo_group_rewards(*_group(), prior="on", lengths=b.lengths()[:6], cfg=cfg)
    assert c.reward[:6].tolist() == pytest.approx(list(grp.reward))
    assert c.judge_reward[:6].tolist() == pytest.approx(list(grp.judge))
    want = S.step_credit_advantages(c.judge_reward[:6], c.reward[:6], b.segment_ids[:6], 6)
    torch.testing.assert_close(c.advantages[:6], want)
    # group 2 is skipped: zero rewards and advantages, flagged
    assert c.skipped.tolist() == [False, True]
    assert torch.equal(c.advantages[6:], torch.zeros(6, b.segment_ids.shape[1]))
    assert torch.equal(c.reward[6:], torch.zeros(6))
    # the judge advantage sits on segment 1 only
    assert torch.equal(c.advantages[0, :2], c.advantages[1, :2])
    # overrides, decision weight, errors
    c = S.assign_credit("step_srpo", b, judge_weight=0.0, decision_weight=0.2)
    assert c.reward[:6].tolist() == pytest.approx([1.0, 1.0, 0.0, 1.0, 1.0, -1.0])
    assert torch.equal(c.decision_mask, b.segment_ids == 1) and c.decision_weight == 0.2
    with pytest.raises(ValueError, match="algorithm"):
        S.assign_credit("ppo", b)
    with pytest.raises(TypeError, match="StepSRPOConfig"):
        S.assign_credit("step_srpo", b, S.GRPOConfig())


def test_rollout_batch_validation_and_forced_token():
    seg = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="multiple of group_size"):
        S.RolloutBatch(3, ["on"] * 4, [1.0] * 4, [True] * 4, seg)
    with pytest.raises(ValueError, match="priors"):
        S.RolloutBatch(2, ["on"] * 4, [1.0] * 4, [True] * 4, seg, priors=["on"])
    with pytest.raises(ValueError, match="segment_ids"):
        S.RolloutBatch(2, ["on"] * 4, [1.0] * 4, [True] * 4, seg[:3])
    old = torch.tensor([[-0.1, -2.0], [-0.3, -0.4]])
    out = S.forced_token_old_logp(old, torch.tensor([[True, False], [False, True]]))
    torch.testing.assert_close(out, torch.tensor([[math.log(0.5), -2.0], [-0.3, math.log(0.5)]]))
