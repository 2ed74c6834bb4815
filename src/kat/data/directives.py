"""User-guided mode switching: directive-bearing prompts whose mode label follows the directive.

KAT-V1 lets users steer the mode with plain-language directives ("DO NOT THINK!!!", "Think deeper.").
kat teaches it in the data: a share of the training items get a directive, in one of several phrasings
and languages (``conf/data/_directives.yaml``), appended or prepended to their last user message, and
their mode label set to the directive's direction (think-off for "don't think", think-on for "think").
At inference the same phrasings build the directive variants :mod:`kat.eval` uses to measure the
directive-following rate; the hard override (forcing the mode token after ``</judge>``) is
``force_mode`` of :func:`kat.rollout.hf.generate`.

Every function here is pure and deterministic: whether an item gets a directive, its direction,
phrasing, position and separator are drawn from ``random.Random(f"kat-directives/{seed}/{id}")``, so
they depend only on ``(seed, id)``, not on the order or size of the data set.

A directive item gets (on a copy): the edited ``messages``, ``mode`` = the direction, ``directive`` =
the direction (the field RL rewards and evaluation read), ``directive_lang``, and the judge rationale
``judge[direction]`` of the config (``null`` keeps the item's judge). A think-on directive needs a
``thinking`` trace when training targets are built (``targets=True``); items without one get no
think-on directive (counted and logged).

Phrasings a tokenizer cannot encode losslessly (e.g. Chinese with the embedded character tokenizer,
which maps them to ``<|unk|>``) are dropped, with a logged warning, rather than taught as unknown-token
noise that is the same for both directions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

from kat.utils import get_logger

log = get_logger(__name__)

DIRECTIONS = ("on", "off")
POSITIONS = ("append", "prepend", "random")


@dataclass(frozen=True)
class Phrasing:
    """One directive text: direction (``on``/``off``), language code and the text itself."""

    mode: str
    lang: str
    text: str


@dataclass(frozen=True)
class DirectiveConfig:
    """``data.directives`` (conf/data/_directives.yaml), validated."""

    share: float = 0.0
    stages: tuple[str, ...] = ("coldstart",)
    off_share: float = 0.5
    position: str = "random"
    separators: tuple[str, ...] = (" ",)
    judge: Mapping[str, str | None] = field(default_factory=dict)
    phrasings: tuple[Phrasing, ...] = ()

    @classmethod
    def coerce(cls, cfg: "DirectiveConfig | Mapping | None") -> "DirectiveConfig":
        """From a mapping (``DictConfig`` or dict) with the fields of ``_directives.yaml``; clear errors."""
        if cfg is None:
            return cls()
        if isinstance(cfg, DirectiveConfig):
            return cfg
        if not hasattr(cfg, "get"):
            raise TypeError(f"data.directives must be a mapping, got {type(cfg).__name__}")
        share = float(cfg.get("share", 0.0))
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"data.directives.share must be in [0, 1], got {share}")
        off_share = float(cfg.get("off_share", 0.5))
        if not 0.0 <= off_share <= 1.0:
            raise ValueError(f"data.directives.off_share must be in [0, 1], got {off_share}")
        position = str(cfg.get("position", "random"))
        if position not in POSITIONS:
            raise ValueError(f"data.directives.position must be one of {POSITIONS}, got {position!r}")
        seps = tuple(str(s) for s in (cfg.get("separators") or (" ",)))
        stages = tuple(str(s) for s in (cfg.get("stages") or ()))
        judge_cfg = cfg.get("judge") or {}
        judge = {m: (None if judge_cfg.get(m) is None else str(judge_cfg.get(m))) for m in DIRECTIONS}
        raw = cfg.get("phrasings") or {}
        unknown = [k for k in raw if str(k) not in DIRECTIONS]
        if unknown:
            raise ValueError(f"data.directives.phrasings keys must be 'on'/'off' (quote them in YAML), got {unknown}")
        phr: list[Phrasing] = []
        for mode in DIRECTIONS:
            by_lang = raw.get(mode) or {}
            if not hasattr(by_lang, "items"):
                raise ValueError(f"data.directives.phrasings.{mode} must map language -> list of texts")
            for lang, texts in by_lang.items():
                if isinstance(texts, str) or not all(isinstance(t, str) and t.strip() for t in texts):
                    raise ValueError(f"data.directives.phrasings.{mode}.{lang} must be a list of non-empty strings")
                phr.extend(Phrasing(mode, str(lang), t) for t in texts)
        return cls(share=share, stages=stages, off_share=off_share, position=position, separators=seps,
                   judge=judge, phrasings=tuple(phr))

    def by_mode(self, mode: str) -> list[Phrasing]:
        return [p for p in self.phrasings if p.mode == mode]


def encodable(text: str, tokenizer) -> bool:
    """True when ``tokenizer`` encodes ``text`` without unknown tokens and decodes it back unchanged."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        return False
    return tokenizer.decode(ids, skip_special_tokens=False) == text


def usable_phrasings(cfg: DirectiveConfig, tokenizer=None) -> DirectiveConfig:
    """``cfg`` without the phrasings ``tokenizer`` cannot encode losslessly (all kept when it is None).

    Raises ``ValueError`` when a direction is left without any phrasing."""
    if tokenizer is None:
        return cfg
    kept = tuple(p for p in cfg.phrasings if encodable(p.text, tokenizer))
    dropped = [p for p in cfg.phrasings if p not in kept]
    if dropped:
        langs = sorted({p.lang for p in dropped})
        log.warning(f"directives: {len(dropped)} phrasing(s) dropped, the tokenizer cannot encode them losslessly "
                    f"(languages: {', '.join(langs)}); {len(kept)} kept")
    for mode in DIRECTIONS:
        if cfg.by_mode(mode) and not any(p.mode == mode for p in kept):
            raise ValueError(f"data.directives: no '{mode}' phrasing is encodable by this tokenizer; add one")
    return DirectiveConfig(share=cfg.share, stages=cfg.stages, off_share=cfg.off_share, position=cfg.position,
                           separators=cfg.separators, judge=cfg.judge, phrasings=kept)


def _rng(seed: int, sample_id: Any, salt: str = "") -> random.Random:
    # str seeds go through SHA-512 in CPython: stable across processes (unlike hash())
    return random.Random(f"kat-directives/{seed}/{sample_id!s}{salt}")


def add_directive(sample: dict, phrasing: Phrasing, *, position: str, separator: str,
                  judge: str | None = None) -> dict:
    """A copy of ``sample`` whose last user message carries ``phrasing`` (``position`` append|prepend) and
    whose ``mode``/``directive`` follow it; ``judge`` replaces the judge rationale when not None."""
    if position not in ("append", "prepend"):
        raise ValueError(f"position must be append or prepend, got {position!r}")
    msgs = [dict(m) for m in sample["messages"]]
    if not msgs or msgs[-1].get("role") != "user":
        raise ValueError(f"sample {sample.get('id')!r}: the last message must be from the user")
    content = msgs[-1]["content"]
    msgs[-1]["content"] = (content + separator + phrasing.text if position == "append"
                           else phrasing.text + separator + content)
    out = dict(sample)
    out["messages"] = msgs
    out["mode"] = phrasing.mode
    out["directive"] = phrasing.mode
    out["directive_lang"] = phrasing.lang
    if judge is not None:
        out["judge"] = judge
    return out


def _draw(cfg: DirectiveConfig, rng: random.Random, mode: str) -> tuple[Phrasing, str, str]:
    options = cfg.by_mode(mode)
    if not options:
        raise ValueError(f"data.directives.phrasings has no '{mode}' phrasing")
    phrasing = options[rng.randrange(len(options))]
    position = cfg.position if cfg.position != "random" else ("append" if rng.random() < 0.5 else "prepend")
    sep = cfg.separators[rng.randrange(len(cfg.separators))]
    return phrasing, position, sep


def apply_directives(samples: Sequence[dict], cfg: DirectiveConfig | Mapping | None, seed: int, *,
                     tokenizer=None, targets: bool = True) -> list[dict]:
    """``samples`` with a share ``cfg.share`` of them turned into directive items (copies; inputs untouched).

    Per item (keyed by ``(seed, id)``): with probability ``share`` it gets a directive, think-off with
    probability ``off_share``, else think-on; then a phrasing (uniform over the tokenizer-encodable ones of
    that direction), a position and a separator. With ``targets`` (SFT data) a think-on directive needs
    ``thinking`` and any directive needs ``response``; such items stay as they are and are counted.
    Order and length of the output equal the input's.
    """
    dcfg = usable_phrasings(DirectiveConfig.coerce(cfg), tokenizer)
    if dcfg.share <= 0.0:
        return list(samples)
    out: list[dict] = []
    counts = {"on": 0, "off": 0, "skipped": 0}
    for s in samples:
        rng = _rng(seed, s.get("id"))
        if rng.random() >= dcfg.share:
            out.append(s)
            continue
        mode = "off" if rng.random() < dcfg.off_share else "on"
        phrasing, position, sep = _draw(dcfg, rng, mode)
        if targets and (s.get("response") is None or (mode == "on" and s.get("thinking") is None)):
            counts["skipped"] += 1
            out.append(s)
            continue
        out.append(add_directive(s, phrasing, position=position, separator=sep, judge=dcfg.judge.get(mode)))
        counts[mode] += 1
    log.info(f"directives: {counts['on']} think-on and {counts['off']} think-off directive items out of "
             f"{len(out)} (share {dcfg.share:g})" +
             (f"; {counts['skipped']} drawn items lack thinking/response and were left as they are"
              if counts["skipped"] else ""))
    return out


def for_training(samples: Sequence[dict], cfg: Mapping | None, *, stage: str, template: str, modes: str,
                 seed: int, tokenizer=None) -> list[dict]:
    """The datamodule's call: :func:`apply_directives` when ``cfg`` is set, ``stage`` is listed in
    ``cfg.stages`` and labels decide the target mode (``template=prompt`` for RL, or ``modes=label``);
    otherwise ``samples`` unchanged (e.g. the forced-mode teacher SFT with ``modes=both``)."""
    if not cfg:
        return list(samples)
    dcfg = DirectiveConfig.coerce(cfg)
    if dcfg.share <= 0.0 or stage not in dcfg.stages:
        return list(samples)
    if template != "prompt" and modes != "label":
        log.info(f"directives: off for data.modes={modes} (targets do not follow labels)")
        return list(samples)
    return apply_directives(samples, dcfg, seed, tokenizer=tokenizer, targets=template != "prompt")


def directive_variants(samples: Iterable[dict], cfg: DirectiveConfig | Mapping | None, seed: int, *,
                       tokenizer=None, modes: Sequence[str] = DIRECTIONS) -> list[dict]:
    """Evaluation: for every sample one copy per direction in ``modes`` with a directive of that direction
    (phrasing, position, separator drawn from ``(seed, id, direction)``); ids get ``#directive-{mode}``.
    The judge rationale is not touched (evaluation ignores it)."""
    dcfg = usable_phrasings(DirectiveConfig.coerce(cfg), tokenizer)
    out = []
    for mode in modes:
        if mode not in DIRECTIONS:
            raise ValueError(f"modes must hold 'on'/'off', got {mode!r}")
        for s in samples:
            rng = _rng(seed, s.get("id"), salt=f"/eval/{mode}")
            phrasing, position, sep = _draw(dcfg, rng, mode)
            v = add_directive(s, phrasing, position=position, separator=sep)
            v["id"] = f"{s.get('id')}#directive-{mode}"
            out.append(v)
    return out
