"""MTP heads: a hand-written reference for depths 1 and 2 (Qwen2 and Llama blocks), causality and the
target shift (depth k at position i predicts t_{i+k+1}), save beside the HF checkpoint, plain-HF load,
reload of the heads."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kat.models import forward, mtp


def _tiny(family: str, vocab: int = 40, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**kw)).eval()
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def _rms(x, w, eps):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """HF rotate-half RoPE on x (H, hd) at integer position ``pos``."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([pos * inv, pos * inv]).float()
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * torch.cos(ang) + torch.cat([-x2, x1], -1) * torch.sin(ang)


def _block_ref(layer, xs, cfg):
    """A decoder layer on a sequence xs (T, d) written out by hand: causal attention over the prefix."""
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // H
    theta = cfg.rope_parameters["rope_theta"]
    eps = cfg.rms_norm_eps
    out = []
    a = layer.self_attn
    normed = [_rms(x, layer.input_layernorm.weight, eps) for x in xs]
    qs = [_rope(a.q_proj(n).view(H, hd), t, theta) for t, n in enumerate(normed)]
    ks = [_rope(a.k_proj(n).view(KV, hd), t, theta) for t, n in enumerate(normed)]
    vs = [a.v_proj(n).view(KV, hd) for n in normed]
    for i, x in enumerate(xs):
        heads = []
        for h in range(H):
            g = h // (H // KV)  # GQA: query head h reads key/value head g
            scores = torch.stack([qs[i][h] @ ks[j][g] for j in range(i + 1)]) / math.sqrt(hd)
            w = torch.softmax(scores, 0)
            heads.append(sum(w[j] * vs[j][g] for j in range(i + 1)))
        y = x + a.o_proj(torch.cat(heads))
        m = layer.mlp
        z = _rms(y, layer.post_attention_layernorm.weight, eps)
        out.append(y + m.down_proj(torch.nn.functional.silu(m.gate_proj(z)) * m.up_proj(z)))
    return out


def _mtp_ref(model, heads, ids, length):
    """Depth outputs for one unpadded sequence ids[:length], position by position (lists of (d,))."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        h = list(forward.base_model(model)(input_ids=ids[None, :length]).last_hidden_state[0])
    outs = []
    for k, dep in enumerate(heads.depths, start=1):
        xs = []
        for i in range(length):
            e = emb[ids[i + k]] if i + k < length else torch.zeros(cfg.hidden_size)
            xs.append(dep.eh_proj(torch.cat([_rms(e, dep.enorm.weight, dep.enorm.eps),
                                             _rms(h[i], dep.hnorm.weight, dep.hnorm.eps)])))
        h = _block_ref(dep.block, xs, cfg)
        outs.append([_rms(x, dep.norm.weight, dep.norm.eps) for x in h])
    return outs


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_matches_hand_written_reference(family, depth):
    model = _tiny(family)
    heads = mtp.MTPHeads(model, depth).eval()
    for p in heads.parameters():  # non-trivial norms
        if p.ndim == 1:
            p.data.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 9), generator=g)
    lengths = [9, 6]
    am = torch.ones_like(ids)
    am[1, 6:] = 0
    ids[1, 6:] = 0  # right padding
    with torch.no_grad():
        h0 = forward.base_model(model)(input_ids=ids, attention_mask=am).last_hidden_state
        got = heads(model, h0, ids, am)
    assert len(got) == depth and all(t.shape == (2, 9, 32) for t in got)
    for b, L in enumerate(lengths):
        ref = _mtp_ref(model, heads, ids[b], L)
        for k in range(depth):
            for i in range(L):
                torch.testing.assert_close(got[k][b, i], ref[k][i], atol=2e-5, rtol=1e-4,
                                           msg=lambda m: f"depth {k + 1}, example {b}, position {i}: {m}")


@pytest.mark.parametrize("depth", [1, 2])
def test_depth_k_at_position_i_sees_tokens_up_to_i_plus_k(depth):
    """Depth k's row i is a function of t_{≤ i+k} (so it may be trained to predict t_{i+k+1})."""
    model = _tiny("qwen2")
    heads = mtp.MTPHeads(model, depth).eval()
    ids = torch.randint(1, 40, (1, 10), generator=torch.Generator().manual_seed(2))

    def run(x):
        with torch.no_grad():
            h0 = forward.base_model(model)(input_ids=x).last_hidden_state
            return heads(model, h0, x)

    base = run(ids)
    j = 6
    changed = ids.clone()
    changed[0, j] = (ids[0, j] % 39) + 1
    pert = run(changed)
    for k in range(1, depth + 1):
        diff = (pert[k - 1] - base[k - 1]).abs().amax(-1)[0]  # (T,)
        assert float(diff[: j - k].max()) == 0.0, f"depth {k}: rows before {j - k} must not see token {j}"
        assert float(diff[j - k]) > 0.0, f"depth {k}: row {j - k} must see token {j} (its input t_(i+k))"


def test_shift_targets():
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, -100]])
    assert mtp.shift_targets(labels, 0).tolist() == [[-100, 5, 6, 7, 8, -100, -100]]
    assert mtp.shift_targets(labels, 1).tolist() == [[5, 6, 7, 8, -100, -100, -100]]
    assert mtp.shift_targets(labels, 2).tolist() == [[6, 7, 8, -100, -100, -100, -100]]
    assert mtp.shift_targets(labels, 7).tolist() == [[-100] * 7]


def test_save_plain_load_and_reload_heads(tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM

    from kat.models import hf

    model = _tiny("qwen2", vocab=len(char_tokenizer))
    heads = mtp.MTPHeads(model, 2)
    out = hf.save(model, char_tokenizer, tmp_path / "ckpt")
    mtp.save_heads(heads, out)
    assert (out / mtp.HEADS_FILE).exists() and json.loads((out / mtp.CONFIG_FILE).read_text())["depth"] == 2

    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"], info
    x = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(plain(x).logits, model(x).logits)

    again = mtp.build_heads(plain, 2, out)
    for (n, a), (_, b) in zip(heads.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    one = mtp.build_heads(plain, 1, out)  # fewer depths: the first is restored
    torch.testing.assert_close(one.depths[0].eh_proj.weight, heads.depths[0].eh_proj.weight)
    three = mtp.build_heads(plain, 3, out)  # more depths: 1..2 restored, 3 fresh
    torch.testing.assert_close(three.depths[1].eh_proj.weight, heads.depths[1].eh_proj.weight)
    assert mtp.build_heads(plain, 0, out) is None  # droppable

    other = _tiny("qwen2", vocab=len(char_tokenizer))
    other.config.hidden_size = 16  # another width: the saved heads do not fit
    with pytest.raises(ValueError, match="hidden_size"):
        mtp.build_heads(other, 1, out)

