"""Sweeps: the sweeps/ configs compose, a 2x2 Hydra multirun of the RL stage makes one MLflow parent run and four
children (swept values as params, rl/* and val/* metrics), the compare API and plots read it, the notebook runs on
it, and unsafe multiruns (several processes per job, parallel writers on SQLite, unknown sweep) are refused.

The 2x2 grid runs once per module (``tiny_sweep``): tiny model, 2 RL steps per job, about 25 s on 2 CPU cores.
"""
from __future__ import annotations

import itertools
import math
import re

import pytest
from omegaconf import OmegaConf

from kat_testing import ROOT, run_module

SWEEPS = ROOT / "sweeps"
TINY = ["data.n_train_per_level=2", "data.n_val_per_level=1", "data.batch_size=2", "data.domains=[math,science]",
        "rollout.group_size=4", "rollout.max_new_tokens=16", "stage.module.val.max_new_tokens=16",
        "model.arch.hidden_size=32", "model.arch.intermediate_size=64", "model.arch.num_hidden_layers=2",
        "stage.module.plots=false", "stage.module.log_samples=0"]
JUDGE_WEIGHTS, FORMAT_PENALTIES = ("0.1", "1.0"), ("-1.0", "-0.5")
EXPERIMENT = "sweep_reward_weights"  # task_name of sweeps/sweep/reward_weights.yaml


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """``python -m kat.train -m +stage=rl +sweep=reward_weights`` narrowed to a 2x2 grid (modulation pinned)."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sweep_dir = tmp / "multirun"
    r = run_module(["kat.train", "-m", "+stage=rl", "+sweep=reward_weights",
                    f"algorithm.credit.judge_weight={','.join(JUDGE_WEIGHTS)}",
                    f"algorithm.credit.format_penalty={','.join(FORMAT_PENALTIES)}",
                    "algorithm.credit.modulation=multiplicative",
                    *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=tmp, env_extra={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return {"uri": uri, "dir": sweep_dir, "log": r.stdout + r.stderr, "tmp": tmp}


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, [e.name for e in client.search_experiments()]
    return client, exp, client.search_runs([exp.experiment_id], max_results=100)


# ==============================================================================================================
# the 2x2 grid through the real entry point
# ==============================================================================================================
def test_grid_makes_one_parent_and_one_child_per_job(tiny_sweep):
    client, exp, runs = _runs(tiny_sweep["uri"])
    everywhere = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    assert len(everywhere) == len(runs)  # parent and children share one experiment
    parents = [r for r in runs if r.data.tags.get("kat.sweep") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 4 and len(runs) == 5
    parent = parents[0]
    pid = parent.info.run_id
    assert (tiny_sweep["dir"] / "mlflow_parent_run_id").read_text().strip() == pid

    # the parent: the sweep's overrides and search space as params, a summary at the end
    p = parent.data.params
    assert p["sweep/space/algorithm.credit.judge_weight"] == "0.1,1.0"
    assert p["sweep/space/algorithm.credit.format_penalty"] == "-1.0,-0.5"
    assert "sweep/space/algorithm.credit.modulation" not in p  # pinned on the command line: not swept
    assert "sweep/space/seed" not in p  # a single value in the config's params sweeps nothing
    assert p["sweep/grid_size"] == "4" and p["sweep/objective"] == "val/acc" and p["sweep/direction"] == "maximize"
    assert "+sweep=reward_weights" in p["sweep/overrides"] and p["sweep/launcher"].endswith("BasicLauncher")
    assert parent.info.run_name == "sweep reward_weights" and parent.info.status == "FINISHED"
    assert parent.data.tags["kat.stage"] == "rl"
    assert parent.data.metrics["sweep/n_jobs"] == 4 and parent.data.metrics["sweep/n_failed"] == 0
    assert parent.data.tags["kat.sweep.best_run_id"] in {c.info.run_id for c in children}
    best = max(c.data.metrics["val/acc"] for c in children)
    assert parent.data.metrics["sweep/best_value"] == pytest.approx(best)

    # the children: one per grid point, swept values as params and tags, rl/* per step, val/* at the end
    assert all(c.data.tags["mlflow.parentRunId"] == pid for c in children)
    assert all(c.info.status == "FINISHED" and c.data.tags["kat.stage"] == "rl" for c in children)
    grid = {(c.data.params["algorithm/credit/judge_weight"], c.data.params["algorithm/credit/format_penalty"])
            for c in children}
    assert grid == set(itertools.product(JUDGE_WEIGHTS, FORMAT_PENALTIES))
    assert all(c.data.params["algorithm/credit/modulation"] == "multiplicative" for c in children)
    assert sorted(int(c.data.tags["kat.sweep.job"]) for c in children) == [0, 1, 2, 3]
    for c in children:
        assert c.data.tags["kat.override.algorithm.credit.judge_weight"] == \
            c.data.params["algorithm/credit/judge_weight"]
        for name in ("rl/acc", "rl/think_on_rate", "rl/tokens_mean", "rl/reward_mean", "rl/reward_judge"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, name)] == [1, 2], name
        assert sorted(m.step for m in client.get_metric_history(c.info.run_id, "val/acc")) == [0, 2]
        assert "val/think_on_rate/level_5" in c.data.metrics
    # each job in its own folder of the one sweep folder
    for job in range(4):
        assert (tiny_sweep["dir"] / str(job) / "checkpoints" / "final" / "config.json").exists()


def test_runs_table_and_plots_read_the_sweep(tiny_sweep):
    import matplotlib

    matplotlib.use("Agg")
    from kat.tracking import compare, plots

    uri = tiny_sweep["uri"]
    sweeps = compare.list_sweeps(uri=uri)
    assert list(sweeps["run_name"]) == ["sweep reward_weights"] and list(sweeps["n_children"]) == [4]
    assert "algorithm.credit.judge_weight=0.1,1.0" in sweeps.iloc[0]["space"]

    table = compare.runs_table(sweep="sweep reward_weights", uri=uri)  # by name ...
    assert compare.runs_table(sweep=sweeps.iloc[0]["run_id"], uri=uri)["run_id"].tolist() == table["run_id"].tolist()
    assert len(table) == 4 and table["sweep_job"].tolist() == [0, 1, 2, 3]
    assert compare.swept_columns(table) == ["algorithm.credit.format_penalty", "algorithm.credit.judge_weight"]
    assert table["algorithm.credit.judge_weight"].dtype.kind == "f"  # swept values come back as numbers
    assert set(zip(table["algorithm.credit.judge_weight"], table["algorithm.credit.format_penalty"])) == \
        {(float(a), float(b)) for a, b in itertools.product(JUDGE_WEIGHTS, FORMAT_PENALTIES)}
    # params: only those that vary (the swept ones), run folders excluded
    assert [c for c in table.columns if c.startswith("params.")] == \
        ["params.algorithm/credit/format_penalty", "params.algorithm/credit/judge_weight"]
    for metric in ("val/acc", "val/think_on_rate", "val/tokens_mean", "rl/acc", "val/think_on_rate/level_3"):
        assert table[metric].notna().all(), metric
    assert (table["best:val/acc"] >= table["val/acc"] - 1e-12).all()
    assert (table["val/tokens_mean"] > 0).all()
    with_parent = compare.runs_table(sweep="sweep reward_weights", uri=uri, include_parent=True)
    assert len(with_parent) == 5 and with_parent["sweep_job"].isna().sum() == 1
    assert len(compare.runs_table(EXPERIMENT, uri=uri, params="none")) == 5

    long = compare.per_level(table)
    assert len(long) == 4 * 5 and sorted(long["level"].unique()) == [1, 2, 3, 4, 5]
    row = table.iloc[0]
    got = long[(long["run_id"] == row["run_id"]) & (long["level"] == 4)]["val/think_on_rate"].item()
    assert got == row["val/think_on_rate/level_4"]

    fig = plots.plot_levels_vs_param(table, "algorithm.credit.judge_weight")
    assert len(fig.axes[0].containers) == 5  # one error-bar line per level
    fig = plots.plot_vs_param(table, "algorithm.credit.judge_weight", hue="algorithm.credit.format_penalty")
    assert len(fig.axes) == 3 and all(len(ax.containers) == 2 for ax in fig.axes)
    xs = sorted(fig.axes[0].containers[0].lines[0].get_xdata())
    assert xs == [0.1, 1.0]
    fig = plots.plot_frontier(table, label="algorithm.credit.judge_weight")
    assert len(fig.axes[0].collections[0].get_offsets()) == 4


def test_notebook_runs_on_the_sweep(tiny_sweep, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tiny_sweep["uri"])  # the kernel inherits it
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    path = ROOT / "notebooks" / "compare_runs.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises on any cell error
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"MLflow store: {tiny_sweep['uri']}" in text
    assert "4 runs, swept: ['algorithm.credit.format_penalty', 'algorithm.credit.judge_weight']" in text
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 1 + 2 + 2  # frontier, per-level plot per swept key, metrics plot per swept key


# ==============================================================================================================
# refusals
# ==============================================================================================================
def test_multirun_with_two_devices_per_job_is_refused(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_module(["kat.train", "-m", "+stage=rl", "trainer.devices=2", "trainer.accelerator=cpu",
                    "algorithm.credit.judge_weight=0.1,1.0", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                   cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1
    assert "2 processes per job" in out and "is refused" in out and "hydra/launcher=slurm" in out
    assert not (tmp_path / "multirun" / "0").exists()  # refused before any job
    assert not (tmp_path / "mlflow.db").exists()  # and before any run was created


def test_single_process_check(compose_cfg):
    from kat.sweep import SweepRefused, check_single_process, processes_per_job

    assert processes_per_job(1) == 1 and processes_per_job(2) == 2 and processes_per_job([0, 1, 2]) == 3
    assert processes_per_job("0,1") == 2 and processes_per_job("3") == 3 and processes_per_job(1, 2) == 2
    assert processes_per_job("auto", 1, "cpu") == 1 and processes_per_job(-1, 2, "cpu") == 2
    cfg = compose_cfg(["+stage=rl"])
    check_single_process(cfg, "hydra._internal.core_plugins.basic_launcher.BasicLauncher", {})  # devices=1: fine
    with pytest.raises(SweepRefused, match="2 processes per job"):  # a swept value > 1 is caught up front
        check_single_process(cfg, "", {"trainer.devices": "1,2"})
    with pytest.raises(SweepRefused, match="4 processes per job"):
        check_single_process(compose_cfg(["+stage=rl", "trainer.devices=2", "trainer.num_nodes=2"]), "", {})
    # SLURM starts the ranks itself: allowed
    check_single_process(compose_cfg(["+stage=rl", "trainer.devices=2"]),
                         "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", {})


def test_parallel_launcher_on_sqlite_is_refused():
    from kat.sweep import BASIC_LAUNCHER, SweepRefused, check_store

    check_store("sqlite:////x/mlflow.db", BASIC_LAUNCHER)
    check_store("http://127.0.0.1:5000", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher")
    with pytest.raises(SweepRefused, match="mlflow server"):
        check_store("sqlite:////x/mlflow.db", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher")


def test_unknown_sweep_is_refused_with_the_list():
    from kat.sweep import SweepRefused, available_sweeps, check_sweep_found

    assert {"reward_weights", "algorithms", "optuna_reward"} <= set(available_sweeps())
    check_sweep_found(OmegaConf.create({"seed": 0}))
    with pytest.raises(SweepRefused, match=r"\+sweep=nope: no sweep/nope.yaml.*reward_weights"):
        check_sweep_found(OmegaConf.create({"sweep": "nope"}))


# ==============================================================================================================
# pure helpers
# ==============================================================================================================
def test_sweep_space_and_grid_size():
    from kat.sweep import grid_size, sweep_name, sweep_space

    params = {"algorithm.credit.judge_weight": "0.1,0.5,1.0", "algorithm.credit.modulation": "multiplicative,additive",
              "seed": "0"}
    space = sweep_space(params, ["+stage=rl", "+sweep=reward_weights", "algorithm.credit.judge_weight=0.1,1.0",
                                 "algorithm.credit.modulation=additive", "algorithm=grpo,dapo", "trainer.max_steps=2"])
    assert space == {"algorithm.credit.judge_weight": "0.1,1.0", "algorithm": "grpo,dapo"}
    assert grid_size(space) == 4 and grid_size({}) == 1
    assert grid_size({"algorithm.credit.judge_weight": "interval(0.0, 1.0)"}) is None
    optuna = {"algorithm.credit.judge_weight": "interval(0.0, 1.0)"}
    assert sweep_space(optuna, []) == optuna
    assert sweep_name(["+sweep=algorithms"], space) == "algorithms"
    assert sweep_name([], space) == "algorithm.credit.judge_weight,algorithm"


def test_pareto_front():
    from kat.tracking.compare import pareto_front

    cost = [10, 20, 15, 30, 12, float("nan"), 10]
    value = [0.5, 0.9, 0.9, 0.95, 0.4, 1.0, 0.5]
    # (15, .9) dominates (20, .9); (12, .4) is dominated by (10, .5); equal points do not dominate each other
    assert pareto_front(cost, value) == [True, False, True, True, False, False, True]
    assert pareto_front([], []) == []
    with pytest.raises(ValueError, match="differ in length"):
        pareto_front([1], [1, 2])


def test_find_store(tmp_path, monkeypatch):
    from kat.tracking.compare import find_store

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "mlflow.db"))):
        find_store(tmp_path / "notebooks")
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert find_store(tmp_path / "notebooks") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert find_store(tmp_path / "notebooks") == "http://127.0.0.1:5000"


def test_start_parent_run_logs_more_than_a_batch_of_params(tmp_path):
    from mlflow.tracking import MlflowClient

    from kat import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = {f"p/{i:03d}": i for i in range(250)}  # MLflow takes at most 100 params per log_batch
    rid = tracking.start_parent_run("many", "parent", params=params, tags={"kat.sweep": "true"}, uri=uri)
    run = MlflowClient(tracking_uri=uri).get_run(rid)
    assert run.data.params == {k: str(v) for k, v in params.items()} and run.data.tags["kat.sweep"] == "true"
    assert run.info.status == "RUNNING"  # the caller closes it


def test_runs_table_rejects_bad_arguments(tiny_sweep):
    from kat.tracking import compare

    uri = tiny_sweep["uri"]
    with pytest.raises(ValueError, match="params must be"):
        compare.runs_table(uri=uri, params="some")
    with pytest.raises(ValueError, match=r"best\['val/acc'\] must be 'max' or 'min'"):
        compare.runs_table(uri=uri, best={"val/acc": "largest"})
    with pytest.raises(ValueError, match=f"experiment='nope' does not exist; known: .*{EXPERIMENT}"):
        compare.runs_table("nope", uri=uri)
    with pytest.raises(ValueError, match="sweep='nope' is neither a run id nor the name of a sweep"):
        compare.runs_table(sweep="nope", uri=uri)


# ==============================================================================================================
# the sweep configs themselves
# ==============================================================================================================
@pytest.mark.parametrize("name", sorted(p.stem for p in (SWEEPS / "sweep").glob("*.yaml")))
def test_every_sweep_composes(compose_cfg, name):
    if name.startswith("optuna"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper not installed")
    cfg = compose_cfg(["+stage=rl", f"+sweep={name}"])
    assert "sweep" not in cfg  # a group of global deltas, not a key
    assert cfg.task_name == f"sweep_{name}"
    assert cfg.hydra.sweeper.params, name
    assert cfg.optimized_metric == "val/acc"


def test_algorithm_sweep_covers_every_algorithm(compose_cfg):
    cfg = compose_cfg(["+stage=rl", "+sweep=algorithms"])
    algos = set(cfg.hydra.sweeper.params.algorithm.split(","))
    assert algos == {p.stem for p in (ROOT / "conf" / "algorithm").glob("*.yaml")}
    assert str(cfg.hydra.sweeper.params.seed) == "0"  # same seed for every algorithm


def test_slurm_launcher_preset_composes(compose_cfg):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher not installed")
    cfg = compose_cfg(["+stage=rl", "+sweep=reward_weights", "hydra/launcher=slurm",
                       "hydra.launcher.partition=gpu"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.tasks_per_node == 1


KEY_LINE = re.compile(r"^\s*(- )?(?!_target_:|defaults:)[A-Za-z_][\w.@/-]*\s*:")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(SWEEPS)) for p in SWEEPS.rglob("*.yaml")))
def test_every_sweep_field_has_a_comment(path):
    """docs/design.md §2: every config field carries a one-line comment (as conf/ in tests/test_config.py)."""
    lines = (SWEEPS / path).read_text().splitlines()
    missing = [f"{path}:{no}: {line.strip()}" for no, line in enumerate(lines, 1)
               if KEY_LINE.match(line) and "#" not in line and not line.strip().startswith("#")]
    assert not missing, "fields without a comment:\n" + "\n".join(missing)


@pytest.mark.slow
def test_optuna_sweep_runs_and_nests_its_trials(tmp_path):
    """hydra-optuna-sweeper 1.3.0 (optuna 2.10.1) on Hydra 1.3: two trials, each a child run returning val/acc."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper not installed")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_module(["kat.train", "-m", "+stage=rl", "+sweep=optuna_reward", "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.sampler.n_startup_trials=1", *TINY, "trainer.max_steps=1",
                    "trainer.val_check_interval=1", "stage.module.validate_at_start=false",
                    f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                   cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": uri}, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sweep_optuna_reward").experiment_id])
    parent = next(x for x in runs if x.data.tags.get("kat.sweep") == "true")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and parent.data.metrics["sweep/n_jobs"] == 2
    assert parent.data.params["sweep/space/algorithm.credit.judge_weight"] == "interval(0.0, 1.0)"
    assert parent.data.params["sweep/sweeper"].endswith("OptunaSweeper")
    for c in children:
        w = float(c.data.params["algorithm/credit/judge_weight"])
        assert 0.0 <= w <= 1.0 and not math.isnan(c.data.metrics["val/acc"])
    assert (tmp_path / "multirun" / "optimization_results.yaml").exists()
