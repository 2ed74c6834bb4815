"""Stage 1, Distill: CE + ULD from a frozen teacher, with DeepSeek-V3-style MTP depths (docs/distill.md).

Loss per batch (all weights and temperatures under ``loss.*``)::

    L = w_ce·CE_0 + w_uld·ULD_0 + (λ/D)·Σ_{k=1..D} (w_ce·CE_k + w_uld·ULD_k)

* Rows: every position p of example b whose next label ``labels[b, p+1]`` is not -100 (the answer
  tokens and EOS; prompt and the trigger ``<think_on|off>`` are -100, so no row ever predicts them
  and the KD mask is exactly the label mask). N rows per batch.
* Depth 0 (main head) at row p predicts ``t_{p+1}``; CE against it, ULD against the teacher's row p.
* Depth k at student position i = p − k predicts ``t_{i+k+1} = t_{p+1}``: the same target, and the
  teacher row ``i+k = p`` (same tokenizer). This is the "roll + rolled mask" of Megatron-LM's MTP (docs/distill.md §2)
  written as an index shift; rows with p − k < 0 are dropped (never happens with a ≥ k-token prompt).
* A teacher with another tokenizer (online kinds) is paired per example by kat.data.align (character
  offsets by default): CE_k still covers every row, ULD_k the aligned pairs of depth k (student row
  ``main_row − k``, teacher row unchanged), EOS rows paired explicitly.
* CE_k is the mean token CE over the rows (HF's mean); ULD_k the mean over rows of the sorted-L1
  distance between softmax(s/τ_s) and softmax(t/τ_t) (:func:`kat.losses.uld.uld_loss`). With
  ``teacher=offline`` the teacher side is the cached top-k + tail bucket
  (:func:`kat.losses.uld.uld_loss_topk`), whose temperature is fixed by the cache manifest.
* λ follows V3: ``loss.mtp_lambda`` (0.3) until ``loss.mtp_lambda_switch`` × max_steps, then
  ``loss.mtp_lambda_final`` (0.1).

``loss.impl=auto|triton|torch`` picks the ULD implementation (auto: the Triton kernel of
``kat_kernels.uld`` on CUDA, else the torch reference); the choice is logged at fit start and as the
param ``loss/impl_ran``. There is no silent fallback: ``triton`` without CUDA (or TRITON_INTERPRET=1)
is an error.

Logged: ``train/loss``, ``train/ce``, ``train/uld``, ``train/mtp_ce_d{k}``, ``train/mtp_uld_d{k}``,
``train/mtp_lambda``. Validation generates in the distill format with forced modes
(``val.fmt=distill``, ``val.modes=[on, off]``). Export writes the HF model plus the MTP heads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kat.models import forward as forward_lib
from kat.models import mtp as mtp_lib
from kat.models.teacher import OnlineTeacher, answer_positions, build_teacher
from kat.models.topk_cache import OfflineTeacher, data_fingerprint
from kat.trainer import fsdp
from kat.stages.base import KatStage, as_dict
from kat.utils import get_logger
from kat_kernels import interpreter_requested

log = get_logger(__name__)

#: the ``loss.*`` settings of the stage (values: conf/stage/distill.yaml; types: kat.config.schemas.DistillLossConfig)
LOSS_KEYS = ("w_ce", "w_uld", "student_temperature", "teacher_temperature", "mtp_lambda", "mtp_lambda_final",
             "mtp_lambda_switch")


def resolve_uld(impl: str, device: torch.device, *, topk: bool) -> tuple[Callable, str]:
    """The ULD function for ``loss.impl`` on ``device`` and its name (for the log).

    ``auto``: on CUDA the chunked torch form for full teacher logits (measured 2.9x faster than the Triton
    kernel in the 0.5B distill step on an H200, docs/benchmarks.md) and the Triton kernel for a top-k cache;
    the torch reference elsewhere. ``triton``: the kernel, or an error
    when it cannot run (no CUDA and no TRITON_INTERPRET=1, or no kernel for the top-k form). ``chunked``:
    the exact torch computation a block of rows at a time with the gradient formed in forward
    (:func:`kat.losses.uld.uld_loss_chunked`; bounded memory, any device; full-logit teachers only).
    """
    if impl not in ("auto", "triton", "torch", "chunked"):
        raise ValueError(f"loss.impl must be auto, triton, torch or chunked, got {impl!r}")
    if impl == "auto" and device.type == "cuda" and not topk:
        impl = "chunked"
    if impl == "chunked":
        if topk:
            raise RuntimeError("loss.impl=chunked needs full teacher logits; a top-k cache uses auto, triton or torch")
        from kat.losses import uld as ref

        return ref.uld_loss_chunked, "torch chunked (kat.losses.uld.uld_loss_chunked)"
    name = "uld_loss_topk" if topk else "uld_loss"
    can_triton = device.type == "cuda" or interpreter_requested()
    if impl == "triton" or (impl == "auto" and device.type == "cuda"):
        if not can_triton:
            raise RuntimeError("loss.impl=triton needs CUDA (or TRITON_INTERPRET=1 for the slow interpreter); "
                               "use loss.impl=auto or torch on CPU")
        try:
            from kat_kernels import uld as kernel
        except ImportError as e:
            raise RuntimeError(f"loss.impl={impl}: kat_kernels.uld cannot be imported ({e})") from e
        fn = getattr(kernel, name, None)
        if fn is not None:
            return fn, f"triton (kat_kernels.uld.{name})"
        if impl == "triton":
            raise RuntimeError(f"loss.impl=triton: kat_kernels.uld has no {name}; use loss.impl=torch or auto")
        from kat.losses import uld as ref

        return getattr(ref, name), f"torch (kat.losses.uld.{name}; kat_kernels.uld has no {name})"
    from kat.losses import uld as ref

    return getattr(ref, name), f"torch (kat.losses.uld.{name})"


class Distill(KatStage):
    """Distillation LightningModule: ``self.model`` (student), ``self.mtp`` (MTP heads or None),
    ``self.teacher`` (online/dual/offline; not an nn.Module: never trained, never checkpointed)."""

    def __init__(self, model, tokenizer, *, optim: dict, val: dict, teacher, mtp: mtp_lib.MTPHeads | None,
                 loss: dict, impl: str):
        super().__init__(model, tokenizer, optim=optim, val=val)
        self.mtp = mtp
        self.teacher = teacher
        self.loss_cfg = {k: loss[k] for k in LOSS_KEYS}
        for key in ("student_temperature", "teacher_temperature"):
            if float(self.loss_cfg[key]) <= 0:
                raise ValueError(f"loss.{key} must be > 0, got {self.loss_cfg[key]}")
        for key in ("w_ce", "w_uld", "mtp_lambda", "mtp_lambda_final"):
            if float(self.loss_cfg[key]) < 0:
                raise ValueError(f"loss.{key} must be >= 0, got {self.loss_cfg[key]}")
        self.impl = impl
        self._uld: Callable | None = None
        self.uld_impl: str | None = None

    @classmethod
    def from_config(cls, cfg, model, tokenizer) -> "Distill":
        m = cfg.stage.module
        depth = int(cfg.model.mtp_depth)
        heads = mtp_lib.build_heads(model, depth, cfg.model.path)
        rows = model.get_output_embeddings().weight.shape[0]
        teacher = build_teacher(cfg.teacher, tokenizer, student_rows=rows)
        loss = as_dict(cfg.loss)
        module = cls(model, tokenizer, optim=as_dict(cfg.optim), val=as_dict(m.val), teacher=teacher, mtp=heads,
                     loss=loss, impl=str(loss["impl"]))
        log.info(f"Distill: {describe(teacher)}; MTP depth {depth}; loss {module.loss_cfg}")
        return module

    # ------------------------------------------------------------------ setup
    @property
    def depth(self) -> int:
        return 0 if self.mtp is None else self.mtp.depth

    def ensure_uld(self, device: torch.device) -> Callable:
        if self._uld is None:
            self._uld, self.uld_impl = resolve_uld(self.impl, device, topk=isinstance(self.teacher, OfflineTeacher))
            log.info(f"ULD implementation: {self.uld_impl} (loss.impl={self.impl})")
        return self._uld

    def on_fit_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps module modes as they are
        if self.mtp is not None:
            self.mtp.train()
        self.teacher.to(self.device)
        self.ensure_uld(self.device)
        for lg in self.loggers:
            lg.log_hyperparams({"loss/impl_ran": self.uld_impl})
        if isinstance(self.teacher, OfflineTeacher):
            dm = getattr(self.trainer, "datamodule", None)
            items = getattr(getattr(dm, "train_set", None), "items", None)
            if items is None:
                log.warning("teacher=offline: no datamodule examples to fingerprint; only per-example lookups are checked")
            self.teacher.check(tokenizer=self.tokenizer, data_fp=None if items is None else data_fingerprint(items),
                               temperature=float(self.loss_cfg["teacher_temperature"]))

    def teacher_flops_per_token(self, T: int) -> float:
        return float(self.teacher.flops_per_token(T))

    def mtp_lambda(self) -> float:
        c = self.loss_cfg
        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        if total and self.global_step >= float(c["mtp_lambda_switch"]) * total:
            return float(c["mtp_lambda_final"])
        return float(c["mtp_lambda"])

    # ------------------------------------------------------------------ loss
    def student_hidden(self, batch: dict) -> list[torch.Tensor]:
        """Hidden states that feed the shared head: [h^0 (main), norm_1(h^1), …], each (B, T, d)."""
        ids, am = batch["input_ids"], batch["attention_mask"]
        # through the root forward: under FSDP2 it gathers the embedding, final norm and head that the MTP
        # depths and the answer-row head below reuse (kat.models.forward)
        h0 = forward_lib.final_hidden(self.model, ids, am)  # (B, T, d), after the final norm
        if self.mtp is None:
            return [h0]
        return [h0, *self.mtp(self.model, h0, ids, am)]

    def teacher_rows(self, batch: dict, rows: torch.Tensor) -> dict:
        """Teacher side at ``rows`` (N, 2): {"logits": (N, V)} or {"logprobs": (N, k), "tail": (N,)}; a
        cross-tokenizer teacher gives {"logits": (U, V_t), "pairs": per depth (b, i, u)} instead."""
        if isinstance(self.teacher, OfflineTeacher):
            lp, tail = self.teacher.topk(batch["input_ids"], batch["labels"], batch["attention_mask"])
            if lp.shape[0] != rows.shape[0]:
                raise RuntimeError(f"teacher cache gave {lp.shape[0]} rows for {rows.shape[0]} answer tokens")
            return {"logprobs": lp, "tail": tail}
        if self.teacher.device != batch["input_ids"].device:
            self.teacher.to(batch["input_ids"].device)
        if self.teacher.cross:  # another tokenizer: rows paired by kat.data.align, per depth
            return self.teacher.aligned(batch["input_ids"], batch["labels"], batch["attention_mask"], self.depth,
                                        mode_on=batch.get("mode_on"))
        return {"logits": self.teacher.logits(batch["input_ids"], batch["attention_mask"], rows,
                                              mode_on=batch.get("mode_on"))}

    def loss_from_hidden(self, hiddens: list[torch.Tensor], labels: torch.Tensor, rows: torch.Tensor,
                         teacher: dict[str, torch.Tensor], mtp_lambda: float | None = None) -> dict[str, torch.Tensor]:
        """All loss terms from per-depth hidden states (B, T, d), labels (B, T), rows (N, 2) and the
        teacher side at those rows (see :meth:`teacher_rows`)."""
        c = self.loss_cfg
        uld = self.ensure_uld(labels.device)
        targets = labels[rows[:, 0], rows[:, 1] + 1]  # (N,) t_{p+1}
        lam = self.mtp_lambda() if mtp_lambda is None else float(mtp_lambda)
        out: dict[str, torch.Tensor] = {}
        total = None
        D = len(hiddens) - 1
        for k, h in enumerate(hiddens):
            src = rows[:, 1] - k  # student position i = p - k
            keep = src >= 0  # (N,)
            b, i = rows[keep, 0], src[keep]
            s = forward_lib.lm_logits(self.model, h[b, i]).float()  # (N_k, Vs)
            ce = F.cross_entropy(s, targets[keep])
            if "pairs" in teacher:  # cross-tokenizer: ULD on the aligned pairs of this depth only
                pb, pi, pu = teacher["pairs"][k]
                kd = uld(forward_lib.lm_logits(self.model, h[pb, pi]).float(), teacher["logits"][pu],
                         student_temperature=float(c["student_temperature"]),
                         teacher_temperature=float(c["teacher_temperature"]))
            elif "logits" in teacher:
                kd = uld(s, teacher["logits"][keep], student_temperature=float(c["student_temperature"]),
                         teacher_temperature=float(c["teacher_temperature"]))
            else:
                kd = uld(s, teacher["logprobs"][keep], teacher["tail"][keep],
                         student_temperature=float(c["student_temperature"]))
            term = float(c["w_ce"]) * ce + float(c["w_uld"]) * kd
            if k == 0:
                out["ce"], out["uld"] = ce, kd
                total = term
            else:
                out[f"mtp_ce_d{k}"], out[f"mtp_uld_d{k}"] = ce, kd
                total = total + (lam / D) * term
        out["loss"] = total
        return out

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        rows = answer_positions(labels)  # (N, 2)
        if rows.shape[0] == 0:
            raise ValueError("a training batch has no answer tokens (all labels are -100): check data.template")
        teacher = self.teacher_rows(batch, rows)
        return self.loss_from_hidden(self.student_hidden(batch), labels, rows, teacher)

    def training_step(self, batch, batch_idx):
        terms = self.compute_losses(batch)
        self.log("train/loss", terms["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items() if k != "loss"})
        if self.depth:
            self.log("train/mtp_lambda", self.mtp_lambda())
        return terms["loss"]

    # ------------------------------------------------------------------ export
    def fsdp_extra_units(self) -> list[torch.nn.Module]:
        return [] if self.mtp is None else list(self.mtp.depths)

    def frozen_models(self) -> list[torch.nn.Module]:
        models = getattr(self.teacher, "models", {})  # online teachers: {"single"} or {"on", "off"}
        return list({id(m): m for m in models.values()}.values())

    def export(self, directory: str | Path) -> Path:
        """The HF checkpoint (loads in plain transformers) plus ``mtp_heads.safetensors`` beside it.
        Call on every rank (sharded weights are gathered)."""
        out = super().export(directory)
        if self.mtp is not None:
            state = fsdp.full_state_dict(self.mtp)
            if self.trainer.is_global_zero:
                mtp_lib.save_heads(self.mtp, out, state=state)
        return out


def describe(teacher: Any) -> str:
    """One line naming the teacher (for the log)."""
    if isinstance(teacher, OnlineTeacher):
        return f"{teacher.kind} teacher ({', '.join(f'{k}={v}' for k, v in teacher.paths.items())})"
    return f"offline teacher cache {teacher.reader.dir}"
