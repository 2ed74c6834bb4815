"""Tokenizers: the embedded character-level tokenizer and kat's special tokens on any HF tokenizer.

The embedded default needs no download: :func:`build_char_tokenizer` builds a character-level
tokenizer with HF ``tokenizers`` (printable ASCII + newline/tab, one id per character), the kat tags
of :data:`kat.data.templates.SPECIAL_TOKENS` and compact chat-role tokens, wrapped as a
``PreTrainedTokenizerFast`` with a chat template. ``save_pretrained`` writes a normal HF tokenizer
directory that ``AutoTokenizer.from_pretrained`` loads.
"""
from __future__ import annotations

import logging
import string

from kat.data.templates import SPECIAL_TOKENS

log = logging.getLogger(__name__)

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

#: Jinja chat template of the embedded tokenizer: <|user|>text<|end|><|assistant|>...
CHAR_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] != 'assistant' or not loop.last %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

CHARSET = "".join(ch for ch in string.printable if ch not in "\x0b\x0c\r")


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with kat's special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, EOS, UNK, *ROLE_TOKENS, *SPECIAL_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in CHARSET:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[*ROLE_TOKENS, *SPECIAL_TOKENS],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAR_CHAT_TEMPLATE
    tok.model_max_length = 1024
    return tok


def add_special_tokens(tokenizer) -> int:
    """Make every kat tag a single special token of ``tokenizer``; return how many ids were added.

    Also gives the tokenizer a pad token (EOS when it has none) and left padding for generation.
    """
    have = set(tokenizer.get_vocab())
    missing = [t for t in SPECIAL_TOKENS if t not in have]
    added = 0
    if missing:
        added = tokenizer.add_tokens(missing, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    for t in SPECIAL_TOKENS:
        ids = tokenizer.encode(t, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"special token {t!r} encodes to {len(ids)} ids {ids}; expected one")
    return added


def special_token_ids(tokenizer) -> dict[str, int]:
    """Map each kat tag to its id."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template prompt ending with the assistant's generation prefix."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # base models without a chat template: a plain transcript
    log.warning("tokenizer has no chat template; using a plain 'role: content' transcript")
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nassistant: "
