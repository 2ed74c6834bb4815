"""kat.models.upscale and kat.models.upscale_expand on tiny Qwen2 / Llama (and Qwen3 / Mistral) models built from
config.

Analysis against a direct hidden-state computation, selection rules, identity/copy expansion (logits,
layer order, KV-cache generation), config consistency, reload in plain transformers, and the
streaming (shard-by-shard, layer-by-layer) path against the in-memory one.
"""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kat.models import upscale as up
from kat.models import upscale_expand as ux

VOCAB = 48


def tiny(arch: str = "qwen2", layers: int = 4, seed: int = 0, **extra):
    """A tiny decoder with weights large enough (init std 0.2) that every layer changes its input."""
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                  pad_token_id=0, bos_token_id=None, eos_token_id=None)
    common.update(extra)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{"tie_word_embeddings": True, **common}))
    elif arch == "llama":  # biases on o_proj and down_proj: identity init must zero them too
        model = LlamaForCausalLM(LlamaConfig(**{"attention_bias": True, "mlp_bias": True, **common}))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**{"head_dim": 8, **common}))
    elif arch == "mistral":  # window 4 < sequence length: the sliding mask matters
        model = MistralForCausalLM(MistralConfig(**{"sliding_window": 4, **common}))
    else:
        raise ValueError(arch)
    return model.eval()


def batch(b: int = 3, t: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random ids with right padding in some rows and left padding in one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (b, t), generator=g)  # (B, T)
    mask = torch.ones(b, t, dtype=torch.long)  # (B, T)
    if b > 1:
        mask[1, t - 4:] = 0
    if b > 2:
        mask[2, :3] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ analysis
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_analysis_matches_direct_hidden_state_computation(arch):
    model = tiny(arch, layers=4)
    batches = [batch(3, 11, seed=1), batch(2, 7, seed=2)]
    profile = up.analyze_model(model, batches)

    model.config.tie_last_hidden_states = False  # hidden_states[-1] = last layer output before the final norm
    per_layer = [[] for _ in range(4)]
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states  # L+1 x (B, T, d)
            assert len(hs) == 5
            real = b["attention_mask"].bool()  # (B, T)
            for i in range(4):
                per_layer[i].append(F.cosine_similarity(hs[i], hs[i + 1], dim=-1)[real])  # (N,)
    for i, p in enumerate(profile):
        ref = torch.cat(per_layer[i]).double()  # (N,) every real token of every batch
        n = ref.numel()
        assert p.layer == i and p.n_tokens == n == 3 * 11 - 4 - 3 + 2 * 7 - 4
        assert p.cos_mean == pytest.approx(float(ref.mean()), abs=1e-6)
        assert p.cos_std == pytest.approx(float(ref.std(unbiased=False)), abs=1e-6)
        srt = ref.sort().values
        for q, got in zip(up.PERCENTILES, (p.cos_p05, p.cos_p50, p.cos_p95)):
            k = max(math.ceil(q / 100.0 * n) - 1, 0)  # the histogram reads the ceil(q n)-th smallest value
            assert abs(got - float(srt[k])) <= 1e-4, (i, q)
    assert 0.0 < min(p.cos_mean for p in profile) < 0.99  # the layers do change their input
    assert up.ranking(profile) == sorted(range(4), key=lambda i: (-profile[i].cos_mean, i))


def test_analysis_ignores_padding_content():
    model = tiny("qwen2")
    b = batch(3, 11)
    other = {k: v.clone() for k, v in b.items()}
    other["input_ids"][b["attention_mask"] == 0] = 7  # different pad ids: same statistics
    a1, a2 = up.analyze_model(model, [b]), up.analyze_model(model, [other])
    for p, q in zip(a1, a2):
        assert p.cos_mean == pytest.approx(q.cos_mean, abs=1e-6) and p.n_tokens == q.n_tokens


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_streaming_analysis_equals_in_memory(arch, tmp_path):
    model = tiny(arch)
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    assert (tmp_path / "src" / up.INDEX_FILE).exists()
    batches = [batch(3, 11, seed=3), batch(2, 9, seed=4)]
    mem = up.analyze_model(model, batches)
    streamed = up.analyze_checkpoint(tmp_path / "src", batches, dtype=torch.float32)
    for p, q in zip(mem, streamed):
        assert p.n_tokens == q.n_tokens
        for f in ("cos_mean", "cos_std", "cos_p05", "cos_p50", "cos_p95"):
            assert getattr(p, f) == pytest.approx(getattr(q, f), abs=1e-5), f


def test_calibration_batches_right_pad_sort_and_cut(char_tokenizer):
    texts = ["abc", "abcdefgh", "", "abcde"]
    bs = up.calibration_batches(char_tokenizer, texts, batch_size=2, max_length=6)
    assert [b["input_ids"].shape for b in bs] == [(2, 6), (1, 3)]  # empty text dropped, longest first, cut to 6
    assert bs[0]["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert bs[0]["input_ids"][1, -1] == char_tokenizer.pad_token_id
    with pytest.raises(ValueError, match="batch_size"):
        up.calibration_batches(char_tokenizer, texts, batch_size=0, max_length=6)


# ----------------------------------------------------------------------------------------- selection
def test_selection_rules():
    scores = [0.99, 0.5, 0.9, 0.8, 0.95, 0.99]  # ends most saturated: excluded unless allow_ends
    assert up.select_layers(scores, 2) == [2, 4]
    assert up.select_layers(scores, 2, allow_ends=True) == [0, 5]
    assert up.select_layers(scores, 3, selection="block") == [2, 3, 4]
    assert up.select_layers(scores, 2, selection="block") == [3, 4]  # mean .875 > .85
    assert up.select_layers([0.1, 0.5, 0.5, 0.1], 1) == [1]  # ties: lower index
    with pytest.raises(ValueError, match="target_layers.*allow_ends"):
        up.select_layers(scores, 5)
    with pytest.raises(ValueError, match="must exceed"):
        up.select_layers(scores, 0)
    with pytest.raises(ValueError, match="upscale.selection"):
        up.select_layers(scores, 1, selection="random")
    with pytest.raises(ValueError, match="finite"):
        up.select_layers([0.1, float("nan"), 0.2], 1)


def test_plan_layouts():
    single = up.plan_expansion(4, [1, 2], selection="single")
    assert single.sources == (0, 1, 1, 2, 2, 3)
    assert single.inserted == (False, False, True, False, True, False)
    block = up.plan_expansion(6, [2, 3], selection="block")
    assert block.sources == (0, 1, 2, 3, 2, 3, 4, 5)
    assert [j for j, f in enumerate(block.inserted) if f] == [4, 5]
    assert block.to_dict()["n_after"] == 8
    with pytest.raises(ValueError, match="contiguous"):
        up.plan_expansion(6, [1, 3], selection="block")
    with pytest.raises(ValueError, match="distinct indices"):
        up.plan_expansion(4, [1, 1])
    with pytest.raises(ValueError, match="distinct indices"):
        up.plan_expansion(4, [4])


# ----------------------------------------------------------------------------------------- expansion
@pytest.mark.parametrize("arch,selection,layers", [("qwen2", "single", [1, 2]), ("llama", "single", [1, 2]),
                                                   ("qwen2", "block", [1, 2]), ("qwen3", "single", [2]),
                                                   ("mistral", "block", [1, 2])])
def test_identity_init_keeps_the_function_and_generate_works(arch, selection, layers):
    model = tiny(arch)
    plan = up.plan_expansion(4, layers, selection=selection)
    big = ux.expand_model(copy.deepcopy(model), plan, init="identity")
    assert big.config.num_hidden_layers == len(big.model.layers) == 4 + len(layers)
    b = batch(3, 13, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(big(**b).logits, model(**b).logits, rtol=1e-5, atol=1e-5)
    # the copy's residual writers are zero; the rest is copied
    for j in (j for j, f in enumerate(plan.inserted) if f):
        layer = big.model.layers[j]
        assert layer.self_attn.o_proj.weight.abs().sum() == 0 and layer.mlp.down_proj.weight.abs().sum() == 0
        if layer.self_attn.o_proj.bias is not None:
            assert layer.self_attn.o_proj.bias.abs().sum() == 0 and layer.mlp.down_proj.bias.abs().sum() == 0
        torch.testing.assert_close(layer.self_attn.q_proj.weight, model.model.layers[plan.sources[j]].self_attn.q_proj.weight)
    # generate with the KV cache: same tokens as the original model and as the uncached expanded model
    x = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = big.generate(x, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(x, use_cache=True, **kw))
    assert torch.equal(cached, big.generate(x, use_cache=False, **kw))


@pytest.mark.parametrize("selection,layers", [("single", [1, 2]), ("block", [1, 2])])
def test_copy_init_layer_order_and_kv_cache(selection, layers):
    model = tiny("llama")
    old = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.model.layers]
    plan = up.plan_expansion(4, layers, selection=selection)
    expected = [0, 1, 1, 2, 2, 3] if selection == "single" else [0, 1, 2, 1, 2, 3]
    assert list(plan.sources) == expected
    big = ux.expand_model(copy.deepcopy(model), plan, init="copy")
    for j, layer in enumerate(big.model.layers):
        new = layer.state_dict()
        for k, v in old[expected[j]].items():
            assert torch.equal(new[k], v), (j, k)
    assert [layer.self_attn.layer_idx for layer in big.model.layers] == list(range(6))
    # copies own their storage: training one does not move the other
    with torch.no_grad():
        big.model.layers[2 if selection == "single" else 3].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(big.model.layers[1].mlp.up_proj.weight, old[1]["mlp.up_proj.weight"])
    b = batch(2, 9, seed=7)
    with torch.no_grad():
        assert not torch.allclose(big(**b).logits, model(**b).logits, atol=1e-3)  # copy changes the function
    x = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(8))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(big.generate(x, use_cache=True, **kw), big.generate(x, use_cache=False, **kw))


def test_config_per_layer_fields_sliding_window():
    """Qwen2 with sliding-window layers: layer_types follow the duplicated layers; the model still matches."""
    model = tiny("qwen2", layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    plan = up.plan_expansion(4, [1, 2])
    big = ux.expand_model(copy.deepcopy(model), plan, init="identity")
    assert big.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    assert big.config.max_window_layers == 3
    assert [layer.self_attn.sliding_window for layer in big.model.layers] == [None] * 3 + [4] * 3
    b = batch(2, 13, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(big(**b).logits, model(**b).logits, rtol=1e-5, atol=1e-5)


def test_config_updates_dict_level():
    plan = up.plan_expansion(3, [1])
    cfg = {"model_type": "llama", "num_hidden_layers": 3, "eos_token_id": [1, 2, 3],
           "per_layer_config": {"1": {"intermediate_size": 96}, "2": {"intermediate_size": 128}}}
    new = ux.expand_config_dict(cfg, plan)
    assert new["num_hidden_layers"] == 4 and new["eos_token_id"] == [1, 2, 3]
    assert new["per_layer_config"] == {"1": {"intermediate_size": 96}, "2": {"intermediate_size": 96},
                                       "3": {"intermediate_size": 128}}
    assert cfg["num_hidden_layers"] == 3  # input untouched
    with pytest.raises(ValueError, match="'attn_windows'.*per-layer"):
        ux.config_updates({**cfg, "attn_windows": [8, 16, 32]}, plan)
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        ux.config_updates({**cfg, "layer_types": ["a", "b"]}, plan)
    with pytest.raises(ValueError, match="plan expects 3"):
        ux.config_updates({**cfg, "num_hidden_layers": 5}, plan)


def test_unknown_architecture_errors_clearly(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    plan = up.plan_expansion(2, [0])
    for call in (lambda: ux.expand_model(gpt2, plan), lambda: up.analyze_model(gpt2, [batch()])):
        with pytest.raises(up.UnsupportedArchitecture, match="model_type='gpt2'.*supported: llama, mistral, qwen2"):
            call()
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(up.UnsupportedArchitecture, match="gpt2"):
        ux.expand_checkpoint(tmp_path / "gpt2", tmp_path / "out", plan)
    with pytest.raises(up.UnsupportedArchitecture, match="gpt2"):
        up.analyze_checkpoint(tmp_path / "gpt2", [batch()])
    with pytest.raises(ValueError, match="upscale.init"):
        ux.expand_model(tiny("qwen2"), up.plan_expansion(4, [1]), init="zeros")


# --------------------------------------------------------------------------------- checkpoints on disk
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sharded_expansion_equals_in_memory_and_reloads(arch, tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny(arch)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB")
    char_tokenizer.save_pretrained(src)
    n_shards = len(list(src.glob("*.safetensors")))
    assert n_shards > 2
    plan = up.plan_expansion(4, [1, 2])

    info = ux.expand_checkpoint(src, tmp_path / "streamed", plan, init="identity")
    assert info["files"] == sorted(p.name for p in src.glob("*.safetensors"))
    mem = ux.expand_model(AutoModelForCausalLM.from_pretrained(src), plan, init="identity")
    mem.save_pretrained(tmp_path / "mem")

    streamed, loading = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    assert streamed.config.num_hidden_layers == 6
    if arch == "qwen2":
        assert len(streamed.config.layer_types) == 6
    s_sd, m_sd = state(streamed), state(mem)
    assert s_sd.keys() == m_sd.keys()
    for k in s_sd:
        assert torch.equal(s_sd[k], m_sd[k]), k
    index = json.loads((tmp_path / "streamed" / up.INDEX_FILE).read_text())
    assert index["metadata"]["total_parameters"] == info["total_parameters"]
    from safetensors import safe_open

    with safe_open(tmp_path / "mem" / up.SINGLE_FILE, "pt") as f:
        assert set(index["weight_map"]) == set(f.keys())  # same tensor names as save_pretrained writes
    # tokenizer and generation config travel with the weights
    tok = AutoTokenizer.from_pretrained(tmp_path / "streamed")
    assert tok.encode("<think_on>1+2", add_special_tokens=False) == char_tokenizer.encode(
        "<think_on>1+2", add_special_tokens=False)
    assert (tmp_path / "streamed" / "generation_config.json").exists()
    b = batch(2, 9, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(streamed(**b).logits, model(**b).logits, rtol=1e-5, atol=1e-5)


def test_single_file_checkpoint_streams_too(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "src")
    assert (tmp_path / "src" / up.SINGLE_FILE).exists()
    plan = up.plan_expansion(4, [2])
    ux.expand_checkpoint(tmp_path / "src", tmp_path / "out", plan, init="copy")
    assert not (tmp_path / "out" / up.INDEX_FILE).exists()
    big = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ref = ux.expand_model(copy.deepcopy(model), plan, init="copy")
    b = batch(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(big(**b).logits, ref(**b).logits)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        up.CheckpointReader(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_analysis_and_expansion_on_cuda(tmp_path):
    """Both analysis paths on the GPU agree with the CPU numbers; identity expansion keeps bf16 logits."""
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "src", max_shard_size="40KB")
    batches = [batch(3, 11, seed=12)]
    cpu = up.analyze_model(model, batches)
    gpu_mem = up.analyze_model(copy.deepcopy(model).cuda(), batches)
    gpu_stream = up.analyze_checkpoint(tmp_path / "src", batches, device="cuda")
    for p, q, r in zip(cpu, gpu_mem, gpu_stream):
        assert q.cos_mean == pytest.approx(p.cos_mean, abs=1e-4) and r.cos_mean == pytest.approx(p.cos_mean, abs=1e-4)
    half = copy.deepcopy(model).to("cuda", torch.bfloat16)
    big = ux.expand_model(copy.deepcopy(half), up.plan_expansion(4, [1, 2]), init="identity")
    b = {k: v.cuda() for k, v in batch(2, 9).items()}
    with torch.no_grad():
        assert torch.equal(big(**b).logits, half(**b).logits)  # zero blocks add exact zeros, even in bf16
