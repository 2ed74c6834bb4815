"""``python -m kat.data.convert FORMAT IN OUT`` — common benchmark files into kat's sample schema.

Local files only (no downloads). Every converter reads rows (JSONL, a JSON array, Parquet or CSV by file
suffix), checks each for the fields its format needs, and the output is validated for evaluation
(:data:`kat.data.schema.STAGE_REQUIREMENTS` ``eval``: ``domain`` and ``answer`` or ``tests``) before it
is written; all problems are reported together as ``FILE:ROW: message``.

=========  ===================================================  ============================================
format     input fields                                         output
=========  ===================================================  ============================================
gsm8k      ``question``, ``answer`` ("… #### 42")                math; answer = the text after ``####``
                                                                (thousands commas removed)
math500    ``problem``, ``answer`` (or ``solution`` with a      math; ``level`` from ``level`` (1..5 or
           ``\\boxed{}``), ``level``, ``unique_id``               "Level 3"); id = ``unique_id``
aime       ``problem``, ``answer``, ``id``, ``year`` (any case)   math; integer answers without leading zeros
humaneval  ``task_id``, ``prompt``, ``test``, ``entry_point``     code; the completion is the *whole* function
                                                                (with its imports); tests = ``test`` +
                                                                ``check(entry_point)``
mbpp       ``task_id``, ``text``, ``test_list``,                code; the prompt shows the asserts (they name
           ``test_setup_code``                                  the function); tests = setup + asserts
gpqa       CSV ``Question``, ``Correct Answer``,                 science; the four options shuffled per row,
           ``Incorrect Answer 1..3``, ``Record ID``              seeded by (``--seed``, record id); ``choices``
                                                                in letter order, answer = the letter
=========  ===================================================  ============================================
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Callable

from kat.data import schema

LETTERS = "ABCD"


class ConvertError(schema.DataValidationError):
    """Raised with every bad input row, one ``FILE:ROW: message`` per line."""

    headline = "row(s) cannot be converted"


class RowError(ValueError):
    """One row lacks or mistypes a field (message names the field)."""


# ------------------------------------------------------------------------------------------------ reading
def read_rows(path: str | Path) -> list[dict]:
    """Rows of a ``.jsonl``/``.json`` (JSON lines or one JSON array), ``.parquet`` or ``.csv`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ConvertError([f"{path}: expected a JSON array of objects"])
        return rows
    rows, errors = [], []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            errors.append(f"{path}:{no}: malformed JSON: {e.msg} (column {e.colno})")
    if errors:
        raise ConvertError(errors)
    return rows


def _field(row: dict, *names: str, required: bool = True) -> Any:
    """The first present, non-empty field among ``names`` (case-insensitive)."""
    lower = {str(k).lower(): v for k, v in row.items()}
    for n in names:
        v = lower.get(n.lower())
        if v is not None and not (isinstance(v, str) and not v.strip()) and not (isinstance(v, float) and v != v):
            return v
    if required:
        raise RowError(f"missing field {' / '.join(repr(n) for n in names)}")
    return None


def _str(row: dict, *names: str) -> str:
    v = _field(row, *names)
    if not isinstance(v, (str, int, float)):
        raise RowError(f"field {names[0]!r} must be a string, got {type(v).__name__}")
    return str(v)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------------------------- answers
def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after ``####``, thousands commas removed."""
    if "####" not in solution:
        raise RowError("field 'answer' has no '#### <number>' final answer")
    ans = solution.rsplit("####", 1)[1].strip()
    ans = re.sub(r"(?<=\d),(?=\d{3}\b)", "", ans).strip().rstrip(".")
    if not ans:
        raise RowError("field 'answer' has an empty '####' final answer")
    return ans


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` (or ``\\fbox{…}``) in ``text``, braces balanced; None if absent."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def math_level(value: Any) -> int | None:
    """1..5 from ``3``, ``"3"`` or ``"Level 3"``; None for anything else (e.g. ``"Level ?"``)."""
    if value is None:
        return None
    m = re.search(r"[1-5]", str(value))
    return int(m.group()) if m and re.fullmatch(r"\s*(level\s*)?[1-5]\s*", str(value), re.I) else None


# -------------------------------------------------------------------------------------------- converters
def convert_gsm8k(row: dict, i: int, seed: int) -> dict:
    return {"id": str(_field(row, "id", required=False) or f"gsm8k-{i}"), "messages": _user(_str(row, "question")),
            "domain": "math", "answer": gsm8k_answer(_str(row, "answer"))}


def convert_math500(row: dict, i: int, seed: int) -> dict:
    answer = _field(row, "answer", required=False)
    if answer is None:
        sol = _field(row, "solution", required=False)
        answer = last_boxed(str(sol)) if sol is not None else None
        if not answer:
            raise RowError("missing field 'answer' (and no \\boxed{} answer in 'solution')")
    out = {"id": str(_field(row, "unique_id", "id", required=False) or f"math500-{i}"),
           "messages": _user(_str(row, "problem")), "domain": "math", "answer": str(answer).strip()}
    level = math_level(_field(row, "level", required=False))
    if level is not None:
        out["level"] = level
    return out


def convert_aime(row: dict, i: int, seed: int) -> dict:
    answer = _str(row, "answer").strip()
    if re.fullmatch(r"\d+", answer):
        answer = str(int(answer))
    rid = _field(row, "id", required=False)
    year = _field(row, "year", required=False)
    if rid is None:
        rid = f"aime-{year}-{i}" if year is not None else f"aime-{i}"
    rid = str(rid)
    if year is not None and str(year) not in rid:
        rid = f"{year}-{rid}"
    return {"id": rid, "messages": _user(_str(row, "problem")), "domain": "math", "answer": answer}


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function, "
                         "including the imports it needs.\n\n")


def convert_humaneval(row: dict, i: int, seed: int) -> dict:
    prompt = _str(row, "prompt")
    test = _str(row, "test")
    entry = _str(row, "entry_point").strip()
    if not entry.isidentifier():
        raise RowError(f"field 'entry_point' must be a Python identifier, got {entry!r}")
    return {"id": str(_field(row, "task_id", required=False) or f"humaneval-{i}"),
            "messages": _user(f"{HUMANEVAL_INSTRUCTION}```python\n{prompt.rstrip()}\n```"), "domain": "code",
            "tests": f"{test.rstrip()}\n\n\ncheck({entry})\n"}


def convert_mbpp(row: dict, i: int, seed: int) -> dict:
    tests = _field(row, "test_list")
    if isinstance(tests, str):
        tests = [tests]
    tests = list(tests)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise RowError("field 'test_list' must be a non-empty list of assert strings")
    setup = _field(row, "test_setup_code", required=False)
    text = _str(row, "text", "prompt")
    prompt = f"{text.strip()}\nYour code should pass these tests:\n\n" + "\n".join(t.strip() for t in tests)
    body = (str(setup).rstrip() + "\n" if setup else "") + "\n".join(t.strip() for t in tests) + "\n"
    tid = _field(row, "task_id", required=False)
    return {"id": f"mbpp-{tid}" if tid is not None else f"mbpp-{i}", "messages": _user(prompt), "domain": "code",
            "tests": body}


GPQA_INSTRUCTION = "Answer with the letter of the correct option."


def gpqa_options(correct: str, incorrect: list[str], key: str, seed: int) -> tuple[list[str], str]:
    """The four options in a deterministic shuffled order (seeded by ``seed`` and the row ``key``) and the
    letter of the correct one."""
    opts = [correct, *incorrect]
    order = list(range(len(opts)))
    random.Random(f"kat-gpqa/{seed}/{key}").shuffle(order)
    shuffled = [opts[k] for k in order]
    return shuffled, LETTERS[order.index(0)]


def convert_gpqa(row: dict, i: int, seed: int) -> dict:
    question = _str(row, "Question").strip()
    correct = _str(row, "Correct Answer").strip()
    incorrect = [_str(row, f"Incorrect Answer {k}").strip() for k in (1, 2, 3)]
    record_id = _field(row, "Record ID", "id", required=False)
    rid = str(record_id) if record_id is not None else f"gpqa-{i}"
    # the shuffle key: the record id, else the question (stable when rows are reordered or subset)
    choices, letter = gpqa_options(correct, incorrect, str(record_id) if record_id is not None else question, seed)
    text = question + "\n\n" + "\n".join(f"{LETTERS[k]}) {c}" for k, c in enumerate(choices)) + \
        f"\n\n{GPQA_INSTRUCTION}"
    return {"id": rid, "messages": _user(text), "domain": "science", "answer": letter, "choices": choices}


CONVERTERS: dict[str, Callable[[dict, int, int], dict]] = {
    "gsm8k": convert_gsm8k,
    "math500": convert_math500,
    "aime": convert_aime,
    "humaneval": convert_humaneval,
    "mbpp": convert_mbpp,
    "gpqa": convert_gpqa,
}
ALIASES = {"math": "math500", "math-500": "math500", "human_eval": "humaneval", "gpqa_diamond": "gpqa"}


def convert(fmt: str, rows: list[dict], *, seed: int = 0, source: str = "input") -> list[dict]:
    """Convert ``rows`` of benchmark ``fmt`` into validated samples (every bad row reported at once)."""
    name = ALIASES.get(fmt.lower(), fmt.lower())
    if name not in CONVERTERS:
        raise ValueError(f"unknown FORMAT {fmt!r}; known: {', '.join(CONVERTERS)}")
    fn = CONVERTERS[name]
    records, errors = [], []
    for i, row in enumerate(rows):
        loc = f"{source}:{i + 1}"
        if not isinstance(row, dict):
            errors.append(f"{loc}: expected an object, got {type(row).__name__}")
            continue
        try:
            records.append((loc, fn(row, i, seed)))
        except RowError as e:
            errors.append(f"{loc}: {e}")
    samples, schema_errors = schema.validate_records(records, "eval")
    errors.extend(schema_errors)
    if errors:
        raise ConvertError(errors)
    if not samples:
        raise ConvertError([f"{source}: no rows"])
    return samples


def convert_file(fmt: str, src: str | Path, dst: str | Path, *, seed: int = 0, limit: int | None = None) -> list[dict]:
    """Read ``src``, convert, validate and write ``dst`` (JSONL, atomically); return the samples."""
    rows = read_rows(src)
    if limit:
        rows = rows[:limit]
    samples = convert(fmt, rows, seed=seed, source=str(src))
    schema.write_jsonl(dst, samples)
    return samples


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kat.data.convert",
                                description="Convert a local benchmark file into kat's sample schema (JSONL).")
    p.add_argument("format", help=f"one of: {', '.join(CONVERTERS)}")
    p.add_argument("input", help="the benchmark file (.jsonl, .json, .parquet or .csv)")
    p.add_argument("output", help="the JSONL file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the GPQA option shuffle (default 0)")
    p.add_argument("--limit", type=int, default=None, help="convert only the first N rows")
    a = p.parse_args(argv)
    try:
        samples = convert_file(a.format, a.input, a.output, seed=a.seed, limit=a.limit)
    except (ConvertError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    domains = sorted({s['domain'] for s in samples})
    print(f"wrote {len(samples)} samples ({', '.join(domains)}) to {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
