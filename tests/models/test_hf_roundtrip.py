"""A model saved by kat together with its char tokenizer loads back with the same tokenizer.

Regression test: transformers 5 resolves a saved ``TokenizersBackend`` tokenizer through config.json's model type
(qwen2) to Qwen2Tokenizer, whose byte-level pre-tokenizer drops spaces and newlines.
"""
from __future__ import annotations

from kat.models import hf
from kat.models.tokenizer import add_special_tokens, build_char_tokenizer

ARCH = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1}


def test_saved_char_tokenizer_round_trips(tmp_path):
    tok = build_char_tokenizer()
    add_special_tokens(tok)
    model, _ = hf.load({"arch": ARCH}, tok)
    hf.save(model, tok, tmp_path / "ckpt")

    back = hf.load_tokenizer({"path": str(tmp_path / "ckpt")})
    text = "<|user|>What is 3 + 4?\nAnswer with a number.<|end|><judge>easy</judge><think_off><answer> 7</answer>"
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text  # spaces and newlines survive
    assert len(back) == len(tok)
    assert (back.pad_token_id, back.eos_token_id, back.padding_side) == (tok.pad_token_id, tok.eos_token_id,
                                                                          tok.padding_side)
    # and the whole model + tokenizer pair loads through model.path
    model2, tok2 = hf.load({"path": str(tmp_path / "ckpt")})
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert model2.get_input_embeddings().weight.shape[0] == len(tok)
