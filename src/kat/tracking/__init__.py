"""MLflow tracking: store location, loggers, params, tags, artifacts (docs/design.md §6).

* Store: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` with the artifact root
  ``<cwd>/mlartifacts`` (Lightning's MLFlowLogger would default to a file store, which MLflow ≥ 3.13
  rejects, so kat always passes a URI and an artifact location).
* One experiment per task (``task_name``); run name = stage + command-line overrides.
* Params = the resolved config flattened with ``/``, secrets redacted; tags ``kat.stage``,
  ``kat.git_commit``, and ``mlflow.parentRunId`` when a parent run is given (``$KAT_PARENT_RUN_ID``,
  set by kat.pipeline and sweeps); a job of a Hydra multirun also gets ``kat.sweep.job`` (its number) and
  ``kat.override.<key>`` for each of its command-line overrides (the swept values, group choices included).
* Comparing runs: :mod:`kat.tracking.compare` (tables) and :mod:`kat.tracking.plots` (figures).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from kat.utils import get_logger, git_commit

log = get_logger(__name__)

PARENT_ENV = "KAT_PARENT_RUN_ID"
# keys whose values are secrets (``*_env`` keys hold the *name* of an environment variable and are kept)
SECRET = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|access[_-]?token|auth[_-]?token|bearer)", re.I)
MAX_PARAM = 250


def child_env(parent_run: str | None = None, threads: int | None = None) -> dict[str, str]:
    """Environment of a kat subprocess (a pipeline step): this process's, plus the MLflow parent run
    (``$KAT_PARENT_RUN_ID``) and ``OMP_NUM_THREADS`` when given."""
    env = dict(os.environ)
    if parent_run:
        env[PARENT_ENV] = parent_run
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs cwd>/mlflow.db``."""
    if uri:
        return str(uri)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def artifact_location(uri: str, location: str | None = None) -> str | None:
    """Artifact root for new experiments: ``location``, else ``<dir of the sqlite db>/mlartifacts``."""
    if location:
        return str(location)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides


def ensure_experiment(name: str, uri: str, location: str | None = None) -> str:
    """Experiment id of ``name`` in the store at ``uri``, created with an explicit artifact root."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, location))
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a/b/c": value}``; lists become strings; secrets redacted."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            if SECRET.search(str(k)) and not str(k).endswith("_env") and v not in (None, ""):
                v = "***"
            out[key] = v
    return out


def params_from_config(cfg) -> dict[str, str]:
    """The resolved config as MLflow params (values cut at 250 characters)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    return {k: str(v)[:MAX_PARAM] for k, v in flatten(container).items()}


def run_name(stage: str, overrides: list[str] | None = None) -> str:
    """``stage`` + command-line overrides (minus the stage itself), cut to 200 characters."""
    extra = [o for o in (overrides or []) if not o.lstrip("+").startswith("stage=") and not o.startswith("hydra.")]
    name = stage + ("  " + " ".join(extra) if extra else "")
    return name[:200]


def mlflow_logger(*, experiment_name: str, stage: str, tracking_uri_: str | None = None,
                  artifact_location_: str | None = None, run_name_: str | None = None,
                  overrides: list[str] | None = None, run_id: str | None = None, tags: dict | None = None):
    """A Lightning MLFlowLogger on kat's store, with kat's tags (parent run from ``$KAT_PARENT_RUN_ID``)."""
    from lightning.pytorch.loggers import MLFlowLogger

    uri = tracking_uri(tracking_uri_)
    ensure_experiment(experiment_name, uri, artifact_location_)
    all_tags = {"kat.stage": stage, "kat.git_commit": git_commit()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    all_tags.update(hydra_job_tags())
    all_tags.update(tags or {})
    return MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name_ or run_name(stage, overrides),
        tracking_uri=uri,
        tags=all_tags,
        artifact_location=artifact_location(uri, artifact_location_),
        log_model=False,
        run_id=run_id,
    )


def hydra_job_tags() -> dict[str, str]:
    """Tags of a job of a Hydra multirun (``kat.sweep.job``, ``kat.override.<key>``); empty otherwise."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
    except Exception:  # no Hydra in this process
        return {}
    if "MULTIRUN" not in str(hc.mode):
        return {}
    tags = {"kat.sweep.job": str(hc.job.num)}
    for o in hc.overrides.task:
        key, _, value = str(o).partition("=")
        tags["kat.override." + re.sub(r"[^\w./ -]", "_", key.lstrip("+~"))] = value[:MAX_PARAM]
    return tags


def start_parent_run(experiment_name: str, run_name_: str, *, params: dict | None = None,
                     tags: dict | None = None, uri: str | None = None, artifact_location_: str | None = None) -> str:
    """Create a parent run (pipeline or sweep) and return its id; children get it through ``$KAT_PARENT_RUN_ID``."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(uri)
    exp_id = ensure_experiment(experiment_name, uri, artifact_location_)
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(exp_id, run_name=run_name_, tags={"kat.git_commit": git_commit(), **(tags or {})})
    items = [Param(k, str(v)[:MAX_PARAM]) for k, v in (params or {}).items()]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run.info.run_id, params=items[i:i + 100])
    return run.info.run_id


def log_report_run(cfg, logger_cfg: Mapping[str, Any], *, stage: str, run_name_: str,
                   metrics: Mapping[str, float], artifact: str | Path | None = None) -> str:
    """A finished run of its own for a command that is not a Lightning fit (``kat.eval``, ``kat.synth``).

    In experiment ``logger_cfg.experiment_name`` (else ``cfg.task_name``), child of ``$KAT_PARENT_RUN_ID`` when
    set; params = ``cfg`` flattened (secrets redacted), ``metrics`` logged at step 0, ``artifact`` attached.
    The run is marked FAILED if logging breaks half-way. Returns the run id."""
    import time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(logger_cfg.get("tracking_uri"))
    exp = ensure_experiment(logger_cfg.get("experiment_name") or cfg.task_name, uri,
                            logger_cfg.get("artifact_location"))
    client = MlflowClient(tracking_uri=uri)
    tags = {"kat.stage": stage, "kat.git_commit": git_commit()}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    rid = client.create_run(exp, run_name=logger_cfg.get("run_name") or run_name_, tags=tags).info.run_id
    try:
        params = [Param(k, v) for k, v in params_from_config(cfg).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(rid, params=params[i : i + 100])
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
        for i in range(0, len(ms), 1000):  # and at most 1000 metrics
            client.log_batch(rid, metrics=ms[i : i + 1000])
        if artifact is not None:
            client.log_artifact(rid, str(artifact))
        client.set_terminated(rid)
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    return rid
