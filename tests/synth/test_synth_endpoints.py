"""kat.synth endpoints, broker and request cache against a fake OpenAI-compatible server.

Retries with backoff on 429/5xx (Retry-After honoured), a clear error at once on 4xx, the concurrency limit,
timeouts, the key read from the environment variable named in the config (and never shown), and the
content-addressed cache (same question -> no request; another sample index -> a new request).
"""
from __future__ import annotations

import time

import pytest

from kat.synth.cache import Reply, RequestCache, request_key
from kat.synth.endpoints import Broker, EndpointConfig, EndpointError, make_request

SECRET = "sk-kat-test-0123456789abcdef"
MSGS = [{"role": "user", "content": "2+3"}]
PARAMS = {"temperature": 1.0, "max_tokens": 8}


def chat_reply(text):
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _broker(url, tmp_path, **ep):
    cfg = EndpointConfig.from_cfg("t", {"base_url": url, "model": "m", "backoff_s": 0.01, "backoff_max_s": 0.05, **ep})
    return Broker({"t": cfg}, backend="openai", cache=RequestCache(tmp_path / "c.sqlite"))


def test_retries_429_and_5xx_with_backoff_then_succeeds(fake_openai, tmp_path):
    def respond(body, n):
        if n == 0:
            return 429, {"error": {"message": "slow down"}}, {"retry-after": "0"}
        if n == 1:
            return 503, {"error": {"message": "overloaded"}}, {}
        return 200, chat_reply("<answer>5</answer>"), {}

    srv = fake_openai(respond)
    b = _broker(srv.url, tmp_path, max_retries=3)
    (rep,) = b.ask([make_request("t", MSGS, PARAMS)])
    assert rep.text == "<answer>5</answer>" and not rep.cached
    assert len(srv.requests) == 3
    assert b.stats["t"].retries == 2 and b.stats["t"].sent == 1
    assert rep.prompt_tokens == 7 and rep.completion_tokens == 3


def test_gives_up_after_max_retries_with_a_clear_error(fake_openai, tmp_path):
    srv = fake_openai(lambda body, n: (500, {"error": {"message": "boom"}}, {}))
    b = _broker(srv.url, tmp_path, max_retries=2)
    with pytest.raises(EndpointError, match=r"endpoint 't' .*gave up after 2 retries.*InternalServerError"):
        b.ask([make_request("t", MSGS, PARAMS)])
    assert len(srv.requests) == 3


@pytest.mark.parametrize("status,hint", [(401, "api_key_env"), (404, "/v1/models"), (400, "sampling params")])
def test_4xx_fails_at_once_with_status_and_hint_and_no_key(fake_openai, tmp_path, monkeypatch, status, hint):
    monkeypatch.setenv("KAT_SYNTH_TEST_KEY", SECRET)
    srv = fake_openai(lambda body, n: (status, {"error": {"message": f"nope, you sent {SECRET}"}}, {}))
    b = _broker(srv.url, tmp_path, max_retries=5, api_key_env="KAT_SYNTH_TEST_KEY")
    with pytest.raises(EndpointError) as e:
        b.ask([make_request("t", MSGS, PARAMS)])
    msg = str(e.value)
    assert f"HTTP {status}" in msg and hint in msg
    assert SECRET not in msg and "***" in msg  # a server echoing the key does not leak it
    assert len(srv.requests) == 1  # no retry
    assert srv.auth == [f"Bearer {SECRET}"]  # the key was read from the named variable and sent


def test_missing_key_variable_and_key_in_config_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("KAT_SYNTH_NO_SUCH_VAR", raising=False)
    b = _broker("http://127.0.0.1:9/v1", tmp_path, api_key_env="KAT_SYNTH_NO_SUCH_VAR")
    with pytest.raises(ValueError, match="KAT_SYNTH_NO_SUCH_VAR.*not set"):
        b.ask([make_request("t", MSGS, PARAMS)])
    with pytest.raises(ValueError, match="never put a key in the config.*api_key_env"):
        EndpointConfig.from_cfg("t", {"base_url": "x", "model": "m", "api_key": SECRET})
    with pytest.raises(ValueError, match="unknown field"):
        EndpointConfig.from_cfg("t", {"base_url": "x", "model": "m", "temprature": 1})


def test_timeouts_are_retried_then_reported(fake_openai, tmp_path):
    def respond(body, n):
        time.sleep(1.0)
        return 200, chat_reply("late"), {}

    srv = fake_openai(respond)
    b = _broker(srv.url, tmp_path, max_retries=1, timeout_s=0.2)
    t0 = time.time()
    with pytest.raises(EndpointError, match="gave up after 1 retries.*Timeout"):
        b.ask([make_request("t", MSGS, PARAMS)])
    assert time.time() - t0 < 3.0
    assert len(srv.requests) == 2


def test_concurrency_limit_and_cache(fake_openai, tmp_path):
    def respond(body, n):
        time.sleep(0.05)
        return 200, chat_reply(f"<answer>{body['messages'][-1]['content']}</answer>"), {}

    srv = fake_openai(respond)
    b = _broker(srv.url, tmp_path, max_concurrency=3)
    reqs = [make_request("t", [{"role": "user", "content": f"q{i}"}], PARAMS) for i in range(12)]
    reqs.append(reqs[0])  # a duplicate inside the batch is asked once
    replies = b.ask(reqs)
    assert [r.text for r in replies[:12]] == [f"<answer>q{i}</answer>" for i in range(12)]
    assert replies[12].text == replies[0].text
    assert len(srv.requests) == 12
    assert 1 < srv.max_inflight <= 3
    # the same questions again: all from the cache; another sample index is another question
    again = b.ask(reqs[:12] + [make_request("t", [{"role": "user", "content": "q0"}], PARAMS, sample=1)])
    assert all(r.cached for r in again[:12]) and not again[12].cached
    assert len(srv.requests) == 13
    assert b.stats["t"].cache_hits == 12 and b.stats["t"].sent == 13


def test_request_key_is_content_addressed():
    ident = {"backend": "openai", "base_url": "http://h/v1", "model": "m"}
    base = {"messages": MSGS, "params": PARAMS, "sample": 0, "trigger": None}
    k = request_key(ident, base)
    assert k == request_key(dict(reversed(list(ident.items()))), dict(base))  # key order does not matter
    for change in ({"sample": 1}, {"params": {**PARAMS, "temperature": 0.5}}, {"trigger": "<think_off>"},
                   {"messages": [{"role": "user", "content": "2+4"}]}):
        assert request_key(ident, {**base, **change}) != k
    assert request_key({**ident, "model": "m2"}, base) != k


def test_cache_persists_across_runs_and_counts_usage(tmp_path):
    c = RequestCache(tmp_path / "c.sqlite", run_id="r1")
    c.put("k1", "teacher", Reply(text="a", prompt_tokens=5, completion_tokens=2))
    c.put("k2", "judge", Reply(text="b", reasoning="r", finish_reason="stop", prompt_tokens=1, completion_tokens=1))
    c.close()
    c = RequestCache(tmp_path / "c.sqlite", run_id="r2")
    got = c.get("k2")
    assert got.text == "b" and got.reasoning == "r" and got.cached and c.get("nope") is None
    assert c.hits == 1 and c.misses == 1
    assert c.usage() == {"teacher": {"requests": 1, "prompt_tokens": 5, "completion_tokens": 2},
                         "judge": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 1}}
    assert c.sent_counts() == {"k1": 1, "k2": 1}


def test_kat_style_drops_system_and_sends_the_trigger_as_an_assistant_prefix(fake_openai, tmp_path):
    srv = fake_openai(lambda body, n: (200, chat_reply("<answer>5</answer>"), {}))
    b = _broker(srv.url, tmp_path, style="kat", extra_body={"skip_special_tokens": False})
    b.ask([make_request("t", [{"role": "system", "content": "be brief"}, *MSGS], PARAMS, mode="off")])
    body = srv.requests[0]
    assert body["messages"] == [*MSGS, {"role": "assistant", "content": "<think_off>"}]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["skip_special_tokens"] is False and body["max_tokens"] == 8
