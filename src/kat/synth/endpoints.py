"""Endpoints: any OpenAI-compatible server through the ``openai`` client, or in-process HF models.

A synth step asks questions as :class:`Request` s (endpoint name, messages, sampling parameters, sample
index, and the mode for kat-style models); :class:`Broker.ask` answers a batch of them: from the
:class:`~kat.synth.cache.RequestCache` when the same question was answered before, else from the
endpoint, and stores every new reply as it arrives.

Endpoint styles:

* ``chat``: a general instruction-following model. The instructions are in the messages (system prompt
  + the query); the mode is a property of the prompt, not of the request.
* ``kat``: a kat forced-mode model (the embedded tiny teacher, or a kat checkpoint): system messages are
  dropped (it was never trained on them) and the trigger ``<think_on>``/``<think_off>`` is appended after
  the generation prompt, the distill format (docs/design.md §3). Local models take the trigger directly; over
  HTTP it is sent as a prefilled assistant message with vLLM's ``continue_final_message`` extra.

Transports (``synth.backend``):

* ``openai``: ``openai.OpenAI(base_url, api_key=$<api_key_env>, max_retries=0)``; up to
  ``max_concurrency`` requests in flight per endpoint; per-request ``timeout_s``; 408/409/429/5xx,
  connection errors and timeouts retried ``max_retries`` times with exponential backoff and jitter
  (``backoff_s · 2^attempt``, capped at ``backoff_max_s``; a ``Retry-After`` header wins); any other 4xx
  raises :class:`EndpointError` at once with the status, the server's message and a hint. The key is
  read from the environment variable *named* in the config, never logged, never stored, and scrubbed
  from every error message.
* ``local``: HF ``generate`` in this process (``kat.rollout.hf.generate``), batched; the model of an
  endpoint is ``endpoints.<name>.path`` or the ``model`` group (``model.path``; the tiny teacher built
  from config, with a warning, when unset).
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kat.data.templates import mode_token
from kat.synth.cache import Reply, RequestCache, request_key

log = logging.getLogger(__name__)  # plain logging: kat.utils would import lightning (slow start-up)

STYLES = ("chat", "kat")
BACKENDS = ("openai", "local")
RETRY_STATUS = (408, 409, 429)
PARAM_KEYS = ("max_tokens", "temperature", "top_p")


class EndpointError(RuntimeError):
    """An endpoint refused a request (4xx) or kept failing after all retries."""


@dataclass(frozen=True)
class EndpointConfig:
    """One ``synth.endpoints.<name>`` entry (see conf/synth/_base.yaml for every field)."""

    name: str
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    path: str | None = None
    style: str = "chat"
    max_concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    send_seed: bool = False
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_cfg(name: str, node: Mapping[str, Any]) -> "EndpointConfig":
        node = dict(node)
        for k in list(node):
            if k in ("api_key", "key", "token", "password", "secret"):
                raise ValueError(
                    f"synth.endpoints.{name}.{k}: never put a key in the config; export it in an environment "
                    f"variable and give that variable's NAME as synth.endpoints.{name}.api_key_env")
        known = {f for f in EndpointConfig.__dataclass_fields__ if f != "name"}
        unknown = sorted(set(node) - known)
        if unknown:
            raise ValueError(f"synth.endpoints.{name}: unknown field(s) {unknown} (known: {sorted(known)})")
        ep = EndpointConfig(name=name, **{k: v for k, v in node.items()})
        if ep.style not in STYLES:
            raise ValueError(f"synth.endpoints.{name}.style must be one of {STYLES}, got {ep.style!r}")
        if int(ep.max_concurrency) < 1:
            raise ValueError(f"synth.endpoints.{name}.max_concurrency must be >= 1, got {ep.max_concurrency}")
        if int(ep.max_retries) < 0:
            raise ValueError(f"synth.endpoints.{name}.max_retries must be >= 0, got {ep.max_retries}")
        return ep

    def where(self) -> str:
        return f"endpoint {self.name!r} ({self.base_url}, model {self.model!r})"


@dataclass(frozen=True)
class Request:
    """One question: ``messages`` as ``((role, content), ...)``, ``params`` as sorted ``((name, value), ...)``."""

    endpoint: str
    messages: tuple
    params: tuple
    sample: int = 0
    mode: str | None = None  # "on"/"off": the trigger kat-style endpoints get (chat endpoints ignore it)


def make_request(endpoint: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any], *, sample: int = 0,
                 mode: str | None = None) -> Request:
    """A :class:`Request`; ``params`` keeps only ``max_tokens``, ``temperature``, ``top_p``."""
    unknown = set(params) - set(PARAM_KEYS)
    if unknown:
        raise ValueError(f"sampling params: unknown key(s) {sorted(unknown)} (known: {PARAM_KEYS})")
    if mode is not None:
        mode_token(mode)  # validates
    msgs = tuple((str(m["role"]), str(m["content"])) for m in messages)
    return Request(endpoint=endpoint, messages=msgs, params=tuple(sorted((k, params[k]) for k in params)),
                   sample=int(sample), mode=mode)


@dataclass
class EndpointStats:
    """This run's traffic of one endpoint."""

    sent: int = 0
    cache_hits: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("sent", "cache_hits", "retries", "prompt_tokens", "completion_tokens")}


def _payload(ep: EndpointConfig, req: Request, seed: int) -> dict[str, Any]:
    """What is actually asked of ``ep`` (the cache key's request part)."""
    msgs = [{"role": r, "content": c} for r, c in req.messages]
    trigger = None
    if ep.style == "kat":
        msgs = [m for m in msgs if m["role"] != "system"]
        trigger = mode_token(req.mode) if req.mode else None
    out: dict[str, Any] = {"messages": msgs, "params": dict(req.params), "sample": req.sample, "trigger": trigger}
    if ep.send_seed:
        out["seed"] = derived_seed(seed, req.sample)
    return out


def derived_seed(seed: int, sample: int) -> int:
    """A 31-bit seed from the run seed and the sample index."""
    return int(hashlib.sha256(f"kat-synth/{seed}/{sample}".encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


# ------------------------------------------------------------------------------------------------ openai
class OpenAITransport:
    """Requests to one OpenAI-compatible endpoint, with retries and backoff (see the module docstring)."""

    def __init__(self, ep: EndpointConfig, stats: EndpointStats):
        if not ep.base_url or not ep.model:
            raise ValueError(f"synth.endpoints.{ep.name}: backend=openai needs base_url and model")
        self.ep = ep
        self.stats = stats
        self._key = self._read_key()
        self._client = None
        self._pool = ThreadPoolExecutor(max_workers=int(ep.max_concurrency), thread_name_prefix=f"synth-{ep.name}")

    def _read_key(self) -> str | None:
        env = self.ep.api_key_env
        if not env:
            return None
        val = os.environ.get(str(env))
        if not val:
            raise ValueError(f"synth.endpoints.{self.ep.name}.api_key_env={env!r}: that environment variable is "
                             "not set (export the key in it, or set api_key_env=null for servers without auth)")
        return val

    def identity(self) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.ep.base_url.rstrip("/"), "model": self.ep.model,
                "style": self.ep.style, "extra_body": dict(self.ep.extra_body or {})}

    def redact(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    @property
    def client(self):
        if self._client is None:
            import openai

            self._client = openai.OpenAI(base_url=self.ep.base_url, api_key=self._key or "EMPTY",
                                         timeout=float(self.ep.timeout_s), max_retries=0)
        return self._client

    def _call_once(self, payload: dict[str, Any]) -> Reply:
        p = payload["params"]
        msgs = list(payload["messages"])
        extra = dict(self.ep.extra_body or {})
        if payload.get("trigger"):  # kat-style model over HTTP: continue an assistant prefix (vLLM extra)
            msgs.append({"role": "assistant", "content": payload["trigger"]})
            extra.update({"add_generation_prompt": False, "continue_final_message": True})
        kwargs: dict[str, Any] = {"model": self.ep.model, "messages": msgs}
        if p.get("max_tokens") is not None:
            kwargs["max_tokens"] = int(p["max_tokens"])
        if p.get("temperature") is not None:
            kwargs["temperature"] = float(p["temperature"])
        if p.get("top_p") is not None:
            kwargs["top_p"] = float(p["top_p"])
        if "seed" in payload:
            kwargs["seed"] = int(payload["seed"])
        if extra:
            kwargs["extra_body"] = extra
        r = self.client.chat.completions.create(**kwargs)
        if not getattr(r, "choices", None):
            return Reply(text="", finish_reason="no_choices")
        ch = r.choices[0]
        msg = ch.message
        extra_fields = getattr(msg, "model_extra", None) or {}
        reasoning = getattr(msg, "reasoning_content", None) or extra_fields.get("reasoning_content") \
            or extra_fields.get("reasoning")
        usage = getattr(r, "usage", None)
        return Reply(text=msg.content or "", reasoning=reasoning if isinstance(reasoning, str) else None,
                     finish_reason=ch.finish_reason,
                     prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                     completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))

    def call(self, payload: dict[str, Any]) -> Reply:
        """One request with retries; raises :class:`EndpointError` on 4xx or when the retries run out."""
        import openai

        attempt = 0
        while True:
            try:
                return self._call_once(payload)
            except openai.APIStatusError as e:
                status = int(getattr(e, "status_code", 0) or 0)
                if status in RETRY_STATUS or status >= 500:
                    err, retry_after = e, _retry_after(e)
                else:
                    raise EndpointError(self._refusal_message(status, e)) from None
            except (openai.APIConnectionError, openai.APITimeoutError) as e:
                err, retry_after = e, None
            if attempt >= int(self.ep.max_retries):
                raise EndpointError(self.redact(
                    f"{self.ep.where()}: gave up after {attempt} retries; last error: "
                    f"{type(err).__name__}: {_msg(err)}")) from None
            delay = min(float(self.ep.backoff_max_s), float(self.ep.backoff_s) * 2 ** attempt)
            delay = retry_after if retry_after is not None else delay * (0.5 + random.random() / 2)
            self.stats.add(retries=1)
            log.warning(self.redact(f"{self.ep.where()}: {type(err).__name__} ({_msg(err)[:120]}); "
                                    f"retry {attempt + 1}/{self.ep.max_retries} in {delay:.1f}s"))
            time.sleep(max(0.0, delay))
            attempt += 1

    def _refusal_message(self, status: int, e: Exception) -> str:
        hints = {
            401: f"the key was rejected: check the environment variable named by "
                 f"synth.endpoints.{self.ep.name}.api_key_env ({self.ep.api_key_env!r})",
            403: "the key has no access to this model or endpoint",
            404: "check base_url (most servers want it to end in /v1) and the model name the server lists at /v1/models",
            400: "the server rejected the request body: check the sampling params and extra_body",
            422: "the server rejected the request body: check the sampling params and extra_body",
        }
        hint = hints.get(status, "a client error: retrying would not help")
        return self.redact(f"{self.ep.where()} answered HTTP {status}: {_msg(e)[:300]} ({hint})")

    def submit(self, fn, *args):
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _msg(e: Exception) -> str:
    return str(getattr(e, "message", None) or e)


def _retry_after(e: Exception) -> float | None:
    resp = getattr(e, "response", None)
    headers = getattr(resp, "headers", None) or {}
    try:
        v = headers.get("retry-after")
        return None if v is None else max(0.0, min(float(v), 120.0))
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ local
class LocalTransport:
    """HF ``generate`` on an in-process model (batched; sampling seeded per batch from its first key)."""

    _models: dict[str, tuple] = {}

    def __init__(self, ep: EndpointConfig, model_cfg: Mapping[str, Any], stats: EndpointStats, *, batch_size: int,
                 seed: int, device: str = "cpu"):
        self.ep = ep
        self.stats = stats
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = device
        self.model_cfg = dict(model_cfg or {})
        if ep.path:
            self.model_cfg["path"] = ep.path
        self.path = self.model_cfg.get("path")

    def identity(self) -> dict[str, Any]:
        if self.path:
            src = str(Path(self.path).resolve())
        else:  # an untrained model built from config: its replies depend on the seed and the architecture
            src = f"untrained:{self.model_cfg.get('name')}:{sorted((self.model_cfg.get('arch') or {}).items())}" \
                  f":seed={self.seed}"
        return {"backend": "local", "path": src, "style": self.ep.style}

    def redact(self, text: str) -> str:
        return text

    def _load(self):
        key = repr(self.identity())
        if key not in LocalTransport._models:
            import torch

            from kat import models

            torch.manual_seed(self.seed)
            model, tok = models.load(self.model_cfg)  # kat.models.load_tokenizer keeps kat's char tokenizer as saved
            model.to(self.device).eval()
            LocalTransport._models[key] = (model, tok)
        return LocalTransport._models[key]

    def call_batch(self, keys: Sequence[str], payloads: Sequence[dict[str, Any]]) -> list[Reply]:
        import torch

        from kat.models.tokenizer import render_prompt
        from kat.rollout.hf import generate

        model, tok = self._load()
        strip = [t for t in (tok.eos_token, tok.pad_token) if t]
        out: list[Reply | None] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(payloads):
            pr = p["params"]
            groups.setdefault((pr.get("max_tokens"), pr.get("temperature"), pr.get("top_p")), []).append(i)
        for (max_tokens, temperature, top_p), idx in groups.items():
            prompts = []
            for i in idx:
                p = payloads[i]
                prompts.append(render_prompt(tok, p["messages"]) + (p.get("trigger") or ""))
            temp = float(temperature if temperature is not None else 1.0)
            torch.manual_seed(int(keys[idx[0]][:8], 16) ^ self.seed)
            comps = generate(model, tok, prompts, max_new_tokens=int(max_tokens or 256), do_sample=temp > 0,
                             temperature=temp if temp > 0 else 1.0, top_p=float(top_p if top_p is not None else 1.0),
                             batch_size=self.batch_size)
            for i, prompt, c in zip(idx, prompts, comps):
                text = c.text
                for s in strip:
                    while text.endswith(s):
                        text = text[: -len(s)]
                n_prompt = len(tok.encode(prompt, add_special_tokens=False))
                out[i] = Reply(text=text, finish_reason="length" if c.truncated else "stop", prompt_tokens=n_prompt,
                               completion_tokens=c.n_tokens)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------------------------ broker
class Broker:
    """Answers batches of requests from the cache or the endpoints; counts traffic per endpoint."""

    def __init__(self, endpoints: Mapping[str, EndpointConfig], *, backend: str, cache: RequestCache,
                 model_cfg: Mapping[str, Any] | None = None, local_batch_size: int = 256, seed: int = 0,
                 device: str = "cpu"):
        if backend not in BACKENDS:
            raise ValueError(f"synth.backend must be one of {BACKENDS}, got {backend!r}")
        self.endpoints = dict(endpoints)
        self.backend = backend
        self.cache = cache
        self.seed = int(seed)
        self.model_cfg = dict(model_cfg or {})
        self.local_batch_size = local_batch_size
        self.device = device
        self.stats: dict[str, EndpointStats] = {n: EndpointStats() for n in self.endpoints}
        self._transports: dict[str, Any] = {}

    def transport(self, name: str):
        if name not in self.endpoints:
            raise ValueError(f"unknown endpoint {name!r} (synth.endpoints has: {sorted(self.endpoints)})")
        if name not in self._transports:
            ep = self.endpoints[name]
            if self.backend == "openai":
                self._transports[name] = OpenAITransport(ep, self.stats[name])
            else:
                self._transports[name] = LocalTransport(ep, self.model_cfg, self.stats[name],
                                                        batch_size=self.local_batch_size, seed=self.seed,
                                                        device=self.device)
        return self._transports[name]

    def model_label(self, name: str) -> str:
        """What provenance records as the model of endpoint ``name``."""
        t = self.transport(name)
        ident = t.identity()
        return ident.get("model") or ident.get("path")

    def ask(self, requests: Sequence[Request]) -> list[Reply]:
        """Replies aligned with ``requests``; duplicates are asked once; new replies are cached as they arrive."""
        keys, payloads = [], []
        for r in requests:
            t = self.transport(r.endpoint)
            payload = _payload(self.endpoints[r.endpoint], r, self.seed)
            payloads.append(payload)
            keys.append(request_key(t.identity(), payload))
        out: list[Reply | None] = [None] * len(requests)
        todo: dict[str, list[int]] = {}
        for i, (r, k) in enumerate(zip(requests, keys)):
            if k in todo:
                todo[k].append(i)
                continue
            hit = self.cache.get(k)
            if hit is not None:
                out[i] = hit
                self.stats[r.endpoint].add(cache_hits=1)
            else:
                todo[k] = [i]
        by_ep: dict[str, list[str]] = {}
        for k, idx in todo.items():
            by_ep.setdefault(requests[idx[0]].endpoint, []).append(k)
        for name, ks in by_ep.items():
            t = self.transport(name)
            if isinstance(t, LocalTransport):
                for s in range(0, len(ks), max(1, self.local_batch_size)):
                    chunk = ks[s : s + self.local_batch_size]
                    replies = t.call_batch(chunk, [payloads[todo[k][0]] for k in chunk])
                    for k, rep in zip(chunk, replies):
                        self._store(name, k, rep)
                        out[todo[k][0]] = rep
            else:
                # each reply is stored by its worker thread the moment it arrives (a crash loses only the
                # requests in flight); the first error cancels what has not started and is raised
                futs = {t.submit(self._ask_one, t, name, k, payloads[todo[k][0]]): k for k in ks}
                done, pending = wait(list(futs), return_when=FIRST_EXCEPTION)
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    wait(list(pending))
                    raise failed[0].exception()
                for f, k in futs.items():
                    out[todo[k][0]] = f.result()
        for k, idx in todo.items():
            for i in idx[1:]:
                out[i] = out[idx[0]]
        return out  # type: ignore[return-value]

    def _ask_one(self, t: OpenAITransport, name: str, key: str, payload: dict[str, Any]) -> Reply:
        rep = t.call(payload)
        self._store(name, key, rep)
        return rep

    def _store(self, name: str, key: str, rep: Reply) -> None:
        self.cache.put(key, name, rep)
        self.stats[name].add(sent=1, prompt_tokens=rep.prompt_tokens, completion_tokens=rep.completion_tokens)

    def close(self) -> None:
        for t in self._transports.values():
            t.close()
