"""``python -m kat.synth [synth=embedded|openai] [overrides]`` — the dual-regime data chain (docs/synth.md).

input → tag → vote → judge → direct → think → assemble, each a resumable pass over JSONL shards in
``synth.work_dir`` (kat.synth.shards); every question goes through the request cache (kat.synth.cache) to
an endpoint (kat.synth.endpoints). The report (counts, acceptance rates, think-off share per domain and
level, tokens per endpoint, cache hits) is printed, written to ``<output_dir>/report.json`` and logged as an
MLflow run (``kat.stage=synth``, child of ``$KAT_PARENT_RUN_ID`` when set). The path of ``report.json`` is
the last line of stdout.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from kat.config import CONF_DIR  # the Hydra tree (kat.config imports neither torch nor lightning)
from kat.data import schema, synthetic
from kat.synth import assemble as asm
from kat.utils import log_tail
from kat.synth.cache import RequestCache
from kat.synth.endpoints import Broker, EndpointConfig, EndpointError
from kat.synth.parsing import compile_refusals
from kat.synth.prompts import load_prompts
from kat.synth.shards import ShardWriter, StepDir, fingerprint, shard_name
from kat.synth.steps import ORDER, STEP_CLASSES, Context

log = logging.getLogger(__name__)  # plain logging: kat.utils would import lightning (slow start-up)

LABEL_FIELDS = ("mode", "judge", "thinking", "response")


class SynthFailed(RuntimeError):
    """``python -m kat.synth`` run by :func:`pipeline_labels` exited with an error."""


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


# ------------------------------------------------------------------------------------------------ input
def load_input(icfg: Mapping[str, Any], seed: int) -> tuple[list[dict], list[dict]]:
    """The queries (label fields of ``input.strip`` removed) and the held-out items (synthetic source only)."""
    src = str(icfg.get("source", "synthetic"))
    held: list[dict] = []
    if src == "synthetic":
        sp = synthetic.splits(int(icfg.get("n_per_level", 10)), int(icfg.get("n_val_per_level", 0)), seed=seed,
                              domains=tuple(icfg.get("domains") or synthetic.DOMAINS4),
                              operand_digits=icfg.get("operand_digits"))
        items, held = sp.train, sp.val
    else:
        p = Path(src)
        files = sorted(f for ext in ("*.jsonl", "*.json", "*.parquet") for f in p.glob(ext)) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"synth.input.source={src!r}: no .jsonl/.json/.parquet files in that folder")
        items, seen = [], {}
        for f in files:
            for s in schema.load_samples(f, "any"):
                if str(s["id"]) in seen:
                    raise schema.DataValidationError([f"{f}: duplicate id {s['id']!r} (first in {seen[str(s['id'])]})"])
                seen[str(s["id"])] = f
                items.append(s)
    strip = list(icfg.get("strip") or [])
    bad = [k for k in strip if k not in LABEL_FIELDS]
    if bad:
        raise ValueError(f"synth.input.strip: only label fields {LABEL_FIELDS} can be stripped, got {bad}")
    for it in items:
        for k in strip:
            it.pop(k, None)
        it.pop("synth", None)
    if icfg.get("limit"):
        items = items[: int(icfg["limit"])]
    return items, held


def ingest(work: Path, icfg: Mapping[str, Any], seed: int) -> tuple[StepDir, str]:
    """Write the queries as shards under ``work/input`` (once per input settings); return the dir and fingerprint."""
    settings = {"input": dict(icfg), "seed": seed}
    if str(icfg.get("source", "synthetic")) != "synthetic":
        p = Path(str(icfg["source"]))
        files = sorted(p.glob("*")) if p.is_dir() else [p]
        settings["files"] = [[str(f), f.stat().st_size, f.stat().st_mtime] for f in files if f.is_file()]
    fp = fingerprint(settings)
    sd = StepDir(work, "input")
    m = sd.manifest()
    if m and m.get("fingerprint") == fp and m.get("ingested"):
        return sd, fp
    if m is not None:
        log.warning(f"input settings changed since the last run in {work}: re-reading the queries")
    sd.reset()
    sd.dir.mkdir(parents=True, exist_ok=True)
    items, held = load_input(icfg, seed)
    size = max(1, int(icfg.get("shard_size", 1000)))
    for k in range(0, max(1, len(items)), size):
        schema.write_jsonl(sd.dir / f"{shard_name(k // size)}.jsonl", items[k : k + size])
    if held:
        schema.write_jsonl(sd.dir / "heldout.jsonl", held)
    sd.save_manifest({"fingerprint": fp, "settings": settings, "ingested": True, "n": len(items),
                      "n_heldout": len(held)})
    log.info(f"input: {len(items)} queries in {sd.dir}" + (f", {len(held)} held-out items" if held else ""))
    return sd, fp


# ------------------------------------------------------------------------------------------------ steps
def run_step(step, src: StepDir, dst: StepDir, fp: str, *, chunk_size: int) -> dict[str, int]:
    """One resumable pass of ``step`` over ``src``'s shards into ``dst``; returns this run's counts."""
    m = dst.prepare(fp, step.settings())
    counts = {"done": 0, "aside": 0, "skipped_done": 0}  # this run's
    for shard in src.shards():
        if shard in m["complete"]:
            continue
        items = src.items(shard)
        done = dst.done_ids(shard)
        todo = [it for it in items if str(it["id"]) not in done]
        counts["skipped_done"] += len(items) - len(todo)
        w = ShardWriter(dst.dir, shard)
        try:
            for s in range(0, len(todo), chunk_size):
                for it, reason in step.run(todo[s : s + chunk_size]):
                    if reason is None:
                        w.write(it)
                        counts["done"] += 1
                    else:
                        it["synth_aside"] = {"step": step.name, "reason": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                        w.write(it, aside=True)
                        counts["aside"] += 1
                w.sync()
                log.info(f"[{step.name}] {shard}: {min(s + chunk_size, len(todo))}/{len(todo)} items")
        finally:
            w.close()
        missing = {str(it["id"]) for it in items} - dst.done_ids(shard)
        if missing:
            raise RuntimeError(f"step {step.name}: {len(missing)} item(s) of {shard} were neither finished nor set "
                               f"aside (first: {sorted(missing)[:3]})")
        m["complete"].append(shard)
        dst.save_manifest(m)
    return counts


def _check_roles(sc: Mapping[str, Any], endpoints: Mapping[str, EndpointConfig], steps: Sequence[str]) -> None:
    """Roles that must follow instructions (tagger, rationale writer, thinker, critic, grader) need chat endpoints."""
    roles = []
    if "tag" in steps:
        roles.append(("synth.tag.endpoint", sc["tag"].get("endpoint")))
    if "judge" in steps and sc["judge"].get("source") == "model":
        roles.append(("synth.judge.endpoint", sc["judge"].get("endpoint")))
    if "think" in steps:
        roles += [("synth.think.thinker", sc["think"].get("thinker")), ("synth.think.critic", sc["think"].get("critic"))]
    roles.append(("synth.grader.endpoint", (sc.get("grader") or {}).get("endpoint")))
    for where, name in roles:
        if name is None:
            continue
        if name not in endpoints:
            raise ValueError(f"{where}={name!r}: no such endpoint (synth.endpoints has {sorted(endpoints)})")
        if endpoints[name].style != "chat":
            raise ValueError(f"{where}={name!r}: that endpoint has style={endpoints[name].style!r}; this role follows "
                             "written instructions, so it needs a chat endpoint (or null where allowed)")
    for where, names in (("synth.vote.endpoints", sc["vote"].get("endpoints") if "vote" in steps else []),
                         ("synth.direct.endpoints", sc["direct"].get("endpoints") if "direct" in steps else []),
                         ("synth.think.solver", [sc["think"].get("solver")] if "think" in steps else [])):
        for n in names or []:
            if n not in endpoints:
                raise ValueError(f"{where}: no endpoint {n!r} (synth.endpoints has {sorted(endpoints)})")


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def synth(cfg: DictConfig) -> dict[str, Any]:
    """Run the chain of ``cfg.synth.steps``; return the report (also written to ``<output_dir>/report.json``)."""
    t0 = time.time()
    sc = _plain(cfg.synth)
    seed = int(cfg.seed)
    steps = list(sc["steps"])
    unknown = [s for s in steps if s not in ORDER]
    if unknown:
        raise ValueError(f"synth.steps: unknown step(s) {unknown} (steps, in order: {list(ORDER)})")
    if steps != sorted(steps, key=ORDER.index):
        raise ValueError(f"synth.steps must keep the order {list(ORDER)}, got {steps}")
    work = Path(sc["work_dir"])
    out_dir = Path(sc["output_dir"])
    work.mkdir(parents=True, exist_ok=True)
    endpoints = {n: EndpointConfig.from_cfg(n, e) for n, e in (sc.get("endpoints") or {}).items()}
    _check_roles(sc, endpoints, steps)
    restart = sc.get("restart_from")
    if restart:
        if restart not in ("input",) + ORDER:
            raise ValueError(f"synth.restart_from must be input or a step of {list(ORDER)}, got {restart!r}")
        names = ["input", *ORDER]
        for name in names[names.index(restart):]:
            StepDir(work, name).reset()
        log.info(f"restart_from={restart}: removed the outputs of {restart} and later steps (the cache is kept)")

    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    cache = RequestCache(work / "cache.sqlite", run_id=run_id)
    lc = sc.get("local") or {}
    broker = Broker(endpoints, backend=sc["backend"], cache=cache, model_cfg=_plain(cfg.get("model")) or {},
                    local_batch_size=int(lc.get("batch_size", 256)), seed=seed, device=_device(str(lc.get("device", "auto"))))
    gr = sc.get("grader") or {}
    rc = _plain(cfg.get("reward")) or {}
    ctx = Context(broker=broker, prompts=load_prompts(sc["prompts"]), refusals=compile_refusals(sc.get("refusals")),
                  seed=seed, bad_retries=int(sc.get("bad_retries", 2)),
                  grading={"max_workers": int(rc.get("workers", 2)), "timeout_s": float(rc.get("timeout_s", 5.0)),
                           "code_cfg": rc.get("code"), "math_cfg": rc.get("math")},
                  grader=gr.get("endpoint"), grader_params={k: v for k, v in (gr.get("params") or {}).items()
                                                             if v is not None})
    counts: dict[str, dict] = {}
    try:
        src, fp = ingest(work, sc["input"], seed)
        for name in [s for s in steps if s != "assemble"]:
            step = STEP_CLASSES[name](ctx, sc[name])
            fp = fingerprint(step.settings(), fp)
            dst = StepDir(work, name)
            t1 = time.time()
            counts[name] = run_step(step, src, dst, fp, chunk_size=max(1, int(sc.get("chunk_size", 256))))
            counts[name]["seconds"] = round(time.time() - t1, 2)
            log.info(f"[{name}] done in {time.time() - t1:.1f}s: {counts[name]}")
            src = dst
        report = build_report(cfg, work, out_dir, steps, src, broker, cache, counts, time.time() - t0,
                              assemble_cfg=sc.get("assemble") or {}, seed=seed)
    finally:
        broker.close()
        cache.close()
    return report


# ------------------------------------------------------------------------------------------------ report
def build_report(cfg, work: Path, out_dir: Path, steps: Sequence[str], last: StepDir, broker: Broker,
                 cache: RequestCache, counts: Mapping, seconds: float, *, assemble_cfg: Mapping, seed: int) -> dict:
    """Assemble the outputs (when ``assemble`` is a step) and compute the report from the step folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    per_step: dict[str, dict] = {}
    done_by_step: dict[str, list[dict]] = {}
    asides: list[dict] = []
    for name in [s for s in steps if s != "assemble"]:
        sd = StepDir(work, name)
        done = list(sd.all_items())
        aside = sd.asides()
        done_by_step[name] = done + aside
        asides += aside
        per_step[name] = asm.step_summary(name, done, aside)
        per_step[name]["this_run"] = dict(counts.get(name) or {})  # finished / set aside / already done before
        per_step[name]["seconds"] = per_step[name]["this_run"].pop("seconds", None)
    n_input = (StepDir(work, "input").manifest() or {}).get("n", 0)
    final = list(last.all_items()) if last.name != "input" else []
    report: dict[str, Any] = {"input": n_input, "steps": per_step, "acceptance": asm.acceptance(done_by_step)}
    labelled = [it for it in final if it.get("mode") in ("on", "off")]
    if "vote" in done_by_step:
        voted = [it for it in done_by_step["vote"] if "synth_aside" not in it]
        report["vote"] = {"random": sum(1 for it in voted if (it.get("synth") or {}).get("vote", {}).get("random")),
                          "early_stopped": sum(1 for it in voted if (it.get("synth") or {}).get("vote", {}).get("n", 0)
                                               < (it.get("synth") or {}).get("vote", {}).get("planned", 0)),
                          "labels": asm.share_table(voted)}
    # the labels as the vote gave them (all voted items), else as they reach the last step
    report["mode_share"] = {"labels": report["vote"]["labels"] if "vote" in report else asm.share_table(labelled)}
    if "assemble" in steps:
        ac = assemble_cfg
        cs_ok, cs_bad = asm.coldstart_items(final)
        cs = asm.select_mix(cs_ok, (ac.get("coldstart") or {}).get("shares"), size=(ac.get("coldstart") or {}).get("size"),
                            seed=seed)
        ds_all = asm.distill_items(final)
        ds = asm.select_mix(ds_all, (ac.get("distill") or {}).get("shares"), size=(ac.get("distill") or {}).get("size"),
                            seed=seed)
        for it, reason in cs_bad:
            asides.append({**it, "synth_aside": {"step": "assemble", "reason": reason}})
        for kind, data in (("coldstart", cs), ("distill", ds)):
            for d in data:
                errs = schema.sample_errors(d, kind)
                if errs:
                    raise RuntimeError(f"assemble produced an invalid {kind} sample {d.get('id')!r}: {errs}")
        schema.write_jsonl(out_dir / "coldstart.jsonl", cs)
        schema.write_jsonl(out_dir / "distill.jsonl", ds)
        held = StepDir(work, "input").dir / "heldout.jsonl"
        if held.exists():
            schema.write_jsonl(out_dir / "heldout.jsonl", (json.loads(x) for x in held.read_text().splitlines() if x))
        report["mode_share"]["coldstart"] = asm.share_table(cs)
        report["mode_share"]["distill"] = asm.share_table(ds)
        report["outputs"] = {"coldstart": len(cs), "coldstart_eligible": len(cs_ok), "distill": len(ds),
                             "distill_eligible": len(ds_all), "aside": len(asides),
                             "dir": str(out_dir.resolve())}
        if not cs:
            log.warning("assemble: no ColdStart sample (every item was set aside; see aside.jsonl and the report)")
    schema.write_jsonl(out_dir / "aside.jsonl", asides)
    usage = cache.usage()
    report["endpoints"] = {n: {**usage.get(n, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}),
                               "run": s.as_dict()} for n, s in broker.stats.items()}
    report["cache"] = {"hits": sum(s.cache_hits for s in broker.stats.values()),
                       "sent": sum(s.sent for s in broker.stats.values())}
    report["seconds"] = round(seconds, 2)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return report


def print_report(report: Mapping[str, Any]) -> None:
    """The report as tables (rich)."""
    from rich.console import Console
    from rich.table import Table

    con = Console(width=150)
    t = Table(title=f"kat.synth — steps ({report.get('input', 0)} input queries)")
    for c in ("step", "in", "done", "aside", "aside reasons", "bad answers", "seconds"):
        t.add_column(c)
    for name, s in report["steps"].items():
        t.add_row(name, str(s["in"]), str(s["done"]), str(s["aside"]),
                  ", ".join(f"{k} {v}" for k, v in s["aside_reasons"].items()) or "-",
                  ", ".join(f"{k} {v}" for k, v in s["bad_answers"].items()) or "-", str(s.get("seconds", "-")))
    con.print(t)
    ms = report.get("mode_share", {})
    for kind in ("labels", "coldstart"):
        if kind not in ms:
            continue
        t = Table(title={"labels": "mode labels", "coldstart": "ColdStart set"}[kind] + ": think-off share")
        t.add_column("group")
        t.add_column("n", justify="right")
        t.add_column("think-off", justify="right")
        t.add_row("all", str(ms[kind]["all"]["n"]), f"{ms[kind]['all']['off_share']:.2f}")
        for axis in ("level", "domain"):
            for g, b in ms[kind][axis].items():
                t.add_row(f"{axis} {g}", str(b["n"]), f"{b['off_share']:.2f}")
        con.print(t)
    t = Table(title="endpoints (tokens over the whole cache; sent / hits this run)")
    for c in ("endpoint", "requests", "prompt tok", "completion tok", "sent", "cache hits", "retries"):
        t.add_column(c, justify="right")
    for n, e in report["endpoints"].items():
        t.add_row(n, str(e["requests"]), str(e["prompt_tokens"]), str(e["completion_tokens"]), str(e["run"]["sent"]),
                  str(e["run"]["cache_hits"]), str(e["run"]["retries"]))
    con.print(t)
    if report.get("acceptance"):
        con.print("acceptance: " + json.dumps(report["acceptance"]))
    if report.get("outputs"):
        o = report["outputs"]
        con.print(f"outputs: {o['coldstart']} coldstart, {o['distill']} distill, {o['aside']} set aside -> {o['dir']}")


def log_mlflow(cfg: DictConfig, report: Mapping[str, Any], report_path: Path) -> str | None:
    """An MLflow run of its own (params = the config with secrets redacted, metrics = the report's numbers)."""
    m = cfg.logger.mlflow
    if not m:
        return None
    from kat import tracking

    return tracking.log_report_run(cfg, m, stage="synth", run_name_=f"synth {cfg.synth.get('name', '')}".strip(),
                                   metrics=asm.flat_metrics(report), artifact=report_path)


@hydra.main(config_path=CONF_DIR, config_name="synth", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.synth.backend == "local":
        from kat.utils import configure_threads

        configure_threads()
    log.info("config:\n" + OmegaConf.to_yaml(cfg, resolve=True))  # endpoints hold env-var names, never keys
    try:
        report = synth(cfg)
    except EndpointError as e:
        print(f"kat.synth: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("kat.synth: interrupted; every finished item and answered request is saved: run the same command "
              "again to continue", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    path = Path(cfg.synth.output_dir) / "report.json"
    print_report(report)
    log_mlflow(cfg, report, path)
    print(path.resolve(), flush=True)


# ------------------------------------------------------------------------------------------------ pipeline
def pipeline_labels(teacher: str | Path, overrides: Sequence[str], seed: int, out_dir: str | Path, *,
                    parent_run: str | None = None, threads: int | None = None, task_name: str | None = None,
                    timeout_s: float | None = None) -> list[str]:
    """``data.labels=synth`` for kat.pipeline: run ``python -m kat.synth synth=embedded`` with the teacher.

    Writes ``<out_dir>/out/coldstart.jsonl`` (the ColdStart training set: vote labels, rationales, verified
    responses), ``distill.jsonl``, ``heldout.jsonl`` (the synthetic held-out split) and ``report.json``;
    the run's log is ``<out_dir>/stdout.log``. Returns the data overrides of the later steps:
    ``["data=jsonl", "data.path=…/coldstart.jsonl", "data.val_path=…/heldout.jsonl"]``.
    ``overrides`` are extra ``kat.synth`` overrides (e.g. ``synth.input.n_per_level=250``). Raises
    :class:`SynthFailed` with the log's tail when the run fails.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "kat.synth", "synth=embedded", f"model.path={teacher}", f"seed={seed}",
           f"synth.work_dir={out_dir}", *([f"task_name={task_name}"] if task_name else []), *overrides,
           f"hydra.run.dir={out_dir / 'run'}"]
    from kat import tracking

    env = tracking.child_env(parent_run, threads)
    (out_dir / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    log.info(f"[synth] python -m kat.synth {' '.join(cmd[4:])}")
    with (out_dir / "stdout.log").open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s)
    if proc.returncode != 0:
        raise SynthFailed(f"kat.synth failed (exit {proc.returncode}); log: {out_dir / 'stdout.log'}\n"
                          + log_tail(out_dir / "stdout.log"))
    out = out_dir / "out"
    report = json.loads((out / "report.json").read_text())
    if not report.get("outputs", {}).get("coldstart"):
        raise SynthFailed(f"kat.synth produced no ColdStart sample (report: {out / 'report.json'})")
    return ["data=jsonl", f"data.path={out / 'coldstart.jsonl'}", f"data.val_path={out / 'heldout.jsonl'}"]
