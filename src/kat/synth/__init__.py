"""``kat.synth`` — dual-regime data construction: raw queries -> Distill and ColdStart data (docs/synth.md).

The chain (the paper's §3.2 and §4.1.1), each step a resumable pass over JSONL shards in the sample schema:
tag (level + domain by an LLM judge) → vote (think-off majority vote of M models × k samples) → judge
(the ``<judge>`` rationale) → direct (think-off responses, reject-sampled) → think (solver → thinker →
critic)
→ assemble (Distill + ColdStart files at the configured mix, and a report logged to MLflow).

Public API:

* ``python -m kat.synth [synth=embedded|openai] [overrides]`` (Hydra, conf/synth.yaml, conf/synth/).
* :func:`kat.synth.run.synth` ``(cfg) -> report dict`` — the chain for a composed config.
* :func:`kat.synth.run.pipeline_labels` ``(teacher, overrides, seed, out_dir, *, parent_run=None,
  threads=None, task_name=None, timeout_s=None) -> list[str]`` — ``data.labels=synth`` for kat.pipeline.
* :class:`kat.synth.endpoints.Broker`, :class:`~kat.synth.endpoints.EndpointConfig`,
  :func:`~kat.synth.endpoints.make_request`, :class:`~kat.synth.endpoints.EndpointError` — talking to
  OpenAI-compatible endpoints or in-process HF models through :class:`kat.synth.cache.RequestCache`.
* :mod:`kat.synth.parsing` — robust parsers of endpoint replies and the bad-answer reasons.

Submodules are imported on first use (``import kat.synth`` is cheap).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "synth": "kat.synth.run", "pipeline_labels": "kat.synth.run", "SynthFailed": "kat.synth.run",
    "Broker": "kat.synth.endpoints", "EndpointConfig": "kat.synth.endpoints", "EndpointError": "kat.synth.endpoints",
    "make_request": "kat.synth.endpoints", "RequestCache": "kat.synth.cache", "BadAnswer": "kat.synth.parsing",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kat.synth' has no attribute {name!r}")
