"""Math answer verification with Math-Verify, in worker processes with a hard timeout.

``verify(completion, gold)`` reads only the ``<answer>`` block and decides symbolic equivalence
with the ``math-verify`` package (huggingface/Math-Verify; settings in docs/verifiers.md, Math):

* **Gold first.** Both sides go through the same extraction (below) and ``math_verify.verify(gold,
  pred)`` is called with gold first (the function is asymmetric by design), ``strict=True``,
  ``numeric_precision=40`` (with the default 15, ``1/2^99 == 1/2^98``, Math-Verify #14) and
  ``float_rounding=6``; ``parsing_timeout=None`` / ``timeout_seconds=None`` because Math-Verify's own
  timeout is ``signal.alarm`` (main thread only, #50/#55). Each (gold, prediction) candidate pair
  is compared separately with ``raise_on_error=True``, so an exception in one pair (#40) is
  counted and scores that pair False without hiding a match of another pair.
* **Strict settings** (README, TRL's accuracy reward): ``NormalizationConfig(basic_latex=True,
  units=True, malformed_operators=False, nits=False, boxed="all", equations=False)``,
  ``boxed_match_priority=0``, ``extraction_mode="first_match"``, no ``StringExtractionConfig``.
* **Extraction of an isolated answer block.** Math-Verify's anchor-free mode scans free text and
  takes the right-most number (``"3 or 4"`` -> 4, ``"(1, 2)"`` -> 2): fine for a whole response,
  wrong for a block that *is* the answer. So, in order, first hit wins:
  1. anchored forms only (``try_extract_without_anchor=False``): ``\\boxed{}``, "final answer is",
     "answer: ...";
  2. a block with math delimiters (``$``, ``\\(``, ``\\[``): LaTeX extraction, anchor-free;
  3. a block of plain arithmetic (digits, ``+-*/^()×÷%``, a decimal point, thousands commas):
     Math-Verify's expression parser (``1/2^99`` is ``1/2**99``, which LaTeX would read as
     ``2^9·9``);
  4. anything else is read as one LaTeX expression ``$block$`` (``x=3``, ``\\frac{1}{2}``,
     ``(1, 2)``, ``3 or 4``).
  Before that, TeX's single-token arguments are spelled out: ``\\frac12`` -> ``\\frac{1}{2}``,
  ``\\sqrt2`` -> ``\\sqrt{2}`` (what TeX itself does; Math-Verify's ``malformed_operators`` rewrite
  turns ``\\frac123`` into ``1/23`` and is off in the strict settings).
* **Gold.** Gold answers are plain text or LaTeX without ``$`` (docs/design.md §3) and go through the
  same steps; a gold that yields no SymPy object (only a raw string, or nothing) raises
  :class:`kat.rewards.GoldParseError` -- as does a gold whose parsing alone exceeds the timeout.
  The outcome per gold string is cached in the caller (4096 entries) and in each worker (parsed
  objects, 1024 entries): G rollouts of one prompt parse their gold once.
* **Answer blocks longer than ``max_answer_chars`` (1000) score False without being parsed**
  (counted as malformed); an empty block scores False.
* **Hard timeout.** Parsing and comparison run in a :class:`kat.rewards.pool.WorkerPool` of
  persistent processes (``workers``, default 2). A task that exceeds ``timeout_s`` has its worker
  SIGKILLed, reaped and replaced, and scores False (counted in ``stats.timeouts``).
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from kat.data.templates import answer_block
from kat.rewards import GoldParseError, RewardStats
from kat.rewards.pool import WorkerPool


@dataclass(frozen=True)
class MathConfig:
    """Settings of the math verifier (Hydra: ``reward.math.*``)."""

    numeric_precision: int = 40  # significant digits of numeric comparison (Math-Verify default 15 is too few)
    float_rounding: int = 6  # decimals floats are rounded to before comparison
    max_answer_chars: int = 1000  # longer answer blocks score 0 unparsed
    workers: int = 2  # maximum worker processes of the default pool
    memory_limit_mb: int = 2048  # RLIMIT_AS of each worker
    startup_timeout_s: float = 120.0  # bound on waiting for a worker's imports (not part of timeout_s)

    @classmethod
    def coerce(cls, cfg: "MathConfig | Mapping | None") -> "MathConfig":
        if cfg is None:
            return _DEFAULT_CONFIG
        if isinstance(cfg, MathConfig):
            return cfg
        if isinstance(cfg, Mapping):  # reward.math: its schema (kat.rl.config.MathRewardConfig) checks the keys
            return cls(**{k: cfg[k] for k in cfg})
        raise TypeError(f"math config must be MathConfig, a mapping or None, got {type(cfg).__name__}")


_DEFAULT_CONFIG = MathConfig()
_HANDLER = "kat.rewards.math:_make_worker_handler"

_pool: WorkerPool | None = None
_pool_lock = threading.Lock()
_gold_status: "OrderedDict[str, bool]" = OrderedDict()
_gold_lock = threading.Lock()
_GOLD_CACHE_SIZE = 4096


def get_pool(config: MathConfig | Mapping | None = None, *, min_size: int | None = None) -> WorkerPool:
    """The process-wide math worker pool (created on first use; rebuilt after fork or close)."""
    global _pool
    cfg = MathConfig.coerce(config)
    with _pool_lock:
        if _pool is None or _pool.closed or _pool._pid != _current_pid():
            _pool = WorkerPool(_HANDLER, size=max(1, cfg.workers), memory_limit_mb=cfg.memory_limit_mb,
                               startup_timeout_s=cfg.startup_timeout_s)
        if min_size is not None:
            _pool.ensure_size(min_size)
        return _pool


def close_pool() -> None:
    """Kill and reap the default pool's workers (also runs at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


def _current_pid() -> int:
    import os

    return os.getpid()


def _gold_cached(gold: str) -> bool | None:
    with _gold_lock:
        v = _gold_status.get(gold)
        if v is not None:
            _gold_status.move_to_end(gold)
        return v


def _gold_store(gold: str, ok: bool) -> None:
    with _gold_lock:
        _gold_status[gold] = ok
        _gold_status.move_to_end(gold)
        while len(_gold_status) > _GOLD_CACHE_SIZE:
            _gold_status.popitem(last=False)


def verify(completion: str, gold: str, *, timeout_s: float = 5.0, config: MathConfig | Mapping | None = None,
           stats: RewardStats | None = None, pool: WorkerPool | None = None) -> bool:
    """True when the ``<answer>`` block of ``completion`` is mathematically equivalent to ``gold``.

    Raises :class:`kat.rewards.GoldParseError` when ``gold`` cannot be parsed (also when no answer
    block exists: the sample is bad either way). Returns within ``timeout_s`` plus worker overhead
    (about a millisecond; a worker that is still starting adds its import time, bounded by
    ``config.startup_timeout_s``); False on timeout, on an exception inside Math-Verify, or for a
    missing / empty / over-long answer block. ``stats`` (optional) receives ``timeouts``/``errors``.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str, got {type(gold).__name__}")
    if not timeout_s or timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    cfg = MathConfig.coerce(config)
    if not gold.strip():
        raise GoldParseError("gold answer is empty")
    status = _gold_cached(gold)
    if status is False:
        raise GoldParseError(f"gold answer does not parse: {gold!r}")
    block = answer_block(completion)
    answer = None if block is None else block.strip()
    if not answer or len(answer) > cfg.max_answer_chars:
        answer = None
        if status is True:
            return False
    request = {"gold": gold, "answer": answer, "numeric_precision": int(cfg.numeric_precision),
               "float_rounding": int(cfg.float_rounding)}
    pool = pool if pool is not None else get_pool(cfg)
    reply = pool.call(request, timeout_s=timeout_s)
    if reply.timed_out:
        gold_parsed = any(p.get("gold_ok") for p in reply.progress)
        if answer is None or not gold_parsed:
            # the gold alone did not parse in time: it is not usable as a reference
            _gold_store(gold, False)
            raise GoldParseError(f"gold answer did not parse within {timeout_s} s: {gold[:200]!r}")
        if stats is not None:
            stats.add("timeouts")
        return False
    res = reply.result
    if reply.crashed or res is None or "error" in res:
        if stats is not None:
            stats.add("errors")
        return False
    if not res.get("gold_ok"):
        _gold_store(gold, False)
        raise GoldParseError(f"gold answer does not parse: {gold[:200]!r}")
    _gold_store(gold, True)
    eq = bool(res.get("eq", False))
    if not eq and res.get("errors") and stats is not None:
        stats.add("errors")
    return eq


# ---------------------------------------------------------------------- shared text preparation
# A TeX macro argument without braces is exactly one token; spell such arguments out.
_ARG = r"(\{[^{}]*\}|\d|[A-Za-z])"
_FRAC_SHORT = re.compile(r"\\[dt]?frac\s*" + _ARG + r"\s*" + _ARG)
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d|[A-Za-z](?![A-Za-z]))")
_PLAIN_ARITH = re.compile(r"[-+]?[\d\s.,+\-*/^()×÷%]+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DELIMS = ("$", "\\(", "\\[")


def _brace(arg: str) -> str:
    return arg if arg.startswith("{") else "{" + arg + "}"


def expand_tex_shorthand(text: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\dfrac1{x}`` -> ``\frac{1}{x}``, ``\sqrt2`` -> ``\sqrt{2}``.

    TeX reads an unbraced macro argument as a single token, so this is exact (``\frac123`` is
    ``\frac{1}{2}3``), unlike Math-Verify's ``malformed_operators`` regex.
    """
    text = _FRAC_SHORT.sub(lambda m: r"\frac" + _brace(m.group(1)) + _brace(m.group(2)), text)
    return _SQRT_SHORT.sub(lambda m: r"\sqrt{" + m.group(1) + "}", text)


def extraction_route(text: str) -> str:
    """Which extraction step (module docstring) reads ``text`` when no anchored form matched:
    ``"latex"`` (has math delimiters), ``"expr"`` (plain arithmetic) or ``"wrap"`` (``$text$``)."""
    t = text.strip()
    if any(d in t for d in _DELIMS):
        return "latex"
    if _PLAIN_ARITH.fullmatch(t) and any(c.isdigit() for c in t):
        if "," not in t or _THOUSANDS.fullmatch(t):
            return "expr"
    return "wrap"


# ---------------------------------------------------------------------- worker side
def _make_worker_handler():
    """Factory run once in each worker process: imports Math-Verify and returns the task handler."""
    import logging

    for name in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from math_verify import verify as mv_verify
    from sympy import Basic
    from sympy.matrices import MatrixBase

    norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=False, nits=False,
                               boxed="all", equations=False)
    anchored = [
        LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=0, normalization_config=norm),
        ExprExtractionConfig(try_extract_without_anchor=False),
    ]
    latex_free = [LatexExtractionConfig(try_extract_without_anchor=True, boxed_match_priority=0,
                                        normalization_config=norm)]
    expr_free = [ExprExtractionConfig(try_extract_without_anchor=True)]
    counters = {"errors": 0}

    def _parse(text: str, cfg) -> list:
        try:
            return parse(text, extraction_config=cfg, fallback_mode="first_match",
                         extraction_mode="first_match", parsing_timeout=None, raise_on_error=True)
        except Exception:  # noqa: BLE001 - Math-Verify/SymPy errors: no candidates from this step
            counters["errors"] += 1
            return []

    def extract(text: str) -> list:
        t = expand_tex_shorthand(text.strip())
        if not t:
            return []
        out = _parse(t, anchored)
        if out:
            return out
        route = extraction_route(t)
        if route == "latex":
            return _parse(t, latex_free)
        if route == "expr":
            return _parse(t, expr_free)
        return _parse(f"${t}$", latex_free)

    def is_sympy(x) -> bool:
        return isinstance(x, (Basic, MatrixBase))

    gold_cache: "OrderedDict[str, list]" = OrderedDict()

    def gold_of(gold: str) -> list:
        if gold in gold_cache:
            gold_cache.move_to_end(gold)
            return gold_cache[gold]
        g = extract(gold)
        gold_cache[gold] = g
        while len(gold_cache) > 1024:
            gold_cache.popitem(last=False)
        return g

    def handle(req: dict, emit) -> dict:
        counters["errors"] = 0
        g = gold_of(req["gold"])
        if not any(is_sympy(x) for x in g):
            return {"gold_ok": False}
        answer = req.get("answer")
        if answer is None:
            return {"gold_ok": True}
        emit({"gold_ok": True})
        pred = extract(answer)
        if not pred:
            return {"gold_ok": True, "eq": False, "pred_ok": False, "errors": counters["errors"]}
        for gi in g:
            for pi in pred:
                try:
                    if mv_verify(gi, pi, float_rounding=req["float_rounding"],
                                 numeric_precision=req["numeric_precision"], strict=True,
                                 timeout_seconds=None, raise_on_error=True):
                        return {"gold_ok": True, "eq": True, "errors": counters["errors"]}
                except Exception:  # noqa: BLE001 - e.g. TypeError on some equations (Math-Verify #40)
                    counters["errors"] += 1
        return {"gold_ok": True, "eq": False, "errors": counters["errors"]}

    # warm-up: compile the extraction regexes and load the LaTeX parser before announcing ready
    handle({"gold": "\\frac{1}{2}", "answer": "0.5", "numeric_precision": 40, "float_rounding": 6},
           lambda _m: None)
    return handle
