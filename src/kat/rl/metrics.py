"""The ``rl/*`` metrics of one RL step (their list and meaning: ``docs/rl.md``, "Metrics").

* :func:`behaviour_rows`: one record per generated rollout of a group not skipped (level, domain, mode, correct,
  tokens, well-formed, truncated) — every round of dynamic sampling, not only the trained groups;
* :func:`step_metrics`: behaviour (think-on rate, accuracy, tokens; overall, per level, per domain, per mode),
  rewards of the trained groups, sampling counts, and the update's token-weighted stats (clip fractions, KL,
  entropy, losses, grad norm).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from kat import metrics
from kat.metrics import Record
from kat.rl.credit import Credit, RolloutBatch

__all__ = ["behaviour_rows", "step_metrics"]


def behaviour_rows(out: list, samples: Sequence[dict], roll, batch: RolloutBatch, credit: Credit,
                   group_size: int) -> None:
    """Append one :class:`kat.metrics.Record` per rollout of ``roll`` (rows prompt-major over ``samples``) whose
    group is not skipped."""
    G_ = group_size
    for i in range(len(roll)):
        b = i // G_
        if bool(credit.skipped[b]):
            continue
        s = samples[b]
        out.append(Record(level=s.get("level"), domain=s.get("domain"), mode=batch.modes[i],
                          correct=bool(credit.correct[i]), tokens=len(roll.response_ids[i]),
                          well_formed=bool(batch.well_formed[i]), truncated=bool(roll.truncated[i])))


def step_metrics(col: dict, st: dict, *, group_size: int, history_resampler=None,
                 has_reference: bool = False) -> dict[str, float]:
    """The ``rl/*`` metrics of one step from :func:`kat.rl.sampling.collect`'s result ``col`` and the update's
    stats ``st`` (:func:`kat.rl.update.update`); ``rl/kl`` only with a reference model."""
    rows: list[Record] = col["all_rows"]
    # think-on rate, accuracy and tokens, overall and per level: the summary blocks of every evaluation (kat.metrics)
    out: dict[str, float] = metrics.flat(metrics.summarize(rows), prefix="rl")
    for group, m in metrics.summarize(rows, key="domain").items():
        if group != "all":
            out[f"rl/think_on_rate/{group}"] = m["think_on_rate"]
    by_mode = metrics.summarize(rows, key="mode")
    for mode in ("on", "off"):  # NaN when no rollout chose this mode (undefined, not 0)
        m = by_mode.get(f"mode_{mode}")
        out[f"rl/tokens_think_{mode}"] = m["tokens_mean"] if m else math.nan
        out[f"rl/acc_think_{mode}"] = m["acc"] if m else math.nan
    if rows:
        out.update({f"rl/{k}": v for k, v in metrics.extra_rates(rows).items()})
    credit: Credit | None = col["credit"]
    if credit is not None:
        G_ = group_size
        keep = (~credit.skipped).repeat_interleave(G_)
        if bool(keep.any()):
            out["rl/reward_mean"] = float(credit.reward[keep].mean())
            out["rl/reward_std"] = float(credit.reward[keep].std()) if int(keep.sum()) > 1 else 0.0
            out["rl/reward_answer"] = float(credit.answer_reward[keep].mean())
            if credit.judge_reward is not None:
                out["rl/reward_judge"] = float(credit.judge_reward[keep].mean())
            cg = credit.correct.view(-1, G_)[~credit.skipped]  # (B', G)
            out["rl/frac_all_correct"] = float(cg.all(1).float().mean())
            out["rl/frac_all_wrong"] = float((~cg).all(1).float().mean())
            out["rl/frac_mixed"] = 1.0 - out["rl/frac_all_correct"] - out["rl/frac_all_wrong"]
        out["rl/skipped_groups"] = float(credit.skipped.sum())
    out["rl/frac_zero_std"] = col["zero_std"] / max(1, col["groups_seen"])
    out["rl/gen_rounds"] = float(col["rounds"])
    hr = history_resampler
    out["rl/resampled_out"] = float(hr.last_resampled_out) if hr is not None else 0.0
    if hr is not None:
        out["rl/resampled_total"] = float(len(hr.excluded))
    n = st.get("tokens", 0.0)
    if n > 0:
        out["rl/clip_frac"] = st["clip_frac"] / n
        out["rl/clip_frac_low"] = st["clip_frac_low"] / n
        out["rl/clip_frac_high"] = st["clip_frac_high"] / n
        out["rl/approx_kl"] = st["approx_kl"] / n
        out["rl/entropy"] = st["entropy_sum"] / n
        out["rl/ratio_max"] = st["ratio_max"]
        out["rl/pg_loss"] = st["pg_loss"] / max(1, st.get("updates", 1))
        out["train/loss"] = st["loss"] / max(1, st.get("updates", 1))  # pg + KL term, per optimizer step
        if has_reference:
            out["rl/kl"] = st["kl"] / n
    out["rl/grad_norm"] = st.get("grad_norm", 0.0)
    g = col["grade"]
    out["rl/grade_timeouts"] = float(g["timeouts"])
    out["rl/grade_cache_hit_rate"] = g["cache_hits"] / max(1, len(rows))
    return out
