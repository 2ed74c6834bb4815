"""Distillation teachers (the ``teacher`` config group) and the offline top-k cache format.

Three kinds, built by :func:`build_teacher` from ``cfg.teacher``:

* ``teacher=tiny`` (``kind: online``): one HF causal LM run in the training process — no grad, eval
  mode, bf16 on GPU (``dtype: auto``), held outside the LightningModule's parameters and checkpoints.
  ``path: null`` builds an untrained ``tiny_teacher`` from ``teacher.model.arch`` (logged warning).
* ``teacher=dual`` (``kind: dual``): a think-on and a think-off teacher, chosen per example by its mode
  (``batch["mode_on"]``), as the paper distils think-on data from R1 and think-off data from V3.
* ``teacher=offline`` (``kind: offline``): per answer token the top-k log-probs and tail mass written
  once by ``python -m kat.teacher_cache`` (:class:`CacheReader`); no teacher model in memory.

Vocabulary: teacher and student must share the tokenizer (same vocabulary). When their logit rows
differ only by padding rows (rows past ``len(tokenizer)``, e.g. Qwen2.5 151,936 vs 152,064), the
teacher is sliced to the student's row count and the log says so; a difference inside the tokenizer's
range is an error. A teacher with a *different* tokenizer (online kinds only) is aligned per example
with :mod:`kat.data.align` (``teacher.align: offsets`` — character offsets, default — or ``positional``,
the ULD paper's): each example's prompt and answer text are re-tokenised for the teacher, and ULD is
taken over the aligned row pairs (:meth:`OnlineTeacher.aligned`); ``teacher.align: none`` makes a
foreign tokenizer an error.

Cache format (docs/distill.md): ``manifest.json`` + ``shard-NNNNN.safetensors``; each shard holds the
tensors ``keys`` uint8 (E, 16) (blake2b of the example's input ids and labels), ``offsets`` int64
(E+1,), ``ids`` int32 (R, k), ``logprobs`` fp16|fp32 (R, k) (descending, at the manifest's
temperature), ``tail`` fp32 (R,) = 1 − Σ exp(top-k). Rows of an example are its answer rows in order:
positions p whose next label ``labels[p+1]`` is not -100 (row p predicts token p+1).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from kat.models import hf
from kat.models.forward import final_hidden, lm_logits
from kat.utils import get_logger

log = get_logger(__name__)

IGNORE = -100
CACHE_FORMAT = "kat-teacher-topk"
CACHE_VERSION = 1
MANIFEST = "manifest.json"


class CacheError(RuntimeError):
    """A teacher cache that is missing, incomplete, malformed or does not match the run."""


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


# ------------------------------------------------------------------------------------------- fingerprints
def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the sorted vocabulary (token -> id), 16 hex digits."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


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


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Rows that carry a loss: positions p with ``labels[..., p+1] != -100``.

    (B, T) -> (N, 2) int64 ``[b, p]`` in row-major order (per example ascending p); (T,) -> (N,).
    The prompt and the trigger token are -100 in the labels, so the row that would predict the
    trigger (and every prompt row) is never selected.
    """
    nxt = torch.full_like(labels, IGNORE)
    nxt[..., :-1] = labels[..., 1:]
    sel = nxt != IGNORE
    if labels.dim() == 1:
        return sel.nonzero().squeeze(-1)
    return sel.nonzero()


# ------------------------------------------------------------------------------------------- vocabulary
def teacher_columns(student_rows: int, teacher_rows: Sequence[int], n_tokens: int) -> int:
    """How many teacher logit columns to keep (see module docstring); logs any slicing."""
    teacher_rows = [int(r) for r in teacher_rows]
    low = min([student_rows, *teacher_rows])
    if low < n_tokens:
        raise ValueError(
            f"vocabulary mismatch: the tokenizer has {n_tokens} tokens but the student has {student_rows} and the "
            f"teacher(s) {teacher_rows} logit rows; with one tokenizer every model needs >= {n_tokens} rows")
    keep = min([student_rows, *teacher_rows])
    if any(r != student_rows for r in teacher_rows):
        log.info(f"teacher logit rows {teacher_rows} vs student {student_rows} (tokenizer {n_tokens}): the extra "
                 f"rows are padding; teacher logits are sliced to the first {keep} columns"
                 + ("; ULD zero-pads the teacher's shorter sorted vector" if keep < student_rows else ""))
    return keep


def _resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    name = str(name or "auto")
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dt = hf.torch_dtype(name)
    if dt == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return dt


# ------------------------------------------------------------------------------------------- online
def load_teacher_model(path: str | None, model_cfg: Any, student_tokenizer):
    """One frozen teacher and its tokenizer: from ``path`` (its own tokenizer, kat's tags added), or an
    untrained model built from ``model_cfg.arch`` with the student's tokenizer (warns)."""
    mcfg = dict(model_cfg or {})
    mcfg["path"] = path
    mcfg["dtype"] = "float32"  # the device decides bf16 at .to() (dtype: auto)
    mcfg.pop("mtp_depth", None)
    if path:
        model, ttok = hf.load(mcfg)
    else:
        if not mcfg.get("arch"):
            raise ValueError("teacher.path is null and teacher.model.arch is empty: set teacher.path=DIR")
        model, ttok = hf.load(mcfg, tokenizer=student_tokenizer)
        log.warning("teacher built from config with random weights (untrained): distillation from it teaches "
                    "nothing useful; set teacher.path to a trained teacher (kat.pipeline does)")
    model.eval()
    model.requires_grad_(False)
    return model, ttok


class OnlineTeacher:
    """One (``online``) or two (``dual``: modes on/off) frozen HF teachers run every step.

    Deliberately not an ``nn.Module``: assigning it to a LightningModule attribute registers nothing,
    so the teacher is excluded from the optimizer, from ``state_dict`` and from checkpoints.
    """

    def __init__(self, models: dict[str, torch.nn.Module], *, columns: int, dtype: str = "auto",
                 paths: dict[str, str | None] | None = None, student_tokenizer=None, teacher_tokenizer=None,
                 align: str = "offsets"):
        if set(models) not in ({"single"}, {"on", "off"}):
            raise ValueError(f"teacher models must be {{'single'}} or {{'on', 'off'}}, got {sorted(models)}")
        if align not in ("offsets", "positional"):
            raise ValueError(f"teacher.align must be offsets, positional or none, got {align!r}")
        self.models = models
        self.kind = "online" if "single" in models else "dual"
        self.columns = int(columns)
        self.dtype_name = dtype
        self.paths = paths or {}
        self.device = torch.device("cpu")
        self._last_on_fraction = 0.5
        #: set when the teacher's tokenizer differs from the student's: rows come from :meth:`aligned`
        self.cross = teacher_tokenizer is not None
        self.student_tokenizer, self.teacher_tokenizer, self.align = student_tokenizer, teacher_tokenizer, align
        if self.cross and student_tokenizer is None:
            raise ValueError("a cross-tokenizer teacher needs the student's tokenizer too")

    def to(self, device: torch.device | str) -> "OnlineTeacher":
        device = torch.device(device)
        dtype = _resolve_dtype(self.dtype_name, device)
        for m in self.models.values():
            m.to(device=device, dtype=dtype)
            m.eval()
        self.device = device
        return self

    def fingerprint(self) -> dict[str, str]:
        return {name: model_fingerprint(m, self.paths.get(name)) for name, m in self.models.items()}

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
               mode_on: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher logits at ``rows`` (N, 2) ``[b, p]`` of the batch: (N, columns) fp32.

        ``dual`` runs the think-on teacher on examples with ``mode_on`` and the think-off teacher on
        the rest (each example is forwarded by exactly one teacher).
        """
        out = torch.empty(rows.shape[0], self.columns, dtype=torch.float32, device=input_ids.device)
        if self.kind == "online":
            groups = [("single", torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device))]
        else:
            if mode_on is None:
                raise ValueError("teacher=dual needs the per-example mode (batch['mode_on']); use the distill "
                                 "template (data.template=distill)")
            mode_on = mode_on.to(device=input_ids.device, dtype=torch.bool)
            groups = [("on", mode_on), ("off", ~mode_on)]
            self._last_on_fraction = float(mode_on.float().mean())
        for name, sel in groups:
            if not bool(sel.any()):
                continue
            model = self.models[name]
            ex = sel.nonzero().squeeze(-1)  # (B_g,)
            hidden = final_hidden(model, input_ids[ex], attention_mask[ex])  # (B_g, T, d_t), root forward (FSDP-safe)
            # rows belonging to this group's examples, mapped to the sub-batch index
            where = sel[rows[:, 0]]  # (N,)
            if not bool(where.any()):
                continue
            local = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            local[ex] = torch.arange(ex.numel(), device=input_ids.device)
            r = rows[where]
            h = hidden[local[r[:, 0]], r[:, 1]]  # (N_g, d_t)
            out[where] = lm_logits(model, h)[:, : self.columns].float()
        return out

    @torch.no_grad()
    def aligned(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, depth: int,
                mode_on: torch.Tensor | None = None) -> dict:
        """Cross-tokenizer rows for a right-padded student batch (B, T) and MTP depths 0..``depth``.

        Per example: the answer span is the labelled suffix (one contiguous span, EOS last); its text is
        decoded with the student tokenizer, the prompt text and the answer text are tokenised separately
        for the teacher (so the teacher's answer starts at a known index), and rows are paired with
        :func:`kat.data.align.offset_rows` (or ``positional_rows``); the rows predicting EOS are paired
        explicitly. Returns ``{"logits": (U, V_t) fp32, "pairs": [(b (P_k,), i (P_k,), u (P_k,)) per depth]}``:
        student position ``(b, i)`` of depth k is compared with teacher row ``u``.
        """
        from kat.data import align as A

        s_tok, t_tok = self.student_tokenizer, self.teacher_tokenizer
        seqs: list[list[int]] = []
        per_depth: list[list[tuple[int, int, int, int]]] = [[] for _ in range(depth + 1)]  # (b, i, b, t_row)
        for b in range(input_ids.shape[0]):
            L = int(attention_mask[b].sum())
            ids, lab = input_ids[b, :L].tolist(), labels[b, :L].tolist()
            ans = [i for i, x in enumerate(lab) if x != IGNORE]
            if not ans or ans != list(range(ans[0], L)) or ans[0] < 1:
                raise ValueError(f"cross-tokenizer distillation needs one labelled answer span at the end of each "
                                 f"example after a non-empty prompt (example {b} of the batch)")
            a = ans[0]
            eos = ids[-1] == s_tok.eos_token_id
            body = ids[a: L - 1] if eos else ids[a:L]
            prompt_text, answer_text = s_tok.decode(ids[:a]), s_tok.decode(body)
            s_ids, s_off = A.encode_answer(s_tok, answer_text)
            if s_ids != body:
                raise ValueError(f"example {b}: the student tokenizer does not re-encode its decoded answer to the same "
                                 "ids; offsets cannot be aligned (is the tokenizer lossy on this text?)")
            t_prompt = t_tok.encode(prompt_text, add_special_tokens=False)
            t_ids, t_off = A.encode_answer(t_tok, answer_text)
            seqs.append(t_prompt + t_ids + ([t_tok.eos_token_id] if eos else []))
            for k in range(depth + 1):
                if self.align == "offsets":
                    r = A.offset_rows(s_off, t_off, student_answer_start=a, teacher_answer_start=len(t_prompt), depth=k)
                else:
                    r = A.positional_rows(len(s_ids), len(t_ids), student_answer_start=a,
                                          teacher_answer_start=len(t_prompt), depth=k)
                rows = list(zip(r.student_rows.tolist(), r.teacher_rows.tolist()))
                if eos and a + len(body) - 1 - k >= 0:  # the rows that predict EOS
                    rows.append((a + len(body) - 1 - k, len(t_prompt) + len(t_ids) - 1))
                per_depth[k].extend((b, i, b, t) for i, t in rows)
        # teacher batch (right-padded) and the union of the teacher rows every depth needs
        n = max(len(q) for q in seqs)
        pad = t_tok.pad_token_id if t_tok.pad_token_id is not None else t_tok.eos_token_id
        t_in = torch.full((len(seqs), n), pad, dtype=torch.long, device=input_ids.device)  # (B, T_t)
        t_mask = torch.zeros((len(seqs), n), dtype=torch.long, device=input_ids.device)  # (B, T_t)
        for b, q in enumerate(seqs):
            t_in[b, : len(q)] = torch.tensor(q, device=input_ids.device)
            t_mask[b, : len(q)] = 1
        index: dict[tuple[int, int], int] = {}
        for rows in per_depth:
            for _, _, b, t in rows:
                index.setdefault((b, t), len(index))
        urows = torch.tensor(list(index), dtype=torch.long, device=input_ids.device).reshape(-1, 2)  # (U, 2)
        logits = self.logits(t_in, t_mask, urows, mode_on=mode_on)  # (U, V_t)
        pairs = []
        for rows in per_depth:
            t = torch.tensor([[b, i, index[(tb, tr)]] for b, i, tb, tr in rows], dtype=torch.long,
                             device=input_ids.device).reshape(-1, 3)
            pairs.append((t[:, 0], t[:, 1], t[:, 2]))
        return {"logits": logits, "pairs": pairs}

    def flops_per_token(self, T: int) -> float:
        """2·N_t + 2·L_t·d_t·T (docs/design.md §6); dual: weighted by the last batch's think-on share."""
        def one(m) -> float:
            n = sum(p.numel() for p in m.parameters())
            return 2.0 * n + 2.0 * m.config.num_hidden_layers * m.config.hidden_size * T

        if self.kind == "online":
            return one(self.models["single"])
        f = self._last_on_fraction
        return f * one(self.models["on"]) + (1 - f) * one(self.models["off"])


def build_teacher(teacher_cfg: Any, tokenizer, *, student_rows: int):
    """The teacher for ``cfg.teacher``: :class:`OnlineTeacher` or :class:`OfflineTeacher`."""
    kind = _get(teacher_cfg, "kind")
    if kind == "offline":
        cache_dir = _get(teacher_cfg, "cache_dir")
        if not cache_dir:
            raise ValueError("teacher=offline needs teacher.cache_dir=DIR (written by python -m kat.teacher_cache)")
        reader = CacheReader(cache_dir, verify=_get(teacher_cfg, "verify", "checksum"))
        return OfflineTeacher(reader, expect_k=_get(teacher_cfg, "k"), expect_teacher=_get(teacher_cfg, "expect_teacher"))
    model_cfg = _get(teacher_cfg, "model") or {}
    if kind == "online":
        paths = {"single": _get(teacher_cfg, "path")}
    elif kind == "dual":
        paths = {"on": _get(teacher_cfg, "on_path"), "off": _get(teacher_cfg, "off_path")}
    else:
        raise ValueError(f"teacher.kind must be online, dual or offline, got {kind!r}")
    loaded = {name: load_teacher_model(p, model_cfg, tokenizer) for name, p in paths.items()}
    models = {name: m for name, (m, _) in loaded.items()}
    toks = [t for _, t in loaded.values()]
    rows = [m.get_output_embeddings().weight.shape[0] for m in models.values()]
    dtype = _get(teacher_cfg, "dtype", "auto")
    if all(same_tokenizer(t, tokenizer) for t in toks):
        cols = teacher_columns(student_rows, rows, len(tokenizer))
        return OnlineTeacher(models, columns=cols, dtype=dtype, paths=paths)
    align = str(_get(teacher_cfg, "align", "offsets") or "none")
    fps = ", ".join(tokenizer_fingerprint(t) for t in toks)
    if align == "none":
        raise ValueError(f"the teacher's tokenizer ({fps}) differs from the student's "
                         f"({tokenizer_fingerprint(tokenizer)}) and teacher.align=none; set teacher.align=offsets or "
                         "positional (kat.data.align) or use a teacher with the student's tokenizer")
    if len(toks) > 1 and not same_tokenizer(toks[0], toks[1]):
        raise ValueError("teacher=dual with a foreign tokenizer: both teachers must share one tokenizer")
    cols = len(toks[0])  # the teacher's own vocabulary; rows past it are padding
    if min(rows) < cols:
        raise ValueError(f"teacher logit rows {rows} are fewer than its tokenizer's {cols} tokens")
    if max(rows) > cols:
        log.info(f"teacher logit rows {rows}: the rows past its tokenizer's {cols} tokens are padding, sliced off")
    log.info(f"teacher tokenizer {fps} differs from the student's ({tokenizer_fingerprint(tokenizer)}): ULD on "
             f"rows aligned by kat.data.align ({align}); {cols} teacher columns vs {student_rows} student rows")
    return OnlineTeacher(models, columns=cols, dtype=dtype, paths=paths, student_tokenizer=tokenizer,
                         teacher_tokenizer=toks[0], align=align)


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
        in the order of :func:`answer_positions`."""
        lengths = attention_mask.sum(-1).tolist()
        ex = [(input_ids[b, :n].cpu(), labels[b, :n].cpu()) for b, n in enumerate(lengths)]
        lp, tail = self.reader.rows(ex)
        return lp.to(input_ids.device), tail.to(input_ids.device)

    def flops_per_token(self, T: int) -> float:
        return 0.0
