"""The sample schema (docs/design.md §3, contract) and whole-file validation.

One JSON object per line. Always required: ``id`` (str or int) and ``messages`` (a non-empty list of
``{"role", "content"}`` whose last entry is from the user). Optional everywhere:

=========  ==============================================================================
field      meaning
=========  ==============================================================================
domain     one of :data:`DOMAINS`
level      difficulty 1..5
answer     gold answer (math: LaTeX without ``$`` or plain text; science: the letter; general: text)
tests      code: Python source with assertions, run after the program
choices    science: the options, in letter order
mode       ``"on"`` / ``"off"``: the cold-start label
judge      the ``<judge>`` rationale
thinking   the ``<think>`` trace
response   the ``<answer>`` text
=========  ==============================================================================

Each stage states which optional fields it needs (:data:`STAGE_REQUIREMENTS`). Loading validates the
*whole* file first and raises :class:`DataValidationError` listing every bad line as ``FILE:LINE: message``;
nothing is skipped silently.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

DOMAINS = ("math", "code", "science", "general", "multiturn", "tool")
ROLES = ("system", "user", "assistant", "tool")
MODES = ("on", "off")

#: optional fields and the Python types they may hold
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "domain": (str,),
    "level": (int,),
    "answer": (str,),
    "tests": (str,),
    "choices": (list,),
    "mode": (str,),
    "judge": (str,),
    "thinking": (str,),
    "response": (str,),
}

#: what each consumer needs beyond id and messages. "answer|tests" = at least one of them.
STAGE_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "any": (),
    "distill": ("mode", "response"),
    "coldstart": ("mode", "judge", "response"),
    "teacher": ("response",),  # forced-mode teacher SFT: both modes, so thinking is needed too (checked below)
    "rl": ("domain", "answer|tests"),
    "eval": ("domain", "answer|tests"),
}


class DataValidationError(ValueError):
    """Raised with every bad line of a file, one ``FILE:LINE: message`` per line."""

    headline = "invalid sample(s)"  # "<count> <headline>:" opens the message

    def __init__(self, errors: list[str]):
        self.errors = errors
        shown = errors[:50]
        more = f"\n... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{len(errors)} {self.headline}:\n" + "\n".join(shown) + more)


def sample_errors(obj: Any, stage: str = "any") -> list[str]:
    """Problems with one decoded sample for ``stage`` (empty list when valid)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    errs: list[str] = []
    if "id" not in obj:
        errs.append("missing field 'id'")
    elif not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        errs.append(f"field 'id' must be a string or integer, got {type(obj['id']).__name__}")
    msgs = obj.get("messages")
    if msgs is None:
        errs.append("missing field 'messages'")
    elif not isinstance(msgs, list) or not msgs:
        errs.append("field 'messages' must be a non-empty list")
    else:
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
                errs.append(f"messages[{k}] must be {{'role': one of {list(ROLES)}, 'content': str}}")
        if isinstance(msgs[-1], dict) and msgs[-1].get("role") != "user":
            errs.append("the last message must be from the user")
    for name, types in FIELD_TYPES.items():
        if name in obj and obj[name] is not None:
            v = obj[name]
            if not isinstance(v, types) or (name == "level" and isinstance(v, bool)):
                errs.append(f"field '{name}' must be {'/'.join(t.__name__ for t in types)}, got {type(v).__name__}")
    if isinstance(obj.get("domain"), str) and obj["domain"] not in DOMAINS:
        errs.append(f"unknown domain {obj['domain']!r} (known: {', '.join(DOMAINS)})")
    if isinstance(obj.get("level"), int) and not isinstance(obj["level"], bool) and not 1 <= obj["level"] <= 5:
        errs.append(f"field 'level' must be in 1..5, got {obj['level']}")
    if isinstance(obj.get("mode"), str) and obj["mode"] not in MODES:
        errs.append(f"field 'mode' must be 'on' or 'off', got {obj['mode']!r}")
    if isinstance(obj.get("choices"), list) and not all(isinstance(c, str) for c in obj["choices"]):
        errs.append("field 'choices' must be a list of strings")

    try:
        required = STAGE_REQUIREMENTS[stage]
    except KeyError:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGE_REQUIREMENTS)})") from None
    for req in required:
        alts = req.split("|")
        if all(obj.get(a) is None for a in alts):
            errs.append(f"missing field {' or '.join(repr(a) for a in alts)} (needed for {stage})")
    needs_thinking = (stage in ("coldstart", "distill") and obj.get("mode") == "on") or stage == "teacher"
    if needs_thinking and obj.get("thinking") is None:
        errs.append(f"missing field 'thinking' (needed for {stage} with mode 'on')")
    return errs


def validate_records(records: Iterable[tuple[str, Any]], stage: str = "any") -> tuple[list[dict], list[str]]:
    """Validate ``(location, obj)`` pairs; return the samples and ``location: message`` errors."""
    samples, errors, seen = [], [], {}
    for loc, obj in records:
        if isinstance(obj, _Malformed):
            errors.append(f"{loc}: {obj.msg}")
            continue
        errs = sample_errors(obj, stage)
        if not errs and str(obj["id"]) in seen:
            errs = [f"duplicate id {obj['id']!r} (first at {seen[str(obj['id'])]})"]
        if errs:
            errors.extend(f"{loc}: {e}" for e in errs)
        else:
            seen[str(obj["id"])] = loc
            samples.append(obj)
    return samples, errors


def load_samples(path: str | Path, stage: str = "any") -> list[dict]:
    """Read and validate a JSONL (``.jsonl``/``.json``) or Parquet file of samples.

    Every line is checked before anything is returned; all problems are reported together as
    ``FILE:LINE: message`` in one :class:`DataValidationError`. Parquet rows are numbered from 1.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path} (set data.path=...)")
    if path.suffix == ".parquet":
        import datasets

        ds = datasets.Dataset.from_parquet(str(path))
        records = [(f"{path}:{i + 1}", dict(row)) for i, row in enumerate(ds)]
    else:
        records = []
        with path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{path}:{lineno}", json.loads(line)))
                except json.JSONDecodeError as e:
                    records.append((f"{path}:{lineno}", _Malformed(f"malformed JSON: {e.msg} (column {e.colno})")))
    samples, errors = validate_records(records, stage)
    if errors:
        raise DataValidationError(errors)
    if not samples:
        raise DataValidationError([f"{path}: no samples"])
    return samples


class _Malformed:
    def __init__(self, msg: str):
        self.msg = msg


def write_jsonl(path: str | Path, samples: Iterable[dict]) -> Path:
    """Write samples, one JSON object per line (atomically: a crash never leaves a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def prompt_messages(sample: dict) -> list[dict]:
    """The conversation the model sees (everything up to and including the last user turn)."""
    return [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]
