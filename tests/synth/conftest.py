"""Fixtures of the kat.synth tests: a scriptable OpenAI-compatible server (stdlib), and a tiny checkpoint."""
from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chat_reply(text: str, *, finish_reason: str = "stop", prompt_tokens: int = 7, completion_tokens: int = 3,
               model: str = "fake") -> dict:
    """A chat.completion body as OpenAI-compatible servers return it."""
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "finish_reason": finish_reason,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class FakeOpenAI:
    """``POST /v1/chat/completions`` answered by ``respond(body, n) -> (status, payload, headers)``.

    ``n`` counts calls (from 0). Every request body and its Authorization header are recorded; ``max_inflight``
    is the most requests the server was handling at once.
    """

    def __init__(self, respond: Callable[[dict, int], tuple[int, dict | str, dict]]):
        self.respond = respond
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("content-length", 0)))
                body = json.loads(raw or b"{}")
                with server._lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.auth.append(self.headers.get("authorization"))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    status, payload, headers = server.respond(body, n)
                finally:
                    with server._lock:
                        server.inflight -= 1
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    for k, v in (headers or {}).items():
                        self.send_header(k, str(v))
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def synth_kit():
    """Helpers for the synth tests (tests/synth is not on sys.path): ``chat_reply``, ``wait_for``, ``free_port``,
    ``TINY_ARCH``."""
    import types

    return types.SimpleNamespace(chat_reply=chat_reply, wait_for=wait_for, free_port=free_port, TINY_ARCH=TINY_ARCH)


@pytest.fixture
def fake_openai():
    """``fake_openai(respond) -> FakeOpenAI`` (stopped at teardown)."""
    servers: list[FakeOpenAI] = []

    def start(respond):
        s = FakeOpenAI(respond)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def wait_for(pred: Callable[[], bool], timeout: float, every: float = 0.2) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(every)
    return pred()


TINY_ARCH = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=64, max_position_embeddings=512, tie_word_embeddings=True, rope_theta=10000.0)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny random-weight Qwen2 with kat's char tokenizer, saved with kat.models.hf (for protocol tests)."""
    import torch

    from kat.models import hf
    from kat.models.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = hf.build_from_config(TINY_ARCH, tok)
    hf.configure_generation(model, tok)
    return hf.save(model, tok, tmp_path_factory.mktemp("synth_ckpt") / "tiny")
