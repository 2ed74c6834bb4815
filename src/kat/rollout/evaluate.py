"""The one evaluation path: generate → grade → :class:`kat.metrics.Record` per completion.

Used by every stage's validation (``stages/base.py``, the RL stage), by ``kat.pipeline``'s per-level tables and
by ``kat.eval``; the per-level summary of the records is :func:`kat.metrics.summarize` (or, across ranks,
:func:`kat.metrics.level_sums` → all-reduce → :func:`kat.metrics.summary_from_sums`).

``fmt="coldstart"`` prompts the model as it is deployed (it writes judge and mode itself; ``mode`` may force
on/off after ``</judge>``); ``fmt="distill"`` appends the trigger token to the prompt (forced-mode teachers and
stage-1 students). Definitions (docs/design.md, "Evaluation"): a malformed completion counts as wrong; a
completion whose gold answer cannot be parsed is recorded with ``correct=None`` and left out of every rate.
"""
from __future__ import annotations

from typing import Sequence

from kat import rewards
from kat.data import schema, templates
from kat.metrics import Record
from kat.models.tokenizer import render_prompt
from kat.rollout.hf import generate

MODES = ("auto", "on", "off")
FMTS = ("coldstart", "distill")


def complete_and_grade(model, tokenizer, samples: Sequence[dict], *, mode: str = "auto", fmt: str = "coldstart",
                       max_new_tokens: int = 96, max_judge_tokens: int = 64, batch_size: int = 256,
                       num_samples: int = 1, do_sample: bool = False, temperature: float = 1.0,
                       top_p: float = 1.0, grading: dict | None = None) -> list[Record]:
    """Generate ``num_samples`` completions per sample (greedy unless ``do_sample``) and grade them.

    Returns one :class:`Record` per completion, prompt-major (row ``i * num_samples + j``). ``max_new_tokens``
    bounds the whole completion, forced tokens included. ``grading``: keyword arguments of
    :func:`kat.rewards.grade_batch` (``max_workers``, ``timeout_s``, ``code_cfg``, ``math_cfg``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be auto, on or off, got {mode!r}")
    if fmt not in FMTS:
        raise ValueError(f"fmt must be coldstart or distill, got {fmt!r}")
    if fmt == "distill" and mode == "auto":
        raise ValueError("fmt=distill needs forced modes (the trigger token is appended): use mode on or off")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    prompts = [render_prompt(tokenizer, schema.prompt_messages(s)) for s in samples]
    force = None if mode == "auto" else mode
    if fmt == "distill":
        prompts = [p + templates.mode_token(mode) for p in prompts]
        force = None
    comps = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                     temperature=temperature, top_p=top_p, num_return_sequences=num_samples,
                     batch_size=max(1, batch_size // num_samples), force_mode=force, max_judge_tokens=max_judge_tokens)
    rows = [s for s in samples for _ in range(num_samples)]
    scores = rewards.grade_batch(rows, [c.text for c in comps], **(grading or {})).scores
    records = []
    for s, c, score in zip(rows, comps, scores):
        if fmt == "distill":
            m, ok = mode, templates.answer_block(c.text) is not None
        else:
            p = templates.parse(c.text)
            m, ok = p.mode, p.well_formed
        records.append(Record(level=s.get("level"), domain=s.get("domain"), mode=m,
                              correct=None if score is None else score >= 1.0, tokens=c.n_tokens,
                              well_formed=ok, truncated=c.truncated))
    return records
