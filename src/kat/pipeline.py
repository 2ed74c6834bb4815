"""``python -m kat.pipeline`` (``make train``) — the whole recipe on the embedded default.

Each step is a real ``python -m kat.train`` run in its own sub-folder of the pipeline folder, recorded
in MLflow as a child of one parent run; the next step starts from the previous step's exported HF
checkpoint (``model.path`` passed explicitly). Steps (``recipe.steps``):

* ``teacher``   forced-mode SFT of the tiny teacher (both modes per query, trigger token as input);
* ``coldstart`` the student's cold-start SFT on the judge/mode templates;
* ``eval``      greedy evaluation of the latest student on the held-out split.

Output: a per-level table (think-on rate, accuracy, mean tokens) and ``summary.json`` (DESIGN.md §4,
contract) whose path is the last line of stdout.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kat import tracking
from kat.train import CONF_DIR
from kat.utils import get_logger

log = get_logger(__name__)


class StepFailed(RuntimeError):
    pass


def run_stage(step: str, overrides: list[str], out_dir: Path, *, parent_run: str | None, threads: int | None) -> Path:
    """Run ``python -m kat.train`` for one step; return its exported HF checkpoint folder."""
    step_dir = out_dir / step
    step_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kat.train", *overrides, f"hydra.run.dir={step_dir}"]
    env = dict(os.environ)
    if parent_run:
        env[tracking.PARENT_ENV] = parent_run
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    (step_dir / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    log.info(f"[{step}] python -m kat.train {' '.join(overrides)}")
    t0 = time.time()
    with (step_dir / "stdout.log").open("w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if "validation (mode=" in line or "Error" in line or "error:" in line:
                print(f"  [{step}] {line.rstrip().split(' - ', 1)[-1]}", flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = (step_dir / "stdout.log").read_text().splitlines()[-30:]
        raise StepFailed(f"step {step!r} failed (exit {rc}); log: {step_dir / 'stdout.log'}\n" + "\n".join(tail))
    final = step_dir / "checkpoints" / "final"
    log.info(f"[{step}] done in {time.time() - t0:.0f}s -> {final}")
    return final


def evaluate_checkpoint(ckpt: Path, cfg: DictConfig) -> dict:
    """Per-level summary of a student checkpoint on the held-out split (greedy)."""
    from kat import models
    from kat.data import synthetic
    from kat.metrics import summarize
    from kat.rollout.evaluate import evaluate

    model, tok = models.load({"path": str(ckpt)})
    samples = synthetic.generate(int(cfg.n_val_per_level), seed=int(cfg.seed), split="heldout")
    records, _ = evaluate(model, tok, samples, fmt="coldstart", mode="auto",
                          max_new_tokens=int(cfg.max_new_tokens), batch_size=int(cfg.batch_size))
    return summarize(records)


def print_table(summary: dict[str, dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    blocks = list(summary)
    table = Table(title="kat — held-out results per level (greedy)")
    table.add_column("level")
    for b in blocks:
        for col in ("think-on", "acc", "tokens"):
            table.add_column(f"{b}\n{col}", justify="right")
    groups = [g for g in summary[blocks[0]]]
    for g in groups:
        row = [g.replace("level_", "")]
        for b in blocks:
            m = summary[b].get(g, {})
            row += [f"{m.get('think_on_rate', 0):.2f}", f"{m.get('acc', 0):.3f}", f"{m.get('tokens_mean', 0):.1f}"]
        table.add_row(*row)
    Console(width=160).print(table)


def run(cfg: DictConfig, out_dir: Path) -> Path:
    recipe = cfg.recipe
    t_start = time.time()
    parent = tracking.start_parent_run(
        cfg.task_name, f"pipeline {recipe.name}",
        params={"recipe": recipe.name, "steps": ",".join(recipe.steps), "seed": cfg.seed},
        tags={"kat.stage": "pipeline"},
    )
    common = [f"seed={cfg.seed}", f"task_name={cfg.task_name}", *recipe.get("common", [])]
    ckpt: dict[str, Path] = {}
    summary: dict[str, dict] = {}
    timings: dict[str, float] = {}
    for step in recipe.steps:
        t0 = time.time()
        if step == "teacher":
            ckpt["teacher"] = run_stage(step, [*recipe.teacher, *common], out_dir, parent_run=parent,
                                        threads=cfg.threads)
        elif step == "coldstart":
            start = [f"model.path={ckpt['distill']}"] if "distill" in ckpt else []
            ckpt["student"] = ckpt["coldstart"] = run_stage(step, [*recipe.coldstart, *common, *start], out_dir,
                                                           parent_run=parent, threads=cfg.threads)
        elif step == "eval":
            ev = OmegaConf.merge(recipe.eval, {"seed": cfg.seed})
            if "coldstart" in ckpt:
                summary["before_rl"] = evaluate_checkpoint(ckpt["coldstart"], ev)
            if "rl" in ckpt:
                summary["after_rl"] = evaluate_checkpoint(ckpt["rl"], ev)
        else:
            raise ValueError(f"recipe.steps: unknown step {step!r}")
        timings[step] = time.time() - t0

    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    report = {"recipe": recipe.name, "seconds": timings, "total_seconds": time.time() - t_start,
              "checkpoints": {k: str(v) for k, v in ckpt.items()}, "parent_run_id": parent}
    (out_dir / "pipeline_report.json").write_text(json.dumps(report, indent=2) + "\n")

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    for block, s in summary.items():
        for group, m in s.items():
            for k in ("think_on_rate", "acc", "tokens_mean"):
                client.log_metric(parent, f"{block}/{k}" + ("" if group == "all" else f"/{group}"), m[k])
    client.log_artifact(parent, str(path))
    client.log_artifact(parent, str(out_dir / "pipeline_report.json"))
    client.set_terminated(parent)
    if summary:
        print_table(summary)
    log.info(f"pipeline finished in {time.time() - t_start:.0f}s; " +
             ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return path


@hydra.main(config_path=CONF_DIR, config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        path = run(cfg, out_dir)
    except StepFailed as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(1) from None
    print(path.resolve(), flush=True)


if __name__ == "__main__":
    main()
