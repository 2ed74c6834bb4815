"""User-guided mode switching in the data: directive items are deterministic and their labels follow them."""
from __future__ import annotations

import copy

import pytest
from omegaconf import OmegaConf

from kat.data import directives, synthetic, templates
from kat_testing import CONF

DCFG = OmegaConf.load(CONF / "data" / "_directives.yaml")


@pytest.fixture(scope="module")
def train_items():
    return synthetic.generate(60, seed=0, split="train")  # 4 domains x 5 levels x 60 = 1200 items


def _texts(mode: str) -> set[str]:
    return {t for texts in DCFG.phrasings[mode].values() for t in texts}


def _directive_text(item: dict, original: dict) -> str:
    """The text the directive added to the last user message (either side, any separator)."""
    new, old = item["messages"][-1]["content"], original["messages"][-1]["content"]
    if new.startswith(old):
        return new[len(old):][1:]
    assert new.endswith(old)
    return new[: -len(old)][:-1]


def test_deterministic_and_order_independent(train_items):
    a = directives.apply_directives(train_items, DCFG, seed=3)
    b = directives.apply_directives(train_items, DCFG, seed=3)
    assert a == b
    rev = directives.apply_directives(list(reversed(train_items)), DCFG, seed=3)
    assert list(reversed(rev)) == a  # decided per (seed, id), not by position
    c = directives.apply_directives(train_items, DCFG, seed=4)
    assert [x.get("directive") for x in a] != [x.get("directive") for x in c]


def test_labels_follow_directives_and_inputs_are_untouched(train_items):
    before = copy.deepcopy(train_items)
    out = directives.apply_directives(train_items, DCFG, seed=0)
    assert train_items == before and len(out) == len(train_items)
    n_dir = {"on": 0, "off": 0}
    for orig, item in zip(train_items, out):
        if "directive" not in item:
            assert item == orig
            continue
        d = item["directive"]
        n_dir[d] += 1
        assert item["mode"] == d and item["id"] == orig["id"]
        assert item["judge"] == DCFG.judge[d]
        assert _directive_text(item, orig) in _texts(d)
        assert item["directive_lang"] in DCFG.phrasings[d]
        # the coldstart target the datamodule builds carries the requested mode token
        target = templates.coldstart_target(item["mode"], item["judge"], item.get("thinking"), item["response"])
        assert templates.parse(target).mode == d
    share = (n_dir["on"] + n_dir["off"]) / len(out)
    assert abs(share - DCFG.share) < 0.03, share
    assert abs(n_dir["off"] / (n_dir["on"] + n_dir["off"]) - DCFG.off_share) < 0.1
    # directives contradict the default labels too: think-off on level 5, think-on on level 1
    assert any(x.get("directive") == "off" and x["level"] == 5 for x in out)
    assert any(x.get("directive") == "on" and x["level"] == 1 for x in out)


def test_tokenizer_drops_phrasings_it_cannot_encode(train_items, char_tokenizer):
    out = directives.apply_directives(train_items, DCFG, seed=0, tokenizer=char_tokenizer)
    used = {_directive_text(i, o) for o, i in zip(train_items, out) if "directive" in i}
    assert used and all(directives.encodable(t, char_tokenizer) for t in used)
    assert not any("思" in t for t in used)  # Chinese maps to <|unk|> in the character tokenizer
    assert "DO NOT THINK!!!" in used and "Think deeper." in used
    only_zh = OmegaConf.merge(DCFG, {"phrasings": {"on": {"en": [], "fr": [], "es": [], "de": []}}})
    with pytest.raises(ValueError, match="no 'on' phrasing is encodable"):
        directives.apply_directives(train_items, only_zh, seed=0, tokenizer=char_tokenizer)


def test_think_on_directive_needs_a_trace_for_sft():
    items = [{"id": i, "messages": [{"role": "user", "content": "q"}], "response": "a", "mode": "off"}
             for i in range(400)]
    cfg = OmegaConf.merge(DCFG, {"share": 1.0})
    sft = directives.apply_directives(items, cfg, seed=0, targets=True)
    assert {x.get("directive") for x in sft} == {"off", None}  # no thinking -> no think-on directive
    rl = directives.apply_directives(items, cfg, seed=0, targets=False)
    assert {x.get("directive") for x in rl} == {"on", "off"}


@pytest.mark.parametrize("stage,template,modes,applied", [
    ("coldstart", "coldstart", "label", True),
    ("coldstart", "distill", "both", False),  # forced-mode teacher SFT: targets ignore labels
    ("rl", "prompt", "label", False),         # not listed in stages by default
    ("distill", "distill", "label", False),
])
def test_for_training_guards(train_items, stage, template, modes, applied):
    out = directives.for_training(train_items, DCFG, stage=stage, template=template, modes=modes, seed=0)
    assert any("directive" in x for x in out) is applied
    assert directives.for_training(train_items, None, stage=stage, template=template, modes=modes, seed=0) == train_items


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="data.directives.share"):
        directives.DirectiveConfig.coerce({"share": 1.5})
    with pytest.raises(ValueError, match="data.directives.position"):
        directives.DirectiveConfig.coerce({"position": "middle"})
    with pytest.raises(ValueError, match="'on'/'off'"):
        directives.DirectiveConfig.coerce({"phrasings": {True: {"en": ["x"]}}})


def test_eval_variants(char_tokenizer):
    items = synthetic.generate(2, seed=0, split="heldout", domains=("math",), levels=(1, 5))
    v = directives.directive_variants(items, DCFG, seed=0, tokenizer=char_tokenizer)
    assert len(v) == 2 * len(items)
    assert [x["directive"] for x in v] == ["on"] * len(items) + ["off"] * len(items)
    assert {x["id"] for x in v} == {f"{i['id']}#directive-{m}" for i in items for m in ("on", "off")}
    assert v == directives.directive_variants(items, DCFG, seed=0, tokenizer=char_tokenizer)


def test_datamodule_wires_directives_into_coldstart_data(compose_cfg, char_tokenizer):
    from kat.data.datamodule import KatDataModule

    over = ["+stage=coldstart", "data.n_train_per_level=40", "data.n_val_per_level=1"]
    cfg = compose_cfg(over)
    if "directives" not in cfg.data:  # until conf/data/_loader.yaml includes _directives
        cfg = compose_cfg(over + ["+data@data.directives=_directives"])
    dm = KatDataModule(cfg.data, char_tokenizer, stage="coldstart", seed=0)
    dm.setup()
    dir_items = [s for s in dm.splits.train if s.get("directive")]
    assert dir_items and all(s["mode"] == s["directive"] for s in dir_items)
    off_id = char_tokenizer.convert_tokens_to_ids(templates.THINK_OFF)
    on_id = char_tokenizer.convert_tokens_to_ids(templates.THINK_ON)
    for ex, s in zip(dm.train_set.items, dm.splits.train):  # modes=label: one example per item, same order
        if s.get("directive"):
            labels = [t for t in ex["labels"] if t >= 0]
            assert (off_id if s["directive"] == "off" else on_id) in labels
    # the teacher's forced-mode SFT data (template distill, both modes) never gets directives
    teacher = KatDataModule(OmegaConf.merge(cfg.data, {"template": "distill", "modes": "both"}), char_tokenizer,
                            stage="coldstart", seed=0)
    teacher.setup()
    assert not any(s.get("directive") for s in teacher.splits.train)
