"""kat.data.align: positional and character-offset alignment, the logits shift, MTP depth, HF wrapper."""
from __future__ import annotations

import pytest
import torch

from kat.data.align import AlignedRows, align_answer, encode_answer, offset_rows, positional_rows
from kat.losses.uld import uld_loss

SENTENCES = [
    "the cat sat on the mat", "a café costs 3 € today", "the answer is 42", "coûte que coûte",
    "two plus two is four", "the mat is on the cat", "answers are numbers",
]
ANSWER = "the café answer is 42 €, the cat sat"


@pytest.fixture(scope="module")
def char_tok():
    """Character-level WordLevel tokenizer (one token per character, spaces included)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(SENTENCES) + ANSWER))
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def bpe_tok():
    """Tiny byte-level BPE trained on a few sentences (multi-byte characters split into byte tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def word_tok():
    """Whitespace-split BPE: spaces belong to no token (gaps in the offsets)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    chars = sorted(set("".join(SENTENCES) + ANSWER) - {" "})
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"], initial_alphabet=chars,
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _oracle_logits(ids: list[int], vocab: int, depth: int = 0) -> torch.Tensor:
    """(T, vocab) logits of a perfect next-token model: row i puts its mass on ids[i + 1 + depth]."""
    out = torch.zeros(len(ids), vocab)
    for i in range(len(ids) - 1 - depth):
        out[i, ids[i + 1 + depth]] = 20.0
    return out


# ----------------------------------------------------------------------------------------------------------------
# core functions on hand-made offsets
# ----------------------------------------------------------------------------------------------------------------
def test_positional_rows_shift_truncation_and_depth():
    a = positional_rows(5, 3, student_answer_start=4, teacher_answer_start=7)
    assert isinstance(a, AlignedRows) and len(a) == 3
    assert a.student_rows.tolist() == [3, 4, 5] and a.teacher_rows.tolist() == [6, 7, 8]
    assert a.student_tokens.tolist() == [0, 1, 2] == a.teacher_tokens.tolist()
    d = positional_rows(5, 3, student_answer_start=1, teacher_answer_start=7, depth=1)
    assert d.student_rows.tolist() == [0, 1] and d.teacher_rows.tolist() == [7, 8], "negative rows dropped"
    with pytest.raises(ValueError, match="student_answer_start"):
        positional_rows(2, 2, student_answer_start=0, teacher_answer_start=1)
    with pytest.raises(ValueError, match="depth"):
        positional_rows(2, 2, student_answer_start=1, teacher_answer_start=1, depth=-1)


def test_offset_rows_groups_at_common_boundaries():
    # "abc": student a|b|c, teacher ab|c -> groups {a,b}~{ab} and {c}~{c}
    a = offset_rows([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)], student_answer_start=10, teacher_answer_start=3)
    assert a.student_tokens.tolist() == [0, 2] and a.teacher_tokens.tolist() == [0, 1]
    assert a.student_rows.tolist() == [9, 11] and a.teacher_rows.tolist() == [2, 3]
    # "abcde": ab|c|de vs a|bcd|e share only the final boundary -> one group
    b = offset_rows([(0, 2), (2, 3), (3, 5)], [(0, 1), (1, 4), (4, 5)], student_answer_start=1,
                    teacher_answer_start=1)
    assert b.student_tokens.tolist() == [0] and b.teacher_tokens.tolist() == [0]


def test_offset_rows_zero_width_byte_split_gaps_and_trailing_tokens():
    # student: special (0,0), "abc", then a 2-byte char split into two tokens (3,4),(3,4), then "de"
    s = [(0, 0), (0, 3), (3, 4), (3, 4), (4, 6)]
    t = [(0, 4), (4, 6)]
    a = offset_rows(s, t, student_answer_start=1, teacher_answer_start=1)
    assert a.student_tokens.tolist() == [1, 4] and a.teacher_tokens.tolist() == [0, 1]
    # whitespace gaps: "Hello world" as Hello|world (no space token) vs Hel|lo|␣wor|ld
    g = offset_rows([(0, 5), (6, 11)], [(0, 3), (3, 5), (5, 9), (9, 11)], student_answer_start=1,
                    teacher_answer_start=1)
    assert g.student_tokens.tolist() == [0, 1] and g.teacher_tokens.tolist() == [0, 2]
    # a trailing student token beyond the teacher's text (e.g. an EOS with a span) is dropped
    e = offset_rows([(0, 2), (2, 4), (4, 5)], [(0, 4)], student_answer_start=1, teacher_answer_start=1)
    assert e.student_tokens.tolist() == [0] and e.teacher_tokens.tolist() == [0]
    with pytest.raises(ValueError, match="teacher_offsets"):
        offset_rows([(0, 1)], [(2, 1)], student_answer_start=1, teacher_answer_start=1)


def test_offset_rows_depth_shifts_student_rows_only():
    s = [(0, 1), (1, 2), (2, 3), (3, 4)]
    t = [(0, 2), (2, 4)]
    main = offset_rows(s, t, student_answer_start=5, teacher_answer_start=2)
    d2 = offset_rows(s, t, student_answer_start=5, teacher_answer_start=2, depth=2)
    assert (d2.student_rows == main.student_rows - 2).all() and torch.equal(d2.teacher_rows, main.teacher_rows)


# ----------------------------------------------------------------------------------------------------------------
# HF fast tokenizers: the shift (TRL GOLD "observed" trap) and identical-tokenizer reduction
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pair", [("char_tok", "bpe_tok"), ("bpe_tok", "word_tok"), ("word_tok", "char_tok")])
@pytest.mark.parametrize("depth", [0, 1])
def test_rows_predict_the_paired_tokens(request, pair, depth):
    """Oracle next-token models: every returned row must put its mass on the paired answer token.

    Slicing at the answer positions themselves (TRL GOLD "observed") would make each row predict the token
    after the paired one; the assertion at the end shows that this test catches it.
    """
    s_tok, t_tok = request.getfixturevalue(pair[0]), request.getfixturevalue(pair[1])
    s_prompt, t_prompt = [1, 2, 3, 4, 5], [7, 8]  # arbitrary prompt ids of different lengths
    a = align_answer(s_tok, t_tok, ANSWER, student_answer_start=len(s_prompt),
                     teacher_answer_start=len(t_prompt), depth=depth)
    assert len(a) >= 5
    s_ids, t_ids = s_prompt + a.student_ids, t_prompt + a.teacher_ids
    s_logits = _oracle_logits(s_ids, len(s_tok) + 10, depth=depth)
    t_logits = _oracle_logits(t_ids, len(t_tok) + 10)
    assert s_logits[a.student_rows].argmax(-1).tolist() == [a.student_ids[k] for k in a.student_tokens.tolist()]
    assert t_logits[a.teacher_rows].argmax(-1).tolist() == [a.teacher_ids[k] for k in a.teacher_tokens.tolist()]
    # paired tokens start right after the same character boundary
    _, s_off = encode_answer(s_tok, ANSWER)
    _, t_off = encode_answer(t_tok, ANSWER)
    for ks, kt in zip(a.student_tokens.tolist(), a.teacher_tokens.tolist()):
        prev_s = s_off[ks - 1][1] if ks > 0 else 0
        prev_t = t_off[kt - 1][1] if kt > 0 else 0
        assert ANSWER[:prev_s].rstrip() == ANSWER[:prev_t].rstrip(), (ks, kt)
    observed = a.student_rows + 1  # the GOLD "observed" slicing
    assert s_logits[observed].argmax(-1).tolist() != [a.student_ids[k] for k in a.student_tokens.tolist()]


def test_identical_tokenizers_reduce_to_the_same_tokenizer_shift(bpe_tok):
    s_prompt, t_prompt = [3] * 6, [3] * 2
    a = align_answer(bpe_tok, bpe_tok, ANSWER, student_answer_start=len(s_prompt),
                     teacher_answer_start=len(t_prompt))
    n = len(a.student_ids)
    assert a.student_ids == a.teacher_ids and len(a) == n
    assert a.student_rows.tolist() == list(range(len(s_prompt) - 1, len(s_prompt) - 1 + n))
    assert a.teacher_rows.tolist() == list(range(len(t_prompt) - 1, len(t_prompt) - 1 + n))
    p = align_answer(bpe_tok, bpe_tok, ANSWER, student_answer_start=6, teacher_answer_start=2, method="positional")
    assert torch.equal(p.student_rows, a.student_rows) and torch.equal(p.teacher_rows, a.teacher_rows)
    # identical (bigram) models on sequences with different prompts: ULD over aligned rows is exactly 0,
    # and a one-sided off-by-one is not
    table = torch.randn(len(bpe_tok) + 10, 50, generator=torch.Generator().manual_seed(0)) * 3
    s_logits = table[torch.tensor(s_prompt + a.student_ids)]
    t_logits = table[torch.tensor(t_prompt + a.teacher_ids)]
    assert uld_loss(s_logits[a.student_rows], t_logits[a.teacher_rows]).item() == 0.0
    assert uld_loss(s_logits[a.student_rows + 1][:-1], t_logits[a.teacher_rows][:-1]).item() > 0.0


def test_offsets_beat_positional_on_different_tokenizers(char_tok, bpe_tok):
    """Positional pairing drifts off the text; offset pairing never pairs tokens at different positions."""
    pos = align_answer(char_tok, bpe_tok, ANSWER, student_answer_start=1, teacher_answer_start=1,
                       method="positional")
    off = align_answer(char_tok, bpe_tok, ANSWER, student_answer_start=1, teacher_answer_start=1)
    _, s_off = encode_answer(char_tok, ANSWER)
    _, t_off = encode_answer(bpe_tok, ANSWER)

    def starts(rows):
        return [(s_off[i][0], t_off[j][0]) for i, j in zip(rows.student_tokens.tolist(),
                                                            rows.teacher_tokens.tolist())]

    assert any(a != b for a, b in starts(pos))
    assert all(a == b for a, b in starts(off))


def test_wrapper_validation(char_tok):
    with pytest.raises(ValueError, match="method"):
        align_answer(char_tok, char_tok, "x", student_answer_start=1, teacher_answer_start=1, method="bytes")
    with pytest.raises(TypeError, match="fast tokenizer"):
        encode_answer(object(), "x")
    with pytest.raises(TypeError, match="answer"):
        encode_answer(char_tok, 3)
