"""A content-addressed request cache in SQLite: re-running never re-asks an answered question.

The key is the SHA-256 of the canonical JSON of what is actually asked: the endpoint's identity (base URL
or local checkpoint path, model name, request style), the effective messages, the sampling parameters, the
forced mode and the sample index (the k-th sample of the same question is a different request). API keys
are never part of a key or of anything stored.

Each reply is committed as it arrives (SQLite WAL, one transaction per reply), so a crash or Ctrl-C loses
at most the requests that were in flight. Bad replies (empty, refusals, ...) are cached too: a resumed run
replays the same retry sequence from the cache instead of asking again.

Tables: ``replies`` (key, endpoint name, text, reasoning, finish reason, token counts, time) and ``sent``
(one row per request that was actually sent and answered, with the run id: ``sent`` rows per key are 1
unless the cache was bypassed).
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY, endpoint TEXT NOT NULL, text TEXT NOT NULL, reasoning TEXT, finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sent (key TEXT NOT NULL, run TEXT NOT NULL, endpoint TEXT NOT NULL, time REAL NOT NULL);
"""


def request_key(identity: dict[str, Any], payload: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``{"endpoint": identity, "request": payload}`` as canonical JSON."""
    blob = json.dumps({"endpoint": identity, "request": payload}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass
class Reply:
    """One answer of an endpoint (``cached``: it came from the cache, not from the endpoint)."""

    text: str
    reasoning: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False


class RequestCache:
    """``get(key) -> Reply | None`` and ``put(key, endpoint, reply)`` on a SQLite file (thread-safe)."""

    def __init__(self, path: str | Path, run_id: str = "run"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.commit()
        self.hits = 0
        self.misses = 0
        self.closed = False

    def get(self, key: str) -> Reply | None:
        with self._lock:
            row = self._db.execute(
                "SELECT text, reasoning, finish_reason, prompt_tokens, completion_tokens FROM replies WHERE key=?",
                (key,)).fetchone()
            if row is None:
                self.misses += 1
                return None
            self.hits += 1
        return Reply(text=row[0], reasoning=row[1], finish_reason=row[2], prompt_tokens=row[3],
                     completion_tokens=row[4], cached=True)

    def put(self, key: str, endpoint: str, reply: Reply) -> None:
        """Store ``reply`` (and a ``sent`` row for this run) in one committed transaction."""
        now = time.time()
        with self._lock:
            if self.closed:  # a request that finished after the run stopped (Ctrl-C): nothing to keep it in
                return
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO replies VALUES (?,?,?,?,?,?,?,?)",
                    (key, endpoint, reply.text, reply.reasoning, reply.finish_reason, int(reply.prompt_tokens),
                     int(reply.completion_tokens), now))
                self._db.execute("INSERT INTO sent VALUES (?,?,?,?)", (key, self.run_id, endpoint, now))

    def usage(self) -> dict[str, dict[str, int]]:
        """Per endpoint over the whole cache: ``requests``, ``prompt_tokens``, ``completion_tokens`` (the cost paid)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT endpoint, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM replies GROUP BY endpoint"
            ).fetchall()
        return {e: {"requests": n, "prompt_tokens": int(p or 0), "completion_tokens": int(c or 0)}
                for e, n, p, c in rows}

    def sent_counts(self) -> dict[str, int]:
        """``{key: times sent}`` over all runs (a value above 1 means a request was asked twice)."""
        with self._lock:
            return dict(self._db.execute("SELECT key, COUNT(*) FROM sent GROUP BY key").fetchall())

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._db.close()
