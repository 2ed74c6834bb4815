"""The whole chain (`python -m kat.synth synth=openai`) against a scripted OpenAI-compatible "oracle".

The oracle plays every role on the embedded suite: it tags from the prompt's shape, answers directly right at
levels 1-2, right every other time at level 3 and wrong at levels 4-5, solves level 5 wrong on the first
draft (so the thinker and critic have work), grades the items without gold, writes rationales, and now and
then answers badly (refusal, empty, non-JSON, an answer with a stray tag). Checked: the labels follow the
vote rule, bad answers are counted and never written as data, every output line passes the schema, the
report and the MLflow run exist, and the API key appears in no log, param, artifact or file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from kat.data import schema, synthetic
from kat_testing import run_module

SECRET = "sk-kat-chain-test-9f8e7d6c5b4a"
KEY_ENV = "KAT_SYNTH_CHAIN_KEY"


def _query(body: dict) -> tuple[str, str]:
    """(role, query) of a request, from the system prompt the templates use."""
    msgs = body["messages"]
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else ""
    user = msgs[-1]["content"]
    role = next((r for r, key in (("tag", "annotator"), ("direct", "Answer directly"), ("solve", "Solve the request"),
                                  ("reflect", "review and improve"), ("critic", "strict reviewer"),
                                  ("grade", "You grade"), ("rationale", "short decision")) if key in system), "?")
    if role in ("direct", "solve"):
        return role, user
    m = re.search(r"REQUEST\n(.*?)(?:\n\n[A-Z ]+\n|\Z)", user, re.DOTALL)
    return role, m.group(1).strip() if m else user


def _truth(q: str) -> dict:
    """Domain, level, sum and the right answer text of an embedded-suite query (or of the no-gold items)."""
    if q.startswith("Write a haiku"):
        return {"domain": "general", "level": 2, "answer": "autumn moon"}
    a, b = (int(x) for x in re.findall(r"\d+", q)[:2])
    s = a + b
    level = {(1, 1): 1, (2, 1): 2, (2, 2): 3, (3, 3): 4, (4, 4): 5}[(len(str(a)), len(str(b)))]
    if q.startswith("code:"):
        return {"domain": "code", "level": level, "answer": f"f=lambda x:x+{s}", "wrong": f"f=lambda x:x+{s + 1}"}
    if "A)" in q:
        opts = dict(re.findall(r"([A-D])\)(\d+)", q))
        right = next(k for k, v in opts.items() if int(v) == s)
        return {"domain": "science", "level": level, "answer": right, "wrong": next(k for k in opts if k != right)}
    if q.startswith("Ann has"):
        return {"domain": "general", "level": level, "answer": f"{s} in total", "wrong": f"{s + 1} in total"}
    return {"domain": "math", "level": level, "answer": str(s), "wrong": str(s + 10)}


def oracle():
    seen: Counter = Counter()

    def respond(body, n):
        role, q = _query(body)
        t = _truth(q)
        seen[(role, q)] += 1
        k = seen[(role, q)]
        if role == "tag":
            if q == "2+8" or (q.startswith("Write a haiku") and k == 1):
                text = "I'm sorry, but I can't classify that."  # a refusal: retried (the haiku) or set aside (2+8)
            else:
                text = f'```json\n{{"domain": "{t["domain"]}", "level": {t["level"]}}}\n```'
        elif role == "direct":
            right = t["level"] <= 2 or (t["level"] == 3 and k % 2 == 1)
            if t["level"] == 2 and k == 1 and t["domain"] == "math":
                text = ""  # an empty reply, retried
            else:
                text = f"<answer>{t['answer'] if right else t.get('wrong', 'no idea')}</answer>"
        elif role == "solve":
            ans = t.get("wrong", t["answer"]) if t["level"] == 5 else t["answer"]
            text = f"<think>adding the columns of {q}</think><answer>{ans}</answer>"
        elif role == "reflect":  # keeps the draft's answer until a reviewer note asks for a fix
            content = body["messages"][-1]["content"]
            draft = re.search(r"DRAFT ANSWER\n(.*?)\n\n", content, re.DOTALL).group(1).strip()
            ans = draft if "(none yet)" in content else t["answer"]
            text = f"<think>column by column, checked twice: {q}</think><answer>{ans}</answer>"
        elif role == "critic":
            m = re.search(r"FINAL ANSWER\n(.*)\Z", body["messages"][-1]["content"], re.DOTALL)
            ok = m and m.group(1).strip() == t["answer"]
            text = json.dumps({"verdict": "accept" if ok else "revise", "feedback": "" if ok else "recheck the carry"})
        elif role == "grade":
            m = re.search(r"CANDIDATE ANSWER\n(.*)\Z", body["messages"][-1]["content"], re.DOTALL)
            text = json.dumps({"correct": bool(m and "moon" in m.group(1))})
        elif role == "rationale":
            mode = "THINK-OFF" if "right choice is THINK-OFF" in body["messages"][-1]["content"] else "THINK-ON"
            text = "" if k == 1 and t["level"] == 3 else f"The request is a sum of {t['level']} digits; use {mode} mode."
        else:
            return 400, {"error": {"message": f"unexpected prompt: {body['messages'][0]['content'][:40]}"}}, {}
        return 200, {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": max(1, len(text) // 4), "total_tokens": 11}}, {}

    return respond


def _queries(path: Path) -> list[dict]:
    items = synthetic.generate(1, seed=3, split="train")  # 4 domains x 5 levels
    for it in items:  # raw queries: no labels, no tags
        for k in ("mode", "judge", "thinking", "response", "domain", "level"):
            it.pop(k)
    items += [{"id": f"haiku-{i}", "messages": [{"role": "user", "content": f"Write a haiku about autumn #{i}"}]}
              for i in range(2)]  # no gold: graded by the judge model
    schema.write_jsonl(path, items)
    return items


def _overrides(url: str, tmp: Path, mlflow: bool = True) -> list[str]:
    return ["synth=openai", f"synth.input.source={tmp / 'queries.jsonl'}", f"synth.work_dir={tmp / 'work'}",
            f"hydra.run.dir={tmp / 'run'}", "synth.vote.k=2", "synth.direct.for=all", "synth.chunk_size=8",
            "synth.tag.skip_tagged=false", "synth.think.rounds=2",
            *[f"synth.endpoints.{e}.{k}={v}" for e in ("teacher", "judge")
              for k, v in (("base_url", url), ("api_key_env", KEY_ENV), ("backoff_s", 0.01), ("max_concurrency", 4))],
            *(["logger=mlflow", f"logger.mlflow.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
               f"logger.mlflow.artifact_location={tmp / 'mlartifacts'}"] if mlflow else ["logger=none"])]


def test_chain_against_an_oracle_endpoint(fake_openai, tmp_path):
    srv = fake_openai(oracle())
    items = _queries(tmp_path / "queries.jsonl")
    r = run_module(["kat.synth", *_overrides(srv.url, tmp_path)], cwd=tmp_path, env_extra={KEY_ENV: SECRET},
                   timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report_path = Path(r.stdout.strip().splitlines()[-1])
    report = json.loads(report_path.read_text())
    out = tmp_path / "work" / "out"
    assert report_path == out / "report.json"
    assert set(srv.auth) == {f"Bearer {SECRET}"}

    # every line of every shard, aside file and output passes the schema
    for p in (tmp_path / "work").rglob("*.jsonl"):
        for line in p.read_text().splitlines():
            assert not schema.sample_errors(json.loads(line)), (p, line[:200])
    cold = schema.load_samples(out / "coldstart.jsonl", "coldstart")
    dist = schema.load_samples(out / "distill.jsonl", "distill")

    # tagging: 2+8 was refused every time -> set aside with the reason; the haiku's refusal was retried
    tag = report["steps"]["tag"]
    aside = [json.loads(x) for x in (out / "aside.jsonl").read_text().splitlines()]
    untaggable = [a["id"] for a in aside if a["synth_aside"]["reason"].startswith("untaggable")]
    n_seven = sum(it["messages"][-1]["content"] == "2+8" for it in items)
    assert n_seven == 1
    assert len(untaggable) == n_seven and tag["aside"] == n_seven
    assert tag["bad_answers"]["refusal"] == 3 * n_seven + 2
    assert report["acceptance"]["tag"]["tagged"] == len(items) - n_seven

    # the vote rule: think-off iff both direct answers were right (levels 1-2); level 3 alternates; 4-5 wrong
    final = [json.loads(x) for x in (tmp_path / "work" / "think" / "shard-00000.jsonl").read_text().splitlines()]
    assert len(final) == len(items) - n_seven
    by_id = {c["id"]: c for c in final}
    for c in final:
        v = c["synth"]["vote"]
        assert v["tally"]["teacher"]["correct"] == v["correct"]
        if v["random"]:
            continue
        expect = "off" if c["level"] <= 2 else "on"
        if c["id"].startswith("haiku"):
            assert v["graded_by"] == {"grader": 2}  # no gold: graded by the judge model ("autumn moon" is right)
        assert c["mode"] == expect, (c["id"], v)
        assert c["synth"]["tag"]["prompts"][0].startswith("tag-v1@")
    assert report["steps"]["vote"]["bad_answers"].get("empty", 0) >= 1  # the empty replies were retried
    # rationales: model-written, one empty reply retried per level-3 item
    assert all(c["judge"].endswith("mode.") for c in final)
    assert report["steps"]["judge"]["bad_answers"]["empty"] == sum(1 for c in final if c["level"] == 3) == 4
    # think-on: level 5 needs the thinker (first draft wrong, critic says revise) -> accepted in round 2
    l5 = [c for c in final if c["level"] == 5]
    assert l5 and all(c["synth"]["think"]["rounds"] == 2 and "revise" in c["synth"]["think"]["history"] for c in l5)
    assert all("checked twice" in c["thinking"] for c in final if c["mode"] == "on")
    # think-off responses are verified answers (the vote's own, from the cache)
    for c in final:
        if c["mode"] == "off" and not c["id"].startswith("haiku"):
            assert c["response"] == _truth(c["messages"][-1]["content"])["answer"]
    # ColdStart at the preset's 2:1 on:off, drawn without replacement; Distill: every verified response, both
    # modes where both exist (direct.for=all), ids <id>:<mode>
    n_on, n_off = (sum(c["mode"] == m for c in final) for m in ("on", "off"))
    assert len(cold) == min(int(n_on / 0.667), int(n_off / 0.333)) and len({c["id"] for c in cold}) == len(cold)
    assert abs(sum(c["mode"] == "on" for c in cold) / len(cold) - 0.667) < 0.04
    modes = Counter(d["mode"] for d in dist)
    assert modes["on"] == n_on and modes["off"] == sum(1 for c in final if c["synth"]["direct"].get("response"))
    assert {d["id"].rsplit(":", 1)[0] for d in dist} <= set(by_id)
    # no bad answer became data: no refusal or empty text anywhere in the outputs
    for c in final:
        assert c["response"].strip() and "sorry" not in c["judge"].lower()
    # report: counts, acceptance, shares, tokens per endpoint
    assert report["outputs"]["coldstart"] == len(cold) and report["input"] == len(items)
    assert report["mode_share"]["labels"]["level"]["1"]["off_share"] > 0.5
    assert report["endpoints"]["teacher"]["completion_tokens"] > 0 and report["endpoints"]["judge"]["requests"] > 0
    assert report["cache"]["sent"] == len(srv.requests)
    assert "kat.synth — steps" in r.stdout

    # the MLflow run: params hold the variable's NAME; no file anywhere holds the key
    db = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(db.execute("SELECT key, value FROM params").fetchall())
    assert params["synth/endpoints/teacher/api_key_env"] == KEY_ENV
    tags = dict(db.execute("SELECT key, value FROM tags").fetchall())
    assert tags["kat.stage"] == "synth"
    mets = {k for (k,) in db.execute("SELECT key FROM metrics").fetchall()}
    assert "synth/outputs/coldstart" in mets and "synth/mode_share/labels/level/1/off_share" in mets
    db.close()
    assert list((tmp_path / "mlartifacts").rglob("report.json"))
    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert SECRET not in r.stdout + r.stderr


def test_client_error_stops_the_run_with_a_clear_message(fake_openai, tmp_path):
    srv = fake_openai(lambda body, n: (404, {"error": {"message": "model 'teacher' not found"}}, {}))
    _queries(tmp_path / "queries.jsonl")
    r = run_module(["kat.synth", *_overrides(srv.url, tmp_path, mlflow=False)], cwd=tmp_path,
                   env_extra={KEY_ENV: SECRET}, timeout=300)
    assert r.returncode == 2
    assert "HTTP 404" in r.stderr and "model 'teacher' not found" in r.stderr and "/v1/models" in r.stderr
    assert "Traceback" not in r.stderr
    # no request was retried; the first error cancelled the queued ones (those already in flight finished)
    assert len({json.dumps(b, sort_keys=True) for b in srv.requests}) == len(srv.requests) <= 2 * 4


@pytest.mark.parametrize("bad,match", [
    (["synth.think.critic=teacher", "synth.endpoints.teacher.style=kat"], "needs a chat endpoint"),
    (["synth.vote.endpoints=[nobody]"], "no endpoint 'nobody'"),
    (["synth.steps=[vote,tag]"], "must keep the order"),
])
def test_config_errors_name_the_setting(compose_cfg, tmp_path, bad, match):
    from kat.synth.run import synth

    cfg = compose_cfg(["synth=openai", f"synth.work_dir={tmp_path}", "logger=none", *bad], config_name="synth")
    with pytest.raises(ValueError, match=match):
        synth(cfg)


@pytest.mark.slow
def test_ctrl_c_stops_quickly_and_the_next_run_continues(fake_openai, tmp_path, synth_kit):
    def slow(body, n):
        time.sleep(0.3)
        return 200, synth_kit.chat_reply("<answer>1</answer>"), {}

    srv = fake_openai(slow)
    _queries(tmp_path / "queries.jsonl")
    args = ["kat.synth", *_overrides(srv.url, tmp_path, mlflow=False), "synth.steps=[vote]",
            "synth.tag.skip_tagged=true"]
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, KEY_ENV: SECRET})
    db = tmp_path / "work" / "cache.sqlite"

    def rows() -> int:
        try:
            with sqlite3.connect(db, timeout=5) as c:
                return c.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
        except sqlite3.Error:
            return 0

    assert synth_kit.wait_for(lambda: rows() >= 3 or proc.poll() is not None, timeout=120, every=0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert time.time() - t0 < 10  # queued requests were cancelled, not sent
    assert "interrupted" in err and "run the same command again" in err
    n_before = len(srv.requests)
    r = run_module(args, cwd=tmp_path, env_extra={KEY_ENV: SECRET}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM sent GROUP BY key)").fetchone()[0] == 1
    assert len(srv.requests) - n_before == json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())["cache"]["sent"]
