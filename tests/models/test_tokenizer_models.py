"""Tokenizer special tokens, the tiny models, HF load/save and embedding resize."""
from __future__ import annotations

import pytest
import torch

from kat.data.templates import SPECIAL_TOKENS
from kat.models import hf
from kat.models.tokenizer import add_special_tokens, build_char_tokenizer, render_prompt, special_token_ids

TINY = {"name": "tiny", "arch": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "num_key_value_heads": 1, "intermediate_size": 64, "max_position_embeddings": 128,
                                 "tie_word_embeddings": True}}


def test_special_tokens_are_single_ids(char_tokenizer):
    ids = special_token_ids(char_tokenizer)
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    for tok in SPECIAL_TOKENS:
        assert char_tokenizer.encode(tok, add_special_tokens=False) == [ids[tok]]
    text = "<judge>easy</judge><think_off><answer>12</answer>"
    enc = char_tokenizer.encode(text, add_special_tokens=False)
    assert len(enc) == 5 + 4 + 2  # 5 tags, 4 + 2 characters
    assert char_tokenizer.decode(enc) == text


def test_char_round_trip_and_chat_template(char_tokenizer, tmp_path):
    text = "def f(x):\n\treturn x+1  # é?"
    ids = char_tokenizer.encode(text, add_special_tokens=False)
    assert char_tokenizer.decode(ids) == text.replace("é", "<|unk|>")
    prompt = render_prompt(char_tokenizer, [{"role": "user", "content": "47+85"}])
    assert prompt == "<|user|>47+85<|end|><|assistant|>"
    char_tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.encode(prompt + text, add_special_tokens=False) == char_tokenizer.encode(prompt + text,
                                                                                           add_special_tokens=False)
    assert again.padding_side == "left"


def test_add_special_tokens_to_a_foreign_tokenizer_and_resize(tmp_path):
    """model=hf: a tokenizer without kat's tags gets them as single ids; the embeddings grow to match."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "</s>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", eos_token="</s>")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32))
    d = tmp_path / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)

    n0 = len(tok)  # the saved tokenizer as it is (AutoTokenizer would swap in Qwen2Tokenizer from config.json)
    loaded, ltok = hf.load({"path": str(d), "dtype": "float32"})
    assert len(ltok) == n0 + len(SPECIAL_TOKENS)
    assert ltok.encode("the quick fox", add_special_tokens=False) == tok.encode("the quick fox",
                                                                               add_special_tokens=False)
    assert loaded.get_input_embeddings().weight.shape[0] >= len(ltok)
    for t in SPECIAL_TOKENS:
        assert len(ltok.encode(t, add_special_tokens=False)) == 1
    assert ltok.pad_token is not None and ltok.padding_side == "left"
    assert add_special_tokens(ltok) == 0  # idempotent


def test_tiny_build_save_load_generate(tmp_path):
    torch.manual_seed(0)
    model, tok = hf.load(TINY)
    out = hf.save(model, tok, tmp_path / "m")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)  # loads in plain transformers
    x = torch.tensor([tok.encode("<|user|>1+2<|end|><|assistant|>", add_special_tokens=False)])
    torch.testing.assert_close(model(x).logits, plain(x).logits)
    assert set(plain.generation_config.eos_token_id) == {tok.eos_token_id, tok.convert_tokens_to_ids("</answer>")}


def test_bad_model_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.path"):
        hf.load({"path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="model.dtype"):
        hf.load({**TINY, "dtype": "float8"})
    with pytest.raises(ValueError, match="model.arch"):
        hf.load({"name": "x", "arch": None})


def test_default_tiny_sizes():
    from omegaconf import OmegaConf

    from kat_testing import CONF

    student = OmegaConf.load(CONF / "model" / "tiny.yaml")
    teacher = OmegaConf.load(CONF / "model" / "tiny_teacher.yaml")
    tok = build_char_tokenizer()
    n_s = hf.n_params(hf.build_from_config(student.arch, tok))
    n_t = hf.n_params(hf.build_from_config(teacher.arch, tok))
    assert 0.5e6 < n_s < 2e6 and n_t > 2 * n_s
