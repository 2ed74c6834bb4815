"""kat.rewards.math.verify: equivalence, strictness, gold errors, hard timeouts, worker hygiene."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from kat.rewards import GoldParseError, RewardStats
from kat.rewards import math as km
from kat.rewards.pool import WorkerPool

# SymPy evaluates this sum term by term: minutes, in one call that no thread can interrupt.
HANG = r"\sum_{n=1}^{10^{7}} \frac{1}{n}"


def A(text: str) -> str:
    return f"<judge>easy</judge><think_off><answer>{text}</answer>"


@pytest.fixture(scope="module", autouse=True)
def _close_default_pool():
    yield
    km.close_pool()


def _gone(pid: int) -> bool:
    """True when ``pid`` is neither running nor a zombie (it was reaped)."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("1/2", r"\frac{1}{2}"),
        (r"\frac{1}{2}", "1/2"),
        ("0.5", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),  # TeX single-token arguments
        ("132", "132"),
        ("132.0", "132"),
        ("1,000", "1000"),
        ("x=3", "3"),  # an assignment to the asked variable
        ("3", "x=3"),
        (r"\boxed{7}", "7"),
        ("The answer is $7$", "7"),
        (r"$\sqrt{4}$", "2"),
        ("2^10", "1024"),
        ("x^2+2x+1", "(x+1)^2"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("1/2^99", r"\frac{1}{2^{99}}"),
        ("-3", "-3"),
    ],
)
def test_equivalent_forms_match(answer, gold):
    assert km.verify(A(answer), gold) is True


@pytest.mark.parametrize(
    "answer, gold",
    [
        ("133", "132"),
        ("0.51", r"\frac{1}{2}"),
        ("x=4", "3"),
        ("3 or 4", "4"),  # no right-most-number extraction inside an answer block
        ("(1, 2)", "2"),
        ("3.14159", r"\pi"),
        ("1/2^99", "1/2^{98}"),  # numeric_precision=40 (the default 15 calls these equal)
        (r"\frac{1}{2^{99}}", r"\frac{1}{2^{98}}"),
        ("hello", "5"),
    ],
)
def test_wrong_answers_do_not_match(answer, gold):
    assert km.verify(A(answer), gold) is False


def test_malformed_empty_and_huge_blocks_score_false_fast():
    assert km.verify("<judge>x</judge><think_off>132", "132") is False  # no answer block
    assert km.verify("<answer>132", "132") is False  # unclosed
    assert km.verify(A(""), "132") is False
    assert km.verify(A("   "), "132") is False
    t0 = time.monotonic()
    assert km.verify(A("1+" * 50_000 + "1"), "100001") is False  # over max_answer_chars: not parsed
    assert time.monotonic() - t0 < 0.5
    # only the answer block is read: a correct number in the thinking does not count
    assert km.verify("<judge>h</judge><think_on><think>132</think><answer>131</answer>", "132") is False


@pytest.mark.parametrize("gold", ["", "   ", "???", "\\frac{", "@@"])
def test_unparseable_gold_raises(gold):
    with pytest.raises(GoldParseError):
        km.verify(A("1"), gold)
    with pytest.raises(GoldParseError):  # also when the completion is malformed: the sample is bad
        km.verify("no answer block", gold)


def test_bad_arguments_raise_naming_them():
    with pytest.raises(TypeError, match="gold"):
        km.verify(A("1"), 1)
    with pytest.raises(TypeError, match="completion"):
        km.verify(None, "1")
    with pytest.raises(ValueError, match="timeout_s"):
        km.verify(A("1"), "1", timeout_s=0)
    with pytest.raises(TypeError, match="'precision'"):  # reward.math typos fail at compose time (kat.rl.config)
        km.verify(A("1"), "1", config={"precision": 3})


def test_timeout_returns_false_within_budget_and_replaces_the_worker():
    pool = WorkerPool(km._HANDLER, size=1)
    try:
        pool.warm_up()
        (old,) = pool.pids()
        stats = RewardStats()
        t0 = time.monotonic()
        assert km.verify(A(HANG), "5", timeout_s=1.0, pool=pool, stats=stats) is False
        elapsed = time.monotonic() - t0
        assert 1.0 <= elapsed < 2.0, elapsed  # timeout + kill + reap + spawn of the successor
        assert stats.timeouts == 1 and pool.counters["timeouts"] == 1 and pool.counters["restarts"] == 1
        assert _gone(old), "the hung worker must be killed and reaped"
        (new,) = pool.pids()
        assert new != old
        # the replacement serves the next task (its start-up is not charged to the task's timeout)
        assert km.verify(A("1/2"), "0.5", timeout_s=5.0, pool=pool) is True
    finally:
        pool.close()
    assert pool.pids() == [] and _gone(new)


def test_concurrent_callers_from_threads():
    # Math-Verify's own signal.alarm timeout would raise off the main thread (#50): ours does not.
    pool = km.get_pool(min_size=2)
    results = {}

    def work(i):
        results[i] = km.verify(A(str(i)), str(i)) and not km.verify(A(str(i + 1)), str(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(8)}
    assert 1 <= pool.n_workers() <= 2


def test_close_pool_kills_and_reaps_workers():
    pool = km.get_pool()
    assert km.verify(A("2"), "2")
    pids = pool.pids()
    assert pids
    km.close_pool()
    assert all(_gone(p) for p in pids)
    assert km.verify(A("2"), "2")  # a new pool starts on demand


def test_import_is_cheap_and_starts_no_process():
    code = (
        "import sys, kat.rewards as r; "
        "print('sympy' in sys.modules, 'math_verify' in sys.modules, r.math._pool is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def test_tex_shorthand_expansion_is_exact():
    assert km.expand_tex_shorthand(r"\frac12") == r"\frac{1}{2}"
    assert km.expand_tex_shorthand(r"\frac123") == r"\frac{1}{2}3"  # TeX: one token per argument
    assert km.expand_tex_shorthand(r"\dfrac1{x}") == r"\frac{1}{x}"
    assert km.expand_tex_shorthand(r"\sqrt2+\sqrt{3}") == r"\sqrt{2}+\sqrt{3}"
    assert km.expand_tex_shorthand(r"\frac{a}{b}") == r"\frac{a}{b}"
    assert km.extraction_route("1/2^99") == "expr"
    assert km.extraction_route("1,000") == "expr"
    assert km.extraction_route("(1, 2)") == "wrap"
    assert km.extraction_route("$x$") == "latex"


def test_errors_in_the_worker_score_false_and_are_counted():
    # "builtins:dict" is a handler factory whose handler is not callable: every task raises inside
    # the worker, which replies with an error instead of dying
    pool = WorkerPool("builtins:dict", size=1)
    try:
        stats = RewardStats()
        assert km.verify(A("1"), "1", pool=pool, stats=stats) is False
        assert stats.errors == 1 and stats.timeouts == 0
        assert pool.counters["restarts"] == 0
    finally:
        pool.close()


def test_worker_that_cannot_start_raises_a_clear_error():
    from kat.rewards.pool import WorkerStartupError

    pool = WorkerPool("kat.no_such_module:factory", size=1)
    try:
        with pytest.raises(WorkerStartupError, match="no_such_module"):
            pool.call({}, timeout_s=1.0)
        assert pool.n_workers() == 0
    finally:
        pool.close()
