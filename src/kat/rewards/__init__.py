"""Verifiable-reward graders: math, code (sandboxed), science multiple choice, general text.

Public API (docs/design.md §5):

* :func:`grade` ``(sample, completion, *, timeout_s=5.0, code_cfg=None) -> float | None`` -- one item:
  1.0 / 0.0, or ``None`` when the sample itself cannot be graded (unparseable gold, missing
  reference or tests): RL skips such samples, they are never scored 0.
* :func:`grade_batch` ``(samples, completions, *, max_workers=2, timeout_s=5.0, ...) -> BatchResult``
  -- many items in parallel; ``.scores`` (list) and ``.stats`` (:class:`RewardStats`).
* :class:`GoldParseError`, :class:`SandboxUnavailableError`.
* Domain verifiers: :func:`kat.rewards.math.verify`, :func:`kat.rewards.code.run_tests`,
  :func:`kat.rewards.science.extract_choice`, :func:`kat.rewards.general.score` / ``match``.

Every verifier reads only the ``<answer>…</answer>`` block (:func:`kat.data.templates.answer_block`);
a completion without one (malformed) scores 0. Domains ``multiturn`` and ``tool`` are graded by the
general heuristics (docs/design.md §3). Scores are binary for every domain (docs/verifiers.md explains why
the general heuristic gives no partial credit).

Importing this package is cheap: stdlib only, no worker process starts until the first math item.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence


class GoldParseError(ValueError):
    """The gold answer / reference of a sample cannot be parsed: skip the sample (reward None)."""


@dataclass
class RewardStats:
    """Counters of one grading pass (thread-safe through :meth:`add`).

    ``n``: items; ``graded``: items with a score; ``skipped``: items graded None (bad gold, missing
    reference/tests); ``malformed``: completions without an ``<answer>`` block (scored 0);
    ``timeouts``: math tasks or programs killed at the timeout (scored 0); ``errors``: exceptions
    inside a verifier, crashed workers, sandbox failures (scored 0); ``correct``: items scored 1.0;
    ``by_domain``: item count per domain; ``wall_s``: wall time of the pass.
    """

    n: int = 0
    graded: int = 0
    skipped: int = 0
    malformed: int = 0
    timeouts: int = 0
    errors: int = 0
    correct: int = 0
    by_domain: dict = field(default_factory=dict)
    wall_s: float = 0.0
    _lock: Any = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, k: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + k)

    def add_domain(self, domain: str) -> None:
        with self._lock:
            self.by_domain[domain] = self.by_domain.get(domain, 0) + 1

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}


from kat.rewards import code, general, math, science  # noqa: E402  (stdlib-only modules)
from kat.rewards.sandbox import SandboxConfig, SandboxUnavailableError  # noqa: E402
from kat.data.templates import answer_block  # noqa: E402

#: domains graded by the general heuristic (docs/design.md §3)
GENERAL_DOMAINS = ("general", "multiturn", "tool")
DOMAINS = ("math", "code", "science") + GENERAL_DOMAINS


@dataclass
class BatchResult:
    """Result of :func:`grade_batch`: one score per item (None = skipped) and the pass's counters."""

    scores: list
    stats: RewardStats


def _sample_id(sample: Mapping) -> str:
    return repr(sample.get("id", "?"))


def grade(sample: Mapping, completion: str, *, timeout_s: float = 5.0,
          code_cfg: SandboxConfig | Mapping | None = None, stats: RewardStats | None = None,
          math_cfg: "math.MathConfig | Mapping | None" = None) -> float | None:
    """Score one completion against one sample: 1.0, 0.0, or None (skip the sample).

    Dispatch on ``sample["domain"]``: ``math`` -> :func:`kat.rewards.math.verify` against
    ``answer``; ``code`` -> :func:`kat.rewards.code.run_tests` of the answer block with ``tests``;
    ``science`` -> :func:`kat.rewards.science.score` (letter in ``answer``, option count from
    ``choices``); ``general``/``multiturn``/``tool`` -> :func:`kat.rewards.general.score` against
    ``answer``.

    None when the sample cannot be graded: gold that does not parse (:class:`GoldParseError`), a
    missing ``answer`` (``tests`` for code). A completion without an ``<answer>`` block scores 0.0.
    Math tasks and programs are bounded by ``timeout_s`` (``code_cfg.timeout_s`` overrides it for
    code); a timeout scores 0.0. Raises :class:`SandboxUnavailableError` for code when bubblewrap
    cannot run and ``allow_unsandboxed`` is not set (a set-up problem, not a wrong answer), and
    ``ValueError`` for an unknown or missing domain.
    """
    if not isinstance(sample, Mapping):
        raise TypeError(f"sample must be a dict, got {type(sample).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    stats = stats if stats is not None else RewardStats()
    domain = sample.get("domain")
    if domain not in DOMAINS:
        raise ValueError(f"sample {_sample_id(sample)}: domain must be one of {DOMAINS}, got {domain!r}")
    stats.add("n")
    stats.add_domain(domain)
    score = _grade(sample, completion, domain, timeout_s, code_cfg, math_cfg, stats)
    if score is None:
        stats.add("skipped")
    else:
        stats.add("graded")
        if score >= 1.0:
            stats.add("correct")
    return score


def _grade(sample, completion, domain, timeout_s, code_cfg, math_cfg, stats) -> float | None:
    block = answer_block(completion)
    if domain == "math":
        gold = sample.get("answer")
        if not isinstance(gold, str) or not gold.strip():
            return None
        try:
            ok = math.verify(completion, gold, timeout_s=timeout_s, config=math_cfg, stats=stats)
        except GoldParseError:
            return None
        if block is None:
            stats.add("malformed")
        return 1.0 if ok else 0.0
    if domain == "code":
        tests = sample.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            return None
        cfg = SandboxConfig.coerce(code_cfg)
        if block is None:
            code.check_available(cfg)  # a missing sandbox is reported even on malformed batches
            stats.add("malformed")
            return 0.0
        t = cfg.timeout_s if cfg.timeout_s is not None else timeout_s
        res = code.run_tests_detailed(block, tests, timeout_s=t, config=cfg)
        if res.timed_out:
            stats.add("timeouts")
        elif res.reason == "sandbox_error":
            stats.add("errors")
        return 1.0 if res.passed else 0.0
    if domain == "science":
        try:
            ok = science.score(sample, completion)
        except GoldParseError:
            return None
        if block is None:
            stats.add("malformed")
        return 1.0 if ok else 0.0
    # general, multiturn, tool
    ref = sample.get("answer")
    if not isinstance(ref, str) or not general.keywords_or_text(ref):
        return None
    if block is None:
        stats.add("malformed")
        return 0.0
    return general.score(completion, ref)


def grade_batch(samples: Sequence[Mapping], completions: Sequence[str], *, max_workers: int = 2,
                timeout_s: float = 5.0, code_cfg: SandboxConfig | Mapping | None = None,
                math_cfg: "math.MathConfig | Mapping | None" = None) -> BatchResult:
    """Grade ``completions[i]`` against ``samples[i]`` for all i, ``max_workers`` items at a time.

    Cheap items (science, general, malformed) are graded inline; math items go to the persistent
    math worker pool (grown to ``max_workers`` processes) and code items each get one sandbox, from
    ``max_workers`` threads. No item waits on its task longer than ``timeout_s`` (plus worker
    overhead); a batch takes at most about ``ceil(n_slow / max_workers) * timeout_s``.
    Returns :class:`BatchResult` (``scores`` aligned with the inputs, ``stats`` counters).
    Raises :class:`SandboxUnavailableError` before grading anything when the batch holds code items
    and the sandbox cannot run.
    """
    if len(samples) != len(completions):
        raise ValueError(f"samples and completions differ in length: {len(samples)} vs {len(completions)}")
    if int(max_workers) < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    t0 = time.monotonic()
    stats = RewardStats()
    scores: list = [None] * len(samples)
    slow: list[int] = []
    for i, (s, c) in enumerate(zip(samples, completions)):
        d = s.get("domain") if isinstance(s, Mapping) else None
        if d in ("math", "code") and isinstance(c, str) and answer_block(c) is not None:
            slow.append(i)
        else:
            scores[i] = grade(s, c, timeout_s=timeout_s, code_cfg=code_cfg, stats=stats, math_cfg=math_cfg)
    if slow:
        if any(samples[i].get("domain") == "code" for i in slow):
            code.check_available(SandboxConfig.coerce(code_cfg))
        if any(samples[i].get("domain") == "math" for i in slow):
            math.get_pool(math_cfg, min_size=int(max_workers))

        def one(i: int):
            scores[i] = grade(samples[i], completions[i], timeout_s=timeout_s, code_cfg=code_cfg,
                              stats=stats, math_cfg=math_cfg)

        if int(max_workers) == 1 or len(slow) == 1:
            for i in slow:
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=int(max_workers), thread_name_prefix="kat-grade") as ex:
                for f in [ex.submit(one, i) for i in slow]:
                    f.result()
    stats.wall_s = time.monotonic() - t0
    return BatchResult(scores=scores, stats=stats)


__all__ = [
    "BatchResult",
    "GoldParseError",
    "RewardStats",
    "SandboxConfig",
    "SandboxUnavailableError",
    "grade",
    "grade_batch",
    "code",
    "general",
    "math",
    "science",
]
