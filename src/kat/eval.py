"""``python -m kat.eval model.path=DIR eval.benchmarks=[...]`` — benchmarks, forced-mode baselines, directive
following, pass@k, and a second checkpoint side by side (docs/eval.md).

For every benchmark (``synthetic`` = the embedded held-out split, or a JSONL/Parquet file in the sample
schema) and every *condition* — the modes of ``eval.mode`` (``auto``: the model writes judge and mode
itself; ``on``/``off``: the mode token is forced after ``</judge>``, the paper's forced-mode baselines)
and, with ``eval.directives=true``, ``directive_on``/``directive_off`` (each prompt with a "think" /
"don't think" directive from ``conf/data/_directives.yaml``, auto mode) — it generates one greedy
completion per prompt, grades it with kat's verifiers and reports, overall, per level and per domain
(:func:`kat.metrics.eval_block`): ``acc`` (greedy pass@1), ``think_on_rate``, ``tokens_mean/p50/p90``
overall and per mode, ``format_error_rate``, ``truncation_rate``, and ``follow_rate`` for the directive
conditions. ``eval.pass_k.k > 0`` adds ``pass_at_k`` (unbiased estimator over ``samples`` temperature
samples per prompt) and ``pass_at_1_sampled`` for the mode conditions.

``eval.compare=DIR`` evaluates a second checkpoint with the same settings; the report then holds its
numbers and ``token_saving_pct = 100 · (1 − tokens_model / tokens_compare)`` per block (Fig. 9 of the
paper: positive = ``model.path`` writes fewer tokens than ``eval.compare``).

Output: one table (rich), ``eval.json`` (path printed as the last line of stdout) and an MLflow run of
its own (``kat.stage=eval``; child of ``$KAT_PARENT_RUN_ID`` when set) with every number as a metric
``eval/{benchmark}/{condition}/{metric}[/{group}]`` (``compare/…`` for the second checkpoint).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kat import metrics, models, tracking
from kat.data import directives as directives_mod
from kat.data import schema, synthetic
from kat.metrics import Record
from kat.rollout.evaluate import FMTS, MODES, complete_and_grade
from kat.config import CONF_DIR
from kat.utils import configure_threads, get_logger

log = get_logger(__name__)



# --------------------------------------------------------------------------------------------- inputs
def bench_name(spec: str) -> str:
    """``synthetic`` or the file's stem, made safe for MLflow metric names."""
    if spec == "synthetic":
        return spec
    return re.sub(r"[^\w.-]", "_", Path(spec).stem) or "bench"


def load_benchmark(spec: str, cfg: Any, seed: int, limit: int | None = None) -> list[dict]:
    """The samples of one benchmark: ``synthetic`` (held-out split) or a file validated for ``eval``."""
    if spec == "synthetic":
        sy = cfg.synthetic
        samples = synthetic.generate(int(sy.n_per_level), seed=seed, split="heldout", domains=tuple(sy.domains),
                                     operand_digits=sy.get("operand_digits"))
    else:
        samples = schema.load_samples(spec, "eval")
    return samples[: int(limit)] if limit else samples


def parse_modes(mode: Any) -> list[str]:
    """``eval.mode``: one of auto|on|off or a list of them."""
    modes = [mode] if isinstance(mode, str) else list(mode)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"eval.mode must be auto, on, off or a list of them, got {mode!r}")
    return list(dict.fromkeys(modes))


def grading_kwargs(reward_cfg: Any) -> dict:
    """``grade_batch`` keyword arguments from the ``reward`` group."""
    rc = OmegaConf.to_container(reward_cfg, resolve=True) if isinstance(reward_cfg, DictConfig) else dict(reward_cfg)
    return {"max_workers": int(rc.get("workers", 2)), "timeout_s": float(rc.get("timeout_s", 5.0)),
            "code_cfg": rc.get("code"), "math_cfg": rc.get("math")}


def pass_k_summary(samples: Sequence[dict], records: Sequence[Record], *, n: int, k: int) -> dict[str, dict]:
    """``pass_at_k`` (unbiased, :func:`kat.metrics.pass_at_k`) and ``pass_at_1_sampled`` (mean share of
    correct samples) per group (``all``, ``level_{k}``, ``domain_{d}``) from ``n`` records per sample
    (prompt-major). Samples whose gold cannot be graded are left out."""
    if len(records) != n * len(samples):
        raise ValueError(f"expected {n} records per sample ({n * len(samples)}), got {len(records)}")
    groups: dict[str, list[tuple[int, int]]] = {"all": []}
    for i, s in enumerate(samples):
        rs = records[i * n : (i + 1) * n]
        if any(r.correct is None for r in rs):
            continue
        nc = (n, sum(bool(r.correct) for r in rs))
        groups["all"].append(nc)
        if s.get("level") is not None:
            groups.setdefault(f"level_{s['level']}", []).append(nc)
        if s.get("domain") is not None:
            groups.setdefault(f"domain_{s['domain']}", []).append(nc)
    out = {}
    for g, ncs in groups.items():
        m = max(1, len(ncs))
        out[g] = {"pass_at_k": sum(metrics.pass_at_k(a, c, k) for a, c in ncs) / m,
                  "pass_at_1_sampled": sum(c / a for a, c in ncs) / m}
    return out


def evaluate_model(model, tokenizer, benches: dict[str, list[dict]], cfg: Any, *, seed: int,
                   directive_cfg: Any = None, grading: dict | None = None) -> dict[str, dict]:
    """``{bench: {condition: {group: metrics}}}`` for one model (see the module docstring)."""
    import torch

    ev = cfg
    modes = parse_modes(ev.mode)
    gen = dict(fmt=str(ev.fmt), max_new_tokens=int(ev.max_new_tokens), max_judge_tokens=int(ev.max_judge_tokens),
               batch_size=int(ev.batch_size), grading=grading)
    pk = ev.get("pass_k") or {}
    k = int(pk.get("k") or 0)
    n = int(pk.get("samples") or k)
    if k and n < k:
        raise ValueError(f"eval.pass_k.samples must be >= eval.pass_k.k, got samples={n}, k={k}")
    out: dict[str, dict] = {}
    for name, samples in benches.items():
        res: dict[str, dict] = {}
        for mode in modes:
            t0 = time.time()
            recs = complete_and_grade(model, tokenizer, samples, mode=mode, **gen)
            res[mode] = metrics.eval_summary(recs)
            if k:
                torch.manual_seed(seed)
                srecs = complete_and_grade(model, tokenizer, samples, mode=mode, num_samples=n, do_sample=True,
                                           temperature=float(pk.get("temperature", 1.0)),
                                           top_p=float(pk.get("top_p", 1.0)), **gen)
                for g, v in pass_k_summary(samples, srecs, n=n, k=k).items():
                    if g in res[mode]:
                        res[mode][g].update(v)
            a = res[mode]["all"]
            log.info(f"[{name}] mode={mode}: acc {a['acc']:.3f}, think-on {a['think_on_rate']:.2f}, "
                     f"tokens {a['tokens_mean']:.1f} (n={a['n']}, {time.time() - t0:.0f}s)")
        if ev.get("directives"):
            if str(ev.fmt) != "coldstart":
                raise ValueError("eval.directives=true needs eval.fmt=coldstart (the model must choose its mode)")
            for d in ("on", "off"):
                t0 = time.time()
                variants = directives_mod.directive_variants(samples, directive_cfg, seed, tokenizer=tokenizer,
                                                             modes=(d,))
                recs = complete_and_grade(model, tokenizer, variants, mode="auto", **gen)
                res[f"directive_{d}"] = metrics.eval_summary(recs, directive=d)
                a = res[f"directive_{d}"]["all"]
                log.info(f"[{name}] directive={d}: follows {a['follow_rate']:.3f}, acc {a['acc']:.3f}, "
                         f"tokens {a['tokens_mean']:.1f} ({time.time() - t0:.0f}s)")
        out[name] = res
    return out


def token_saving(model_res: dict, compare_res: dict) -> dict:
    """``{bench: {condition: {group: pct}}}``: :func:`kat.metrics.token_saving_pct` of each block."""
    out: dict = {}
    for b, conds in model_res.items():
        for c, groups in conds.items():
            for g, m in groups.items():
                base = compare_res.get(b, {}).get(c, {}).get(g)
                if base is not None:
                    out.setdefault(b, {}).setdefault(c, {})[g] = metrics.token_saving_pct(m["tokens_mean"],
                                                                                          base["tokens_mean"])
    return out


# ---------------------------------------------------------------------------------------------- output
def flat_metrics(results: dict, prefix: str) -> dict[str, float]:
    """MLflow names ``{prefix}/{bench}/{condition}/{metric}`` (group ``all``) or ``…/{metric}/{group}``."""
    out = {}
    for b, conds in results.items():
        for c, groups in conds.items():
            for g, m in groups.items():
                items = m.items() if isinstance(m, dict) else [("token_saving_pct", m)]
                for name, v in items:
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        out[f"{prefix}/{b}/{c}/{name}" + ("" if g == "all" else f"/{g}")] = float(v)
    return out


def print_table(report: dict) -> None:
    """One table: a row per (benchmark, condition, level) with every metric family; compare columns."""
    from rich.console import Console
    from rich.table import Table

    res = report["results"]["model"]
    cmp_res = (report["results"].get("compare") or {})
    saving = report.get("token_saving_pct") or {}
    has_pk = any("pass_at_k" in g.get("all", {}) for conds in res.values() for g in conds.values())
    has_dir = any("follow_rate" in g.get("all", {}) for conds in res.values() for g in conds.values())
    title = f"kat.eval — {report['model']}" + (f"  vs  {report['compare']}" if report.get("compare") else "")
    t = Table(title=title, title_justify="left")
    cols = ["bench", "cond", "group", "n", "acc"]
    if has_pk:
        cols.append(f"pass@{report['settings']['pass_k']['k']}")
    cols += ["think-on", "tok mean", "p50", "p90", "tok on", "tok off", "trunc", "fmt err"]
    if has_dir:
        cols.append("follow")
    if cmp_res:
        cols += ["acc (cmp)", "think-on (cmp)", "tok (cmp)", "saving %"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("bench", "cond", "group") else "right")
    for b, conds in res.items():
        for c, groups in conds.items():
            for g, m in groups.items():
                if g.startswith("domain_"):
                    continue  # per-domain numbers are in the JSON and MLflow
                row = [b, c, g.replace("level_", "L"), str(m["n"]), f"{m['acc']:.3f}"]
                if has_pk:
                    row.append(f"{m['pass_at_k']:.3f}" if "pass_at_k" in m else "")
                row += [f"{m['think_on_rate']:.2f}", f"{m['tokens_mean']:.1f}", f"{m['tokens_p50']:.0f}",
                        f"{m['tokens_p90']:.0f}", f"{m.get('tokens_mean_on', 0):.1f}" if m.get("n_on") else "-",
                        f"{m.get('tokens_mean_off', 0):.1f}" if m.get("n_off") else "-",
                        f"{m['truncation_rate']:.3f}", f"{m['format_error_rate']:.3f}"]
                if has_dir:
                    row.append(f"{m['follow_rate']:.3f}" if "follow_rate" in m else "")
                if cmp_res:
                    o = cmp_res.get(b, {}).get(c, {}).get(g)
                    s = saving.get(b, {}).get(c, {}).get(g)
                    row += [f"{o['acc']:.3f}" if o else "", f"{o['think_on_rate']:.2f}" if o else "",
                            f"{o['tokens_mean']:.1f}" if o else "", f"{s:+.1f}" if s is not None else ""]
                t.add_row(*row)
            t.add_section()
    console = Console(width=None if Console().is_terminal else 220)
    console.print(t)


def log_mlflow(cfg: DictConfig, report: dict, json_path: Path) -> str | None:
    """A run of its own in ``task_name`` (child of ``$KAT_PARENT_RUN_ID``): params, every metric, the JSON."""
    lcfg = cfg.logger.mlflow
    if lcfg is None:
        return None
    flat = flat_metrics(report["results"]["model"], "eval")
    if report["results"].get("compare"):
        flat.update(flat_metrics(report["results"]["compare"], "compare"))
        flat.update(flat_metrics(report["token_saving_pct"], "eval"))
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return tracking.log_report_run(cfg, lcfg, stage="eval", run_name_=tracking.run_name("eval", overrides),
                                   metrics=flat, artifact=json_path)


# ------------------------------------------------------------------------------------------------ main
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(model_cfg: Any, device):
    model, tok = models.load(model_cfg)
    return model.to(device), tok


def run(cfg: DictConfig) -> Path:
    """Evaluate ``model.path`` (and ``eval.compare``), write the JSON, print the table, log to MLflow."""
    configure_threads()
    ev = cfg.eval
    parse_modes(ev.mode)  # fail before loading anything
    if str(ev.fmt) not in FMTS:
        raise ValueError(f"eval.fmt must be coldstart or distill, got {ev.fmt!r}")
    if ev.get("directives") and str(ev.fmt) != "coldstart":
        raise ValueError("eval.directives=true needs eval.fmt=coldstart (the model must choose its mode)")
    if str(ev.fmt) == "distill" and "auto" in parse_modes(ev.mode):
        raise ValueError("eval.fmt=distill needs forced modes: set eval.mode=on, off or [on,off]")
    if not ev.benchmarks:
        raise ValueError("eval.benchmarks is empty: give e.g. eval.benchmarks=[synthetic,path/to/file.jsonl]")
    specs = [str(b) for b in ev.benchmarks]
    names = [bench_name(s) for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"eval.benchmarks: two benchmarks share the name(s) {dup}; rename the files")
    seed = int(cfg.seed)
    benches = {n: load_benchmark(s, ev, seed, ev.get("limit")) for n, s in zip(names, specs)}
    grading = grading_kwargs(cfg.reward)
    device = _device(str(ev.device))
    directive_cfg = cfg.directives

    model, tok = _load(cfg.model, device)
    results = {"model": evaluate_model(model, tok, benches, ev, seed=seed, directive_cfg=directive_cfg,
                                       grading=grading)}
    saving = None
    if ev.get("compare"):
        del model
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()
        mcfg = OmegaConf.merge(cfg.model, {"path": str(ev.compare)})
        model, tok = _load(mcfg, device)
        results["compare"] = evaluate_model(model, tok, benches, ev, seed=seed, directive_cfg=directive_cfg,
                                            grading=grading)
        saving = token_saving(results["model"], results["compare"])
    report = {
        "model": str(cfg.model.path),
        "compare": str(ev.compare) if ev.get("compare") else None,
        "benchmarks": {n: {"source": s, "n_items": len(benches[n])} for n, s in zip(names, specs)},
        "settings": {"modes": parse_modes(ev.mode), "fmt": str(ev.fmt), "directives": bool(ev.directives),
                     "max_new_tokens": int(ev.max_new_tokens), "seed": seed, "greedy": True,
                     "pass_k": {"k": int(ev.pass_k.k or 0), "samples": int(ev.pass_k.samples or ev.pass_k.k or 0),
                                "temperature": float(ev.pass_k.temperature), "top_p": float(ev.pass_k.top_p)}},
        "results": results,
        "token_saving_pct": saving,
    }
    out = Path(str(ev.output))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    rid = log_mlflow(cfg, report, out)
    if rid:
        report["mlflow_run_id"] = rid
        out.write_text(json.dumps(report, indent=2) + "\n")
        log.info(f"MLflow run {rid}")
    return out


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = run(cfg)
    print(path.resolve(), flush=True)


if __name__ == "__main__":
    main()
