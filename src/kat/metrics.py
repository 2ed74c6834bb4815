"""Summary metrics over graded completions (docs/design.md §4, §6).

* ``think_on_rate`` = completions whose mode is "on" / all completions (malformed ones count in the
  denominator);
* ``acc`` = correct / all (malformed completions count as wrong); completions whose gold answer cannot
  be parsed are left out of ``n`` entirely (they say nothing about the model);
* ``tokens_mean`` = mean generated tokens (judge included, prompt excluded).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable


@dataclass(frozen=True)
class Record:
    """One graded completion."""

    level: int | None
    domain: str | None
    mode: str | None  # "on" / "off" / None (no mode token)
    correct: bool | None  # None = skipped (ungradable gold)
    tokens: int
    well_formed: bool = True
    truncated: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def _block(n: float, on: float, correct: float, tokens: float) -> dict:
    """One summary block from counts: ``n`` graded completions, ``on`` of them think-on, ``correct``, ``tokens``."""
    if n == 0:
        return {"think_on_rate": 0.0, "acc": 0.0, "tokens_mean": 0.0, "n": 0}
    return {"think_on_rate": on / n, "acc": correct / n, "tokens_mean": tokens / n, "n": int(n)}


def _counts(recs: list[Record]) -> tuple[float, float, float, float]:
    return (float(len(recs)), float(sum(r.mode == "on" for r in recs)), float(sum(bool(r.correct) for r in recs)),
            float(sum(r.tokens for r in recs)))


def summarize(records: Iterable[Record], key: str = "level") -> dict[str, dict]:
    """``{"level_1": M, …, "all": M}`` (levels present only), ``M = {think_on_rate, acc, tokens_mean, n}``.

    ``key="domain"`` groups by domain instead. Skipped records (``correct is None``) are left out.
    """
    recs = [r for r in records if r.correct is not None]
    groups: dict[str, list[Record]] = {}
    for r in recs:
        v = getattr(r, key)
        if v is None:
            continue
        groups.setdefault(f"{key}_{v}", []).append(r)
    out = {k: _block(*_counts(groups[k])) for k in sorted(groups)}
    out["all"] = _block(*_counts(recs))
    return out


LEVELS = (1, 2, 3, 4, 5)


def level_sums(records: Iterable[Record], device=None):
    """Per-level counts as a fixed-shape float64 tensor ``[6, 4]`` (rows: levels 1..5, then "no level"; columns:
    n, think-on, correct, tokens) that ranks can all-reduce; :func:`summary_from_sums` turns it into the summary
    :func:`summarize` gives for the same records."""
    import torch

    t = torch.zeros(len(LEVELS) + 1, 4, dtype=torch.float64)
    for r in records:
        if r.correct is None:
            continue
        row = LEVELS.index(r.level) if r.level in LEVELS else len(LEVELS)
        t[row] += torch.tensor([1.0, float(r.mode == "on"), float(bool(r.correct)), float(r.tokens)],
                               dtype=torch.float64)
    return t if device is None else t.to(device)


def summary_from_sums(t) -> dict[str, dict]:
    """The per-level summary (as :func:`summarize`) of :func:`level_sums` counts, summed over ranks or batches."""
    out = {f"level_{lv}": _block(*map(float, t[k])) for k, lv in enumerate(LEVELS) if t[k, 0] > 0}
    out["all"] = _block(*map(float, t.sum(0)))
    return out


def flat(summary: dict[str, dict], prefix: str = "val") -> dict[str, float]:
    """MLflow names: ``val/acc`` for "all", ``val/acc/level_3`` per level (no ``n``)."""
    out = {}
    for group, m in summary.items():
        for name in ("think_on_rate", "acc", "tokens_mean"):
            out[f"{prefix}/{name}" if group == "all" else f"{prefix}/{name}/{group}"] = float(m[name])
    return out


def extra_rates(records: Iterable[Record]) -> dict[str, float]:
    """Format-error and truncation rates (share of all completions)."""
    recs = list(records)
    n = max(1, len(recs))
    return {
        "format_error_rate": sum(not r.well_formed for r in recs) / n,
        "truncation_rate": sum(r.truncated for r in recs) / n,
    }


# ==============================================================================================================
# Evaluation metrics (kat.eval): pass@k, token percentiles, per-mode tokens, directive following, token saving
# ==============================================================================================================
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, HumanEval):

        pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k / i)

    The product form avoids huge binomials. ``n − c < k`` (fewer than k wrong samples) gives 1.0.
    Raises ``ValueError`` for ``k < 1``, ``n < k`` or ``c`` outside ``0..n``.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < k:
        raise ValueError(f"n (samples per prompt) must be >= k, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be in 0..n={n}, got {c}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-quantile (``q`` in [0, 1]) with linear interpolation between order statistics (numpy's
    default ``method="linear"``); 0.0 for no values."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    xs = sorted(float(v) for v in values)
    if not xs:
        return 0.0
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _token_stats(tokens: list[int], suffix: str = "") -> dict[str, float]:
    return {
        f"tokens_mean{suffix}": sum(tokens) / len(tokens) if tokens else 0.0,
        f"tokens_p50{suffix}": percentile(tokens, 0.5),
        f"tokens_p90{suffix}": percentile(tokens, 0.9),
    }


def eval_block(records: Iterable[Record], *, directive: str | None = None) -> dict[str, float]:
    """The full metric block of kat.eval over graded records (skipped ones, ``correct is None``, left out).

    ``n``, ``acc`` (greedy pass@1; malformed = wrong), ``think_on_rate``, ``tokens_mean/p50/p90`` overall and
    per parsed mode (``_on``, ``_off``; 0 when that mode never occurs, see ``n_on``/``n_off``), ``acc_on``,
    ``acc_off``, ``format_error_rate``, ``truncation_rate``; with ``directive`` = "on"/"off" also
    ``follow_rate`` = completions whose parsed mode equals the directive / all (malformed = not followed).
    """
    recs = [r for r in records if r.correct is not None]
    n = len(recs)
    out: dict[str, float] = {"n": n}
    if n == 0:
        out.update({"acc": 0.0, "think_on_rate": 0.0, **_token_stats([]), "format_error_rate": 0.0,
                    "truncation_rate": 0.0})
        if directive is not None:
            out["follow_rate"] = 0.0
        return out
    out["acc"] = sum(bool(r.correct) for r in recs) / n
    out["think_on_rate"] = sum(r.mode == "on" for r in recs) / n
    out.update(_token_stats([r.tokens for r in recs]))
    for mode in ("on", "off"):
        sub = [r for r in recs if r.mode == mode]
        out[f"n_{mode}"] = len(sub)
        out[f"acc_{mode}"] = sum(bool(r.correct) for r in sub) / len(sub) if sub else 0.0
        out.update(_token_stats([r.tokens for r in sub], suffix=f"_{mode}"))
    out.update(extra_rates(recs))
    if directive is not None:
        if directive not in ("on", "off"):
            raise ValueError(f"directive must be 'on', 'off' or None, got {directive!r}")
        out["follow_rate"] = sum(r.mode == directive for r in recs) / n
    return out


def eval_summary(records: Iterable[Record], *, directive: str | None = None) -> dict[str, dict]:
    """:func:`eval_block` for ``all``, each ``level_{k}`` and each ``domain_{d}`` present in ``records``."""
    recs = list(records)
    groups: dict[str, list[Record]] = {}
    for r in recs:
        if r.level is not None:
            groups.setdefault(f"level_{r.level}", []).append(r)
    for r in recs:
        if r.domain is not None:
            groups.setdefault(f"domain_{r.domain}", []).append(r)
    out = {"all": eval_block(recs, directive=directive)}
    out["all"]["n_skipped"] = sum(r.correct is None for r in recs)
    for g in sorted(groups, key=lambda s: (not s.startswith("level_"), s)):
        out[g] = eval_block(groups[g], directive=directive)
    return out


def token_saving_pct(tokens_model: float, tokens_baseline: float) -> float:
    """Token saving of a model against a baseline in percent: ``100 · (1 − tokens_model / tokens_baseline)``
    (positive = the model writes fewer tokens; the paper's Fig. 9). 0.0 when the baseline wrote none."""
    if tokens_baseline <= 0:
        return 0.0
    return 100.0 * (1.0 - tokens_model / tokens_baseline)
