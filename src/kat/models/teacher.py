"""Distillation teachers (the ``teacher`` config group): the online ones and :func:`build_teacher`.

Three kinds, built by :func:`build_teacher` from ``cfg.teacher``:

* ``teacher=tiny`` (``kind: online``): one HF causal LM run in the training process — no grad, eval
  mode, bf16 on GPU (``dtype: auto``), held outside the LightningModule's parameters and checkpoints.
  ``path: null`` builds an untrained ``tiny_teacher`` from ``teacher.model.arch`` (logged warning).
* ``teacher=dual`` (``kind: dual``): a think-on and a think-off teacher, chosen per example by its mode
  (``batch["mode_on"]``), as the paper distils think-on data from R1 and think-off data from V3.
* ``teacher=offline`` (``kind: offline``): per answer token the top-k log-probs and tail mass written
  once by ``python -m kat.teacher_cache``; no teacher model in memory. The cache format, its writer and
  reader and :class:`~kat.models.topk_cache.OfflineTeacher` are in :mod:`kat.models.topk_cache`.

Vocabulary: teacher and student must share the tokenizer (same vocabulary). When their logit rows
differ only by padding rows (rows past ``len(tokenizer)``, e.g. Qwen2.5 151,936 vs 152,064), the
teacher is sliced to the student's row count and the log says so; a difference inside the tokenizer's
range is an error. A teacher with a *different* tokenizer (online kinds only) is aligned per example
with :mod:`kat.data.align` (``teacher.align: offsets`` — character offsets, default — or ``positional``,
the ULD paper's): each example's prompt and answer text are re-tokenised for the teacher, and ULD is
taken over the aligned row pairs (:meth:`OnlineTeacher.aligned`); ``teacher.align: none`` makes a
foreign tokenizer an error.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kat.models import hf
from kat.models.forward import final_hidden, lm_logits
from kat.models.topk_cache import IGNORE, CacheReader, OfflineTeacher, model_fingerprint, tokenizer_fingerprint
from kat.utils import get_logger

log = get_logger(__name__)


def _get(cfg: Any, key: str, default=None):
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


# ------------------------------------------------------------------------------------------- answer rows
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
def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab()


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
