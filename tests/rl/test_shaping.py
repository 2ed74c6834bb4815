"""kat.rl.shaping: the Step-SRPO judge/answer/modulated rewards and the other algorithms' reward rules, each on a
hand-built group."""
from __future__ import annotations

import pytest

from kat.rl import shaping as S


# ----------------------------------------------------------------------------------------------------------------
# the judge rule
# ----------------------------------------------------------------------------------------------------------------
def test_preferred_mode_rules():
    modes = ["on", "on", "on", "off", "off", "off"]
    correct = [True, True, True, True, True, False]  # acc_on 1, acc_off 2/3
    assert S.preferred_mode(modes, correct, margin=0.1) == ("on", 1.0, pytest.approx(2 / 3))
    assert S.preferred_mode(modes, correct, margin=0.4)[0] == "off"  # within the margin: the cheaper mode wins
    # a tie goes to think-off even with margin 0
    assert S.preferred_mode(["on", "off"], [True, True], margin=0.0)[0] == "off"
    assert S.preferred_mode(["on", "off"], [False, False], margin=0.0)[0] == "off"
    # one mode sampled: the cold-start label decides; without a label nothing is preferred
    assert S.preferred_mode(["on", "on"], [True, False], prior="off") == ("off", 0.5, None)
    assert S.preferred_mode(["off", None], [True, False], prior="on") == ("on", None, 1.0)
    assert S.preferred_mode(["on", "on"], [True, True], prior=None)[0] is None
    assert S.preferred_mode([None, None], [False, False], prior="on") == (None, None, None)
    with pytest.raises(ValueError, match="prior"):
        S.preferred_mode(["on"], [True], prior="maybe")
    with pytest.raises(ValueError, match=r"modes\[1\]"):
        S.preferred_mode(["on", "auto"], [True, True])


def _group():
    # rollouts: on ✓, on ✓, on ✗, off ✓, off ✓, malformed (no mode)
    modes = ["on", "on", "on", "off", "off", None]
    scores = [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    wf = [True, True, True, True, True, False]
    return modes, scores, wf


@pytest.mark.parametrize(
    "modulation,reward",
    [
        # acc_on 2/3, acc_off 1 -> off preferred; j = [−1, −1, −1, +1, +1, −1]; a = [1, 1, 0, 1, 1, −1]; w = 0.5
        ("multiplicative", [0.5, 0.5, 0.0, 1.5, 1.5, -1.0]),  # a·(1 + w·j)
        ("additive", [0.5, 0.5, -0.5, 1.5, 1.5, -1.0]),  # a + w·j
        ("gated", [0.5, 0.5, 0.0, 1.0, 1.0, -1.0]),  # a, or (1 − w)·a in the wrong mode
        ("none", [1.0, 1.0, 0.0, 1.0, 1.0, -1.0]),
    ],
)
def test_step_srpo_group_rewards_hand_computed(modulation, reward):
    cfg = S.StepSRPOConfig(judge_weight=0.5, modulation=modulation, margin=0.1, format_penalty=-1.0)
    g = S.step_srpo_group_rewards(*_group(), prior="on", cfg=cfg)
    assert g.preferred == "off" and g.acc_on == pytest.approx(2 / 3) and g.acc_off == 1.0
    assert g.answer == (1.0, 1.0, 0.0, 1.0, 1.0, -1.0)
    assert g.judge == (-1.0, -1.0, -1.0, 1.0, 1.0, -1.0)
    assert g.correct == (True, True, False, True, True, False)
    assert list(g.reward) == pytest.approx(reward)
    assert not g.skipped


def test_step_srpo_efficiency_term_hand_computed():
    cfg = S.StepSRPOConfig(judge_weight=0.5, modulation="gated", efficiency_weight=0.5)
    lengths = [10, 20, 5, 4, 8, 3]
    g = S.step_srpo_group_rewards(*_group(), prior="on", lengths=lengths, cfg=cfg)
    # correct rows 0, 1, 3, 4: mean length (10 + 20 + 4 + 8)/4 = 10.5; e = 1 − L/10.5 (clipped to [−1, 1])
    e = [1 - 10 / 10.5, 1 - 20 / 10.5, 0.0, 1 - 4 / 10.5, 1 - 8 / 10.5, 0.0]
    assert e[1] == pytest.approx(-0.9047619)
    d = [-1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    assert list(g.judge) == pytest.approx([dd + 0.5 * ee for dd, ee in zip(d, e)])
    assert list(g.reward) == pytest.approx([0.5, 0.5, 0.0, 1.0, 1.0, -1.0])  # the gate reads the mode decision only
    with pytest.raises(ValueError, match="lengths"):
        S.step_srpo_group_rewards(*_group(), cfg=cfg)


def test_step_srpo_one_mode_group_and_skips():
    # all think-on, prior off: every rollout with a mode has j = −1, so its judge advantage will be 0
    g = S.step_srpo_group_rewards(["on", "on", "on"], [1.0, 0.0, 1.0], [True] * 3, prior="off")
    assert g.preferred == "off" and g.judge == (-1.0, -1.0, -1.0)
    assert list(g.reward) == pytest.approx([0.5, 0.0, 0.5])
    # no prior: undecided, j = 0, the modulation is neutral
    g = S.step_srpo_group_rewards(["on", "on"], [1.0, 0.0], [True, True], prior=None)
    assert g.judge == (0.0, 0.0) and g.reward == (1.0, 0.0)
    # an ungradable rollout skips the group
    g = S.step_srpo_group_rewards(["on", "off"], [1.0, None], [True, True])
    assert g.skipped and g.reward == (0.0, 0.0) and g.judge == (0.0, 0.0)
    # ... but a malformed rollout without a score is just malformed
    g = S.step_srpo_group_rewards(["on", None], [1.0, None], [True, False])
    assert not g.skipped and g.answer == (1.0, -1.0)


def test_step_srpo_config_validation():
    with pytest.raises(ValueError, match="modulation"):
        S.StepSRPOConfig(modulation="power")
    with pytest.raises(ValueError, match="scale"):
        S.StepSRPOConfig(scale="global")
    with pytest.raises(ValueError, match="judge_weight"):
        S.StepSRPOConfig(judge_weight=-1)
    with pytest.raises(ValueError, match="same length"):
        S.step_srpo_group_rewards(["on"], [1.0, 0.0], [True, True])


# ----------------------------------------------------------------------------------------------------------------
# the other algorithms' reward rules
# ----------------------------------------------------------------------------------------------------------------
def test_other_reward_rules_hand_built_group():
    # GRPO: the score; malformed 0
    assert S.grpo_rewards([1.0, 0.0, 0.5, 1.0], [True, True, True, False]) == [1.0, 0.0, 0.5, 0.0]
    # DAPO: ±1 and the overlong penalty: L_max 10, L_cache 4 -> free up to 6, L = 8 -> −(8 − 6)/4 = −0.5
    assert S.overlong_penalty(6, max_len=10, cache_len=4) == 0.0
    assert S.overlong_penalty(10, max_len=10, cache_len=4) == -1.0
    assert S.dapo_rewards([1.0, 0.0, 1.0, 1.0], [True, True, True, False], [4, 5, 8, 3], max_len=10, cache_len=4) \
        == [1.0, -1.0, 0.5, -1.0]
    assert S.dapo_rewards([1.0], [True], [9], max_len=12) == [1.0 - (9 - 9) / 3]  # cache defaults to 12 // 4
    with pytest.raises(ValueError, match="cache_len"):
        S.overlong_penalty(3, max_len=4, cache_len=5)
    # AdaptThink: acc − ref + δ·[off]
    assert S.adaptthink_rewards(["off", "on", "off", None], [1.0, 1.0, 0.0, 1.0], [True, True, True, False],
                                ref_acc=0.5, delta=0.05) == pytest.approx([0.55, 0.5, -0.45, -0.5])
    # Thinkless: off ✓ 1, on ✓ 0.5, wrong/malformed −1; the reproduction's 0.8
    assert S.thinkless_rewards(["off", "on", "on", None], [1.0, 1.0, 0.0, 1.0], [True, True, True, False]) \
        == [1.0, 0.5, -1.0, -1.0]
    assert S.thinkless_rewards(["on"], [1.0], [True], think_correct=0.8) == [0.8]
    # ungradable -> None in every rule
    assert S.dapo_rewards([None], [True]) == [None]
    assert S.adaptthink_rewards(["on"], [None], [True], ref_acc=0.0) == [None]
