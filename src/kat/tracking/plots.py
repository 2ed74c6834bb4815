"""Figures for comparing runs (matplotlib; input: a :func:`kat.tracking.compare.runs_table`).

* :func:`plot_vs_param` — accuracy, think-on rate and tokens (final values) against one swept parameter.
* :func:`plot_levels_vs_param` — a metric per level (one line per level) against one swept parameter.
* :func:`plot_frontier` — accuracy against tokens per completion, the efficiency frontier drawn through the
  non-dominated runs.
* :func:`plot_rl_history` — one RL run: think-on rate, tokens and accuracy per step, overall and per level (the
  RL stage writes these PNGs at the end of training).

Several runs with the same x (seeds) are drawn as their mean with a min–max bar. A categorical x (``algorithm``,
``algorithm.credit.modulation``) is spaced evenly in first-seen order. Every comparison function returns the
``Figure``.
"""
from __future__ import annotations

from typing import Sequence

from kat.tracking.compare import pareto_front, per_level

DEFAULT_METRICS = ("val/acc", "val/think_on_rate", "val/tokens_mean")
LABELS = {"val/acc": "accuracy", "val/think_on_rate": "think-on rate", "val/tokens_mean": "tokens / completion",
          "rl/acc": "rollout accuracy", "rl/think_on_rate": "rollout think-on rate",
          "rl/tokens_mean": "rollout tokens"}


def _require(df, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} are not in the table; it has {sorted(map(str, df.columns))[:40]}")


def _x_positions(values):
    """Numeric x as is; otherwise categories in first-seen order -> (positions, tick labels or None)."""
    import pandas as pd

    num = pd.to_numeric(values, errors="coerce")
    if num.notna().all():
        return num.astype(float), None
    cats = list(dict.fromkeys(map(str, values)))
    return values.astype(str).map({c: i for i, c in enumerate(cats)}).astype(float), cats


def _mean_band(x, y):
    """Group y by x: (xs, mean, lower error, upper error) with min–max bars."""
    import pandas as pd

    g = pd.DataFrame({"x": x.values, "y": pd.to_numeric(y, errors="coerce").values}).groupby("x")["y"]
    mean, lo, hi = g.mean(), g.min(), g.max()
    return mean.index.values, mean.values, (mean - lo).values, (hi - mean).values


def plot_vs_param(df, param: str, metrics: Sequence[str] = DEFAULT_METRICS, *, hue: str | None = None,
                  title: str | None = None):
    """One panel per metric: its final value against ``param`` (a column of the table), a line per ``hue``."""
    import matplotlib.pyplot as plt

    _require(df, [param, *metrics, *([hue] if hue else [])])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    x, cats = _x_positions(df[param])
    groups = [(None, df.index)] if hue is None else [(h, df.index[df[hue] == h]) for h in dict.fromkeys(df[hue])]
    for ax, metric in zip(axes[0], metrics):
        for h, idx in groups:
            xs, mean, lo, hi = _mean_band(x.loc[idx], df.loc[idx, metric])
            ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, label=None if h is None else f"{hue}={h}")
        ax.set_xlabel(param)
        ax.set_ylabel(LABELS.get(metric, metric))
        if cats is not None:
            ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
        ax.grid(alpha=0.3)
        if hue is not None:
            ax.legend(fontsize=8)
    fig.suptitle(title or f"final metrics vs {param}")
    fig.tight_layout()
    return fig


def plot_levels_vs_param(df, param: str, metric: str = "val/think_on_rate", *, title: str | None = None):
    """``metric`` per level (``<metric>/level_k`` columns) against ``param``: one line per level."""
    import matplotlib.pyplot as plt

    _require(df, [param])
    long = per_level(df, metric, by=[param])
    x, cats = _x_positions(long[param])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    levels = sorted(long["level"].unique())
    cmap = plt.get_cmap("viridis")
    for k, lv in enumerate(levels):
        sel = long["level"] == lv
        xs, mean, lo, hi = _mean_band(x[sel], long.loc[sel, metric])
        ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, color=cmap(k / max(1, len(levels) - 1)),
                    label=f"level {lv}")
    ax.set_xlabel(param)
    ax.set_ylabel(LABELS.get(metric, metric))
    if cats is not None:
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or f"{LABELS.get(metric, metric)} per level vs {param}")
    fig.tight_layout()
    return fig


def plot_frontier(df, *, cost: str = "val/tokens_mean", value: str = "val/acc", label: str | None = None,
                  title: str | None = None):
    """Accuracy against tokens per completion, one point per run (annotated with ``label``'s value), the
    non-dominated runs joined by the frontier line."""
    import matplotlib.pyplot as plt

    _require(df, [cost, value, *([label] if label else [])])
    c = df[cost].astype(float)
    v = df[value].astype(float)
    front = pareto_front(c, v)
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    ax.scatter(c, v, c=["tab:red" if f else "tab:gray" for f in front], zorder=3)
    pts = sorted((ci, vi) for ci, vi, f in zip(c, v, front) if f)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:red", lw=1.2, label="frontier", zorder=2)
    if label:
        for ci, vi, lab in zip(c, v, df[label]):
            ax.annotate(str(lab), (ci, vi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(LABELS.get(cost, cost))
    ax.set_ylabel(LABELS.get(value, value))
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(fontsize=8)
    ax.set_title(title or "efficiency frontier")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------- one RL run
def _moving_average(ys: Sequence[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= w:
            acc -= ys[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_rl_history(history: Sequence[dict], val_history: Sequence[dict], directory, algorithm: str = "") -> list:
    """The RL stage's figures: think-on rate, mean tokens and accuracy per RL step, overall and per level (rollouts,
    moving average over 10 steps; validation points as markers). ``history``: one dict of ``rl/*`` metrics with
    ``step`` per RL step; ``val_history``: ``{"step", "summary"}`` per validation. Writes
    ``think_on_rate.png``, ``tokens_mean.png``, ``accuracy.png`` under ``directory``; returns their paths."""
    from pathlib import Path

    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history]
    levels = sorted({int(k.rsplit("_", 1)[1]) for h in history for k in h if "/level_" in k})
    paths = []
    for metric, title, fname in (("think_on_rate", "think-on rate", "think_on_rate.png"),
                                 ("tokens_mean", "mean generated tokens", "tokens_mean.png"),
                                 ("acc", "accuracy", "accuracy.png")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        cmap = plt.get_cmap("viridis")
        series = [("all", f"rl/{metric}", "black", 2.2)] + [
            (f"level {lv}", f"rl/{metric}/level_{lv}", cmap(k / max(1, len(levels) - 1)), 1.2)
            for k, lv in enumerate(levels)]
        for label, key, color, lw in series:
            xs = [s for s, h in zip(steps, history) if key in h]
            ys = [h[key] for h in history if key in h]
            if ys:
                ax.plot(xs, _moving_average(ys, 10), label=label, color=color, linewidth=lw)
        for v in val_history:
            s = v["summary"]
            for k, lv in enumerate(levels):
                b = s.get(f"level_{lv}")
                if b is not None:
                    ax.scatter([v["step"]], [b[metric]], color=cmap(k / max(1, len(levels) - 1)), marker="o",
                               s=18, zorder=3)
            if "all" in s:
                ax.scatter([v["step"]], [s["all"][metric]], color="black", marker="D", s=22, zorder=3)
        ax.set_xlabel("RL step")
        ax.set_ylabel(title)
        ax.set_title(f"{title} per RL step ({algorithm})", fontsize=10)
        fig.text(0.01, 0.01, "lines: sampled rollouts, 10-step moving mean; markers: greedy held-out validation",
                 fontsize=7, color="0.35")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        p = directory / fname
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)
    return paths
