"""The offline teacher (``teacher=offline``): the top-k cache format, its writer and reader, and the fingerprints
that tie a cache to a teacher, a tokenizer and a data set.

Cache format (docs/distill.md): ``manifest.json`` + ``shard-NNNNN.safetensors``; each shard holds the
tensors ``keys`` uint8 (E, 16) (blake2b of the example's input ids and labels), ``offsets`` int64
(E+1,), ``ids`` int32 (R, k), ``logprobs`` fp16|fp32 (R, k) (descending, at the manifest's
temperature), ``tail`` fp32 (R,) = 1 − Σ exp(top-k). Rows of an example are its answer rows in order:
positions p whose next label ``labels[p+1]`` is not -100 (row p predicts token p+1;
:func:`kat.models.teacher.answer_positions`).

* :class:`CacheWriter`: writes shards atomically and records each in the manifest (resumable); used by
  ``python -m kat.teacher_cache``.
* :class:`CacheReader`: opens a finished cache, verifies every shard and returns an example's rows.
* :class:`OfflineTeacher`: the teacher object the distill stage calls (built by
  :func:`kat.models.teacher.build_teacher`); no teacher model in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from kat.utils import get_logger

log = get_logger(__name__)

IGNORE = -100
CACHE_FORMAT = "kat-teacher-topk"
CACHE_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A teacher cache that is missing, incomplete, malformed or does not match the run."""


# ------------------------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the sorted vocabulary (token -> id), 16 hex digits."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def model_fingerprint(model, path: str | None = None) -> str:
    """sha256 of a checkpoint dir's ``config.json`` and weight files, or of the in-memory weights
    (untrained models built from config), 16 hex digits."""
    h = hashlib.sha256()
    if path:
        p = Path(path)
        files = [p / "config.json", *sorted(p.glob("*.safetensors")), *sorted(p.glob("*.bin"))]
        files = [f for f in files if f.name not in ("mtp_heads.safetensors",) and f.exists()]
        for f in files:
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        return "dir:" + h.hexdigest()[:16]
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return "weights:" + h.hexdigest()[:16]


def example_key(input_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> bytes:
    """16-byte blake2b of an example's (unpadded) input ids and labels: the cache's lookup key."""
    ids = torch.as_tensor(input_ids, dtype=torch.int32).cpu().numpy().tobytes()
    lab = torch.as_tensor(labels, dtype=torch.int32).cpu().numpy().tobytes()
    return hashlib.blake2b(ids + b"|" + lab, digest_size=16).digest()


def data_fingerprint(examples: Iterable[dict]) -> str:
    """sha256 over the ordered example keys: equal iff the same token sequences in the same order."""
    h = hashlib.sha256()
    n = 0
    for ex in examples:
        h.update(example_key(ex["input_ids"], ex["labels"]))
        n += 1
    return f"{n}:" + h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- cache: write
def shard_name(j: int) -> str:
    return f"shard-{j:05d}.safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


#: manifest fields that must agree between a cache and a run (or a resumed write)
IDENTITY_FIELDS = ("teacher", "tokenizer", "k", "temperature", "data", "vocab_columns", "logprob_dtype")


class CacheWriter:
    """Writes shards atomically and records each finished shard in the manifest (resumable).

    ``identity`` holds the fields of :data:`IDENTITY_FIELDS`; if ``cache_dir`` already has a manifest
    they must be equal (else :class:`CacheError` listing the differences), and the shards it records
    whose files still verify are kept, not recomputed.
    """

    def __init__(self, cache_dir: str | Path, identity: dict, *, n_examples: int, shard_size: int,
                 extra: dict | None = None):
        import fcntl

        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = (self.dir / ".lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CacheError(f"{self.dir}: another kat.teacher_cache process is writing this cache") from None
        if shard_size < 1:
            raise ValueError(f"cache.shard_size must be >= 1, got {shard_size}")
        self.identity = dict(identity)
        self.n_examples = int(n_examples)
        self.shard_size = int(shard_size)
        self.n_shards = (self.n_examples + self.shard_size - 1) // self.shard_size
        self.manifest = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **self.identity,
                         "n_unique_examples": self.n_examples, "shard_size": self.shard_size,
                         "n_shards": self.n_shards, "shards": {}, "complete": False, **(extra or {})}
        path = self.dir / MANIFEST
        if path.exists():
            old = _read_manifest(self.dir)
            diff = _identity_diff(old, self.manifest, fields=(*IDENTITY_FIELDS, "n_unique_examples", "shard_size"))
            if diff:
                raise CacheError(f"{self.dir} holds a cache for another configuration; delete it or choose another "
                                 "cache.dir:\n" + "\n".join(diff))
            for name, rec in old.get("shards", {}).items():
                f = self.dir / name
                if f.exists() and f.stat().st_size == rec.get("bytes") and file_sha256(f) == rec.get("sha256"):
                    self.manifest["shards"][name] = rec
                else:
                    log.warning(f"{f}: recorded in the manifest but missing or corrupt; it will be rewritten")
        for stray in self.dir.glob("*.tmp-*"):  # partial files of an interrupted write
            stray.unlink(missing_ok=True)
        self._save_manifest()

    def pending(self) -> list[int]:
        return [j for j in range(self.n_shards) if shard_name(j) not in self.manifest["shards"]]

    def shard_range(self, j: int) -> tuple[int, int]:
        return j * self.shard_size, min(self.n_examples, (j + 1) * self.shard_size)

    def write_shard(self, j: int, *, keys: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
                    logprobs: torch.Tensor, tail: torch.Tensor) -> None:
        """keys uint8 (E, 16), offsets int64 (E+1,), ids int32 (R, k), logprobs (R, k), tail fp32 (R,)."""
        from safetensors.torch import save_file

        a, b = self.shard_range(j)
        k = int(self.identity["k"])
        R = int(offsets[-1])
        if keys.shape != (b - a, 16) or offsets.shape != (b - a + 1,) or ids.shape != (R, k) \
                or logprobs.shape != (R, k) or tail.shape != (R,):
            raise ValueError(f"shard {j}: inconsistent shapes keys {tuple(keys.shape)} offsets {tuple(offsets.shape)} "
                             f"ids {tuple(ids.shape)} logprobs {tuple(logprobs.shape)} tail {tuple(tail.shape)}")
        name = shard_name(j)
        final = self.dir / name
        tmp = self.dir / f"{name}.tmp-{os.getpid()}"
        save_file({"keys": keys.contiguous(), "offsets": offsets.contiguous(), "ids": ids.contiguous(),
                   "logprobs": logprobs.contiguous(), "tail": tail.contiguous()}, str(tmp),
                  metadata={"format": CACHE_FORMAT})  # one key: multi-key metadata order is not stable
        os.replace(tmp, final)
        self.manifest["shards"][name] = {"first_example": a, "n_examples": b - a, "n_rows": R,
                                         "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        self.manifest["complete"] = not self.pending()
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["shards"] = dict(sorted(self.manifest["shards"].items()))
        _atomic_write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=2) + "\n")

    def close(self) -> None:
        self._lock.close()


def _read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.exists():
        raise CacheError(f"{cache_dir}: no {MANIFEST} (write the cache with python -m kat.teacher_cache)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: malformed JSON ({e})") from e
    if m.get("format") != CACHE_FORMAT or m.get("version") != CACHE_VERSION:
        raise CacheError(f"{path}: not a {CACHE_FORMAT} v{CACHE_VERSION} manifest "
                         f"(format={m.get('format')!r}, version={m.get('version')!r})")
    return m


def _identity_diff(have: dict, want: dict, fields: Iterable[str] = IDENTITY_FIELDS) -> list[str]:
    return [f"  {f}: cache has {have.get(f)!r}, this run has {want.get(f)!r}" for f in fields
            if have.get(f) != want.get(f)]


# ------------------------------------------------------------------------------------------- cache: read
@dataclass
class _Shard:
    name: str
    path: Path
    handle: Any  # safetensors safe_open
    offsets: torch.Tensor  # (E+1,) int64


class CacheReader:
    """Reads a finished cache; every problem is a :class:`CacheError` naming the file.

    ``verify="checksum"`` (default) checks each shard's sha256 against the manifest at open;
    ``"size"`` only its byte size (faster on huge caches; a truncated file still fails).
    """

    def __init__(self, cache_dir: str | Path, *, verify: str = "checksum"):
        from safetensors import safe_open

        if verify not in ("checksum", "size"):
            raise ValueError(f"teacher.verify must be checksum or size, got {verify!r}")
        self.dir = Path(cache_dir)
        if not self.dir.is_dir():
            raise CacheError(f"teacher.cache_dir={str(cache_dir)!r} is not a directory")
        self.manifest = _read_manifest(self.dir)
        m = self.manifest
        done = m.get("shards", {})
        if not m.get("complete") or len(done) != m.get("n_shards"):
            raise CacheError(f"{self.dir}: incomplete cache ({len(done)} of {m.get('n_shards')} shards); run "
                             "python -m kat.teacher_cache again with the same settings to finish it")
        self.k = int(m["k"])
        self.temperature = float(m["temperature"])
        self.shards: list[_Shard] = []
        self.index: dict[bytes, tuple[int, int]] = {}
        for si, (name, rec) in enumerate(sorted(done.items())):
            path = self.dir / name
            if not path.exists():
                raise CacheError(f"teacher cache shard {path} is missing")
            size = path.stat().st_size
            if size != rec.get("bytes"):
                raise CacheError(f"teacher cache shard {path} is truncated or altered: {size} bytes, manifest "
                                 f"says {rec.get('bytes')}")
            if verify == "checksum" and file_sha256(path) != rec.get("sha256"):
                raise CacheError(f"teacher cache shard {path} fails its sha256 check (corrupt or altered)")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = handle.get_tensor("keys")
                offsets = handle.get_tensor("offsets")
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in ("ids", "logprobs", "tail")}
            except Exception as e:
                raise CacheError(f"teacher cache shard {path} is malformed: {e}") from e
            E, R = int(rec["n_examples"]), int(rec["n_rows"])
            ok = (tuple(keys.shape) == (E, 16) and tuple(offsets.shape) == (E + 1,) and int(offsets[0]) == 0
                  and int(offsets[-1]) == R and bool((offsets[1:] >= offsets[:-1]).all())
                  and shapes["ids"] == (R, self.k) and shapes["logprobs"] == (R, self.k) and shapes["tail"] == (R,))
            if not ok:
                raise CacheError(f"teacher cache shard {path} is malformed: keys {tuple(keys.shape)}, offsets "
                                 f"{tuple(offsets.shape)}, {shapes}; manifest says {E} examples, {R} rows, k={self.k}")
            for e, key in enumerate(keys.numpy()):
                self.index.setdefault(bytes(key), (si, e))
            self.shards.append(_Shard(name, path, handle, offsets))
        log.info(f"teacher cache {self.dir}: {len(self.index)} examples in {len(self.shards)} shard(s), k={self.k}, "
                 f"temperature={self.temperature}, teacher={m.get('teacher')}")

    def check(self, *, tokenizer=None, data_fp: str | None = None, temperature: float | None = None,
              k: int | None = None, teacher: Any = None) -> None:
        """Raise :class:`CacheError` listing every field where the cache and the run disagree."""
        m, diff = self.manifest, []
        if tokenizer is not None and m.get("tokenizer") != tokenizer_fingerprint(tokenizer):
            diff.append(f"  tokenizer: cache {m.get('tokenizer')!r}, run {tokenizer_fingerprint(tokenizer)!r}")
        if data_fp is not None and m.get("data") != data_fp:
            diff.append(f"  data: cache {m.get('data')!r} (examples:fingerprint), run {data_fp!r}")
        if temperature is not None and abs(float(m.get("temperature")) - float(temperature)) > 1e-9:
            diff.append(f"  temperature: cache {m.get('temperature')}, run (loss.teacher_temperature) {temperature}")
        if k is not None and int(m.get("k")) != int(k):
            diff.append(f"  k: cache {m.get('k')}, run (teacher.k) {k}")
        if teacher is not None and teacher not in (m.get("teacher"), *_values(m.get("teacher"))):
            diff.append(f"  teacher: cache {m.get('teacher')!r}, run (teacher.expect_teacher) {teacher!r}")
        if diff:
            raise CacheError(f"teacher cache {self.dir} does not match this run:\n" + "\n".join(diff))

    def rows(self, examples: Sequence[tuple[torch.Tensor, torch.Tensor]], *, with_ids: bool = False):
        """Concatenated answer rows of ``examples`` [(input_ids (L,), labels (L,)), …] in order.

        Returns ``logprobs`` (N, k) fp32, ``tail`` (N,) fp32 and, with ``with_ids``, ``ids`` (N, k) int64.
        """
        lps, tails, idss = [], [], []
        for n, (ids, labels) in enumerate(examples):
            key = example_key(ids, labels)
            hit = self.index.get(key)
            if hit is None:
                raise CacheError(f"teacher cache {self.dir}: example {n} of the batch (length {len(ids)}) is not in "
                                 "the cache; was it written for this data, template and tokenizer?")
            sh = self.shards[hit[0]]
            a, b = int(sh.offsets[hit[1]]), int(sh.offsets[hit[1] + 1])
            want = int((labels[1:] != IGNORE).sum())
            if b - a != want:
                raise CacheError(f"teacher cache shard {sh.path}: example {hit[1]} has {b - a} rows, the batch "
                                 f"example has {want} answer tokens")
            try:
                lp = sh.handle.get_slice("logprobs")[a:b].float()
                tl = sh.handle.get_slice("tail")[a:b].float()
                ti = sh.handle.get_slice("ids")[a:b].long() if with_ids else None
            except Exception as e:
                raise CacheError(f"teacher cache shard {sh.path} is unreadable: {e}") from e
            _check_rows(sh.path, hit[1], lp, tl, self.k)
            lps.append(lp)
            tails.append(tl)
            if with_ids:
                idss.append(ti)
        lp = torch.cat(lps) if lps else torch.zeros(0, self.k)
        tl = torch.cat(tails) if tails else torch.zeros(0)
        if with_ids:
            return lp, tl, (torch.cat(idss) if idss else torch.zeros(0, self.k, dtype=torch.long))
        return lp, tl


def _values(x: Any) -> tuple:
    return tuple(x.values()) if isinstance(x, dict) else ()


def _check_rows(path: Path, example: int, lp: torch.Tensor, tail: torch.Tensor, k: int) -> None:
    """Values a valid shard can hold: finite descending log-probs ≤ 0, tail in [0, 1], mass ≈ 1."""
    bad = None
    if not bool(torch.isfinite(lp).all()) or not bool(torch.isfinite(tail).all()):
        bad = "non-finite values"
    elif bool((lp > 1e-3).any()):
        bad = "log-probs > 0"
    elif bool(((tail < -1e-3) | (tail > 1 + 1e-3)).any()):
        bad = "tail mass outside [0, 1]"
    elif lp.numel() and bool(((lp.exp().sum(-1) + tail - 1).abs() > 2e-2).any()):
        bad = "top-k mass + tail != 1"
    elif k > 1 and lp.numel() and bool((lp[:, 1:] > lp[:, :-1] + 1e-3).any()):
        bad = "log-probs not sorted descending"
    if bad:
        raise CacheError(f"teacher cache shard {path}: example {example} holds invalid rows ({bad})")


class OfflineTeacher:
    """The ``teacher=offline`` kind: top-k log-probs + tail mass per answer row from a :class:`CacheReader`."""

    kind = "offline"

    def __init__(self, reader: CacheReader, *, expect_k: int | None = None, expect_teacher: str | None = None):
        self.reader = reader
        self.expect_k = expect_k
        self.expect_teacher = expect_teacher

    def to(self, device) -> "OfflineTeacher":
        return self

    def fingerprint(self):
        return self.reader.manifest.get("teacher")

    def check(self, *, tokenizer, data_fp: str | None, temperature: float) -> None:
        teacher = self.expect_teacher
        if teacher and Path(str(teacher)).is_dir():
            teacher = model_fingerprint(None, str(teacher))
        self.reader.check(tokenizer=tokenizer, data_fp=data_fp, temperature=temperature, k=self.expect_k,
                          teacher=teacher)

    def topk(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        """Rows for a right-padded batch (B, T): logprobs (N, k) fp32 and tail (N,) fp32 on the batch's device,
        in the order of :func:`kat.models.teacher.answer_positions`."""
        lengths = attention_mask.sum(-1).tolist()
        ex = [(input_ids[b, :n].cpu(), labels[b, :n].cpu()) for b, n in enumerate(lengths)]
        lp, tail = self.reader.rows(ex)
        return lp.to(input_ids.device), tail.to(input_ids.device)

    def flops_per_token(self, T: int) -> float:
        return 0.0
