"""``python -m kat.generate model.path=DIR generate.input=IN.jsonl generate.output=OUT.jsonl`` — batch generation.

Input lines are samples in the schema (``{"id", "messages", …}``, the conversation up to the last user
turn is the prompt) or ``{"prompt": "…"}`` (one user message; ``id`` optional, default ``line-{N}``).
The whole file is checked first; every bad line is reported as ``FILE:LINE: message``.

Each output line is one completion::

    {"id", "sample", "messages", "forced_mode", "completion", "judge", "mode", "thinking", "answer",
     "well_formed", "tokens", "truncated"}

(``completion`` decoded with the special tokens; the parts from :func:`kat.data.templates.parse`;
``mode`` is the parsed mode, ``forced_mode`` the override or null; ``tokens`` = generated tokens, judge
included.)

Crash safety: lines are appended one batch at a time (flushed and fsynced). A re-run with the same
output resumes: ids with all their ``generate.samples`` lines are skipped; a torn last line or an id
with only some of its samples (a crash mid-write) is removed first (the file is rewritten atomically).
A resume with a different ``generate.mode`` or ``generate.samples`` is refused.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from kat.data import schema, templates
from kat.config import CONF_DIR
from kat.utils import get_logger

log = get_logger(__name__)


def read_prompts(path: str | Path) -> list[dict]:
    """``[{"id", "messages"}]`` from a JSONL of samples or ``{"prompt": …}`` lines (every bad line reported)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"generate.input not found: {path}")
    items, errors, seen = [], [], {}
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            loc = f"{path}:{no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{loc}: malformed JSON: {e.msg} (column {e.colno})")
                continue
            if isinstance(obj, dict) and "messages" not in obj and "prompt" in obj:
                if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
                    errors.append(f"{loc}: field 'prompt' must be a non-empty string")
                    continue
                obj = {"id": obj.get("id", f"line-{no}"), "messages": [{"role": "user", "content": obj["prompt"]}]}
            errs = schema.sample_errors(obj, "any")
            if errs:
                errors.extend(f"{loc}: {e}" for e in errs)
                continue
            key = str(obj["id"])
            if key in seen:
                errors.append(f"{loc}: duplicate id {obj['id']!r} (first at {seen[key]})")
                continue
            seen[key] = loc
            items.append({"id": obj["id"], "messages": schema.prompt_messages(obj)})
    if errors:
        raise schema.DataValidationError(errors)
    return items


def resume_state(path: str | Path, *, samples: int, forced_mode: str | None) -> set[str]:
    """Ids already complete in ``path`` (``samples`` lines each). Torn lines and incomplete ids are removed
    (atomic rewrite). Raises ``ValueError`` when the file was written with another mode or sample count."""
    path = Path(path)
    if not path.exists():
        return set()
    good: list[dict] = []
    torn = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(rec, dict) or "id" not in rec:
            torn += 1
            continue
        good.append(rec)
    for rec in good:
        if rec.get("forced_mode") != forced_mode:
            raise ValueError(f"{path} was written with generate.mode={rec.get('forced_mode') or 'auto'}; "
                             f"this run has generate.mode={forced_mode or 'auto'} (use another generate.output)")
        if rec.get("samples_per_prompt", 1) != samples:
            raise ValueError(f"{path} was written with generate.samples={rec.get('samples_per_prompt', 1)}; "
                             f"this run has generate.samples={samples} (use another generate.output)")
    counts: dict[str, int] = {}
    for rec in good:
        counts[str(rec["id"])] = counts.get(str(rec["id"]), 0) + 1
    done = {k for k, c in counts.items() if c == samples}
    keep = [rec for rec in good if str(rec["id"]) in done]
    if torn or len(keep) != len(good):
        log.warning(f"resume: dropping {torn} torn line(s) and {len(good) - len(keep)} line(s) of incomplete ids "
                    f"from {path}")
        schema.write_jsonl(path, keep)
    return done


def completion_record(item: dict, j: int, comp, *, forced_mode: str | None, samples: int) -> dict:
    """One output line for sample ``j`` of ``item``."""
    p = templates.parse(comp.text)
    return {"id": item["id"], "sample": j, "samples_per_prompt": samples, "messages": item["messages"],
            "forced_mode": forced_mode, "completion": comp.text, "judge": p.judge, "mode": p.mode,
            "thinking": p.thinking, "answer": p.answer, "well_formed": p.well_formed, "tokens": comp.n_tokens,
            "truncated": comp.truncated}


def append_records(path: Path, records: list[dict]) -> None:
    """Append lines and make them durable (flush + fsync) before the next batch starts."""
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run(model, tokenizer, cfg: Any) -> Path:
    """Generate completions for every pending prompt of ``cfg.input`` into ``cfg.output``."""
    from kat.rollout import hf as hf_rollout
    from kat.models.tokenizer import render_prompt

    mode = str(cfg.mode)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"generate.mode must be auto, on or off, got {mode!r}")
    samples = int(cfg.samples)
    temp = float(cfg.temperature)
    if samples < 1:
        raise ValueError(f"generate.samples must be >= 1, got {samples}")
    if samples > 1 and temp <= 0:
        raise ValueError("generate.samples > 1 needs generate.temperature > 0 (greedy samples are identical)")
    bs = int(cfg.batch_size)
    if bs < 1:
        raise ValueError(f"generate.batch_size must be >= 1, got {bs}")
    forced = None if mode == "auto" else mode
    items = read_prompts(cfg.input)
    out = Path(str(cfg.output))
    out.parent.mkdir(parents=True, exist_ok=True)
    done = resume_state(out, samples=samples, forced_mode=forced)
    todo = [it for it in items if str(it["id"]) not in done]
    if done:
        log.info(f"resume: {len(done)} of {len(items)} prompts already in {out}; {len(todo)} to go")
    t0 = time.time()
    for b in range(0, len(todo), bs):
        chunk = todo[b : b + bs]
        prompts = [render_prompt(tokenizer, it["messages"]) for it in chunk]
        comps = hf_rollout.generate(model, tokenizer, prompts, max_new_tokens=int(cfg.max_new_tokens),
                                    force_mode=forced, max_judge_tokens=int(cfg.max_judge_tokens),
                                    do_sample=temp > 0, temperature=temp if temp > 0 else 1.0,
                                    top_p=float(cfg.top_p), num_return_sequences=samples,
                                    batch_size=max(1, bs // samples))
        recs = [completion_record(it, j, comps[i * samples + j], forced_mode=forced, samples=samples)
                for i, it in enumerate(chunk) for j in range(samples)]
        append_records(out, recs)
        log.info(f"{min(b + bs, len(todo))}/{len(todo)} prompts written ({time.time() - t0:.0f}s)")
    return out


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from kat import models
    from kat.utils import configure_threads

    configure_threads()
    torch.manual_seed(int(cfg.seed))
    g = cfg.generate
    read_prompts(g.input)  # fail on bad input before loading the model
    dev = str(g.device)
    device = torch.device("cuda" if dev == "auto" and torch.cuda.is_available() else ("cpu" if dev == "auto" else dev))
    model, tok = models.load(cfg.model)
    path = run(model.to(device), tok, g)
    print(Path(path).resolve(), flush=True)


if __name__ == "__main__":
    main()
