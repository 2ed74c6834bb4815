"""Greedy generation on held-out samples, grading against gold, and per-level records.

Used by the stages' validation, by ``kat.pipeline`` and by ``kat.eval``. ``fmt="coldstart"`` prompts
the model as it is deployed (it writes judge and mode itself; ``mode`` may force on/off after
``</judge>``); ``fmt="distill"`` appends the trigger token to the prompt (forced-mode teachers and
stage-1 students).
"""
from __future__ import annotations

from typing import Sequence

from kat import rewards
from kat.data import schema, templates
from kat.metrics import Record
from kat.models.tokenizer import render_prompt
from kat.rollout.hf import Completion, generate


def evaluate(model, tokenizer, samples: Sequence[dict], *, fmt: str = "coldstart", mode: str = "auto",
             max_new_tokens: int = 128, batch_size: int = 128, grade_workers: int = 2,
             timeout_s: float = 5.0) -> tuple[list[Record], list[Completion]]:
    """Generate one greedy completion per sample and grade it; return records and completions."""
    if fmt not in ("coldstart", "distill"):
        raise ValueError(f"fmt must be coldstart or distill, got {fmt!r}")
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"mode must be auto, on or off, got {mode!r}")
    if fmt == "distill" and mode == "auto":
        raise ValueError("distill-format models need a forced mode (on or off)")
    prompts = [render_prompt(tokenizer, schema.prompt_messages(s)) for s in samples]
    if fmt == "distill":
        prompts = [p + templates.mode_token(mode) for p in prompts]
        comps = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    else:
        comps = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         force_mode=None if mode == "auto" else mode)
    scores = rewards.grade_batch(list(samples), [c.text for c in comps], max_workers=grade_workers,
                                 timeout_s=timeout_s).scores
    records = []
    for s, c, score in zip(samples, comps, scores):
        parsed = templates.parse(c.text)
        if fmt == "distill":
            m, ok = mode, templates.answer_block(c.text) is not None
        else:
            m, ok = parsed.mode, parsed.well_formed
        records.append(Record(level=s.get("level"), domain=s.get("domain"), mode=m,
                              correct=None if score is None else score >= 1.0, tokens=c.n_tokens,
                              well_formed=ok, truncated=c.truncated))
    return records, comps
