"""kat.rewards.cache.GradeCache: each (sample, answer block) is graded once."""
from __future__ import annotations

from kat.data import synthetic, templates
from kat.rewards.cache import GradeCache


def pool_of(n_per_level=2, domains=("math", "science")):
    return synthetic.generate(n_per_level, seed=0, domains=domains)


def test_grade_cache_grades_each_answer_once(monkeypatch):
    from kat import rewards

    calls = []
    real = rewards.grade_batch

    def counting(samples, completions, **kw):
        calls.append(len(samples))
        return real(samples, completions, **kw)

    monkeypatch.setattr(rewards, "grade_batch", counting)
    s = pool_of(1, ("math",))[0]
    good = templates.coldstart_target("off", "easy", None, s["response"])
    bad = templates.coldstart_target("off", "easy", None, "7")
    cache = GradeCache()
    scores, _, hits = cache.grade([s, s, s], [good, good, bad], max_workers=1)
    assert scores == [1.0, 1.0, 0.0] and calls == [2] and hits == 0
    scores, _, hits = cache.grade([s], [templates.coldstart_target("on", "hard", "x", s["response"])], max_workers=1)
    assert scores == [1.0] and hits == 1 and calls[-1] == 0  # same answer block: a hit
