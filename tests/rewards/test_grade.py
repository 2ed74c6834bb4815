"""kat.rewards.grade / grade_batch: dispatch by domain, None for bad gold, malformed -> 0, counters."""
from __future__ import annotations

import time

import pytest

from kat import rewards
from kat.data import synthetic, templates
from kat.rewards import BatchResult, RewardStats, grade, grade_batch
from kat.rewards import math as km
from kat.rewards import sandbox

BWRAP_OK, BWRAP_DETAIL = sandbox.probe()
needs_bwrap = pytest.mark.skipif(not BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {BWRAP_DETAIL}")
HANG = r"\sum_{n=1}^{10^{7}} \frac{1}{n}"


@pytest.fixture(scope="module", autouse=True)
def _close_default_pool():
    yield
    km.close_pool()


def A(text: str, mode: str = "off") -> str:
    return templates.coldstart_target(mode, "easy", "t" if mode == "on" else None, text)


MATH = {"id": 1, "domain": "math", "answer": r"\frac{1}{2}"}
CODE = {"id": 2, "domain": "code", "tests": "assert f(2) == 134"}
SCI = {"id": 3, "domain": "science", "answer": "B", "choices": ["122", "132", "142", "133"]}
GEN = {"id": 4, "domain": "general", "answer": "132 in total"}


@pytest.mark.parametrize(
    "sample, right, wrong",
    [
        (MATH, "0.5", "0.25"),
        (SCI, "B", "C"),
        (GEN, "132 in total", "131 in total"),
        ({**GEN, "domain": "multiturn"}, "In total: 132", "no idea"),
        ({**GEN, "domain": "tool"}, "132 in total", "131"),
    ],
)
def test_dispatch_by_domain(sample, right, wrong):
    assert grade(sample, A(right)) == 1.0
    assert grade(sample, A(wrong, mode="on")) == 0.0
    assert grade(sample, f"<judge>x</judge><think_off>{right}") == 0.0  # malformed: no answer block


@needs_bwrap
def test_dispatch_code():
    assert grade(CODE, A("f = lambda x: x + 132")) == 1.0
    assert grade(CODE, A("f = lambda x: x + 131")) == 0.0
    assert grade(CODE, A("import sys\nsys.exit(0)")) == 0.0
    assert grade(CODE, "f = lambda x: x + 132") == 0.0  # malformed


@pytest.mark.parametrize(
    "sample",
    [
        {"id": 5, "domain": "math", "answer": "???"},
        {"id": 6, "domain": "math"},
        {"id": 7, "domain": "science", "answer": "E", "choices": ["1", "2"]},
        {"id": 8, "domain": "general", "answer": "  "},
        {"id": 9, "domain": "code"},
    ],
)
def test_ungradable_samples_are_skipped_not_zero(sample):
    stats = RewardStats()
    assert grade(sample, A("1"), stats=stats) is None
    assert grade(sample, "malformed", stats=stats) is None
    assert stats.skipped == 2 and stats.graded == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="domain"):
        grade({"id": 1, "domain": "poetry", "answer": "x"}, A("x"))
    with pytest.raises(ValueError, match="domain"):
        grade({"id": 1, "answer": "x"}, A("x"))
    with pytest.raises(TypeError, match="completion"):
        grade(MATH, None)
    with pytest.raises(ValueError, match="length"):
        grade_batch([MATH], [])


def test_grade_batch_mixed_with_counters():
    samples = [MATH, MATH, SCI, GEN, {"id": 5, "domain": "math", "answer": "???"}, MATH, SCI]
    comps = [A("1/2"), A("2/3"), A("(B)"), A("132 in total"), A("1"), "malformed", "malformed"]
    res = grade_batch(samples, comps, max_workers=2)
    assert isinstance(res, BatchResult)
    assert res.scores == [1.0, 0.0, 1.0, 1.0, None, 0.0, 0.0]
    st = res.stats
    assert (st.n, st.graded, st.skipped, st.malformed, st.correct) == (7, 6, 1, 2, 3)
    assert st.by_domain == {"math": 4, "science": 2, "general": 1}
    assert st.timeouts == 0 and st.errors == 0


def test_grade_batch_bounds_each_item_by_the_timeout():
    samples = [{"id": i, "domain": "math", "answer": "5"} for i in range(4)]
    comps = [A(HANG), A("5"), A(HANG), A("5")]
    t0 = time.monotonic()
    res = grade_batch(samples, comps, max_workers=2, timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert res.scores == [0.0, 1.0, 0.0, 1.0]
    assert res.stats.timeouts == 2
    # two hung items on two workers run side by side; replacements start in the background
    assert elapsed < 2 * 1.0 + 2.5, elapsed


@needs_bwrap
def test_grade_batch_code_items_in_parallel():
    samples = [CODE] * 4
    comps = [A("f = lambda x: x + 132"), A("while True:\n    pass"), A("f = lambda x: x"), A("f = lambda x: x + 132")]
    res = grade_batch(samples, comps, max_workers=2, timeout_s=1.0)
    assert res.scores == [1.0, 0.0, 0.0, 1.0]
    assert res.stats.timeouts == 1


def test_code_without_sandbox_refuses_unless_allowed():
    cfg = {"bwrap": "kat-no-such-bwrap"}
    with pytest.raises(rewards.SandboxUnavailableError):
        grade_batch([CODE], [A("f = lambda x: x + 132")], code_cfg=cfg)
    with pytest.raises(rewards.SandboxUnavailableError):  # also when every completion is malformed
        grade(CODE, "malformed", code_cfg=cfg)
    ok = grade_batch([CODE], [A("f = lambda x: x + 132")], code_cfg={**cfg, "allow_unsandboxed": True})
    assert ok.scores == [1.0]


@needs_bwrap
def test_reference_responses_of_the_synthetic_suite_score_one():
    items = synthetic.generate(2, seed=0, split="train")
    comps = [templates.coldstart_target(it["mode"], it["judge"], it.get("thinking"), it["response"]) for it in items]
    res = grade_batch(items, comps, max_workers=2)
    assert res.scores == [1.0] * len(items), [(it["id"], s) for it, s in zip(items, res.scores) if s != 1.0]
