"""Examples and batches: where the loss is, trigger tokens, modes, over-long samples, sources, mix."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from kat.data import datamodule as D
from kat.data import mix as M
from kat.data import synthetic as S

ITEM = S.generate(1, seed=0, domains=("math",), levels=(3,))[0]


def _decode_targets(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != D.IGNORE])


def test_coldstart_loss_covers_everything_after_the_prompt(char_tokenizer):
    ex = D.encode_example(char_tokenizer, ITEM, "coldstart", "on", 256)
    target = _decode_targets(char_tokenizer, ex)
    assert target == f"<judge>hard</judge><think_on><think>{ITEM['thinking']}</think><answer>{ITEM['response']}" \
                     f"</answer><|endoftext|>"
    prompt = char_tokenizer.decode(ex["input_ids"][: ex["n_prompt"]])
    assert prompt == f"<|user|>{ITEM['messages'][0]['content']}<|end|><|assistant|>"
    assert all(t == D.IGNORE for t in ex["labels"][: ex["n_prompt"]])


@pytest.mark.parametrize("mode", ["on", "off"])
def test_distill_trigger_is_input_never_target(char_tokenizer, mode):
    ex = D.encode_example(char_tokenizer, ITEM, "distill", mode, 256)
    trig = char_tokenizer.convert_tokens_to_ids(f"<think_{mode}>")
    k = ex["input_ids"].index(trig)
    assert k == ex["n_prompt"] - 1  # the last input token
    assert ex["labels"][k] == D.IGNORE
    assert trig not in [t for t in ex["labels"] if t != D.IGNORE]
    target = _decode_targets(char_tokenizer, ex)
    assert target.startswith("<think>" if mode == "on" else "<answer>")


def test_modes_and_overlong(char_tokenizer):
    items = S.generate(2, seed=0, domains=("math",), levels=(5,))
    both = D.build_examples(char_tokenizer, items, template="distill", modes="both", max_length=256)
    assert [e["mode"] for e in both] == ["on", "off", "on", "off"]
    with pytest.raises(ValueError, match="data.max_length=20"):
        D.build_examples(char_tokenizer, items, template="coldstart", modes="label", max_length=20)
    short = S.generate(2, seed=0, domains=("math",), levels=(1,))
    kept = D.build_examples(char_tokenizer, items + short, template="coldstart", modes="off", max_length=30,
                            on_overlong="drop")
    assert len(kept) == 2 + 2  # off-mode targets are short enough; none silently lost: counted in the log
    with pytest.raises(ValueError, match="data.modes"):
        D.build_examples(char_tokenizer, items, template="coldstart", modes="sometimes", max_length=256)


def test_collate_pads_right_and_masks(char_tokenizer):
    exs = D.build_examples(char_tokenizer, S.generate(1, seed=0, domains=("math",), levels=(1, 5)),
                           template="coldstart", modes="label", max_length=256)
    batch = D.pad_collate(char_tokenizer.pad_token_id)(exs)
    lens = [len(e["input_ids"]) for e in exs]
    assert batch["input_ids"].shape == (2, max(lens))
    assert batch["attention_mask"].sum(1).tolist() == lens
    assert (batch["labels"][batch["attention_mask"] == 0] == D.IGNORE).all()


def _dm(cfg, tok, stage="coldstart"):
    dm = D.KatDataModule(OmegaConf.create(cfg), tok, stage=stage, seed=0)
    dm.setup()
    return dm


LOADER = {"template": None, "modes": "label", "batch_size": 4, "val_batch_size": 8, "val_limit": None,
          "max_length": 256, "on_overlong": "error", "num_workers": 0, "directives": None}
# every field of data=synthetic (the datamodule reads them all: conf/data/synthetic.yaml holds the values)
SYNTH = {"name": "synthetic", "labels": "generator", "off_share": [0.5, 0, 0, 0, 0], "random_mode_rate": 0.01,
         "operand_digits": None}


def test_synthetic_datamodule(char_tokenizer):
    dm = _dm({**LOADER, **SYNTH, "n_train_per_level": 3, "n_val_per_level": 2,
              "domains": ["math", "code"], "labels": "generator", "off_share": [0.5, 0, 0, 0, 0],
              "random_mode_rate": 0.01}, char_tokenizer)
    assert len(dm.train_set) == 2 * 5 * 3
    assert len(dm.val_samples) == 2 * 5 * 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long
    assert next(iter(dm.val_dataloader()))[0]["id"].startswith("heldout-")


def test_synthetic_datamodule_reads_operand_digits(char_tokenizer):
    shapes = [[1, 1], [2, 1], [2, 2], [3, 3], [4, 4, 4]]
    dm = _dm({**LOADER, **SYNTH, "n_train_per_level": 2, "n_val_per_level": 1, "domains": ["math"],
              "labels": "generator", "operand_digits": shapes}, char_tokenizer)
    level5 = [s for s in dm.val_samples if s["level"] == 5]
    assert level5 and all(len(S.operands(s)) == 3 for s in level5)


def test_jsonl_datamodule_and_errors(char_tokenizer, tmp_path):
    items = S.generate(4, seed=0, domains=("math",))
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in items))
    dm = _dm({**LOADER, "name": "jsonl", "path": str(p), "val_path": None, "val_fraction": 0.25}, char_tokenizer)
    assert len(dm.train_set) + len(dm.val_samples) == 20 and len(dm.val_samples) == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(items[0]) + "\n" + json.dumps({**items[1], "mode": None}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:2: missing field 'mode'"):
        _dm({**LOADER, "name": "jsonl", "path": str(bad), "val_path": None, "val_fraction": 0.0}, char_tokenizer)
    with pytest.raises(ValueError, match="data.path"):
        _dm({**LOADER, "name": "jsonl", "path": None, "val_path": None, "val_fraction": 0.0}, char_tokenizer)


def test_mix_meets_target_shares():
    easy = S.generate(50, seed=0, domains=("math",), levels=(1, 2))
    hard = S.generate(50, seed=1, domains=("code",), levels=(4, 5))
    drawn, realised = M.mix([("a", easy, 1.0), ("b", hard, 3.0)], size=4000, seed=0,
                            targets={"mode": {"on": 2, "off": 1}, "level": None, "domain": None})
    assert abs(realised["mode"]["on"] - 2 / 3) < 0.03
    drawn2, realised2 = M.mix([("a", easy, 1.0), ("b", hard, 3.0)], size=4000, seed=0, targets=None)
    assert abs(realised2["domain"]["code"] - 0.75) < 0.03  # source weights, not sizes
    assert len({d["id"] for d in drawn}) == 4000  # ids stay unique
    with pytest.raises(ValueError, match="data.shares.domain.science"):
        M.mix([("a", easy, 1.0)], size=10, seed=0, targets={"domain": {"science": 1.0}})
    with pytest.raises(ValueError, match="data.shares.colour"):
        M.mix([("a", easy, 1.0)], size=10, seed=0, targets={"colour": {"red": 1.0}})
