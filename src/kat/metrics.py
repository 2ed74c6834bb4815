"""Summary metrics over graded completions (DESIGN.md §4, §6).

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


def _block(recs: list[Record]) -> dict:
    n = len(recs)
    if n == 0:
        return {"think_on_rate": 0.0, "acc": 0.0, "tokens_mean": 0.0, "n": 0}
    return {
        "think_on_rate": sum(r.mode == "on" for r in recs) / n,
        "acc": sum(bool(r.correct) for r in recs) / n,
        "tokens_mean": sum(r.tokens for r in recs) / n,
        "n": n,
    }


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
    out = {k: _block(groups[k]) for k in sorted(groups)}
    out["all"] = _block(recs)
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
