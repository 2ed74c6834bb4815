"""``python -m kat.pipeline`` (``make train``) — the whole recipe on the embedded default.

Each step is a real ``python -m kat.train`` run in its own sub-folder of the pipeline folder, recorded
in MLflow as a child of one parent run; the next step starts from the previous step's exported HF
checkpoint (``model.path`` passed explicitly). Steps (``recipe.steps``):

* ``teacher``   forced-mode SFT of the tiny teacher (both modes per query, trigger token as input);
* ``distill``   stage 1: the student distilled from that teacher (``teacher=tiny teacher.path=<teacher>``,
  CE + ULD + MTP, both modes per query, trigger token as input);
* ``coldstart`` the student's cold-start SFT on the judge/mode templates (from the distilled student
  when a ``distill`` step ran);
* ``vote``      cold-start labels by teacher vote (``labels=vote``, docs/design.md §4): the teacher step's model
  answers every training query up to ``k`` times in think-off mode (distill format: prompt + ``<think_off>``,
  sampled at ``vote.temperature``); the label is think-off when at least ``vote.threshold · k`` answers are
  right (``threshold: 1.0`` = all of them, docs/design.md §4), then ``1 %`` of the labels are re-drawn at random.
  The labelled training set and the synthetic held-out split are written as JSONL (``vote/train.jsonl``,
  ``vote/heldout.jsonl``) and the later ``coldstart`` and ``rl`` steps read them with
  ``data=jsonl data.path=… data.val_path=…`` (``common`` overrides of synthetic-only keys such as
  ``data.n_train_per_level`` are dropped for those steps: the vote already applied them);
* ``synth``     cold-start data by the dual-regime chain (``labels=synth``, docs/synth.md):
  ``python -m kat.synth synth=embedded model.path=<teacher> <recipe.synth overrides>`` in ``synth/``; its
  ``coldstart.jsonl`` and ``heldout.jsonl`` feed the later ``coldstart`` and ``rl`` steps exactly like the vote's
  files. Without a ``vote`` or ``synth`` step the student steps use the generator's labels
  (``data=synthetic``, ``labels=generator``) with the ``recipe.generator`` overrides. When both labelling steps
  run, the later one feeds the student steps;
* ``rl``        stage 3 (``+stage=rl``) from the coldstart step's checkpoint;
* ``eval``      greedy evaluation of the latest student on the held-out split.

The top-level ``labels=generator|vote|synth`` (conf/pipeline.yaml; default null = as ``recipe.steps`` say)
swaps the recipe's labelling step: :func:`resolve_steps`.

While it runs: the recipe step (``[k/n step]``), the child's progress (:mod:`kat.trainer.progress`: a bar in a terminal,
its lines otherwise), the elapsed time and an ETA scaled from ``recipe.seconds`` or an earlier run's times.

Output: a per-level table (think-on rate, accuracy, mean tokens) and ``summary.json`` (docs/design.md §4,
contract) whose path is the last line of stdout.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kat import tracking
from kat.trainer.progress import PipelineProgress, reference_seconds
from kat.config import CONF_DIR
from kat.utils import get_logger, log_tail

log = get_logger(__name__)


class StepFailed(RuntimeError):
    pass


def run_stage(step: str, overrides: list[str], out_dir: Path, *, parent_run: str | None, threads: int | None,
              progress: PipelineProgress | None = None) -> Path:
    """Run ``python -m kat.train`` for one step; return its exported HF checkpoint folder.

    The child's output goes to ``<step>/stdout.log``; its progress lines, validation results and errors are shown
    through ``progress`` (a bar in a terminal, plain lines otherwise).
    """
    progress = progress or PipelineProgress([step])
    step_dir = out_dir / step
    step_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kat.train", *overrides, f"hydra.run.dir={step_dir}"]
    env = tracking.child_env(parent_run, threads)
    (step_dir / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    log.info(f"{progress.label(step)} python -m kat.train {' '.join(overrides)}")
    with (step_dir / "stdout.log").open("w") as f, progress.watch(step) as show:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            show(line)
        rc = proc.wait()
    if rc != 0:
        raise StepFailed(f"step {step!r} failed (exit {rc}); log: {step_dir / 'stdout.log'}\n"
                         + log_tail(step_dir / "stdout.log"))
    final = step_dir / "checkpoints" / "final"
    log.info(f"{progress.label(step)} checkpoint: {final}")
    return final


#: every step a recipe may list, in the order they make sense
STEPS = ("teacher", "vote", "synth", "distill", "coldstart", "rl", "eval")

#: data-group keys that only ``data=synthetic`` has (dropped from ``common`` for steps that read the vote JSONL)
SYNTHETIC_ONLY_KEYS = ("n_train_per_level", "n_val_per_level", "domains", "labels", "off_share", "random_mode_rate",
                       "operand_digits")


def common_for(common: list[str], data_override: list[str]) -> list[str]:
    """``common`` minus ``data.<synthetic-only key>=…`` when the step reads JSONL (``data_override`` non-empty)."""
    if not data_override:
        return list(common)
    drop = tuple(f"data.{k}=" for k in SYNTHETIC_ONLY_KEYS)
    return [o for o in common if not o.lstrip("+~").startswith(drop)]


def suite_shapes(recipe: DictConfig) -> list[list[int]] | None:
    """``recipe.operand_digits``: the embedded suite's operand shapes for every step (None = the default suite)."""
    shapes = recipe.get("operand_digits")
    if shapes is None:
        return None
    from kat.data import synthetic

    try:
        return [list(r) for r in synthetic.level_digits(list(shapes)).values()]
    except ValueError as e:
        raise ValueError(f"recipe.operand_digits: {e}") from None


def vote_labels(teacher: Path, vcfg: DictConfig, seed: int, out_dir: Path, *,
                parent_run: str | None = None, operand_digits: list[list[int]] | None = None) -> list[str]:
    """Label the training queries by teacher vote and write them as JSONL; return the data overrides.

    For each query of the synthetic training split (``vote.n_train_per_level`` per domain and level), the
    teacher samples up to ``vote.k`` think-off answers (distill format, ``vote.temperature``), graded by
    ``kat.rewards``. With ``need = max(1, ceil(vote.threshold · k))`` (``threshold`` default 1.0: all ``k``,
    docs/design.md §4; the paper does not give its rule), the label is ``off`` iff at least ``need`` answers are right.
    Sampling stops for a query as soon as its label is decided (``need`` right, or more than ``k − need``
    wrong), so with ``threshold: 1.0`` hard queries cost one generation. Then ``vote.random_mode_rate`` of the
    labels are re-drawn uniformly (seeded). The held-out JSONL is the synthetic held-out split
    (``vote.n_val_per_level``). ``operand_digits``: the suite's operand shapes (``recipe.operand_digits``).
    """
    import random as _random

    from kat import models
    from kat.data import schema, synthetic, templates
    from kat.models.tokenizer import render_prompt
    from kat.rollout.hf import generate
    from kat.rewards.cache import GradeCache

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    k = int(vcfg.k)
    if k < 1:
        raise ValueError(f"recipe.vote.k must be >= 1, got {k}")
    threshold = float(vcfg.get("threshold", 1.0))
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"recipe.vote.threshold must be in (0, 1], got {threshold}")
    need = max(1, math.ceil(threshold * k - 1e-9))  # right answers needed for a think-off label
    sp = synthetic.splits(int(vcfg.n_train_per_level), int(vcfg.n_val_per_level), seed=seed,
                          domains=tuple(vcfg.domains), operand_digits=operand_digits)
    model, tok = models.load({"path": str(teacher)})
    prompts = [render_prompt(tok, schema.prompt_messages(s)) + templates.mode_token("off") for s in sp.train]
    cache = GradeCache()
    right = [0] * len(sp.train)
    wrong = [0] * len(sp.train)
    alive = list(range(len(sp.train)))  # queries whose label is not decided yet
    temp = float(vcfg.temperature)
    for _ in range(k):
        if not alive:
            break
        comps = generate(model, tok, [prompts[i] for i in alive], max_new_tokens=int(vcfg.max_new_tokens),
                         do_sample=temp > 0, temperature=temp if temp > 0 else 1.0,
                         batch_size=int(vcfg.batch_size))
        scores, _, _ = cache.grade([sp.train[i] for i in alive], [c.text for c in comps],
                                   max_workers=int(vcfg.get("grade_workers", 2)))
        for i, sc in zip(alive, scores):
            if sc is not None and sc >= 1.0:
                right[i] += 1
            else:
                wrong[i] += 1
        alive = [i for i in alive if right[i] < need and wrong[i] <= k - need]
    rng = _random.Random(f"kat-vote/{seed}")
    rate = float(vcfg.random_mode_rate)
    stats: dict[int, list[int]] = {}
    with (out_dir / "train.jsonl").open("w") as f:
        for i, s in enumerate(sp.train):
            mode = "off" if right[i] >= need else "on"
            if rng.random() < rate:
                mode = rng.choice(("on", "off"))
            synthetic.label(s, mode)
            st = stats.setdefault(int(s["level"]), [0, 0])
            st[0] += 1
            st[1] += mode == "off"
            f.write(json.dumps(s) + "\n")
    with (out_dir / "heldout.jsonl").open("w") as f:
        for s in sp.val:
            f.write(json.dumps(s) + "\n")
    off = {f"level_{lv}": st[1] / st[0] for lv, st in sorted(stats.items())}
    n_off = sum(st[1] for st in stats.values())
    report = {"k": k, "threshold": threshold, "need": need, "temperature": temp, "n_train": len(sp.train), "n_heldout": len(sp.val),
              "off_share": off, "off_share_all": n_off / max(1, len(sp.train)), "seconds": time.time() - t0}
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info(f"[vote] k={k} need={need} T={temp}: think-off labels " + ", ".join(f"{g} {v:.2f}" for g, v in off.items())
             + f" (all {report['off_share_all']:.2f}) in {report['seconds']:.0f}s")
    if parent_run:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        for g, v in off.items():
            client.log_metric(parent_run, f"vote/off_share/{g}", v)
        client.log_metric(parent_run, "vote/off_share", report["off_share_all"])
    return ["data=jsonl", f"data.path={out_dir / 'train.jsonl'}", f"data.val_path={out_dir / 'heldout.jsonl'}"]


def synth_labels(teacher: Path, overrides: list[str], seed: int, out_dir: Path, *, parent_run: str | None = None,
                 threads: int | None = None, task_name: str | None = None) -> list[str]:
    """``labels=synth``: cold-start data from ``python -m kat.synth`` with the teacher; return the data overrides.

    Runs :func:`kat.synth.run.pipeline_labels` (its own MLflow child run of ``parent_run``) and logs the
    think-off share of its ColdStart set per level to the parent run (``synth/off_share/level_k``,
    ``synth/off_share``), as the vote step does with ``vote/off_share``.
    """
    from kat.synth.run import SynthFailed, pipeline_labels

    try:
        data = pipeline_labels(teacher, overrides, seed, out_dir, parent_run=parent_run, threads=threads,
                               task_name=task_name)
    except SynthFailed as e:
        raise StepFailed(f"step 'synth' failed: {e}") from None
    report = json.loads((out_dir / "out" / "report.json").read_text())
    share = report["mode_share"].get("coldstart") or report["mode_share"]["labels"]
    off = {f"level_{lv}": b["off_share"] for lv, b in sorted(share["level"].items())}
    o = report.get("outputs", {})
    log.info(f"[synth] {o.get('coldstart')} ColdStart samples of {report.get('input')} queries; think-off share "
             + ", ".join(f"{g} {v:.2f}" for g, v in off.items()) + f" (all {share['all']['off_share']:.2f}) "
             f"in {report.get('seconds', 0):.0f}s")
    if parent_run:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking.tracking_uri())
        for g, v in off.items():
            client.log_metric(parent_run, f"synth/off_share/{g}", v)
        client.log_metric(parent_run, "synth/off_share", share["all"]["off_share"])
    return data


#: the steps that write cold-start labels (the student steps read the last one's JSONL)
LABEL_STEPS = ("vote", "synth")
LABEL_CHOICES = ("generator", *LABEL_STEPS)


def resolve_steps(steps: list[str], labels: str | None) -> list[str]:
    """The recipe's steps with its labelling step swapped for ``labels`` (None: the steps unchanged).

    ``generator`` removes every ``vote``/``synth`` step (the student steps then use the generator's labels);
    ``vote``/``synth`` replaces them by that one step, placed where the first one was, else right after
    ``teacher`` (which it needs).
    """
    steps = list(steps)
    if labels is None:
        return steps
    if labels not in LABEL_CHOICES:
        raise ValueError(f"labels must be one of {LABEL_CHOICES} (or null), got {labels!r}")
    where = next((i for i, s in enumerate(steps) if s in LABEL_STEPS), None)
    rest = [s for s in steps if s not in LABEL_STEPS]
    if labels == "generator":
        return rest
    if where is None:
        if "teacher" not in rest:
            raise ValueError(f"labels={labels}: the {labels} step needs the teacher step, and recipe.steps has none")
        where = rest.index("teacher") + 1
    return rest[:where] + [labels] + rest[where:]


def evaluate_checkpoint(ckpt: Path, cfg: DictConfig) -> dict:
    """Per-level summary of a student checkpoint on the held-out split (greedy)."""
    from kat import models
    from kat.data import synthetic
    from kat.metrics import summarize
    from kat.rollout.evaluate import complete_and_grade

    model, tok = models.load({"path": str(ckpt)})
    samples = synthetic.generate(int(cfg.n_val_per_level), seed=int(cfg.seed), split="heldout",
                                 operand_digits=cfg.get("operand_digits"))
    records = complete_and_grade(model, tok, samples, fmt="coldstart", mode="auto",
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
    steps = resolve_steps(list(recipe.steps), cfg.get("labels"))
    unknown = [s for s in steps if s not in STEPS]
    if unknown:  # before any work
        raise ValueError(f"recipe.steps: unknown step(s) {unknown} (known: {list(STEPS)})")
    labels = next((s for s in reversed(steps) if s in LABEL_STEPS), "generator")
    parent = tracking.start_parent_run(
        cfg.task_name, f"pipeline {recipe.name}",
        params={"recipe": recipe.name, "steps": ",".join(steps), "labels": labels, "seed": cfg.seed},
        tags={"kat.stage": "pipeline"},
    )
    shapes = suite_shapes(recipe)  # one set of operand shapes for every step (data, vote, synth, eval)
    suite = [] if shapes is None else [f"data.operand_digits={json.dumps(shapes, separators=(',', ':'))}"]
    common = [f"seed={cfg.seed}", f"task_name={cfg.task_name}", *suite, *recipe.get("common", [])]
    # generator labels: the recipe's generator overrides for the student steps (a labelling step replaces them)
    generator = [] if labels != "generator" else list(recipe.get("generator") or [])
    ckpt: dict[str, Path] = {}
    summary: dict[str, dict] = {}
    timings: dict[str, float] = {}
    data_override: list[str] = []  # set by a vote/synth step: later student steps read its JSONL
    overrides = command_line(cfg)
    prog = PipelineProgress(steps, *reference_seconds(recipe, steps, overrides, out_dir))
    for step in steps:
        t0 = time.time()
        prog.begin(step)
        if step == "teacher":
            ckpt["teacher"] = run_stage(step, [*recipe.teacher, *common], out_dir, parent_run=parent,
                                        threads=cfg.threads, progress=prog)
        elif step == "distill":
            if "teacher" not in ckpt:
                raise ValueError("recipe.steps: the distill step needs the teacher step before it")
            ckpt["distill"] = run_stage(step, [*recipe.distill, *common, f"teacher.path={ckpt['teacher']}"], out_dir,
                                        parent_run=parent, threads=cfg.threads, progress=prog)
        elif step == "vote":
            if "teacher" not in ckpt:
                raise ValueError("recipe.steps: the vote step needs the teacher step before it")
            data_override = vote_labels(ckpt["teacher"], recipe.vote, int(cfg.seed), out_dir / "vote",
                                        parent_run=parent, operand_digits=shapes)
        elif step == "synth":
            if "teacher" not in ckpt:
                raise ValueError("recipe.steps: the synth step needs the teacher step before it")
            synth_ov = [*(recipe.get("synth") or []),
                        *([] if shapes is None else [s.replace("data.", "synth.input.", 1) for s in suite])]
            data_override = synth_labels(ckpt["teacher"], synth_ov, int(cfg.seed),
                                         out_dir / "synth", parent_run=parent, threads=cfg.threads,
                                         task_name=str(cfg.task_name))
        elif step == "coldstart":
            start = [f"model.path={ckpt['distill']}"] if "distill" in ckpt else []
            ckpt["student"] = ckpt["coldstart"] = run_stage(
                step, [*recipe.coldstart, *common_for(common, data_override), *generator, *start, *data_override],
                out_dir, parent_run=parent, threads=cfg.threads, progress=prog)
        elif step == "rl":
            if "coldstart" not in ckpt:
                raise ValueError("recipe.steps: the rl step needs the coldstart step before it")
            ckpt["student"] = ckpt["rl"] = run_stage(
                step, [*recipe.rl, *common_for(common, data_override), *generator,
                       f"model.path={ckpt['coldstart']}", *data_override], out_dir, parent_run=parent,
                threads=cfg.threads, progress=prog)
        elif step == "eval":
            ev = OmegaConf.create({**OmegaConf.to_container(recipe.eval, resolve=True), "seed": cfg.seed,
                                   "operand_digits": shapes})
            if "coldstart" in ckpt:
                summary["before_rl"] = evaluate_checkpoint(ckpt["coldstart"], ev)
            if "rl" in ckpt:
                summary["after_rl"] = evaluate_checkpoint(ckpt["rl"], ev)
        else:
            raise ValueError(f"recipe.steps: unknown step {step!r}")
        timings[step] = time.time() - t0
        prog.finish(step, timings[step])

    path = out_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    report = {"recipe": recipe.name, "steps": steps, "labels": labels, "seconds": timings, "total_seconds": time.time() - t_start,
              "overrides": [o for o in overrides if not o.lstrip("+~").startswith("hydra.")],
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


def command_line(cfg: DictConfig) -> list[str]:
    """The pipeline's command-line overrides (Hydra's, or the composed config's ``hydra`` node in tests)."""
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])


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
