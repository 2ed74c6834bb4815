"""JSONL shards, per-step manifests and settings fingerprints: what makes every step resumable.

Layout of ``synth.work_dir``::

    cache.sqlite                 request cache (kat.synth.cache)
    input/shard-00000.jsonl      the queries, ``input.shard_size`` per shard
    <step>/shard-00000.jsonl     items the step finished (new fields + provenance under "synth")
    <step>/aside-00000.jsonl     items it set aside, with "synth_aside": {step, reason, detail}
    <step>/manifest.json         {"fingerprint", "settings", "complete": [finished shards]}
    out/                         coldstart.jsonl, distill.jsonl, aside.jsonl, heldout.jsonl, report.json

An item is appended (and flushed) the moment the step finishes it, so a crash or Ctrl-C loses nothing
finished; a torn last line (a kill in the middle of a write) is cut off on the next read. On a re-run a
step skips the ids already in its shard and aside files. The fingerprint hashes the step's settings with
the previous step's fingerprint; when it differs from the manifest's, that step's outputs are redone
(the request cache still answers every question asked before).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator


log = logging.getLogger(__name__)  # plain logging: kat.utils would import lightning (slow start-up)


def fingerprint(settings: Any, previous: str = "") -> str:
    """16 hex digits of the SHA-256 of ``settings`` (canonical JSON) chained with ``previous``."""
    blob = json.dumps(settings, sort_keys=True, default=str, ensure_ascii=False) + "|" + previous
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict]:
    """Objects of a JSONL file; with ``repair`` a torn last line is cut off the file (logged)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out: list[dict] = []
    good_end = 0
    pos = 0
    for k, line in enumerate(lines):
        end = pos + len(line) + 1
        last = k == len(lines) - 1
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                if last or (k == len(lines) - 2 and not lines[-1].strip()):
                    if repair:
                        log.warning(f"{path}: cutting a torn last line ({len(line)} bytes) left by an interrupted run")
                        with path.open("r+b") as f:
                            f.truncate(good_end)
                    break
                raise ValueError(f"{path}:{k + 1}: malformed JSON inside a synth shard") from None
            if last:  # complete JSON but no newline: the newline write was interrupted
                if repair:
                    with path.open("ab") as f:
                        f.write(b"\n")
            out.append(obj)
            good_end = end
        pos = end
    return out


class ShardWriter:
    """Appends items to one shard's output and aside files, one flushed line each."""

    def __init__(self, step_dir: Path, shard: str):
        self.out_path = step_dir / f"{shard}.jsonl"
        self.aside_path = step_dir / f"{shard.replace('shard', 'aside')}.jsonl"
        self._out = self.out_path.open("a", encoding="utf-8")
        self._aside = self.aside_path.open("a", encoding="utf-8")

    def write(self, item: dict, *, aside: bool = False) -> None:
        f = self._aside if aside else self._out
        f.write(json.dumps(item, ensure_ascii=False) + "\n")
        f.flush()

    def sync(self) -> None:
        for f in (self._out, self._aside):
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        self.sync()
        self._out.close()
        self._aside.close()


class StepDir:
    """The folder of one step: shards, asides, manifest."""

    def __init__(self, root: Path, name: str):
        self.name = name
        self.dir = root / name
        self.manifest_path = self.dir / "manifest.json"

    def manifest(self) -> dict | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            return None

    def save_manifest(self, m: dict) -> None:
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(m, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(self.manifest_path)

    def prepare(self, fp: str, settings: Any) -> dict:
        """The manifest for fingerprint ``fp``: the existing one, or a fresh folder when settings changed."""
        m = self.manifest()
        if m is not None and m.get("fingerprint") != fp:
            old = m.get("settings")
            changed = _diff_keys(old, settings)
            log.warning(f"step {self.name}: settings changed since the last run in {self.dir} "
                        f"({', '.join(changed) or 'an earlier step'}); redoing this step (answered requests come "
                        "from the request cache)")
            self.reset()
            m = None
        if m is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            m = {"fingerprint": fp, "settings": settings, "complete": []}
            self.save_manifest(m)
        return m

    def reset(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

    def shards(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("shard-*.jsonl"))

    def items(self, shard: str) -> list[dict]:
        return read_jsonl(self.dir / f"{shard}.jsonl")

    def asides(self, shard: str | None = None) -> list[dict]:
        if shard is not None:
            return read_jsonl(self.dir / f"{shard.replace('shard', 'aside')}.jsonl")
        return [x for p in sorted(self.dir.glob("aside-*.jsonl")) for x in read_jsonl(p)]

    def all_items(self) -> Iterator[dict]:
        for s in self.shards():
            yield from self.items(s)

    def done_ids(self, shard: str) -> set[str]:
        ids = set()
        for path in (self.dir / f"{shard}.jsonl", self.dir / f"{shard.replace('shard', 'aside')}.jsonl"):
            ids.update(str(o.get("id")) for o in read_jsonl(path, repair=True))
        return ids


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _diff_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [prefix or "settings"]
