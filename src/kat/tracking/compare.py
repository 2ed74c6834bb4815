"""Compare runs: tidy pandas tables of an MLflow experiment or of one sweep (a parent run and its children).

Column conventions of :func:`runs_table` (one row per run):

* ``run_id, run_name, status, stage, parent_run_id, sweep_job, start_time, duration_s``
* the job's command-line overrides as Hydra wrote them (``algorithm.credit.judge_weight``, ``algorithm``): the
  swept values, group choices included (from the tags ``kat.override.<key>`` that every job of a multirun
  carries); numbers when every value parses as one
* ``params.<name>``: flattened config params (``params.algorithm/credit/judge_weight``), by default only those
  that differ between the rows (run folders excluded)
* ``<metric>``: the metric's final (latest) value, e.g. ``val/acc``, ``val/think_on_rate/level_3``, ``rl/acc``
* ``best:<metric>``: the best value over the run's history for the metrics in ``best`` ({name: "max"|"min"})

:func:`per_level` melts the per-level columns into a long table for plotting; :func:`pareto_front` marks the
efficiency frontier (highest accuracy for the fewest tokens).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from kat.tracking import tracking_uri

ID_COLUMNS = ("run_id", "run_name", "status", "stage", "parent_run_id", "sweep_job", "start_time", "duration_s")
OVERRIDE_TAG = "kat.override."
# params that differ between runs for bookkeeping only (their folders), never because of the experiment
_BOOKKEEPING = re.compile(r"(^|/)(output_dir|ckpt_dir|default_root_dir|dirpath|run_name|run_id)$")
LEVEL = re.compile(r"/level_(\d+)$")


def find_store(start: str | Path | None = None, *, db_name: str = "mlflow.db") -> str:
    """The tracking URI a notebook or script should open: ``$MLFLOW_TRACKING_URI`` if set, else
    ``sqlite:///<project root>/mlflow.db`` where the project root is the first folder at or above ``start``
    (default: the working directory) holding ``pyproject.toml``.

    Raises ``FileNotFoundError`` naming the path when that database does not exist.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    here = Path(start or Path.cwd()).resolve()
    root = next((p for p in (here, *here.parents) if (p / "pyproject.toml").exists()), here)
    db = root / db_name
    if not db.exists():
        raise FileNotFoundError(f"no MLflow store at {db} (start: {here}): run a sweep from the project root first, "
                                f"or set MLFLOW_TRACKING_URI")
    return f"sqlite:///{db}"


def _client(uri: str | None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def _experiment_ids(client, experiment: str | Sequence[str] | None) -> list[str]:
    if experiment is None:
        return [e.experiment_id for e in client.search_experiments()]
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    ids = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise ValueError(f"experiment={name!r} does not exist; known: {known}")
        ids.append(exp.experiment_id)
    return ids


def _search(client, exp_ids: list[str], filter_string: str = "") -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def list_sweeps(experiment: str | Sequence[str] | None = None, *, uri: str | None = None):
    """Parent runs of sweeps (tag ``kat.sweep=true``), newest first: ``run_id, run_name, experiment, status,
    start_time, n_children, objective, best_value, best_run_id, space`` (the swept keys and their values)."""
    import pandas as pd

    client = _client(uri)
    exp_ids = _experiment_ids(client, experiment)
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    rows = []
    for r in _search(client, exp_ids, "tags.`kat.sweep` = 'true'"):
        children = _search(client, [r.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        p, m = r.data.params, r.data.metrics
        rows.append({
            "run_id": r.info.run_id, "run_name": r.info.run_name, "experiment": names.get(r.info.experiment_id),
            "status": r.info.status, "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            "n_children": len(children), "objective": p.get("sweep/objective"), "best_value": m.get("sweep/best_value"),
            "best_run_id": r.data.tags.get("kat.sweep.best_run_id"),
            "space": "; ".join(f"{k[len('sweep/space/'):]}={v}" for k, v in sorted(p.items())
                               if k.startswith("sweep/space/")),
        })
    cols = ["run_id", "run_name", "experiment", "status", "start_time", "n_children", "objective", "best_value",
            "best_run_id", "space"]
    return pd.DataFrame(rows, columns=cols)


def resolve_sweep(sweep: str, *, uri: str | None = None) -> str:
    """A sweep's parent run id from its id or its run name (the newest sweep of that name)."""
    client = _client(uri)
    try:
        run = client.get_run(sweep)
        return run.info.run_id
    except Exception:  # not a run id: look it up by name
        pass
    table = list_sweeps(uri=uri)
    hits = table[table["run_name"] == sweep]
    if hits.empty:
        raise ValueError(f"sweep={sweep!r} is neither a run id nor the name of a sweep; known: "
                         f"{sorted(set(table['run_name']))}")
    return str(hits.iloc[0]["run_id"])


def runs_table(experiment: str | Sequence[str] | None = None, *, sweep: str | None = None, uri: str | None = None,
               params: str | Sequence[str] = "varying", best: Mapping[str, str] | None = None,
               include_parent: bool = False, stage: str | None = None):
    """One row per run: of ``experiment`` (a name, names, or None = all), or of one ``sweep`` (its parent run's id
    or name: the children, plus the parent with ``include_parent``); ``stage`` keeps runs tagged ``kat.stage``.

    ``params``: "varying" (params whose value differs between rows, run folders excluded), "all", "none", or a
    list of param names. ``best``: {metric: "max"|"min"} -> ``best:<metric>`` columns from the metric histories
    (default: the sweep's objective, or ``val/acc``, maximised). Rows are ordered by sweep job, then start time.
    """
    import pandas as pd

    if isinstance(params, str) and params not in ("varying", "all", "none"):
        raise ValueError(f"params must be 'varying', 'all', 'none' or a list of names, got {params!r}")
    for name, mode in (best or {}).items():
        if mode not in ("max", "min"):
            raise ValueError(f"best[{name!r}] must be 'max' or 'min', got {mode!r}")
    client = _client(uri)
    if sweep is not None:
        parent_id = resolve_sweep(sweep, uri=uri)
        parent = client.get_run(parent_id)
        runs = _search(client, [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
        if include_parent:
            runs = [parent, *runs]
        if best is None:
            obj = parent.data.params.get("sweep/objective")
            direction = parent.data.params.get("sweep/direction", "maximize")
            best = {obj if obj and obj != "None" else "val/acc": "min" if direction == "minimize" else "max"}
    else:
        runs = _search(client, _experiment_ids(client, experiment))
    if stage is not None:
        runs = [r for r in runs if r.data.tags.get("kat.stage") == stage]
    best = dict(best if best is not None else {"val/acc": "max"})

    rows = []
    for r in runs:
        t = r.data.tags
        end = r.info.end_time
        row = {
            "run_id": r.info.run_id, "run_name": r.info.run_name, "status": r.info.status,
            "stage": t.get("kat.stage"), "parent_run_id": t.get("mlflow.parentRunId"),
            "sweep_job": int(t["kat.sweep.job"]) if "kat.sweep.job" in t else None,
            "start_time": pd.to_datetime(r.info.start_time, unit="ms"),
            "duration_s": (end - r.info.start_time) / 1000.0 if end else math.nan,
        }
        row.update({k[len(OVERRIDE_TAG):]: v for k, v in t.items() if k.startswith(OVERRIDE_TAG)})
        row.update({f"params.{k}": v for k, v in r.data.params.items()})
        row.update(r.data.metrics)
        for name, mode in best.items():
            hist = [m.value for m in client.get_metric_history(r.info.run_id, name) if not math.isnan(m.value)]
            row[f"best:{name}"] = (max(hist) if mode == "max" else min(hist)) if hist else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(ID_COLUMNS))

    all_overrides = {k[len(OVERRIDE_TAG):] for r in runs for k in r.data.tags if k.startswith(OVERRIDE_TAG)}
    param_cols = [c for c in df.columns if c.startswith("params.")]
    if params == "none":
        keep_params = []
    elif params == "all":
        keep_params = sorted(param_cols)
    elif params == "varying":
        keep_params = sorted(c for c in param_cols if not _BOOKKEEPING.search(c)
                             and df[c].dropna().astype(str).nunique() > 1)
    else:
        keep_params = [f"params.{p}" for p in params]
        missing = [p for p in keep_params if p not in df.columns]
        if missing:
            raise ValueError(f"params {missing} are not logged by any of these runs")
    # overrides that are the same in every row are the sweep's fixed settings: keep only what varies
    override_cols = sorted(c for c in all_overrides if df[c].dropna().astype(str).nunique() > 1)
    metric_cols = sorted(c for c in df.columns if c not in ID_COLUMNS and c not in all_overrides
                         and not c.startswith(("params.", "best:")))
    best_cols = [f"best:{n}" for n in best]
    df = df[list(ID_COLUMNS) + override_cols + keep_params + metric_cols + best_cols].copy()
    for c in override_cols + keep_params:
        df[c] = _maybe_numeric(df[c])
    df = df.sort_values(["sweep_job", "start_time"], na_position="first", kind="stable").reset_index(drop=True)
    return df


def swept_columns(df) -> list[str]:
    """The override columns of a :func:`runs_table` (the values that differ between the sweep's jobs)."""
    return [c for c in df.columns if c not in ID_COLUMNS and not c.startswith(("params.", "best:")) and "/" not in c]


def per_level(df, metric: str = "val/think_on_rate", by: Sequence[str] | None = None):
    """Long table of ``metric`` per level: columns ``run_id, *by, level, <metric>`` (level an int), from the
    ``<metric>/level_<k>`` columns of a :func:`runs_table`. ``by`` defaults to the swept columns."""
    import pandas as pd

    cols = {c: int(LEVEL.search(c).group(1)) for c in df.columns
            if c.startswith(metric + "/level_") and LEVEL.search(c)}
    if not cols:
        raise ValueError(f"no {metric}/level_<k> columns in the table (metrics logged: "
                         f"{sorted({c.rsplit('/level_', 1)[0] for c in df.columns if '/level_' in c})})")
    by = list(swept_columns(df) if by is None else by)
    long = df[["run_id", *by, *cols]].melt(id_vars=["run_id", *by], value_vars=list(cols), var_name="level",
                                            value_name=metric)
    long["level"] = long["level"].map(cols).astype(int)
    return long.sort_values(["run_id", "level"], kind="stable").reset_index(drop=True)


def pareto_front(cost: Iterable[float], value: Iterable[float]) -> list[bool]:
    """Efficiency frontier: ``True`` for points no other point dominates (cost ≤ and value ≥, one strictly).

    ``cost`` e.g. tokens per completion (lower is better), ``value`` e.g. accuracy (higher is better); NaN points
    are never on the front.
    """
    c, v = list(map(float, cost)), list(map(float, value))
    if len(c) != len(v):
        raise ValueError(f"cost and value differ in length: {len(c)} vs {len(v)}")
    out = []
    for i, (ci, vi) in enumerate(zip(c, v)):
        if math.isnan(ci) or math.isnan(vi):
            out.append(False)
            continue
        dominated = any(cj <= ci and vj >= vi and (cj < ci or vj > vi)
                        for j, (cj, vj) in enumerate(zip(c, v)) if j != i and not (math.isnan(cj) or math.isnan(vj)))
        out.append(not dominated)
    return out


def _maybe_numeric(col):
    import pandas as pd

    conv = pd.to_numeric(col, errors="coerce")
    return conv if conv.notna().sum() == col.notna().sum() else col
