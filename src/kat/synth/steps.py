"""The request-making steps of the synth chain: tag, vote, judge, direct, think (the paper's §3.2 and §4.1.1).

Each step maps a chunk of items to ``(item, None)`` (finished: new fields + ``item["synth"][step]``, the
provenance record) or ``(item, reason)`` (set aside). Bad endpoint answers are retried with a fresh sample
index up to ``synth.bad_retries`` times (:func:`run_jobs`); their reasons are counted in the provenance
(``bad``). Every provenance record holds the endpoint(s), model(s), prompt template id(s)
(``<id>@<hash>``), sampling settings and the time.

* **tag** — difficulty level 1–5 and domain by an LLM judge with the rubric of ``synth.tag.rubric``;
  ``samples`` judge replies per item (majority domain, lower median level). Items that already carry both
  are kept as they are when ``skip_tagged``. Untaggable items are set aside with the reason.
* **vote** — ``M = len(endpoints)`` models × ``k`` think-off answers per item, graded by the verifiers
  (``kat.rewards``) where the item has gold, else by the ``grader`` endpoint. Label ``off`` iff
  ``correct ≥ threshold · M·k`` (default 1.0: all correct), else ``on``; a bad or ungraded answer counts as
  not correct. Sampling stops early once the label cannot change. Then a seeded ``random_mode_rate`` of the
  items get a uniformly random mode (seeded by the item id, so resuming does not change it). Tallies per
  endpoint are stored with the item.
* **judge** — the ``<judge>`` rationale for the chosen mode: written by a model (``source: model``) or a
  fixed per-mode text (``source: template``; the embedded suite's "easy"/"hard").
* **direct** — think-off responses by reject sampling: ``samples`` direct answers from each endpoint, only
  verified (or grader-accepted) ones kept, the shortest (or first) chosen. With the vote's endpoints and
  sampling settings these are the vote's own answers, served by the request cache.
* **think** — think-on responses: per round a solver drafts (when there is no draft), a thinker reflects and
  revises it, a critic decides accept / revise / reject; an accepted draft is kept only if it verifies.
  ``rounds`` rounds at most; a failed verification counts as "revise" (the thinker is told the answer
  did not verify, never the gold), "reject" starts from a new draft.
"""
from __future__ import annotations

import logging
import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

from kat import rewards
from kat.data import schema
from kat.data.templates import ANSWER_CLOSE, ANSWER_OPEN
from kat.synth.cache import Reply
from kat.synth.endpoints import Broker, Request, make_request
from kat.synth.parsing import (BadAnswer, Solution, parse_correct, parse_rationale, parse_solution, parse_tag,
                               parse_verdict)
from kat.synth.prompts import Prompt, fill

log = logging.getLogger(__name__)  # plain logging: kat.utils would import lightning (slow start-up)

#: sample index of retry ``a`` of logical sample ``j`` is ``j + STRIDE * a`` (distinct cache keys)
STRIDE = 100_000
MODE_NAMES = {"on": "THINK-ON", "off": "THINK-OFF"}

Outcome = tuple[dict, str | None]  # (item, aside reason or None)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Job:
    """One logical question: ``build(attempt) -> Request``, ``parse(reply) -> value | BadAnswer``."""

    build: Callable[[int], Request]
    parse: Callable[[Reply], Any]
    value: Any = None
    done: bool = False
    bad: Counter = field(default_factory=Counter)
    last_bad: BadAnswer | None = None
    attempts: int = 0


def run_jobs(broker: Broker, jobs: Sequence[Job], retries: int) -> None:
    """Ask every job, then re-ask the ones whose reply was bad, ``retries`` times at most (in batches)."""
    todo = list(jobs)
    for a in range(int(retries) + 1):
        if not todo:
            break
        replies = broker.ask([j.build(a) for j in todo])
        nxt = []
        for j, rep in zip(todo, replies):
            j.attempts += 1
            v = j.parse(rep)
            if isinstance(v, BadAnswer):
                j.bad[v.reason] += 1
                j.last_bad = v
                nxt.append(j)
            else:
                j.value, j.done = v, True
        todo = nxt


def merge_bad(*counters: Counter) -> dict[str, int]:
    c: Counter = Counter()
    for x in counters:
        c.update(x)
    return dict(sorted(c.items()))


@dataclass
class Context:
    """What every step needs: the broker, prompts, refusal regex, grading settings, seed, retry budget."""

    broker: Broker
    prompts: Mapping[str, Prompt]
    refusals: re.Pattern
    seed: int
    bad_retries: int
    grading: Mapping[str, Any]
    grader: str | None = None  # endpoint that grades answers of items without gold (None: they stay ungraded)
    grader_params: Mapping[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "max_tokens": 64})
    _memo: dict = field(default_factory=dict)

    def prov(self, endpoint: str | Sequence[str], prompt: str | Sequence[str], params: Mapping | None,
             **extra: Any) -> dict:
        eps = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        prs = [prompt] if isinstance(prompt, str) else list(prompt)
        out = {"endpoints": eps, "models": [self.broker.model_label(e) for e in eps],
               "prompts": [self.prompts[p].ref for p in prs], "params": dict(params or {}), "time": now()}
        out.update(extra)
        return out

    # ------------------------------------------------------------------------------------------ grading
    def grade(self, items: Sequence[dict], answers: Sequence[str]) -> list[tuple[bool | None, str]]:
        """``(correct, how)`` per answer: ``how`` = verifier | grader | ungraded; ``None`` = could not grade.

        Verifiers read only the answer block, so each answer is wrapped as ``<answer>…</answer>``. Items
        without gold (the verifier returns None) go to the ``grader`` endpoint, with the reference answer
        when the item has one.
        """
        out: list[tuple[bool | None, str] | None] = [None] * len(items)
        todo = []
        for i, (it, a) in enumerate(zip(items, answers)):
            if _gkey(it, a) in self._memo:
                out[i] = self._memo[_gkey(it, a)]
            elif it.get("domain") in rewards.DOMAINS:
                todo.append(i)
            else:
                out[i] = None
        if todo:
            res = rewards.grade_batch([items[i] for i in todo], [f"{ANSWER_OPEN}{answers[i]}{ANSWER_CLOSE}" for i in todo],
                                      **self.grading)
            memo_ok = res.stats.timeouts == 0 and res.stats.errors == 0
            for i, sc in zip(todo, res.scores):
                if sc is not None:
                    out[i] = (sc >= 1.0, "verifier")
                    if memo_ok:  # a timeout or crash might not repeat: not memoised
                        self._memo[_gkey(items[i], answers[i])] = out[i]
        rest = [i for i in range(len(items)) if out[i] is None]
        if rest and self.grader:
            p = self.prompts["grade"]
            jobs = []
            for i in rest:
                msgs = p.messages(items[i], answer=answers[i], reference=items[i].get("answer") or "(none)")
                jobs.append(Job(build=lambda a, m=msgs: make_request(self.grader, m, self.grader_params, sample=STRIDE * a),
                                parse=lambda r: parse_correct(r.text, self.refusals)))
            run_jobs(self.broker, jobs, self.bad_retries)
            for i, j in zip(rest, jobs):
                out[i] = (bool(j.value), "grader") if j.done else (None, "ungraded")
                if j.done:
                    self._memo[_gkey(items[i], answers[i])] = out[i]
        return [o if o is not None else (None, "ungraded") for o in out]


def _gkey(item: dict, answer: str) -> tuple:
    """Grading memo key: the item's identity and gold, and the answer (verifiers read nothing else)."""
    return str(item.get("id")), item.get("answer"), item.get("tests"), answer


def _synth(item: dict) -> dict:
    return item.setdefault("synth", {})


def _params(node: Mapping | None) -> dict:
    return {k: v for k, v in dict(node or {}).items() if v is not None}


# ================================================================================================== tag
class TagStep:
    name = "tag"

    def __init__(self, ctx: Context, cfg: Mapping[str, Any]):
        self.ctx = ctx
        self.endpoint = cfg.get("endpoint")
        self.samples = int(cfg.get("samples", 1))
        self.skip_tagged = bool(cfg.get("skip_tagged", True))
        self.overwrite = bool(cfg.get("overwrite", False))
        self.domains = list(cfg.get("domains") or schema.DOMAINS)
        self.rubric = str(cfg.get("rubric") or "")
        self.params = _params(cfg.get("params"))
        if self.samples < 1:
            raise ValueError(f"synth.tag.samples must be >= 1, got {self.samples}")
        bad = [d for d in self.domains if d not in schema.DOMAINS]
        if bad:
            raise ValueError(f"synth.tag.domains: unknown domain(s) {bad} (known: {schema.DOMAINS})")

    def settings(self) -> dict:
        return {"endpoint": self.endpoint, "samples": self.samples, "skip_tagged": self.skip_tagged,
                "overwrite": self.overwrite, "domains": self.domains, "params": self.params,
                "prompt": self.ctx.prompts["tag"].ref, "rubric": self.rubric}

    def _tagged(self, it: dict) -> bool:
        return it.get("domain") in schema.DOMAINS and isinstance(it.get("level"), int) and 1 <= it["level"] <= 5

    def run(self, items: list[dict]) -> Iterator[Outcome]:
        need = []
        for it in items:
            if self.skip_tagged and self._tagged(it):
                _synth(it)["tag"] = {"source": "input", "time": now()}
                yield it, None
            else:
                need.append(it)
        if not need:
            return
        if not self.endpoint:
            for it in need:
                yield it, "untaggable: the item lacks domain or level and synth.tag.endpoint is null"
            return
        p = self.ctx.prompts["tag"]
        jobs: list[list[Job]] = []
        for it in need:
            msgs = p.messages(it, domains=", ".join(self.domains), rubric=self.rubric.strip())
            jobs.append([Job(build=lambda a, m=msgs, j=j: make_request(self.endpoint, m, self.params, sample=j + STRIDE * a),
                             parse=lambda r: parse_tag(r.text, self.domains, self.ctx.refusals))
                         for j in range(self.samples)])
        run_jobs(self.ctx.broker, [j for js in jobs for j in js], self.ctx.bad_retries)
        for it, js in zip(need, jobs):
            votes = [j.value for j in js if j.done]
            bad = merge_bad(*(j.bad for j in js))
            prov = self.ctx.prov(self.endpoint, "tag", self.params, samples=self.samples, bad=bad,
                                 votes=[[v["domain"], v["level"]] for v in votes])
            _synth(it)["tag"] = prov
            if not votes:
                last = next((j.last_bad for j in reversed(js) if j.last_bad), None)
                yield it, f"untaggable: {last.reason if last else 'no reply'}" + (f" ({last.detail})" if last and last.detail else "")
                continue
            domain = Counter(v["domain"] for v in votes).most_common(1)[0][0]
            levels = sorted(v["level"] for v in votes)
            level = levels[(len(levels) - 1) // 2]
            if self.overwrite or it.get("domain") not in schema.DOMAINS:
                it["domain"] = domain
            elif it.get("domain") != domain:
                prov["judge_domain"] = domain
            if self.overwrite or not (isinstance(it.get("level"), int) and 1 <= it["level"] <= 5):
                it["level"] = level
            elif it.get("level") != level:
                prov["judge_level"] = level
            yield it, None


# ================================================================================================= vote
class VoteStep:
    name = "vote"

    def __init__(self, ctx: Context, cfg: Mapping[str, Any]):
        self.ctx = ctx
        self.endpoints = list(cfg["endpoints"])
        self.k = int(cfg.get("k", 4))
        self.threshold = float(cfg.get("threshold", 1.0))
        self.random_rate = float(cfg.get("random_mode_rate", 0.01))
        self.early_stop = bool(cfg.get("early_stop", True))
        self.params = _params(cfg.get("params"))
        if not self.endpoints:
            raise ValueError("synth.vote.endpoints must name at least one endpoint")
        if self.k < 1:
            raise ValueError(f"synth.vote.k must be >= 1, got {self.k}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"synth.vote.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 <= self.random_rate <= 1.0:
            raise ValueError(f"synth.vote.random_mode_rate must be in [0, 1], got {self.random_rate}")

    def settings(self) -> dict:
        return {"endpoints": self.endpoints, "k": self.k, "threshold": self.threshold, "random": self.random_rate,
                "early_stop": self.early_stop, "params": self.params, "prompt": self.ctx.prompts["direct"].ref,
                "grader": self.ctx.grader, "seed": self.ctx.seed}

    def run(self, items: list[dict]) -> Iterator[Outcome]:
        n_ep, planned = len(self.endpoints), len(self.endpoints) * self.k
        need = max(1, math.ceil(self.threshold * planned - 1e-9))  # correct answers needed for think-off
        tallies = [{e: Counter() for e in self.endpoints} for _ in items]
        bad = [Counter() for _ in items]
        graded_by = [Counter() for _ in items]
        decided = [False] * len(items)
        p = self.ctx.prompts["direct"]
        msgs = [p.messages(it) for it in items]
        for j in range(self.k):
            alive = [i for i in range(len(items)) if not decided[i]]
            if not alive:
                break
            jobs = {(i, e): Job(build=lambda a, m=msgs[i], e=e, j=j: make_request(e, m, self.params, sample=j + STRIDE * a,
                                                                                   mode="off"),
                                parse=lambda r: parse_solution(r.text, reasoning=r.reasoning, finish_reason=r.finish_reason,
                                                               refusals=self.ctx.refusals))
                    for i in alive for e in self.endpoints}
            run_jobs(self.ctx.broker, list(jobs.values()), self.ctx.bad_retries)
            ok = [(i, e, jb.value.answer) for (i, e), jb in jobs.items() if jb.done]
            verdicts = self.ctx.grade([items[i] for i, _, _ in ok], [a for _, _, a in ok])
            for (i, e), jb in jobs.items():
                bad[i].update(jb.bad)
                if not jb.done:
                    tallies[i][e]["bad"] += 1
            for (i, e, _), (v, how) in zip(ok, verdicts):
                tallies[i][e]["correct" if v else ("ungraded" if v is None else "wrong")] += 1
                graded_by[i][how] += 1
            for i in alive:
                c = sum(t["correct"] for t in tallies[i].values())
                n = sum(sum(t.values()) for t in tallies[i].values())
                if n >= planned or (self.early_stop and (c + planned - n < need or c >= need)):
                    decided[i] = True
            for i in alive:
                if decided[i] or j == self.k - 1:
                    yield self._label(items[i], tallies[i], bad[i], graded_by[i], need, planned), None

    def _label(self, it: dict, tally: dict, bad: Counter, graded_by: Counter, need: int, planned: int) -> dict:
        c = sum(t["correct"] for t in tally.values())
        n = sum(sum(t.values()) for t in tally.values())
        voted = "off" if c >= need else "on"
        rng = random.Random(f"kat-synth-mode/{self.ctx.seed}/{it.get('id')}")
        rand = rng.random() < self.random_rate
        mode = rng.choice(("on", "off")) if rand else voted
        it["mode"] = mode
        _synth(it)["vote"] = self.ctx.prov(
            self.endpoints, "direct", self.params, k=self.k, threshold=self.threshold, planned=planned, n=n,
            correct=c, share=c / max(1, n), voted=voted, random=rand,
            tally={e: {key: int(t[key]) for key in ("correct", "wrong", "bad", "ungraded")} for e, t in tally.items()},
            graded_by=dict(graded_by), bad=dict(sorted(bad.items())))
        return it


# ================================================================================================ judge
class JudgeStep:
    name = "judge"

    def __init__(self, ctx: Context, cfg: Mapping[str, Any]):
        self.ctx = ctx
        self.source = str(cfg.get("source", "model"))
        self.endpoint = cfg.get("endpoint")
        self.templates = dict(cfg.get("templates") or {})
        self.max_chars = int(cfg.get("max_chars", 400))
        self.params = _params(cfg.get("params"))
        if self.source not in ("model", "template"):
            raise ValueError(f"synth.judge.source must be model or template, got {self.source!r}")
        if self.source == "model" and not self.endpoint:
            raise ValueError("synth.judge.source=model needs synth.judge.endpoint")
        if self.source == "template" and not all(self.templates.get(m) for m in ("on", "off")):
            raise ValueError("synth.judge.source=template needs synth.judge.templates.on and .off")

    def settings(self) -> dict:
        s = {"source": self.source, "max_chars": self.max_chars}
        if self.source == "model":
            s.update(endpoint=self.endpoint, params=self.params, prompt=self.ctx.prompts["rationale"].ref)
        else:
            s.update(templates=self.templates)
        return s

    def run(self, items: list[dict]) -> Iterator[Outcome]:
        ready = []
        for it in items:
            if it.get("mode") not in ("on", "off"):
                yield it, "no mode label (run the vote step or give modes in the input)"
            else:
                ready.append(it)
        if self.source == "template":
            for it in ready:
                it["judge"] = fill(self.templates[it["mode"]], {"level": it.get("level"), "domain": it.get("domain")})
                _synth(it)["judge"] = {"source": "template", "time": now()}
                yield it, None
            return
        p = self.ctx.prompts["rationale"]
        jobs = []
        for it in ready:
            vote = (it.get("synth") or {}).get("vote") or {}
            if vote and not vote.get("random"):
                evidence = (f"In a test, direct answers without thinking were correct in {vote.get('correct')} of "
                            f"{vote.get('n')} attempts.")
            else:
                evidence = ""
            msgs = p.messages(it, mode=MODE_NAMES[it["mode"]], evidence=evidence)
            jobs.append(Job(build=lambda a, m=msgs: make_request(self.endpoint, m, self.params, sample=STRIDE * a),
                            parse=lambda r: parse_rationale(r.text, max_chars=self.max_chars, refusals=self.ctx.refusals)))
        run_jobs(self.ctx.broker, jobs, self.ctx.bad_retries)
        for it, j in zip(ready, jobs):
            _synth(it)["judge"] = self.ctx.prov(self.endpoint, "rationale", self.params, bad=dict(j.bad))
            if j.done:
                it["judge"] = j.value
                yield it, None
            else:
                yield it, f"no usable rationale: {j.last_bad.reason if j.last_bad else 'no reply'}"


# ================================================================================================== off
class OffStep:
    name = "direct"

    def __init__(self, ctx: Context, cfg: Mapping[str, Any]):
        self.ctx = ctx
        self.endpoints = list(cfg["endpoints"])
        self.samples = int(cfg.get("samples", 4))
        self.select = str(cfg.get("select", "shortest"))
        self.scope = str(cfg.get("for", "label"))
        self.params = _params(cfg.get("params"))
        if self.select not in ("shortest", "first"):
            raise ValueError(f"synth.direct.select must be shortest or first, got {self.select!r}")
        if self.scope not in ("label", "all"):
            raise ValueError(f"synth.direct.for must be label or all, got {self.scope!r}")
        if not self.endpoints or self.samples < 1:
            raise ValueError("synth.off needs endpoints and samples >= 1")

    def settings(self) -> dict:
        return {"endpoints": self.endpoints, "samples": self.samples, "select": self.select, "for": self.scope,
                "params": self.params, "prompt": self.ctx.prompts["direct"].ref, "grader": self.ctx.grader}

    def run(self, items: list[dict]) -> Iterator[Outcome]:
        need = []
        for it in items:
            if it.get("mode") == "off" or (self.scope == "all" and it.get("mode") == "on"):
                need.append(it)
            else:
                yield it, None
        if not need:
            return
        p = self.ctx.prompts["direct"]
        jobs = []
        for i, it in enumerate(need):
            m = p.messages(it)
            for e in self.endpoints:
                for j in range(self.samples):
                    jobs.append((i, e, j, Job(
                        build=lambda a, m=m, e=e, j=j: make_request(e, m, self.params, sample=j + STRIDE * a, mode="off"),
                        parse=lambda r: parse_solution(r.text, reasoning=r.reasoning, finish_reason=r.finish_reason,
                                                       refusals=self.ctx.refusals))))
        run_jobs(self.ctx.broker, [jb for *_, jb in jobs], self.ctx.bad_retries)
        ok = [(i, e, j, jb.value.answer) for i, e, j, jb in jobs if jb.done]
        verdicts = self.ctx.grade([need[i] for i, *_ in ok], [a for *_, a in ok])
        cands: list[list[tuple]] = [[] for _ in need]
        for (i, e, j, a), (v, how) in zip(ok, verdicts):
            cands[i].append((e, j, a, v, how))
        bad = [Counter() for _ in need]
        for i, *_, jb in jobs:
            bad[i].update(jb.bad)
        n_cand = len(self.endpoints) * self.samples
        for i, it in enumerate(need):
            good = [c for c in cands[i] if c[3]]
            pick = None
            if good:
                pick = min(good, key=lambda c: len(c[2])) if self.select == "shortest" else good[0]
            prov = self.ctx.prov(self.endpoints, "direct", self.params, candidates=n_cand, parsed=len(cands[i]),
                                 verified=len(good), graded_by=dict(Counter(c[4] for c in cands[i])),
                                 bad=dict(sorted(bad[i].items())))
            if pick is not None:
                prov.update(response=pick[2], endpoint=pick[0], sample=pick[1])
                if it["mode"] == "off":
                    it["response"] = pick[2]
                    it.pop("thinking", None)
            _synth(it)["direct"] = prov
            if pick is None and it["mode"] == "off":
                yield it, f"no verified think-off response ({len(good)}/{n_cand} candidates verified)"
            else:
                yield it, None


# =================================================================================================== on
class OnStep:
    name = "think"

    def __init__(self, ctx: Context, cfg: Mapping[str, Any]):
        self.ctx = ctx
        self.solver = cfg["solver"]
        self.thinker = cfg.get("thinker")
        self.critic = cfg.get("critic")
        self.rounds = int(cfg.get("rounds", 3))
        self.scope = str(cfg.get("for", "label"))
        self.params = _params(cfg.get("params"))
        self.role_params = _params(cfg.get("review_params")) or self.params
        if self.rounds < 1:
            raise ValueError(f"synth.think.rounds must be >= 1, got {self.rounds}")
        if self.scope not in ("label", "all"):
            raise ValueError(f"synth.think.for must be label or all, got {self.scope!r}")

    def settings(self) -> dict:
        pr = ["solve"] + (["reflect"] if self.thinker else []) + (["critic"] if self.critic else [])
        return {"solver": self.solver, "thinker": self.thinker, "critic": self.critic, "rounds": self.rounds,
                "for": self.scope, "params": self.params, "review_params": self.role_params,
                "prompts": [self.ctx.prompts[p].ref for p in pr], "grader": self.ctx.grader}

    def _solution_job(self, endpoint: str, msgs: list[dict], sample: int, mode: str | None,
                      params: Mapping) -> Job:
        return Job(build=lambda a: make_request(endpoint, msgs, params, sample=sample + STRIDE * a, mode=mode),
                   parse=lambda r: parse_solution(r.text, reasoning=r.reasoning, finish_reason=r.finish_reason,
                                                  need_thinking=True, refusals=self.ctx.refusals))

    def run(self, items: list[dict]) -> Iterator[Outcome]:
        need = []
        for it in items:
            if it.get("mode") == "on" or (self.scope == "all" and it.get("mode") == "off"):
                need.append(it)
            else:
                yield it, None
        if not need:
            return
        draft: list[Solution | None] = [None] * len(need)
        feedback: list[str] = [""] * len(need)
        history: list[list[str]] = [[] for _ in need]
        bad = [Counter() for _ in need]
        finished: list[Solution | None] = [None] * len(need)
        open_ = list(range(len(need)))
        used = [0] * len(need)
        solve, reflect, critic = (self.ctx.prompts[k] for k in ("solve", "reflect", "critic"))
        for r in range(self.rounds):
            if not open_:
                break
            for i in open_:
                used[i] = r + 1
            # 1. the solver drafts where there is no draft (first round, or after a reject)
            todo = [i for i in open_ if draft[i] is None]
            jobs = [self._solution_job(self.solver, solve.messages(need[i]), r, "on", self.params) for i in todo]
            run_jobs(self.ctx.broker, jobs, self.ctx.bad_retries)
            for i, jb in zip(todo, jobs):
                bad[i].update(jb.bad)
                draft[i] = jb.value if jb.done else None
                history[i].append("draft" if jb.done else "draft_failed")
            have = [i for i in open_ if draft[i] is not None]
            # 2. the thinker reflects on the draft and revises it
            if self.thinker and have:
                jobs = [self._solution_job(self.thinker, reflect.messages(
                    need[i], thinking=draft[i].thinking, answer=draft[i].answer,
                    feedback=feedback[i] or "(none yet)"), r, None, self.role_params) for i in have]
                run_jobs(self.ctx.broker, jobs, self.ctx.bad_retries)
                for i, jb in zip(have, jobs):
                    bad[i].update(jb.bad)
                    if jb.done:
                        draft[i] = jb.value
                        history[i].append("revised")
            # 3. the critic checks consistency: accept / revise / reject
            verdict = {i: ("accept", "") for i in have}
            if self.critic and have:
                jobs = [Job(build=lambda a, m=critic.messages(need[i], thinking=draft[i].thinking, answer=draft[i].answer):
                            make_request(self.critic, m, self.role_params, sample=r + STRIDE * a),
                            parse=lambda rep: parse_verdict(rep.text, self.ctx.refusals)) for i in have]
                run_jobs(self.ctx.broker, jobs, self.ctx.bad_retries)
                for i, jb in zip(have, jobs):
                    bad[i].update(jb.bad)
                    verdict[i] = jb.value if jb.done else ("revise" if self.thinker else "reject", "")
                    history[i].append(verdict[i][0] if jb.done else "critic_failed")
            # 4. accepted drafts are kept only if they verify
            acc = [i for i in have if verdict[i][0] == "accept"]
            checks = self.ctx.grade([need[i] for i in acc], [draft[i].answer for i in acc])
            for i, (ok, how) in zip(acc, checks):
                history[i].append(f"verified:{how}" if ok else f"unverified:{how}")
                if ok:
                    finished[i] = draft[i]
                else:
                    verdict[i] = ("revise", "The final answer did not pass verification; find and fix the error.")
            for i in have:
                v, fb = verdict[i]
                if finished[i] is not None:
                    continue
                if v == "reject" or not self.thinker:
                    draft[i], feedback[i] = None, ""
                else:
                    feedback[i] = fb
            open_ = [i for i in open_ if finished[i] is None]
        roles = [self.solver] + ([self.thinker] if self.thinker else []) + ([self.critic] if self.critic else [])
        pr = ["solve"] + (["reflect"] if self.thinker else []) + (["critic"] if self.critic else [])
        for i, it in enumerate(need):
            sol = finished[i]
            prov = self.ctx.prov(roles, pr, self.params, rounds=used[i],
                                 history=history[i], accepted=sol is not None, bad=dict(sorted(bad[i].items())))
            if sol is not None:
                prov.update(thinking=sol.thinking, response=sol.answer)
                if it["mode"] == "on":
                    it["thinking"], it["response"] = sol.thinking, sol.answer
            _synth(it)["think"] = prov
            if sol is None and it["mode"] == "on":
                yield it, f"no verified think-on response after {self.rounds} round(s)"
            else:
                yield it, None


STEP_CLASSES = {"tag": TagStep, "vote": VoteStep, "judge": JudgeStep, "direct": OffStep, "think": OnStep}
ORDER = ("tag", "vote", "judge", "direct", "think", "assemble")
#: the step that writes the responses of each mode
RESPONSE_STEP = {"off": "direct", "on": "think"}
