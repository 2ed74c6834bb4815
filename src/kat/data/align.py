"""Cross-tokenizer alignment of answer positions for logit distillation (ULD).

Student and teacher see the same answer *text* but tokenize it differently. ULD compares one student
distribution with one teacher distribution per aligned position, so we need pairs of logits rows.

The shift (the part implementations get wrong). In a causal LM (HF convention) logits row i predicts
token i + 1. If the answer starts at sequence index ``answer_start`` (its first token is
``input_ids[answer_start]``), then answer token k (0-based) is predicted by row ``answer_start − 1 + k``.
Every function here returns rows that *predict* the paired tokens, on both sides. TRL GOLD's "observed"
merge strategy sliced the logits at the answer positions themselves (row ``answer_start + k``), i.e. the
distribution of the token *after* the one it pairs (docs/uld.md §3); the tests in tests/data/test_align.py
check the shift with an oracle next-token model and with identical tokenizers.

Two alignments:

* :func:`positional_rows` — the ULD paper's reference code: answer token k ↔ answer token k, truncated to
  the shorter answer. Cheap; drifts as soon as the tokenizations differ in length.
* :func:`offset_rows` — character-offset alignment (better): walk both answers' token end offsets; a group
  closes where both sides reach the same character boundary. Each group contributes one pair: the *first*
  token of the student group with the *first* token of the teacher group. Both first tokens start at the
  same character, so both rows are "the next-token distribution at this point of the text" — the closest
  like-for-like comparison available without merging probabilities. (GOLD instead merges the probabilities
  of multi-token groups; we do not, because ULD sorts whole distributions and a product of conditionals
  over several steps is not a next-token distribution.) The later tokens of a multi-token group get no
  distillation signal.
  Tokens that add no characters (empty spans such as special tokens, or the rest of a character split into
  byte tokens, whose span ends at the boundary already reached) are merged into the group that just closed,
  unless both sides have the same run of such tokens with the same spans (then they are paired one to one,
  so identical tokenizations pair every token). Character offsets cannot tell where two tokenizers split a
  character's bytes, so such a pair may compare two different byte continuations; both are near one-hot
  and their ULD is then ≈ 0, so this is harmless.

MTP depth k (DeepSeek-V3, arXiv 2412.19437): the student's depth-k head at row i predicts token i + k + 1, so
the student row that predicts the same token is ``main_row − k`` (the teacher row is unchanged); pairs whose
student row would be negative are dropped. With one tokenizer this is the rule "student row i ↔ teacher row
i + k". (A cross-tokenizer rule could shift by k alignment groups instead; shifting rows by k tokens is exact
for the paired tokens, whereas a k-group shift pairs different text when groups hold several tokens.)

The core functions take plain token offsets, so they work with any tokenizer; :func:`align_answer` is a
convenience wrapper for HF *fast* tokenizers (``return_offsets_mapping=True``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["AlignedRows", "positional_rows", "offset_rows", "encode_answer", "align_answer"]


@dataclass(frozen=True, eq=False)
class AlignedRows:
    """Paired logits rows (P pairs). Index ``student_logits[student_rows]`` and ``teacher_logits[teacher_rows]``.

    Attributes:
        student_rows: (P,) int64 rows of the student sequence's logits (row i predicts token i + 1 + depth).
        teacher_rows: (P,) int64 rows of the teacher sequence's logits.
        student_tokens: (P,) int64 answer-token indices (0-based within the answer) predicted by student_rows.
        teacher_tokens: (P,) int64 answer-token indices predicted by teacher_rows.
        student_ids, teacher_ids: the answer token ids when produced by :func:`align_answer`, else None.
    """

    student_rows: torch.Tensor
    teacher_rows: torch.Tensor
    student_tokens: torch.Tensor
    teacher_tokens: torch.Tensor
    student_ids: list[int] | None = None
    teacher_ids: list[int] | None = None

    def __len__(self) -> int:
        return int(self.student_rows.numel())


def _check_start(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be ≥ 1 (row answer_start − 1 predicts the first answer token), got {value}")
    return value


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be an int ≥ 0, got {depth!r}")
    return depth


def _rows(s_tok: list[int], t_tok: list[int], s_start: int, t_start: int, depth: int) -> AlignedRows:
    s_tokens = torch.tensor(s_tok, dtype=torch.long)  # (P,)
    t_tokens = torch.tensor(t_tok, dtype=torch.long)  # (P,)
    s_rows = s_start - 1 + s_tokens - depth  # (P,)
    t_rows = t_start - 1 + t_tokens  # (P,)
    keep = s_rows >= 0
    return AlignedRows(s_rows[keep], t_rows[keep], s_tokens[keep], t_tokens[keep])


def positional_rows(
    n_student_answer: int,
    n_teacher_answer: int,
    *,
    student_answer_start: int,
    teacher_answer_start: int,
    depth: int = 0,
) -> AlignedRows:
    """Paper alignment: answer token k ↔ answer token k for k < min(n_student_answer, n_teacher_answer).

    Returns rows ``student_answer_start − 1 + k − depth`` and ``teacher_answer_start − 1 + k``.
    """
    for name, v in (("n_student_answer", n_student_answer), ("n_teacher_answer", n_teacher_answer)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int ≥ 0, got {v!r}")
    s_start = _check_start("student_answer_start", student_answer_start)
    t_start = _check_start("teacher_answer_start", teacher_answer_start)
    depth = _check_depth(depth)
    k = list(range(min(n_student_answer, n_teacher_answer)))
    return _rows(k, k, s_start, t_start, depth)


def _check_offsets(name: str, offsets: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    out = []
    for i, span in enumerate(offsets):
        try:
            a, b = int(span[0]), int(span[1])
        except (TypeError, IndexError, ValueError):
            raise ValueError(f"{name}[{i}] must be a (start, end) pair of ints, got {span!r}") from None
        if a < 0 or b < a:
            raise ValueError(f"{name}[{i}] = {span!r} is not a valid character span")
        out.append((a, b))
    return out


def _group_firsts(s_off: list[tuple[int, int]], t_off: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """First token index of every common-boundary group on each side (see the module docstring)."""
    s_first: list[int] = []
    t_first: list[int] = []
    i = j = 0
    boundary = 0  # last common character boundary
    n_s, n_t = len(s_off), len(t_off)
    while True:
        # Tokens that add no characters beyond the boundary (empty spans, the rest of a character split into
        # byte tokens). Equal runs with equal spans on both sides are paired one to one (identical
        # tokenizations stay fully paired); otherwise they are merged into the group that just closed.
        i_end, j_end = i, j
        while i_end < n_s and s_off[i_end][1] <= boundary:
            i_end += 1
        while j_end < n_t and t_off[j_end][1] <= boundary:
            j_end += 1
        if boundary > 0 and i_end - i == j_end - j and s_off[i:i_end] == t_off[j:j_end]:
            s_first.extend(range(i, i_end))
            t_first.extend(range(j, j_end))
        i, j = i_end, j_end
        if i >= n_s or j >= n_t:
            break
        gi, gj = i, j
        end_s, end_t = s_off[i][1], t_off[j][1]
        i += 1
        j += 1
        while end_s != end_t:
            if end_s < end_t:
                if i >= n_s:
                    break
                end_s = max(end_s, s_off[i][1])
                i += 1
            else:
                if j >= n_t:
                    break
                end_t = max(end_t, t_off[j][1])
                j += 1
        if end_s != end_t:  # one side ran out before a common boundary: the trailing group is dropped
            break
        s_first.append(gi)
        t_first.append(gj)
        boundary = end_s
    return s_first, t_first


def offset_rows(
    student_offsets: Sequence[Sequence[int]],
    teacher_offsets: Sequence[Sequence[int]],
    *,
    student_answer_start: int,
    teacher_answer_start: int,
    depth: int = 0,
) -> AlignedRows:
    """Character-offset alignment of two tokenizations of the same answer text.

    Args:
        student_offsets: per student answer token, its (start, end) character span in the answer text.
        teacher_offsets: the same for the teacher's answer tokens (same text, same character coordinates).
        student_answer_start: sequence index of the student's first answer token (≥ 1).
        teacher_answer_start: sequence index of the teacher's first answer token (≥ 1).
        depth: MTP depth of the student head (0 = main head).

    Returns:
        One pair per common-boundary group: the rows predicting the first token of the group on each side.
    """
    s_off = _check_offsets("student_offsets", student_offsets)
    t_off = _check_offsets("teacher_offsets", teacher_offsets)
    s_start = _check_start("student_answer_start", student_answer_start)
    t_start = _check_start("teacher_answer_start", teacher_answer_start)
    depth = _check_depth(depth)
    s_first, t_first = _group_firsts(s_off, t_off)
    return _rows(s_first, t_first, s_start, t_start, depth)


def encode_answer(tokenizer, answer: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of ``answer`` alone (no special tokens) with an HF fast tokenizer.

    Build training sequences as ``prompt_ids + ids`` with these ids so that the alignment matches the tokens
    the model actually sees (tokenizing prompt and answer jointly can merge tokens across the boundary).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"encode_answer needs an HF fast tokenizer (return_offsets_mapping), got "
                        f"{type(tokenizer).__name__}")
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def align_answer(
    student_tokenizer,
    teacher_tokenizer,
    answer: str,
    *,
    student_answer_start: int,
    teacher_answer_start: int,
    method: str = "offsets",
    depth: int = 0,
) -> AlignedRows:
    """Tokenize ``answer`` with both HF fast tokenizers and align it (``method`` "offsets" or "positional").

    The returned :class:`AlignedRows` carries the answer ids of both sides (``student_ids``, ``teacher_ids``);
    the sequences must be ``prompt_ids + answer_ids`` with the answer starting at the given indices.
    """
    if method not in ("offsets", "positional"):
        raise ValueError(f"method must be 'offsets' or 'positional', got {method!r}")
    s_ids, s_off = encode_answer(student_tokenizer, answer)
    t_ids, t_off = encode_answer(teacher_tokenizer, answer)
    if method == "offsets":
        rows = offset_rows(s_off, t_off, student_answer_start=student_answer_start,
                           teacher_answer_start=teacher_answer_start, depth=depth)
    else:
        rows = positional_rows(len(s_ids), len(t_ids), student_answer_start=student_answer_start,
                               teacher_answer_start=teacher_answer_start, depth=depth)
    return AlignedRows(rows.student_rows, rows.teacher_rows, rows.student_tokens, rows.teacher_tokens,
                       student_ids=s_ids, teacher_ids=t_ids)
