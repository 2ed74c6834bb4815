"""Assemble Distill and ColdStart data from the chain's items, and the report.

* **ColdStart** (stage 2): every item with ``mode``, ``judge``, ``response`` (and ``thinking`` when
  on), checked with ``schema.sample_errors(..., "coldstart")``; its template is the full
  ``<judge>…</judge><think_on|off>…`` target.
* **Distill** (stage 1): one line per item and available mode (id ``"<id>:<mode>"``): the label mode's
  response, plus the other mode's when the direct/think step ran with ``for: all``; the trigger token is
  the input, the body the target.

Both are drawn to the mix of ``assemble.<kind>.shares`` (``{axis: {value: share}}`` for the axes mode,
domain, level; null = as produced) and ``size`` (null = the most items that meet the shares) by
:func:`select_mix`: *without* replacement, so ids stay unique and no example is duplicated.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from kat.data import schema

AXES = ("mode", "domain", "level")


def _val(item: dict, axis: str) -> str:
    v = item.get(axis)
    return "none" if v is None else str(v)


def _norm_targets(targets: Mapping[str, Mapping | None] | None) -> dict[str, dict[str, float]]:
    out = {}
    for axis, t in (targets or {}).items():
        if not t:
            continue
        if axis not in AXES:
            raise ValueError(f"assemble shares: unknown axis {axis!r} (axes: {AXES})")
        t = {str(k): float(v) for k, v in dict(t).items()}
        if any(v < 0 for v in t.values()) or sum(t.values()) <= 0:
            raise ValueError(f"assemble shares.{axis} must be non-negative and not all zero, got {t}")
        s = sum(t.values())
        out[axis] = {k: v / s for k, v in t.items()}
    return out


def select_mix(items: Sequence[dict], targets: Mapping[str, Mapping | None] | None, *, size: int | None,
               seed: int) -> list[dict]:
    """A subset meeting the marginal ``targets`` per axis, without replacement (deterministic in ``seed``).

    Size: ``min(size, the largest n with n·share ≤ available for every targeted value)``. Quotas are
    ``n·share`` rounded (largest remainders); items are taken scarcest-first (the item whose values need the
    largest fraction of their pool), ties broken by a seeded hash, while every axis has room; the result keeps
    the input order. With several axes the greedy can fall a few items short of ``n``; the realised shares
    are reported.
    """
    tg = _norm_targets(targets)
    pool = [it for it in items if all(_val(it, a) in t for a, t in tg.items())]
    if not tg:
        n = len(pool) if size is None else min(int(size), len(pool))
        keep = {id(it) for it in sorted(pool, key=lambda it: _h(seed, it))[:n]}
        return [it for it in pool if id(it) in keep]
    counts = {a: Counter(_val(it, a) for it in pool) for a in tg}
    feasible = min(math.floor(counts[a][v] / s + 1e-9) for a, t in tg.items() for v, s in t.items() if s > 0)
    n = min(feasible, len(pool)) if size is None else min(int(size), feasible, len(pool))
    quota = {a: _quotas(n, t) for a, t in tg.items()}
    need = {a: {v: (quota[a][v] / counts[a][v] if counts[a][v] else 0.0) for v in t} for a, t in tg.items()}
    order = sorted(pool, key=lambda it: (-max(need[a][_val(it, a)] for a in tg), _h(seed, it)))
    taken = {a: Counter() for a in tg}
    chosen: set[int] = set()
    for it in order:
        if len(chosen) >= n:
            break
        if all(taken[a][_val(it, a)] < quota[a][_val(it, a)] for a in tg):
            chosen.add(id(it))
            for a in tg:
                taken[a][_val(it, a)] += 1
    return [it for it in pool if id(it) in chosen]  # in input order


def _quotas(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    raw = {k: n * s for k, s in shares.items()}
    q = {k: math.floor(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: -(raw[k] - q[k]))[: n - sum(q.values())]:
        q[k] += 1
    return q


def _h(seed: int, it: dict) -> str:
    return hashlib.sha256(f"{seed}/{it.get('id')}".encode()).hexdigest()


def coldstart_items(items: Iterable[dict]) -> tuple[list[dict], list[tuple[dict, str]]]:
    """Items valid for ColdStart, and ``(item, reason)`` for the others."""
    ok, bad = [], []
    for it in items:
        errs = schema.sample_errors(it, "coldstart")
        if errs:
            bad.append((it, "incomplete for coldstart: " + "; ".join(errs)))
        else:
            ok.append(it)
    return ok, bad


def distill_items(items: Iterable[dict]) -> list[dict]:
    """One Distill sample per item and mode with a verified response (ids ``<id>:<mode>``)."""
    out = []
    for it in items:
        syn = it.get("synth") or {}
        base = {k: v for k, v in it.items() if k not in ("mode", "judge", "thinking", "response", "id")}
        for mode in ("on", "off"):
            if it.get("mode") == mode and it.get("response") is not None:
                resp, think = it["response"], it.get("thinking") if mode == "on" else None
            else:
                rec = syn.get({"off": "direct", "on": "think"}[mode]) or {}
                if rec.get("response") is None or (mode == "on" and rec.get("thinking") is None):
                    continue
                resp, think = rec["response"], rec.get("thinking") if mode == "on" else None
            d = {"id": f"{it['id']}:{mode}", **base, "mode": mode, "response": resp}
            if think is not None:
                d["thinking"] = think
            if not schema.sample_errors(d, "distill"):
                out.append(d)
    return out


# ------------------------------------------------------------------------------------------------ report
def share_table(items: Sequence[dict]) -> dict[str, Any]:
    """Think-off share (and counts) overall, per level and per domain."""
    def block(group: Sequence[dict]) -> dict:
        c = Counter(it.get("mode") for it in group)
        n = c["on"] + c["off"]
        return {"n": n, "on": c["on"], "off": c["off"], "off_share": c["off"] / n if n else 0.0}

    by_level: dict = defaultdict(list)
    by_domain: dict = defaultdict(list)
    for it in items:
        by_level[str(it.get("level"))].append(it)
        by_domain[str(it.get("domain"))].append(it)
    return {"all": block(items), "level": {k: block(v) for k, v in sorted(by_level.items())},
            "domain": {k: block(v) for k, v in sorted(by_domain.items())}}


def step_summary(step: str, done: Sequence[dict], aside: Sequence[dict]) -> dict[str, Any]:
    """Counts, set-aside reasons and bad endpoint answers (by reason) of one step."""
    bad: Counter = Counter()
    for it in list(done) + list(aside):
        rec = (it.get("synth") or {}).get(step) or {}
        bad.update(rec.get("bad") or {})
    reasons = Counter(_reason_key((a.get("synth_aside") or {}).get("reason", "?")) for a in aside)
    return {"in": len(done) + len(aside), "done": len(done), "aside": len(aside),
            "aside_reasons": dict(sorted(reasons.items())), "bad_answers": dict(sorted(bad.items())),
            "bad_total": sum(bad.values())}


def _reason_key(reason: str) -> str:
    return reason.split(" (")[0].split(":")[0].strip()


def acceptance(items_by_step: Mapping[str, Sequence[dict]]) -> dict[str, Any]:
    """Acceptance rates: tagging, rationales, think-off reject sampling, think-on solver loop."""
    out: dict[str, Any] = {}
    tag = [(it.get("synth") or {}).get("tag") for it in items_by_step.get("tag", [])]
    asked = [t for t in tag if t and t.get("source") != "input"]
    if asked:
        out["tag"] = {"asked": len(asked), "tagged": sum(1 for t in asked if t.get("votes")),
                      "rate": sum(1 for t in asked if t.get("votes")) / len(asked)}
    jd = [(it.get("synth") or {}).get("judge") for it in items_by_step.get("judge", [])]
    jm = [j for j in jd if j and j.get("source") != "template"]
    if jm:
        ok = sum(1 for it in items_by_step["judge"] if it.get("judge") is not None
                 and (it.get("synth") or {}).get("judge", {}).get("source") != "template")
        out["judge"] = {"asked": len(jm), "written": ok, "rate": ok / len(jm)}
    off = [(it.get("synth") or {}).get("direct") for it in items_by_step.get("direct", [])]
    off = [o for o in off if o]
    if off:
        cand = sum(o.get("candidates", 0) for o in off)
        ver = sum(o.get("verified", 0) for o in off)
        kept = sum(1 for o in off if o.get("response") is not None)
        out["direct"] = {"items": len(off), "kept": kept, "item_rate": kept / len(off), "candidates": cand,
                      "verified": ver, "candidate_rate": ver / cand if cand else 0.0}
    on = [(it.get("synth") or {}).get("think") for it in items_by_step.get("think", [])]
    on = [o for o in on if o]
    if on:
        acc = [o for o in on if o.get("accepted")]
        hist: Counter = Counter(h.split(":")[0] for o in on for h in o.get("history", []))
        out["think"] = {"items": len(on), "accepted": len(acc), "item_rate": len(acc) / len(on),
                     "rounds_mean": sum(o.get("rounds", 0) for o in on) / len(on),
                     "rounds_mean_accepted": (sum(o.get("rounds", 0) for o in acc) / len(acc)) if acc else 0.0,
                     "events": dict(sorted(hist.items()))}
    return out


def flat_metrics(report: Mapping[str, Any], prefix: str = "synth") -> dict[str, float]:
    """Numeric leaves of ``report`` as ``synth/a/b/c`` MLflow metric names (other characters replaced by _)."""
    out: dict[str, float] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                walk(v, f"{key}/{_safe(str(k))}")
        elif isinstance(node, bool):
            out[key] = float(node)
        elif isinstance(node, (int, float)) and math.isfinite(float(node)):
            out[key] = float(node)

    walk(report, prefix)
    return out


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-. " else "_" for ch in s)
