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


def _stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(ANSWER_CLOSE)]
    return [i for i in ids if i is not None]


def _cut(ids: list[int], stops: set[int], pad_id: int | None) -> tuple[list[int], bool]:
    for k, t in enumerate(ids):
        if t in stops:
            return ids[: k + 1], False
    # no stop token: strip trailing padding (only after a stop would padding appear, but be safe)
    while ids and pad_id is not None and ids[-1] == pad_id and pad_id not in stops:
        ids = ids[:-1]
    return ids, True


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
        n = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), n), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(chunk), n), dtype=torch.long)  # (B, T)
        for i, p in enumerate(chunk):
            ids[i, n - len(p) :] = torch.tensor(p)
            mask[i, n - len(p) :] = 1
        kwargs = dict(do_sample=do_sample, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                      eos_token_id=stop_ids, pad_token_id=pad)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)  # (B*G, T+N)
        out.extend(gen[:, n:].tolist())
    return out


def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, num_return_sequences: int = 1, batch_size: int = 64,
             force_mode: str | None = None, max_judge_tokens: int = 64) -> list[Completion]:
    """Generate completions for rendered ``prompts`` (strings ending with the assistant prefix).

    ``force_mode`` = "on"/"off": the judge is generated first (stop at ``</judge>``, at most
    ``max_judge_tokens``), then the mode token is appended and generation continues; the forced token
    counts as a completion token.
    """
    was_training = model.training
    model.eval()
    try:
        stops = _stop_ids(tokenizer)
        pad = tokenizer.pad_token_id
        p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        if force_mode is None:
            raw = _generate_ids(model, tokenizer, p_ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
                                stop_ids=stops, batch_size=batch_size)
            cut = [_cut(r, set(stops), pad) for r in raw]
        else:
            judge_close = tokenizer.convert_tokens_to_ids(JUDGE_CLOSE)
            forced = tokenizer.convert_tokens_to_ids(mode_token(force_mode))
            raw = _generate_ids(model, tokenizer, p_ids, max_new_tokens=max_judge_tokens, do_sample=do_sample,
                                temperature=temperature, top_p=top_p, num_return_sequences=num_return_sequences,
                                stop_ids=stops + [judge_close], batch_size=batch_size)
            heads = []
            for r in raw:
                head, _ = _cut(r, set(stops) | {judge_close}, pad)
                if not head or head[-1] != judge_close:  # no judge closed: close it ourselves
                    head = [t for t in head if t not in stops] + [judge_close]
                heads.append(head + [forced])
            prompt_rows = [p for p in p_ids for _ in range(num_return_sequences)]
            rest = _generate_ids(model, tokenizer, [p + h for p, h in zip(prompt_rows, heads)],
                                 max_new_tokens=max(1, max_new_tokens - max_judge_tokens), do_sample=do_sample,
                                 temperature=temperature, top_p=top_p, num_return_sequences=1, stop_ids=stops,
                                 batch_size=batch_size)
            cut = []
            for h, r in zip(heads, rest):
                tail, trunc = _cut(r, set(stops), pad)
                cut.append((h + tail, trunc))
        return [Completion(text=tokenizer.decode(ids, skip_special_tokens=False), token_ids=ids, truncated=trunc)
                for ids, trunc in cut]
    finally:
        if was_training:
            model.train()
