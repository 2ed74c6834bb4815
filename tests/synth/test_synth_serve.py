"""The synth chain against a real ``transformers serve`` on loopback, killed mid-way and resumed.

The server hosts a tiny random-weight Qwen2 built and saved with kat.models.hf (the protocol is under
test, not the answers: every reply is garbage, so every answer is a bad answer that must be counted, retried
and set aside, never written as data). The run is SIGKILLed in the middle of its think step and started
again: the finished steps are skipped, the interrupted chunk is replayed from the request cache, and no
request answered before the kill is sent again (checked in the cache's ``sent`` table and in the server's
access log).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from kat.data import schema
from kat_testing import run_module

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("accelerate")  # transformers serve always passes a device_map


def _transformers_cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())"]


@pytest.fixture
def served(tiny_ckpt, tmp_path, synth_kit):
    """``(base_url, model, log_path)`` of a transformers-serve process hosting the tiny checkpoint."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in Path(tiny_ckpt).iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    # keep the reply as plain content (docs/serving.md: qwen2 checkpoints otherwise get a reasoning parser)
    tc = json.loads((ckpt / "tokenizer_config.json").read_text())
    tc["response_template"] = {"defaults": {"role": "assistant"}, "start_anchor": "<|assistant|>",
                               "fields": {"content": {"close_pattern": r"\s*(?:<\|end\|>|<\|endoftext\|>)",
                                                      "content": "text"}}}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(tc))
    port = synth_kit.free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen([*_transformers_cli(), "serve", str(ckpt), "--device", "cpu", "--host", "127.0.0.1",
                                 "--port", str(port)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    import urllib.request

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None

    try:
        assert synth_kit.wait_for(up, timeout=120, every=0.3), "transformers serve did not come up"
        assert proc.poll() is None, log.read_text()[-3000:]
        yield f"http://127.0.0.1:{port}/v1", str(ckpt), log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rows(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM replies").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_chain_on_transformers_serve_killed_and_resumed(served, tmp_path, synth_kit):
    url, model, server_log = served
    work = tmp_path / "work"
    args = ["kat.synth", "synth=openai", "logger=none", f"synth.work_dir={work}", f"hydra.run.dir={tmp_path / 'run'}",
            "synth.input.n_per_level=1", "synth.input.n_val_per_level=1", "synth.chunk_size=20",
            "synth.vote.k=2", "synth.vote.params.max_tokens=16", "synth.judge.source=template",
            "synth.direct.for=all", "synth.think.rounds=2", "synth.think.params.max_tokens=24",
            *[f"synth.endpoints.{e}.{k}={v}" for e in ("teacher", "judge")
              for k, v in (("base_url", url), ("model", model), ("max_concurrency", 4), ("send_seed", "true"),
                           ("timeout_s", 60))]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    db = work / "cache.sqlite"
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # wait until the think step is under way, then let it answer a few requests and kill -9
        assert synth_kit.wait_for(lambda: (work / "think" / "manifest.json").exists() or proc.poll() is not None,
                                  timeout=240, every=0.05), "the run never reached the think step"
        start = _rows(db)
        assert synth_kit.wait_for(lambda: _rows(db) >= start + 6 or proc.poll() is not None, timeout=120, every=0.05)
        assert proc.poll() is None, "the run finished before it could be killed:\n" + proc.stdout.read()[-3000:]
        at_kill = _rows(db)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after_kill = _rows(db)
    assert not list((work / "think").glob("shard-*.jsonl")) or all(
        not p.read_text().strip() for p in (work / "think").glob("shard-*.jsonl"))  # the think chunk was in flight

    r = run_module(args, cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(Path(r.stdout.strip().splitlines()[-1]).read_text())
    total = _rows(db)

    # finished steps were not redone; the interrupted chunk came back from the cache
    for step in ("tag", "vote", "judge", "direct"):
        assert report["steps"][step]["this_run"] == {"done": 0, "aside": 0, "skipped_done": 0}, step
        assert report["steps"][step]["in"] == 20
    assert report["cache"]["hits"] >= at_kill - start > 0
    assert report["cache"]["sent"] == total - after_kill
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT MAX(n) FROM (SELECT COUNT(*) AS n FROM sent GROUP BY key)").fetchone()[0] == 1
        assert c.execute("SELECT COUNT(DISTINCT run) FROM sent").fetchone()[0] == 2
    # the server saw every stored request once, plus at most the ones in flight at the kill
    posts = server_log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert total <= posts <= total + 4

    # garbage replies are bad answers: counted, retried, set aside; nothing made it into the data
    assert report["steps"]["vote"]["bad_total"] > 0 and report["steps"]["think"]["bad_total"] > 0
    assert report["steps"]["think"]["aside"] == report["steps"]["think"]["in"]  # no draft verified
    assert report["outputs"]["coldstart"] == 0
    assert report["endpoints"]["teacher"]["prompt_tokens"] > 0 and report["endpoints"]["teacher"]["completion_tokens"] > 0
    n_lines = 0
    for p in work.rglob("*.jsonl"):
        for line in p.read_text().splitlines():
            assert not schema.sample_errors(json.loads(line)), (p, line[:300])
            n_lines += 1
    assert n_lines >= 20 * 6  # input + five steps, each item somewhere
