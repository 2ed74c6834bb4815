"""Samples -> tokenized batches for every stage.

``build_datamodule(data_cfg, tokenizer, stage)`` reads the ``data`` config group:

* ``data=synthetic``: the embedded suite (kat.data.synthetic), train and held-out splits.
* ``data=jsonl data.path=FILE``: a local JSONL/Parquet file in the sample schema, validated whole
  before training (every bad line reported as ``FILE:LINE: message``); held-out items from
  ``data.val_path`` or a seeded ``data.val_fraction`` of the file.
* ``data=mix``: weighted sources resampled to target shares per domain, level and mode (kat.data.mix).

What a training example looks like depends on ``data.template`` (default: the stage's):

* ``coldstart``: prompt (no loss) + ``<judge>…</judge><think_on|off>…<answer>…</answer>`` + EOS
* ``distill``: prompt + trigger ``<think_on|off>`` (no loss) + ``<think>…</think><answer>…</answer>`` + EOS
* ``prompt`` (RL): raw samples; the stage renders and generates.

``data.modes`` picks the modes: ``label`` (the sample's ``mode``), ``both`` (one example per mode:
forced-mode teacher SFT), ``on`` or ``off``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kat.data import mix as mixing
from kat.data import directives, schema, synthetic, templates
from kat.models.tokenizer import render_prompt
from kat.utils import get_logger

log = get_logger(__name__)

STAGE_TEMPLATES = {"coldstart": "coldstart", "distill": "distill", "rl": "prompt", "teacher": "distill"}
IGNORE = -100


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    shares: dict[str, dict[str, float]] | None = None  # realised mix shares (data=mix)


# --------------------------------------------------------------------------------------------- sources
def _label_policy(cfg: Any) -> synthetic.LabelPolicy:
    return synthetic.LabelPolicy(off_share=tuple(cfg["off_share"]), random_mode_rate=float(cfg["random_mode_rate"]))


def _synthetic(cfg: Any, seed: int) -> Splits:
    if cfg["labels"] != "generator":
        raise ValueError(
            f"data.labels={cfg['labels']!r}: data=synthetic generates 'generator' labels only; vote/synth "
            "labels are written to a JSONL file by kat.pipeline or kat.synth and read with data=jsonl"
        )
    sp = synthetic.splits(
        int(cfg.n_train_per_level), int(cfg.n_val_per_level), seed=seed,
        domains=tuple(cfg.domains), labels=_label_policy(cfg), operand_digits=cfg["operand_digits"],
    )
    return Splits(sp.train, sp.val)


def _jsonl(cfg: Any, seed: int, stage: str) -> Splits:
    if not cfg["path"]:
        raise ValueError("data=jsonl needs data.path=FILE (a JSONL or Parquet file in the sample schema)")
    need = {"coldstart": "coldstart", "distill": "distill", "teacher": "teacher", "rl": "rl"}.get(stage, "any")
    train = schema.load_samples(cfg.path, need)
    if cfg["val_path"]:
        val = schema.load_samples(cfg.val_path, "eval")
    else:
        frac = float(cfg["val_fraction"])
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {frac}")
        order = list(range(len(train)))
        random.Random(f"kat-val/{seed}").shuffle(order)
        k = int(round(frac * len(train)))
        held = set(order[:k])
        val = [s for i, s in enumerate(train) if i in held]
        train = [s for i, s in enumerate(train) if i not in held]
        gradable = [s for s in val if not schema.sample_errors(s, "eval")]
        if len(gradable) < len(val):
            log.warning(f"{len(val) - len(gradable)} held-out samples lack domain/answer/tests and are not graded")
        val = gradable
    return Splits(train, val)


def load_splits(cfg: Any, stage: str, seed: int) -> Splits:
    """Train and held-out samples for ``data`` config ``cfg``."""
    name = cfg["name"]
    if name == "synthetic":
        return _synthetic(cfg, seed)
    if name == "jsonl":
        return _jsonl(cfg, seed, stage)
    if name == "mix":
        sources, vals = [], []
        for k, src in enumerate(cfg.sources):
            kind = src.get("name")
            if kind not in ("synthetic", "jsonl"):
                raise ValueError(f"data.sources[{k}].name must be synthetic or jsonl, got {kind!r}")
            sub = dict(cfg.synthetic) if kind == "synthetic" else {"val_path": None, "val_fraction": 0.0}
            sub.update({key: v for key, v in src.items() if key != "weight"})
            sp = load_splits(sub, stage, seed)
            sources.append((f"{k}:{kind}", sp.train, float(src.get("weight", 1.0))))
            vals.extend(sp.val)
        targets = {axis: (dict(v) if v else None) for axis, v in cfg.shares.items()}
        train, realised = mixing.mix(sources, size=int(cfg.size), targets=targets, seed=seed)
        for axis, sh in realised.items():
            log.info(f"data mix realised {axis} shares: " + ", ".join(f"{k}={v:.3f}" for k, v in sh.items()))
        return Splits(train, vals, realised)
    raise ValueError(f"data.name must be synthetic, jsonl or mix, got {name!r}")


# ------------------------------------------------------------------------------------------- examples
def encode_example(tokenizer, sample: dict, template: str, mode: str, max_length: int) -> dict | None:
    """Token ids and labels (``-100`` where no loss) for one sample in one mode; None when too long."""
    prompt = render_prompt(tokenizer, schema.prompt_messages(sample))
    thinking = sample.get("thinking")
    if template == "coldstart":
        judge = sample.get("judge") or ""
        prefix, target = prompt, templates.coldstart_target(mode, judge, thinking, sample["response"])
    elif template == "distill":
        trigger, target = templates.distill_target(mode, thinking, sample["response"])
        prefix = prompt + trigger  # the trigger token is input only: never a loss target
    else:
        raise ValueError(f"data.template must be coldstart, distill or prompt, got {template!r}")
    p_ids = tokenizer.encode(prefix, add_special_tokens=False)
    t_ids = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(p_ids) + len(t_ids) > max_length:
        return None
    return {"input_ids": p_ids + t_ids, "labels": [IGNORE] * len(p_ids) + t_ids, "n_prompt": len(p_ids)}


def build_examples(tokenizer, samples: Sequence[dict], *, template: str, modes: str, max_length: int,
                   on_overlong: str = "error") -> list[dict]:
    """Encode ``samples``; ``modes`` = label | both | on | off. Over-long samples: error or drop (counted)."""
    out, too_long = [], []
    for s in samples:
        if modes == "label":
            ms = [s.get("mode")]
            if ms[0] not in ("on", "off"):
                raise ValueError(f"sample {s.get('id')!r} has no mode label (data.modes=label needs 'mode')")
        elif modes == "both":
            ms = ["on", "off"]
        elif modes in ("on", "off"):
            ms = [modes]
        else:
            raise ValueError(f"data.modes must be label, both, on or off, got {modes!r}")
        for m in ms:
            ex = encode_example(tokenizer, s, template, m, max_length)
            if ex is None:
                too_long.append(s.get("id"))
            else:
                ex["mode"] = m
                out.append(ex)
    if too_long:
        msg = (f"{len(too_long)} example(s) exceed data.max_length={max_length} tokens (first: {too_long[:5]}); "
               "raise data.max_length or set data.on_overlong=drop")
        if on_overlong == "error":
            raise ValueError(msg)
        if on_overlong != "drop":
            raise ValueError(f"data.on_overlong must be error or drop, got {on_overlong!r}")
        log.warning("dropped " + msg)
    if not out:
        raise ValueError("no training examples left after encoding")
    return out


class ListDataset(Dataset):
    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def pad_collate(pad_id: int):
    """Right-pad ``input_ids`` (with ``pad_id``) and ``labels`` (with -100); build the attention mask.

    When every example carries its ``mode``, the batch also holds ``mode_on`` (B,) bool.
    """

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(batch), n), dtype=torch.long)  # (B, T)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if all("mode" in b for b in batch):  # per-example mode (teacher=dual picks its teacher by it)
            out["mode_on"] = torch.tensor([b["mode"] == "on" for b in batch], dtype=torch.bool)  # (B,)
        return out

    return collate


def list_collate(batch: list[dict]) -> list[dict]:
    return batch


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch shuffle, sharded over data-parallel ranks, that can start mid-epoch.

    ``resume_at(epoch, skip)`` makes the next iteration of ``epoch`` skip its first ``skip`` samples
    (per rank), so a run restored from a checkpoint sees exactly the batches an uninterrupted run
    would. Being a DistributedSampler, Lightning keeps it (and calls ``set_epoch``) instead of
    inserting its own.
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, skip: int) -> None:
        self.set_epoch(epoch)
        self._resume = (epoch, skip) if skip > 0 else None

    def __iter__(self):
        indices = list(super().__iter__())
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1]:]
            self._resume = None
        return iter(indices)


class KatDataModule(L.LightningDataModule):
    """Train batches for ``stage`` and held-out samples (raw dicts) for generation-based validation."""

    def __init__(self, cfg: Any, tokenizer, stage: str, seed: int):
        super().__init__()
        self.cfg, self.tokenizer, self.stage, self.seed = cfg, tokenizer, stage, seed
        self.template = cfg.template or STAGE_TEMPLATES.get(stage, "coldstart")
        self.splits: Splits | None = None
        self.train_set: ListDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.splits = load_splits(self.cfg, self.stage, self.seed)
        # user-guided mode switching (kat.data.directives): a no-op unless data.directives lists this stage
        self.splits.train = directives.for_training(
            self.splits.train, self.cfg.directives, stage=self.stage, template=self.template,
            modes=self.cfg.modes, seed=self.seed, tokenizer=self.tokenizer)
        if self.template == "prompt":
            self.train_set = ListDataset(self.splits.train)
        else:
            self.train_set = ListDataset(build_examples(
                self.tokenizer, self.splits.train, template=self.template, modes=self.cfg.modes,
                max_length=int(self.cfg.max_length), on_overlong=self.cfg.on_overlong,
            ))
        log.info(f"data: {len(self.train_set)} training examples ({self.template} template), "
                 f"{len(self.splits.val)} held-out samples")

    @property
    def val_samples(self) -> list[dict]:
        assert self.splits is not None, "call setup() first"
        n = self.cfg.val_limit
        return self.splits.val if not n else self.splits.val[: int(n)]

    def train_dataloader(self) -> DataLoader:
        collate = list_collate if self.template == "prompt" else pad_collate(self.tokenizer.pad_token_id)
        bs = int(self.cfg.batch_size)
        trainer = self.trainer  # None outside a Trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if len(self.train_set) < bs * replicas:
            raise ValueError(f"data.batch_size={bs} x {replicas} rank(s) is larger than the training set "
                             f"({len(self.train_set)} examples)")
        sampler = ResumableSampler(self.train_set, num_replicas=replicas, rank=rank, seed=self.seed)
        if trainer is not None and trainer.lightning_module is not None:  # resume mid-epoch
            consumed = trainer.lightning_module.batches_consumed()
            per_epoch = len(sampler) // bs
            if consumed:
                epoch, skip = divmod(consumed, per_epoch)
                sampler.resume_at(epoch, skip * bs)
                log.info(f"data: resuming at epoch {epoch}, batch {skip} of {per_epoch}", rank_all=False)
        return DataLoader(self.train_set, batch_size=bs, sampler=sampler, collate_fn=collate,
                          num_workers=int(self.cfg.num_workers), drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ListDataset(self.val_samples), batch_size=int(self.cfg.val_batch_size),
                          shuffle=False, collate_fn=list_collate)
