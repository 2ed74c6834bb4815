"""General / multiturn / tool answers: normalised exact match or keyword coverage.

The heuristic (all comparisons on the ``<answer>`` block only):

* **Normalisation** (SQuAD style): lower-case; numbers canonicalised (``1,000`` -> ``1000``,
  ``132.0`` -> ``132``, ``3.50`` -> ``3.5``); punctuation removed (except inside numbers and a
  leading minus); the articles *a, an, the* dropped; whitespace collapsed.
* **Exact match**: normalised answer == normalised reference -> 1.
* **Keyword match** -> 1 when all of:
  1. every *number* of the reference occurs in the answer;
  2. every *content word* of the reference (not in a small English stop-word list, at least two
     letters; compared after stripping a plural ``s``) occurs in the answer;
  3. the answer has at most ``max_extra_numbers`` (1) distinct numbers that are not in the
     reference (listing candidates is not an answer);
  4. the answer is not absurdly longer than the reference: at most
     ``max(length_ratio * n_ref, n_ref + length_slack)`` tokens (defaults 4 and 16).
  A reference without any keyword (``"yes"``, ``"the"``) can only be matched exactly.
* Otherwise 0. No partial credit: a fraction of keywords is easy to farm (list many words) and
  RL needs a signal that cannot be raised without being right; 1/0 keeps all domains on one scale.
"""
from __future__ import annotations

import re
from kat.data.templates import answer_block

STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had has
    have having he her here hers herself him himself his how i if in into is it its itself just me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves total answer result equals equal""".split()
)
# "total", "answer", "result", "equal(s)" are framing words in our references ("132 in total")
_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def _canon_number(tok: str) -> str:
    t = tok.replace(",", "")
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    if t in ("-0", ""):
        t = "0"
    return t


def numbers(text: str) -> list[str]:
    """Canonical numbers in ``text`` in order of appearance (``"1,000 and 2.50"`` -> ``['1000', '2.5']``)."""
    return [_canon_number(m.group(0)) for m in _NUMBER.finditer(text)]


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> list[str]:
    """Lower-cased, stemmed words of ``text`` that are not stop words (at least two letters)."""
    out = []
    for m in _WORD.finditer(text.lower()):
        w = m.group(0).replace("'", "")
        if len(w) >= 2 and w not in STOP_WORDS:
            out.append(_stem(w))
    return out


def normalize(text: str) -> str:
    """SQuAD-style normalisation with canonical numbers (module docstring)."""
    parts: list[str] = []
    pos = 0
    for m in _NUMBER.finditer(text):
        parts.append(_clean(text[pos : m.start()]))
        parts.append(" " + _canon_number(m.group(0)) + " ")
        pos = m.end()
    parts.append(_clean(text[pos:]))
    toks = [t for t in "".join(parts).split() if t not in _ARTICLES]
    return " ".join(toks)


def _clean(s: str) -> str:
    s = s.lower()
    return re.sub(r"[^\w\s]|_", " ", s)


def keywords_or_text(reference: str) -> bool:
    """Whether ``reference`` can be graded at all (it has some non-space text)."""
    return bool(normalize(reference))


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def match_text(answer: str, reference: str, *, max_extra_numbers: int = 1, length_ratio: float = 4.0,
               length_slack: int = 16) -> bool:
    """The heuristic on an already isolated answer text (module docstring)."""
    a_norm, r_norm = normalize(answer), normalize(reference)
    if not a_norm or not r_norm:
        return False
    if a_norm == r_norm:
        return True
    r_nums, r_words = numbers(reference), content_words(reference)
    if not r_nums and not r_words:
        return False  # nothing to look for: exact match only
    n_ref, n_ans = len(r_norm.split()), len(a_norm.split())
    if n_ans > max(length_ratio * n_ref, n_ref + length_slack):
        return False
    a_nums = set(numbers(answer))
    if not set(r_nums) <= a_nums:
        return False
    if len(a_nums - set(r_nums)) > max_extra_numbers:
        return False
    a_words = set(content_words(answer))
    return set(r_words) <= a_words


def match(completion: str, reference: str, **kw) -> bool:
    """True when the ``<answer>`` block of ``completion`` matches ``reference`` (exact or keywords)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a str, got {type(reference).__name__}")
    block = answer_block(completion)
    if block is None:
        return False
    return match_text(block, reference, **kw)


def score(completion: str, reference: str, **kw) -> float:
    """1.0 when :func:`match`, else 0.0 (binary on purpose, see the module docstring)."""
    return 1.0 if match(completion, reference, **kw) else 0.0
