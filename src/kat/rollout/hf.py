"""Batched generation with HF ``generate`` (the embedded default's engine, CPU and GPU).

Left padding, a stop at EOS or ``</answer>`` (both single ids), ``num_return_sequences`` samples per
prompt in prompt-major order (row ``i*G + j``), and optionally a forced mode: generate the judge up to
``</judge>``, append ``<think_on>``/``<think_off>``, continue (the inference-time mode override).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from kat.data.templates import ANSWER_CLOSE, JUDGE_CLOSE, mode_token


@dataclass
class Completion:
    """One generated completion (the prompt excluded)."""

    text: str  # decoded with special tokens, cut after the stop token, no padding
    token_ids: list[int] = field(repr=False)  # generated ids up to and including the stop token
    truncated: bool  # hit max_new_tokens before a stop token

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)]
    return [i for i in ids if i is not None]


def cut_at_stop(ids: list[int], stops: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    for k, t in enumerate(ids):
        if t in stops:
            return ids[: k + 1], False
    # no stop token: strip trailing padding (only after a stop would padding appear, but be safe)
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id not in stops:
        ids = ids[:-1]
    return ids, True


def _judge_budget(max_new_tokens: int, max_judge_tokens: int) -> int:
    """Tokens the judge may take when a mode is forced: ``</judge>`` and the mode token must still fit."""
    return max(1, min(max_judge_tokens, max_new_tokens - 2))


def left_pad(rows: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded ids (B, P) and attention mask (B, P), P = the longest row."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(rows), n), dtype=torch.long)  # (B, P)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r) :] = 1
    return ids, mask


def synced_generation(model) -> dict:
    """``{"synced_gpus": True}`` when ``model`` is FSDP-sharded over several processes, else ``{}``.

    Sharded layers all-gather their weights in every forward, so every rank must run the same number of forward
    passes: with ``synced_gpus`` a rank that has finished keeps stepping until all ranks have."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp import FSDPModule

        if any(isinstance(m, FSDPModule) for m in model.modules()):
            return {"synced_gpus": True}
    return {}


@torch.no_grad()
def _generate_ids(model, tokenizer, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, do_sample: bool,
                  temperature: float, top_p: float, num_return_sequences: int, stop_ids: list[int],
                  batch_size: int) -> list[list[int]]:
    """Raw generated ids (prompt-major), padded tails included."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[list[int]] = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start : start + batch_size]
        ids, mask = left_pad(chunk, pad)  # (B, P), (B, P)
        n = ids.shape[1]
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                      eos_token_id=stop_ids, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        kwargs.update(synced_generation(model))
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)  # (B*G, T+N)
        out.extend(gen[:, n:].tolist())
    return out


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int = 64,
             force_mode: str | None = None, max_judge_tokens: int = 64) -> list[Completion]:
    """Generate completions for rendered ``prompts`` (strings ending with the assistant prefix).

    ``max_new_tokens`` bounds the whole completion. ``force_mode`` = "on"/"off": the judge is generated
    first (stop at ``</judge>``, at most ``min(max_judge_tokens, max_new_tokens - 2)`` tokens, so that the
    forced tokens fit), ``</judge>`` is appended when the judge did not close, then the mode token, and
    generation continues with what is left of the budget for that row: ``max_new_tokens - len(head)``, where
    ``head`` = judge + ``</judge>`` + mode token (the forced tokens count as completion tokens). The
    continuation of every row is generated in one batched call up to the largest remaining budget and each
    row is then cut to its own (decoding is left to right, so that equals a per-row budget); a row whose head
    already fills the budget (``max_new_tokens`` < 3) gets no continuation and is ``truncated``.
    """
    was_training = model.training
    model.eval()
    try:
        stops = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        if force_mode is None:
            raw = _generate_ids(model, tokenizer, p_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
                                stop_ids=stops, batch_size=batch_size)
            cut = [cut_at_stop(r, set(stops), pad) for r in raw]
        else:
            judge_close = tokenizer.convert_tokens_to_ids(JUDGE_CLOSE)
            forced = tokenizer.convert_tokens_to_ids(mode_token(force_mode))
            head_budget = _judge_budget(max_new_tokens, max_judge_tokens)
            raw = _generate_ids(model, tokenizer, p_ids, max_new_tokens=head_budget, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
                                stop_ids=stops + [judge_close], batch_size=batch_size)
            heads = []
            for r in raw:
                head, _ = cut_at_stop(r, set(stops) | {judge_close}, pad)
                if not head or head[-1] != judge_close:  # no judge closed: close it ourselves
                    head = [t for t in head if t not in stops] + [judge_close]
                heads.append(head + [forced])
            prompt_rows = [p for p in p_ids for _ in range(num_return_sequences)]
            budgets = [max_new_tokens - len(h) for h in heads]  # (N,) what each row has left after its head
            todo = [k for k, b in enumerate(budgets) if b > 0]
            tails: dict[int, list[int]] = {}
            if todo:
                rest = _generate_ids(model, tokenizer, [prompt_rows[k] + heads[k] for k in todo],
                                     max_new_tokens=max(budgets[k] for k in todo), do_sample=do_sample,
                                     temperature=temperature, top_p=top_p, num_return_sequences=1, stop_ids=stops,
                                     batch_size=batch_size)
                tails = {k: r[: budgets[k]] for k, r in zip(todo, rest)}
            cut = []
            for k, h in enumerate(heads):
                tail, trunc = cut_at_stop(tails[k], set(stops), pad) if k in tails else ([], True)
                cut.append((h + tail, trunc))
        return [Completion(text=tokenizer.decode(ids, skip_special_tokens=False), token_ids=ids, truncated=trunc)
                for ids, trunc in cut]
    finally:
        if was_training:
            model.train()


# ==============================================================================================================
# RL rollouts: G samples per prompt with per-token log-probs (additive API used by kat.stages.rl)
# ==============================================================================================================
LOGPROB_SOURCES = ("recompute", "sampler")


@dataclass
class Rollouts:
    """``B`` prompts × ``G`` samples, rows prompt-major (row ``b*G + j``), prompt excluded from the response.

    ``old_logp [N, T]`` (fp32, ``N = B*G``, ``T`` = longest response) holds ``log π_old(y_t | ·)`` of each
    response token at the rollout temperature (0 beyond the response); ``forced [N, T]`` marks tokens that were
    appended by force (AdaptThink's forced mode token), not sampled. ``logprobs_source`` says where
    ``old_logp`` came from (``recompute``: a no-grad eval-mode forward of the policy over prompt + response;
    ``sampler``: the logits the sampler used).
    """

    prompt_ids: list[list[int]]  # (N,) prompt token ids of each row (each prompt repeated G times)
    response_ids: list[list[int]]  # (N,) generated ids up to and including the stop token
    texts: list[str]  # (N,) decoded responses with special tokens
    truncated: list[bool]  # (N,) hit max_new_tokens before a stop token
    old_logp: torch.Tensor  # (N, T) fp32
    forced: torch.Tensor  # (N, T) bool
    group_size: int
    logprobs_source: str

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def num_prompts(self) -> int:
        return len(self) // self.group_size

    def completions(self) -> list[Completion]:
        return [Completion(text=t, token_ids=list(r), truncated=tr)
                for t, r, tr in zip(self.texts, self.response_ids, self.truncated)]

    def response_tensors(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids [N, T] long right-padded with pad_id, mask [N, T] bool)``."""
        return _right_pad(self.response_ids, pad_id, width=self.old_logp.shape[1])

    def select(self, rows: Sequence[int]) -> "Rollouts":
        """The given rows (keep whole groups to stay prompt-major)."""
        rows = list(rows)
        idx = torch.tensor(rows, dtype=torch.long)
        return Rollouts(
            prompt_ids=[self.prompt_ids[i] for i in rows], response_ids=[self.response_ids[i] for i in rows],
            texts=[self.texts[i] for i in rows], truncated=[self.truncated[i] for i in rows],
            old_logp=self.old_logp[idx], forced=self.forced[idx], group_size=self.group_size,
            logprobs_source=self.logprobs_source,
        )

    @staticmethod
    def concat(parts: Sequence["Rollouts"]) -> "Rollouts":
        """Rows of ``parts`` one after the other (same group size); responses re-padded to the widest."""
        if not parts:
            raise ValueError("parts must hold at least one Rollouts")
        g = parts[0].group_size
        if any(p.group_size != g for p in parts):
            raise ValueError("all parts must have the same group_size")
        T = max(p.old_logp.shape[1] for p in parts)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
        return Rollouts(
            prompt_ids=[r for p in parts for r in p.prompt_ids],
            response_ids=[r for p in parts for r in p.response_ids],
            texts=[t for p in parts for t in p.texts], truncated=[t for p in parts for t in p.truncated],
            old_logp=torch.cat([pad(p.old_logp, 0.0) for p in parts]),
            forced=torch.cat([pad(p.forced, False) for p in parts]), group_size=g,
            logprobs_source=parts[0].logprobs_source,
        )


def _right_pad(rows: Sequence[Sequence[int]], pad_id: int,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    T = max([len(r) for r in rows] + [0]) if width is None else width
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)  # (N, T)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


@dataclass
class Packed:
    """Prompt (left-padded to ``P``) + response (right-padded to ``T``) for one forward pass."""

    input_ids: torch.Tensor  # (n, P+T)
    attention_mask: torch.Tensor  # (n, P+T) long
    position_ids: torch.Tensor  # (n, P+T) from the attention mask (as generate() computes them)
    response_ids: torch.Tensor  # (n, T)
    response_mask: torch.Tensor  # (n, T) bool
    prompt_len: int  # P


def pack(prompt_rows: Sequence[Sequence[int]], response_rows: Sequence[Sequence[int]], pad_id: int, *,
         width: int | None = None, device=None) -> Packed:
    """Pack rows for a teacher-forced forward: logits at columns ``P-1 … P+T-2`` predict the response.

    ``width`` pads the response to a fixed ``T`` (default: the longest response in these rows).
    """
    if len(prompt_rows) != len(response_rows):
        raise ValueError(f"prompt_rows and response_rows differ in length: {len(prompt_rows)} vs {len(response_rows)}")
    if any(len(p) == 0 for p in prompt_rows):
        raise ValueError("every prompt must have at least one token")
    n = len(prompt_rows)
    P = max(len(p) for p in prompt_rows)
    resp, rmask = _right_pad(response_rows, pad_id, width=width)
    T = resp.shape[1]
    ids = torch.full((n, P + T), pad_id, dtype=torch.long)  # (n, P+T)
    am = torch.zeros((n, P + T), dtype=torch.long)  # (n, P+T)
    for i, p in enumerate(prompt_rows):
        ids[i, P - len(p) : P] = torch.tensor(list(p), dtype=torch.long)
        am[i, P - len(p) : P] = 1
    ids[:, P:] = resp
    am[:, P:] = rmask.long()
    pos = (am.cumsum(-1) - 1).clamp(min=0)  # (n, P+T)
    out = Packed(ids, am, pos, resp, rmask, P)
    if device is not None:
        out = Packed(ids.to(device), am.to(device), pos.to(device), resp.to(device), rmask.to(device), P)
    return out


def response_hidden(model, packed: Packed) -> torch.Tensor:
    """Final hidden states (after the last norm) at the positions that predict the response: ``[n, T, H]``.

    A root forward of ``model`` (FSDP2-safe, :mod:`kat.models.forward`); afterwards the head weight is gathered
    for a fused loss that reads it (:func:`kat.models.forward.head_weight`)."""
    from kat.models.forward import final_hidden

    h = final_hidden(model, packed.input_ids, packed.attention_mask, packed.position_ids)  # (n, P+T, H)
    T = packed.response_ids.shape[1]
    P = packed.prompt_len
    return h[:, P - 1 : P - 1 + T]  # (n, T, H)


def response_logits(model, packed: Packed) -> torch.Tensor:
    """Logits predicting each response token: ``[n, T, V]`` (the model's head incl. logit scaling/softcap).

    The root forward computes the head on the last ``T + 1`` columns only (``P-1 … P+T-1``); the first ``T`` of
    them predict the response (FSDP2-safe, :mod:`kat.models.forward`)."""
    from kat.models.forward import last_logits

    T = packed.response_ids.shape[1]
    logits = last_logits(model, packed.input_ids, packed.attention_mask, packed.position_ids, keep=T + 1)
    return logits[:, :T]  # (n, T, V)


@torch.no_grad()
def response_logprobs(model, prompt_rows: Sequence[Sequence[int]], response_rows: Sequence[Sequence[int]], *,
                      pad_id: int, temperature: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """``log softmax(z/τ)[y_t]`` of every response token under ``model`` in eval mode: ``[N, T]`` fp32, 0 beyond
    each response. The no-grad recomputation of the behaviour policy's log-probs (``logprobs=recompute``)."""
    from kat.losses.grpo import selective_log_softmax

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    T = max([len(r) for r in response_rows] + [0])
    out = torch.zeros((len(response_rows), T), dtype=torch.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for s in range(0, len(response_rows), batch_size):
            pk = pack(prompt_rows[s : s + batch_size], response_rows[s : s + batch_size], pad_id, device=device)
            lp = selective_log_softmax(response_logits(model, pk), pk.response_ids, temperature=temperature)
            w = pk.response_ids.shape[1]
            out[s : s + len(pk.response_ids), :w] = torch.where(pk.response_mask, lp, 0.0).float().cpu()
    finally:
        if was_training:
            model.train()
    return out


class _LogprobRecorder:
    """A ``generate`` logits processor that records ``log softmax(z/τ)`` of each sampled token on the fly.

    HF applies custom processors before the temperature/top-p warpers, so ``scores`` here are the raw logits
    (after any penalty processors, none by default). At each call the previous step's log-softmax is gathered at
    the token just appended to ``input_ids``; :meth:`finish` gathers the last one from the returned sequences.
    Memory is one ``[N, V]`` buffer, not the ``[N, T, V]`` of ``output_logits``.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.prev: torch.Tensor | None = None  # (N, V) log-softmax of the last step
        self.steps: list[torch.Tensor] = []  # (N,) per generated token

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """``[N, n_new]`` fp32 log-probs of ``new_tokens [N, n_new]`` (the generated part of the sequences)."""
        if self.prev is not None and new_tokens.shape[1] > len(self.steps):
            self.steps.append(self.prev.gather(-1, new_tokens[:, len(self.steps) : len(self.steps) + 1]).squeeze(-1))
        if not self.steps:
            return torch.zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1)[:, : new_tokens.shape[1]]


@torch.no_grad()
def _sample_ids(model, tokenizer, prompt_rows: Sequence[list[int]], *, max_new_tokens: int, temperature: float,
                top_p: float, num_return_sequences: int, stop_ids: list[int], batch_size: int,
                want_logits: bool) -> tuple[list[list[int]], list[torch.Tensor] | None]:
    """Sampled ids (prompt-major, padded tails included) and, with ``want_logits``, per row the sampler's
    ``log softmax(z/τ)`` at the sampled ids (``[len]`` fp32, :class:`_LogprobRecorder`)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Recorder(_LogprobRecorder, LogitsProcessor):
        pass

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[list[int]] = []
    lps: list[torch.Tensor] | None = [] if want_logits else None
    for start in range(0, len(prompt_rows), batch_size):
        chunk = prompt_rows[start : start + batch_size]
        ids, mask = left_pad(chunk, pad)  # (B, P), (B, P)
        n = ids.shape[1]
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
                      num_return_sequences=num_return_sequences, eos_token_id=stop_ids, pad_token_id=pad)
        rec = _Recorder(temperature) if want_logits else None
        if rec is not None:
            kwargs["logits_processor"] = LogitsProcessorList([rec])
        kwargs.update(synced_generation(model))
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)  # (B*G, P+N)
        new = seqs[:, n:]  # (B*G, N)
        out.extend(new.tolist())
        if rec is not None:
            lps.extend(rec.finish(new).cpu())
    return out, lps


def sample(model, tokenizer, prompts: Sequence[str], *, group_size: int, max_new_tokens: int = 128,
           temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 64,
           force_modes: Sequence[str | None] | None = None, max_judge_tokens: int = 64,
           logprobs: str = "recompute", logprob_batch_size: int = 64) -> Rollouts:
    """``group_size`` temperature samples per rendered prompt, with per-token log-probs (RL rollouts).

    Batched HF ``generate`` with left padding, stop at EOS or ``</answer>`` (kept in the response), rows
    prompt-major. ``force_modes`` (one entry per row, ``None`` = free) forces the mode token of a row: the
    judge is sampled first (stop at ``</judge>``), then the mode token is appended and sampling continues;
    unforced rows continue from their own judge, so their distribution is unchanged.

    ``logprobs``: ``recompute`` (default) runs a separate no-grad forward of the policy in eval mode over
    prompt + response (the usual choice: the loss recomputes ``log π_θ`` the same way, so at the first update
    ``ρ = 1`` up to float noise); ``sampler`` records them from the logits ``generate`` sampled from, as it goes
    (no extra forward, one ``[N, V]`` buffer; KV-cached incremental logits can differ from a full forward in the
    last bits: ~1e-6 for the tiny default). Both are ``log softmax(z/τ)`` at the rollout temperature ``τ``
    (top-p truncation is not applied to the log-prob). Forced tokens get the policy's
    log-prob like any other; AdaptThink replaces it (``forced`` marks them).
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    if logprobs not in LOGPROB_SOURCES:
        raise ValueError(f"logprobs must be one of {LOGPROB_SOURCES}, got {logprobs!r}")
    N = len(prompts) * group_size
    if force_modes is not None and len(force_modes) != N:
        raise ValueError(f"force_modes must have one entry per rollout row ({N}), got {len(force_modes)}")
    want_logits = logprobs == "sampler"
    was_training = model.training
    model.eval()
    try:
        stops = stop_token_ids(tokenizer)
        pad = tokenizer.pad_token_id
        p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        rows_prompt = [p for p in p_ids for _ in range(group_size)]
        forced_pos: list[int | None] = [None] * N
        if force_modes is None or all(m is None for m in force_modes):
            raw, lps = _sample_ids(model, tokenizer, p_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, num_return_sequences=group_size, stop_ids=stops,
                                   batch_size=batch_size, want_logits=want_logits)
            cut = [cut_at_stop(r, set(stops), pad) for r in raw]
            samp_lp = None if lps is None else [lp[: len(c[0])] for lp, c in zip(lps, cut)]
        else:
            judge_close = tokenizer.convert_tokens_to_ids(JUDGE_CLOSE)
            head_budget = _judge_budget(max_new_tokens, max_judge_tokens)
            raw, lps = _sample_ids(model, tokenizer, p_ids, max_new_tokens=head_budget, temperature=temperature,
                                   top_p=top_p, num_return_sequences=group_size, stop_ids=stops + [judge_close],
                                   batch_size=batch_size, want_logits=want_logits)
            heads, head_lp = [], []
            for k, r in enumerate(raw):
                head, _ = cut_at_stop(r, set(stops) | {judge_close}, pad)
                lp = None if lps is None else list(lps[k][: len(head)])
                if not head or head[-1] != judge_close:  # the judge did not close: close it ourselves (forced)
                    if force_modes[k] is not None:
                        keep = [i for i, t in enumerate(head) if t not in stops]
                        head = [head[i] for i in keep] + [judge_close]
                        lp = None if lp is None else [lp[i] for i in keep] + [float("nan")]
                if force_modes[k] is not None:
                    forced_pos[k] = len(head)
                    head = head + [tokenizer.convert_tokens_to_ids(mode_token(force_modes[k]))]
                    lp = None if lp is None else lp + [float("nan")]
                heads.append(head)
                head_lp.append(lp)
            done = [bool(h) and h[-1] in stops for h in heads]
            todo = [k for k in range(N) if not done[k] and max_new_tokens - len(heads[k]) > 0]
            tails: dict[int, tuple[list[int], bool, list | None]] = {}
            # continue rows with the same remaining budget together (budget differs by head length)
            for budget in sorted({max_new_tokens - len(heads[k]) for k in todo}):
                ks = [k for k in todo if max_new_tokens - len(heads[k]) == budget]
                rest, rlp = _sample_ids(model, tokenizer, [rows_prompt[k] + heads[k] for k in ks],
                                        max_new_tokens=budget, temperature=temperature, top_p=top_p,
                                        num_return_sequences=1, stop_ids=stops, batch_size=batch_size,
                                        want_logits=want_logits)
                for j, k in enumerate(ks):
                    tail, trunc = cut_at_stop(rest[j], set(stops), pad)
                    tails[k] = (tail, trunc, None if rlp is None else list(rlp[j][: len(tail)]))
            cut, samp_lp = [], ([] if want_logits else None)
            for k in range(N):
                tail, trunc, tlp = tails.get(k, ([], not done[k], []))
                cut.append((heads[k] + tail, trunc))
                if want_logits:
                    samp_lp.append(torch.tensor((head_lp[k] or []) + (tlp or []), dtype=torch.float32))
        resp = [c[0] for c in cut]
        T = max([len(r) for r in resp] + [1])
        forced = torch.zeros((N, T), dtype=torch.bool)
        for k, p in enumerate(forced_pos):
            if p is not None:
                forced[k, p] = True
        if want_logits:
            old = torch.zeros((N, T), dtype=torch.float32)
            for k, lp in enumerate(samp_lp):
                old[k, : len(lp)] = lp
            if bool(torch.isnan(old).any()):  # forced tokens: the policy's log-prob of the appended token
                fixed = response_logprobs(model, rows_prompt, resp, pad_id=pad, temperature=temperature,
                                          batch_size=logprob_batch_size)
                old = torch.where(torch.isnan(old), fixed[:, :T] if fixed.shape[1] >= T else
                                  torch.nn.functional.pad(fixed, (0, T - fixed.shape[1])), old)
        else:
            old = response_logprobs(model, rows_prompt, resp, pad_id=pad, temperature=temperature,
                                    batch_size=logprob_batch_size)
            old = torch.nn.functional.pad(old, (0, T - old.shape[1]))
        texts = [tokenizer.decode(r, skip_special_tokens=False) for r in resp]
        return Rollouts(prompt_ids=rows_prompt, response_ids=resp, texts=texts, truncated=[c[1] for c in cut],
                        old_logp=old, forced=forced, group_size=group_size, logprobs_source=logprobs)
    finally:
        if was_training:
            model.train()


class HFEngine:
    """``rollout=hf``: :func:`sample` on the policy itself (nothing to sync: it *is* the policy)."""

    name = "hf"

    def sample(self, model, tokenizer, prompts: Sequence[str], **kwargs) -> Rollouts:
        return sample(model, tokenizer, prompts, **kwargs)

    def close(self) -> None:
        pass
