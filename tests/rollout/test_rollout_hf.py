"""RL rollouts with HF generate: G samples per prompt, stops, forced modes, per-token log-probs."""
from __future__ import annotations

import pytest
import torch

from kat.data import templates
from kat.models import hf as hf_models
from kat.models.tokenizer import render_prompt
from kat.rollout import hf

ARCH = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 256, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, tok = hf_models.load({"name": "tiny", "path": None, "arch": ARCH})
    return model.eval(), tok


def _prompts(tok, contents):
    return [render_prompt(tok, [{"role": "user", "content": c}]) for c in contents]


def _unpadded_logprobs(model, prompt, response, temperature):
    """Ground truth: one row, no padding at all, the model's own forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature  # (L, V)
    lp = torch.log_softmax(logits, -1)
    P = len(prompt)
    return torch.stack([lp[P - 1 + t, y] for t, y in enumerate(response)])


@pytest.mark.parametrize("source", ["recompute", "sampler"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_a_forward_pass(tiny, source, temperature):
    model, tok = tiny
    torch.manual_seed(1)
    r = hf.sample(model, tok, _prompts(tok, ["1+2", "47+85", "code: f(x)=x+3+4"]), group_size=3,
                  max_new_tokens=12, temperature=temperature, logprobs=source, batch_size=2, logprob_batch_size=4)
    assert r.logprobs_source == source and len(r) == 9 and r.group_size == 3
    for i in range(len(r)):
        n = len(r.response_ids[i])
        want = _unpadded_logprobs(model, r.prompt_ids[i], r.response_ids[i], temperature)
        torch.testing.assert_close(r.old_logp[i, :n], want, atol=2e-5, rtol=1e-5)
        assert bool((r.old_logp[i, n:] == 0).all())
        assert bool((r.old_logp[i, :n] <= 0).all())


def test_rows_are_prompt_major_and_stop_at_answer_close(tiny):
    model, tok = tiny
    prompts = _prompts(tok, ["1+2", "99+1"])
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids(templates.ANSWER_CLOSE)}
    torch.manual_seed(2)
    r = hf.sample(model, tok, prompts, group_size=4, max_new_tokens=10)
    p_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    for i in range(8):
        assert r.prompt_ids[i] == p_ids[i // 4]
        ids = r.response_ids[i]
        assert 1 <= len(ids) <= 10
        assert sum(t in stops for t in ids) == (0 if r.truncated[i] else 1)
        if not r.truncated[i]:
            assert ids[-1] in stops
        else:
            assert len(ids) == 10
        assert r.texts[i] == tok.decode(ids, skip_special_tokens=False)
    ids, mask = r.response_tensors(tok.pad_token_id)
    assert ids.shape == mask.shape == r.old_logp.shape
    assert mask.sum().item() == sum(len(x) for x in r.response_ids)


@pytest.mark.parametrize("source", ["recompute", "sampler"])
def test_forced_modes_put_the_mode_token_after_the_judge(tiny, source):
    model, tok = tiny
    torch.manual_seed(3)
    modes = ["off", "on", None, "off"]
    r = hf.sample(model, tok, _prompts(tok, ["5+5"]), group_size=4, max_new_tokens=16, max_judge_tokens=5,
                  force_modes=modes, logprobs=source)
    close = tok.convert_tokens_to_ids(templates.JUDGE_CLOSE)
    for i, md in enumerate(modes):
        ids = r.response_ids[i]
        if md is None:
            assert not bool(r.forced[i].any())
            continue
        pos = int(r.forced[i].nonzero()[0, 0])
        assert ids[pos] == tok.convert_tokens_to_ids(templates.mode_token(md))
        assert ids[pos - 1] == close  # the judge block closes right before the forced token
        assert r.forced[i].sum() == 1
    # the forced token's log-prob is the policy's, like any other token
    for i in range(4):
        n = len(r.response_ids[i])
        want = _unpadded_logprobs(model, r.prompt_ids[i], r.response_ids[i], 1.0)
        torch.testing.assert_close(r.old_logp[i, :n], want, atol=2e-5, rtol=1e-5)


def test_pack_left_pads_prompts_and_counts_positions_from_the_first_token():
    pk = hf.pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert pk.prompt_len == 3
    assert pk.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert pk.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert pk.position_ids[1, 2:].tolist() == [0, 1, 2, 3]
    assert pk.response_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match="prompt_rows and response_rows"):
        hf.pack([[1]], [[1], [2]], pad_id=0)


def test_select_and_concat_keep_rows_aligned(tiny):
    model, tok = tiny
    torch.manual_seed(4)
    r = hf.sample(model, tok, _prompts(tok, ["1+1", "2+2"]), group_size=2, max_new_tokens=6)
    a, b = r.select([0, 1]), r.select([2, 3])
    c = hf.Rollouts.concat([b, a])
    assert c.response_ids == r.response_ids[2:] + r.response_ids[:2]
    w = c.old_logp.shape[1]
    torch.testing.assert_close(c.old_logp[:2, : b.old_logp.shape[1]], b.old_logp)
    assert w == max(a.old_logp.shape[1], b.old_logp.shape[1])


def test_bad_arguments_are_named(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="logprobs"):
        hf.sample(model, tok, ["x"], group_size=2, logprobs="vllm")
    with pytest.raises(ValueError, match="force_modes"):
        hf.sample(model, tok, ["x"], group_size=2, force_modes=["on"])
    with pytest.raises(ValueError, match="temperature"):
        hf.sample(model, tok, ["x"], group_size=2, temperature=0.0)


def test_generate_for_evaluation_is_unchanged(tiny):
    model, tok = tiny
    out = hf.generate(model, tok, _prompts(tok, ["1+2"]), max_new_tokens=5)
    assert len(out) == 1 and isinstance(out[0], hf.Completion) and 1 <= out[0].n_tokens <= 5


# ---------------------------------------------------------------------------------- generate(force_mode=...)
def _greedy_reference(model, prompt, n):
    """Plain greedy decoding of ``n`` tokens from one unpadded row (full forward per token, no KV cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _forced_reference(model, tok, prompt, *, mode, max_new_tokens, max_judge_tokens):
    """What forced-mode generate must return for one prompt, decoded greedily token by token:
    judge until ``</judge>`` (or a stop, or its budget), ``</judge>`` added when missing, the mode token, then the
    rest of ``max_new_tokens`` until ``</answer>``/EOS."""
    close = tok.convert_tokens_to_ids(templates.JUDGE_CLOSE)
    stops = {tok.eos_token_id, tok.convert_tokens_to_ids(templates.ANSWER_CLOSE)}
    head = []
    for t in _greedy_reference(model, prompt, min(max_judge_tokens, max_new_tokens - 2)):
        if t in stops:
            break
        head.append(t)
        if t == close:
            break
    if not head or head[-1] != close:
        head.append(close)
    head.append(tok.convert_tokens_to_ids(templates.mode_token(mode)))
    tail = []
    for t in _greedy_reference(model, prompt + head, max_new_tokens - len(head)):
        tail.append(t)
        if t in stops:
            return head + tail, False
    return head + tail, True


@pytest.mark.parametrize("mode", ["on", "off"])
def test_forced_generate_matches_token_by_token_greedy_decoding(tiny, mode):
    """Greedy forced-mode generate == the plain reference, with prompts of different lengths batched (odd
    batch size, left padding) and a judge budget smaller than the whole budget."""
    model, tok = tiny
    prompts = _prompts(tok, ["1+2", "47+85", "code: f(x)=x+3+4"])
    out = hf.generate(model, tok, prompts, max_new_tokens=19, force_mode=mode, max_judge_tokens=6, batch_size=2)
    for p, c in zip(prompts, out):
        want, trunc = _forced_reference(model, tok, tok.encode(p, add_special_tokens=False), mode=mode,
                                        max_new_tokens=19, max_judge_tokens=6)
        assert c.token_ids == want and c.truncated == trunc
        assert c.n_tokens <= 19


def test_forced_generate_gives_each_row_the_budget_its_judge_left(tiny, monkeypatch):
    """The continuation budget is ``max_new_tokens - len(judge + </judge> + mode)`` per row, not
    ``max_new_tokens - max_judge_tokens``: scripted generations with judges of different lengths."""
    model, tok = tiny
    close = tok.convert_tokens_to_ids(templates.JUDGE_CLOSE)
    ans_close = tok.convert_tokens_to_ids(templates.ANSWER_CLOSE)
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    pad = tok.pad_token_id
    judge_budget, M = 10, 30
    heads = [[a, close], [a] * 5 + [close], [a] * judge_budget]  # closed after 1 / 5 tokens; never closed
    calls = []

    def scripted(model_, tok_, prompt_ids, *, max_new_tokens, stop_ids, **kw):
        calls.append(max_new_tokens)
        if close in stop_ids:  # the judge pass
            assert max_new_tokens == judge_budget
            return [h + [pad] * (judge_budget - len(h)) for h in heads]
        # the continuation: row 0 runs on to the budget, row 1 stops early, row 2 runs on
        rows = [[b] * max_new_tokens, [b, b, ans_close] + [pad] * (max_new_tokens - 3), [b] * max_new_tokens]
        return rows[: len(prompt_ids)]

    monkeypatch.setattr(hf, "_generate_ids", scripted)
    out = hf.generate(model, tok, _prompts(tok, ["x", "y", "z"]), max_new_tokens=M, force_mode="on",
                      max_judge_tokens=judge_budget)
    on = tok.convert_tokens_to_ids(templates.mode_token("on"))
    head_lens = [2 + 1, 6 + 1, judge_budget + 2]  # judge (+ </judge> we add) + mode token
    assert calls == [judge_budget, M - min(head_lens)]  # one continuation call up to the largest budget
    assert [c.token_ids[h - 1] for c, h in zip(out, head_lens)] == [on, on, on]
    assert out[0].n_tokens == M and out[0].truncated  # 3-token head: 27 continuation tokens, not 20
    assert out[1].token_ids[-3:] == [b, b, ans_close] and not out[1].truncated and out[1].n_tokens == 7 + 3
    assert out[2].n_tokens == M and out[2].truncated and out[2].token_ids[judge_budget] == close


def test_forced_generate_with_no_room_after_the_head(tiny):
    """``max_new_tokens`` = 2: one judge token, then ``</judge>`` and the mode token fill it: no continuation."""
    model, tok = tiny
    out = hf.generate(model, tok, _prompts(tok, ["1+2"]), max_new_tokens=2, force_mode="off")
    close = tok.convert_tokens_to_ids(templates.JUDGE_CLOSE)
    off = tok.convert_tokens_to_ids(templates.mode_token("off"))
    assert out[0].token_ids[-2:] == [close, off] and out[0].truncated and out[0].n_tokens <= 3


@pytest.mark.parametrize("source", ["recompute", "sampler"])
def test_forced_samples_stay_within_max_new_tokens(tiny, source):
    """A judge that never closes is cut so that ``</judge>`` and the forced mode token still fit the budget."""
    model, tok = tiny
    torch.manual_seed(5)
    M, G = 6, 8
    r = hf.sample(model, tok, _prompts(tok, ["5+5", "7+1"]), group_size=G, max_new_tokens=M, max_judge_tokens=64,
                  force_modes=["on", "off"] * G, logprobs=source)
    close = tok.convert_tokens_to_ids(templates.JUDGE_CLOSE)
    for i, ids in enumerate(r.response_ids):
        assert len(ids) <= M, (i, len(ids))
        pos = int(r.forced[i].nonzero()[0, 0])
        assert ids[pos - 1] == close
