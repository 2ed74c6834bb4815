"""The grading memo: verifier scores memoised by (sample, answer block) within a run (used by the RL stage and
``kat.pipeline``'s vote labelling)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from kat import rewards
from kat.data import templates

__all__ = ["GradeCache"]


class GradeCache:
    """Scores memoised by (sample identity, answer block): every verifier reads only the answer block
    (docs/verifiers.md), so the same answer to the same sample always gets the same score. Scores from a
    ``grade_batch`` call that had timeouts or errors are not stored (they might not be reproducible)."""

    def __init__(self, max_items: int = 200_000):
        self.max_items = max_items
        self._d: OrderedDict = OrderedDict()
        self.hits = 0
        self.lookups = 0

    @staticmethod
    def key(sample: dict, completion: str) -> tuple:
        gold = (sample.get("domain"), sample.get("answer"), sample.get("tests"),
                tuple(sample.get("choices") or ()))
        return (str(sample.get("id")), hash(gold), templates.answer_block(completion))

    def grade(self, samples: Sequence[dict], completions: Sequence[str], *, use_cache: bool = True,
              **grade_kw) -> tuple[list, rewards.RewardStats, int]:
        """Scores aligned with the inputs, the grading pass's stats (unique items only) and the cache hits."""
        keys = [self.key(s, c) for s, c in zip(samples, completions)]
        todo: dict[tuple, int] = {}
        for i, k in enumerate(keys):
            if (not use_cache or k not in self._d) and k not in todo:
                todo[k] = i
        hits = sum(1 for k in keys if use_cache and k in self._d)
        self.lookups += len(keys)
        self.hits += hits
        idx = list(todo.values())
        res = rewards.grade_batch([samples[i] for i in idx], [completions[i] for i in idx], **grade_kw)
        fresh = dict(zip(todo.keys(), res.scores))
        if use_cache and res.stats.timeouts == 0 and res.stats.errors == 0:
            for k, v in fresh.items():
                self._d[k] = v
            while len(self._d) > self.max_items:
                self._d.popitem(last=False)
        scores = [fresh[k] if k in fresh else self._d[k] for k in keys]
        return scores, res.stats, hits
