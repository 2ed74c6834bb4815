"""Hydra multirun ↔ MLflow: one parent run per sweep, one child run per job (registered in conf/train.yaml as
``hydra.callbacks.mlflow_sweep``; Hydra's Callback API, MLflow's ``mlflow.parentRunId`` tag; docs/design.md §6).

``python -m kat.train -m +stage=rl +sweep=reward_weights`` (or any ``-m`` command line) goes through
:class:`MLflowSweepCallback`:

* ``on_multirun_start`` (once, before any job) checks that the sweep can run safely, creates the MLflow
  experiment and the **parent run** (tag ``kat.sweep=true``; params ``sweep/overrides``, ``sweep/space/<key>``
  for every swept key, ``sweep/sweeper``, ``sweep/launcher``, ``sweep/objective``, ``sweep/direction``,
  ``sweep/dir``, ``sweep/grid_size``) and exports its id as ``$KAT_PARENT_RUN_ID``. kat.tracking's logger
  gives every run started while that is set the tag ``mlflow.parentRunId``: each job's run is a child, in the
  same experiment. The id is also written to ``<sweep dir>/mlflow_parent_run_id``.
* ``on_job_start`` (in the job's process; for remote launchers the callback travels pickled, id included)
  re-exports the id and refuses a job that would start several Lightning processes (below).
* ``on_multirun_end`` logs ``sweep/n_jobs``, ``sweep/n_failed`` and ``sweep/best_value`` (the best child's
  final ``optimized_metric``; its run id in the tag ``kat.sweep.best_run_id``) and closes the parent.
  A sweep that crashes leaves its parent RUNNING (Hydra calls no end hook then).

Refused, with a message saying what to do instead:

* several processes per job (``trainer.devices`` > 1 or ``trainer.num_nodes`` > 1) with a local launcher:
  Lightning's subprocess launcher re-runs ``sys.argv`` for ranks > 0, and under ``-m`` that relaunches the
  whole sweep. Multi-GPU jobs are launched by SLURM instead (``hydra/launcher=slurm`` with
  ``tasks_per_node`` = devices), where Lightning starts no processes itself.
* a parallel launcher (anything but Hydra's sequential basic launcher) on an ``sqlite://`` store: concurrent
  SQLite writers race (schema set-up, "database is locked") and break on network filesystems. Serve the
  store with ``mlflow server`` and point ``MLFLOW_TRACKING_URI`` at it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf

from kat import tracking
from kat.utils import get_logger, git_commit

log = get_logger(__name__)

PARENT_FILE = "mlflow_parent_run_id"
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
SLURM_LAUNCHERS = ("SlurmLauncher",)  # launchers whose jobs get their ranks from the cluster, not from Lightning


class SweepRefused(SystemExit):
    """A multirun that kat will not start (the message says why and what to run instead).

    A ``SystemExit`` (exit status 1, the message on stderr): Hydra turns an ``Exception`` raised in a callback
    into a warning and carries on, which here would start the unsafe jobs anyway."""


# ==============================================================================================================
# pure helpers (unit-tested)
# ==============================================================================================================
def processes_per_job(devices: Any, num_nodes: Any = 1, accelerator: Any = "auto") -> int:
    """How many Lightning processes one job starts: devices per node × nodes.

    ``devices``: an int, a list of device ids, a string ``"2"`` / ``"0,1"``, or ``"auto"`` / ``-1`` (all
    visible GPUs when the accelerator may be a GPU, else 1 — Lightning's CPU default).
    """
    nodes = int(num_nodes or 1)
    if isinstance(devices, (list, tuple, ListConfig)):
        return max(1, len(devices)) * nodes
    if isinstance(devices, str):
        d = devices.strip()
        if "," in d:
            return len([x for x in d.split(",") if x.strip()]) * nodes
        devices = d if d == "auto" else int(d)
    if devices in ("auto", -1):
        if str(accelerator) in ("cpu",):
            return nodes
        try:
            import torch

            return max(1, torch.cuda.device_count()) * nodes
        except Exception:  # torch without CUDA support
            return nodes
    if devices is None:
        return nodes
    return max(1, int(devices)) * nodes


def sweep_space(sweeper_params: dict | None, overrides: list[str]) -> dict[str, str]:
    """Swept keys -> their search space as written: the sweeper's ``params`` updated by the command-line
    overrides that sweep (``key=a,b``, ``key=range(...)``, ``interval(...)``, ``choice(...)``); a command-line
    value for a key that the config sweeps (``algorithm.credit.modulation=additive``) pins it and removes it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    space = {str(k): str(v) for k, v in (sweeper_params or {}).items()}
    parser = OverridesParser.create()
    for o in parser.parse_overrides(list(overrides)):
        key = o.get_key_element().lstrip("+~")
        if o.is_sweep_override():
            text = o.input_line.split("=", 1)[1] if o.input_line else o.get_value_element_as_str()
            space[key] = text
        else:
            space.pop(key, None)
    # single values in the config's params (``seed: 0``) do not sweep anything
    return {k: v for k, v in space.items() if _is_sweep(k, v, parser)}


def _is_sweep(key: str, value: str, parser) -> bool:
    try:
        return parser.parse_override(f"{key}={value}").is_sweep_override()
    except Exception:  # optuna syntax the basic grammar does not know counts as a sweep
        return True


def grid_size(space: dict[str, str]) -> int | None:
    """Number of jobs of a discrete grid (product of the list lengths); None when an axis is not a list."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    n = 1
    for k, v in space.items():
        try:
            o = parser.parse_override(f"{k}={v}")
        except Exception:
            return None
        if not o.is_discrete_sweep():
            return None
        n *= len(list(o.sweep_string_iterator()))
    return n


def sweep_name(overrides: list[str], space: dict[str, str]) -> str:
    """``+sweep=NAME`` if given, else the swept keys."""
    for o in overrides:
        if o.lstrip("+").startswith("sweep="):
            return o.split("=", 1)[1]
    return ",".join(space) or "sweep"


# ==============================================================================================================
# the Hydra callback
# ==============================================================================================================
class MLflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun; its jobs' runs are its children (module docstring)."""

    def __init__(self) -> None:
        self.parent_run_id: str | None = None
        self.uri: str | None = None
        self._saved_env: str | None = None

    # ---------------------------------------------------------------- single run
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep_found(config)

    # ---------------------------------------------------------------- multirun (sweeping process)
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_sweep_found(config)
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
        space = sweep_space(OmegaConf.to_container(params, resolve=False) if params is not None else {}, overrides)
        check_single_process(config, launcher, space)
        m = OmegaConf.select(config, "logger.mlflow", default=None)
        if not m:
            log.info("sweep: no MLflow logger (logger=none/csv): no parent run")
            return
        uri = tracking.tracking_uri(m.get("tracking_uri"))
        check_store(uri, launcher)
        self.uri = uri
        sweep_dir = Path(str(config.hydra.sweep.dir))
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default="maximize")
        sweep_params = {
            "sweep/overrides": " ".join(overrides),
            "sweep/sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_", default="")),
            "sweep/launcher": launcher,
            "sweep/objective": str(config.get("optimized_metric")),
            "sweep/direction": str(OmegaConf.to_container(direction) if OmegaConf.is_config(direction) else direction),
            "sweep/dir": str(sweep_dir.resolve()),
            "sweep/grid_size": str(grid_size(space)),
            **{f"sweep/space/{k}": v for k, v in space.items()},
        }
        stage = OmegaConf.select(config, "stage.name", default=None)
        tags = {"kat.sweep": "true", "kat.stage": str(stage), "kat.git_commit": git_commit()}
        outer = os.environ.get(tracking.PARENT_ENV)
        if outer:  # a sweep started inside a pipeline (or another parent): nest under it
            tags["mlflow.parentRunId"] = outer
        name = f"sweep {sweep_name(overrides, space)}"
        self.parent_run_id = tracking.start_parent_run(
            m.experiment_name, name[:200], params=sweep_params, tags=tags, uri=uri,
            artifact_location_=m.get("artifact_location"))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_FILE).write_text(self.parent_run_id + "\n")
        self._saved_env = outer
        os.environ[tracking.PARENT_ENV] = self.parent_run_id
        log.info(f"sweep: MLflow parent run {self.parent_run_id} ({name}) in experiment {m.experiment_name!r} "
                 f"at {uri}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id is None:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        parent = client.get_run(self.parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=10000)
        objective = config.get("optimized_metric")
        direction = OmegaConf.select(config, "hydra.sweeper.direction", default="maximize")
        sign = -1.0 if str(direction) == "minimize" else 1.0
        scored = [(c.data.metrics[objective], c.info.run_id) for c in children
                  if objective and objective in c.data.metrics and not math.isnan(c.data.metrics[objective])]
        client.log_metric(self.parent_run_id, "sweep/n_jobs", len(children))
        client.log_metric(self.parent_run_id, "sweep/n_failed", sum(c.info.status == "FAILED" for c in children))
        if scored:
            best_value, best_id = max(scored, key=lambda t: sign * t[0])
            client.log_metric(self.parent_run_id, "sweep/best_value", best_value)
            client.set_tag(self.parent_run_id, "kat.sweep.best_run_id", best_id)
        client.set_terminated(self.parent_run_id, "FINISHED")
        log.info(f"sweep: parent run {self.parent_run_id} finished with {len(children)} child run(s)")
        if self._saved_env is None:
            os.environ.pop(tracking.PARENT_ENV, None)
        else:
            os.environ[tracking.PARENT_ENV] = self._saved_env

    # ---------------------------------------------------------------- job (job process)
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if str(OmegaConf.select(config, "hydra.mode", default="")) != "RunMode.MULTIRUN":
            return
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_", default="") or "")
        check_single_process(config, launcher, {})
        if self.parent_run_id and not os.environ.get(tracking.PARENT_ENV):
            os.environ[tracking.PARENT_ENV] = self.parent_run_id  # remote launchers: the pickled callback's id


def available_sweeps() -> list[str]:
    """Names usable as ``+sweep=NAME`` (the ``sweep/`` group of the installed ``kat.sweeps``)."""
    from importlib import resources

    try:
        root = resources.files("kat.sweeps").joinpath("sweep")
        return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
        return []


def check_sweep_found(config: DictConfig) -> None:
    """``+sweep=NAME`` with no ``sweep/NAME.yaml`` on the search path is a plain string key to Hydra, which would
    run one job silently: refuse it, listing the sweeps there are."""
    value = config.get("sweep") if isinstance(config, DictConfig) else None
    if isinstance(value, str):
        names = available_sweeps()
        raise SweepRefused(
            f"+sweep={value}: no sweep/{value}.yaml on Hydra's search path (pkg://kat.sweeps). Available: "
            f"{', '.join(names) if names else 'none: kat.sweeps is not importable; reinstall kat (pip install -e .)'}")


def check_single_process(config: DictConfig, launcher: str, space: dict[str, str]) -> None:
    """Refuse a multirun whose jobs would each start several Lightning processes (module docstring)."""
    if launcher.endswith(SLURM_LAUNCHERS):
        return
    trainer = OmegaConf.select(config, "trainer", default=None) or {}
    devices = [trainer.get("devices", 1)] if "trainer.devices" not in space else _values("trainer.devices", space)
    nodes = [trainer.get("num_nodes", 1)] if "trainer.num_nodes" not in space else _values("trainer.num_nodes", space)
    accelerator = trainer.get("accelerator", "auto")
    worst = max(processes_per_job(d, n, accelerator) for d in devices for n in nodes)
    if worst > 1:
        raise SweepRefused(
            f"multirun (-m) with {worst} processes per job (trainer.devices={trainer.get('devices')}, "
            f"trainer.num_nodes={trainer.get('num_nodes', 1)}) is refused: Lightning starts ranks > 0 by re-running "
            "the command line, which under -m relaunches the whole sweep. Either sweep with one process per job "
            "(trainer.devices=1), or let SLURM start the ranks: add hydra/launcher=slurm "
            "hydra.launcher.tasks_per_node=<devices> hydra.launcher.gpus_per_node=<devices>, or run each "
            "configuration as a single (non -m) run under torchrun.")


def _values(key: str, space: dict[str, str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    o = OverridesParser.create().parse_override(f"{key}={space[key]}")
    return [OmegaConf.create({"v": s})["v"] for s in o.sweep_string_iterator()] if o.is_discrete_sweep() else [1]


def check_store(uri: str, launcher: str) -> None:
    """Refuse parallel launchers on an SQLite store (module docstring)."""
    if uri.startswith("sqlite:") and launcher and launcher != BASIC_LAUNCHER:
        raise SweepRefused(
            f"the launcher {launcher} runs jobs in parallel, but the MLflow store is SQLite ({uri}): parallel "
            "writers corrupt or lock it. Serve it instead and point the jobs at the server:\n"
            "  mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --default-artifact-root $PWD/mlartifacts "
            "--host 127.0.0.1 --port 5000   # (PostgreSQL on a cluster)\n"
            "  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000\n"
            "or drop the launcher override to run the jobs one after the other.")
