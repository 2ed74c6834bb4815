"""Stage 2, ColdStart: SFT on the adaptive-thinking templates.

The loss covers judge, mode token, thinking and answer (and the closing EOS), never the prompt:
``<judge>…</judge><think_on><think>…</think><answer>…</answer>`` or
``<judge>…</judge><think_off><answer>…</answer>``. Mode labels come from the data (generator labels,
majority votes or kat.synth). Validation generates greedily on the held-out split and reports
``val/think_on_rate``, ``val/acc`` and ``val/tokens_mean``, overall and per level.

With ``data.template=distill data.modes=both`` and ``stage.module.val.fmt=distill`` the same module is
the forced-mode teacher SFT of the embedded default (trigger token as input, both modes per query).
"""
from __future__ import annotations

from kat.stages.base import KatStage, as_dict


class ColdStart(KatStage):
    @classmethod
    def from_config(cls, cfg, model, tokenizer) -> "ColdStart":
        m = cfg.stage.module
        return cls(model, tokenizer, optim=as_dict(cfg.optim), val=as_dict(m.val))

    def training_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True)
        return out.loss
