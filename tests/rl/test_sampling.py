"""kat.rl.sampling: SRPO History Resampling (with state round-trip) and DAPO dynamic sampling."""
from __future__ import annotations

import json

import pytest
import torch

from kat.rl.sampling import DynamicSampler, HistoryResampler, zero_std_groups


def _epoch1(hr: HistoryResampler) -> None:
    # G = 3; prompt d is seen twice: once all correct, once mixed -> not all-correct over the epoch
    hr.record(["a", "b", "d"], [1, 1, 1, 1, 0, 1, 1, 1, 1], 3)
    hr.record(["c", "d"], torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool), 3)


def test_history_resampling_drops_only_all_correct_prompts():
    hr = HistoryResampler()
    _epoch1(hr)
    assert hr.epoch_counts == {"seen": 4, "all_correct": 1, "mixed": 2, "all_incorrect": 1}
    assert hr.end_epoch() == 1 and hr.last_resampled_out == 1 and hr.epoch == 1
    assert not hr.keep("a") and hr.keep("b") and hr.keep("c") and hr.keep("d")
    assert hr.filter(["a", "b", "c", "d", "e"]) == ["b", "c", "d", "e"]
    # epoch 2: b is solved now; a stays out without being seen
    hr.record(["b", "c"], [1, 1, 1, 0, 0, 1], 3)
    assert hr.end_epoch() == 1
    assert hr.excluded == {"a", "b"} and hr.epoch == 2
    # an epoch with nothing solved
    hr.record(["c"], [0, 0, 0], 3)
    assert hr.end_epoch() == 0 and hr.last_resampled_out == 0


def test_history_resampling_state_round_trip_mid_epoch():
    hr = HistoryResampler()
    _epoch1(hr)
    hr.end_epoch()
    hr.record(["b"], [1, 1, 1], 3)  # mid-epoch 2
    state = json.loads(json.dumps(hr.state_dict()))  # must survive JSON (checkpoint metadata)
    assert state["excluded"] == ["a"] and state["seen"] == {"b": [3, 3]}
    resumed = HistoryResampler()
    resumed.load_state_dict(state)
    for r in (hr, resumed):
        r.record(["c"], [1, 0, 0], 3)
        assert r.end_epoch() == 1
    assert resumed.state_dict() == hr.state_dict()
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({**state, "version": 99})


def test_history_resampling_bad_input():
    hr = HistoryResampler()
    with pytest.raises(ValueError, match="groups"):
        hr.record(["a", "b"], [1, 1, 1], 3)
    with pytest.raises(ValueError, match="multiple"):
        hr.record(["a"], [1, 1], 3)
    with pytest.raises(TypeError, match="str"):
        hr.record([7], [1, 1, 1], 3)


def test_zero_std_groups_and_dynamic_sampler():
    acc = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.float32)  # all right / mixed / all wrong
    assert zero_std_groups(acc, 3).tolist() == [True, False, True]
    assert zero_std_groups([0.5], 1).tolist() == [True]
    ds = DynamicSampler(max_gen_batches=2)
    assert ds.frac_zero_std == 0.0
    assert ds.filter(acc, 3).tolist() == [False, True, False]
    assert ds.filter(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2).tolist() == [True, True]
    assert (ds.gen_batches, ds.groups_seen, ds.groups_kept) == (2, 5, 3)
    assert ds.frac_zero_std == pytest.approx(2 / 5)
    with pytest.raises(RuntimeError, match="max_gen_batches"):
        ds.filter(acc, 3)
    ds.reset()
    assert (ds.gen_batches, ds.groups_seen, ds.frac_zero_std) == (0, 0, 0.0)
    unlimited = DynamicSampler(max_gen_batches=0)
    for _ in range(12):
        unlimited.filter(acc, 3)
    with pytest.raises(ValueError, match="max_gen_batches"):
        DynamicSampler(max_gen_batches=-1)
    with pytest.raises(ValueError, match="1-D"):
        zero_std_groups(torch.zeros(2, 2), 2)
