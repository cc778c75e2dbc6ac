"""The code-aware tokenizer used by the lexical (BM25) stage, for chunks and queries alike.

Every identifier is kept whole (lower-cased) *and* split into its parts at snake_case underscores,
camelCase / PascalCase humps and letter–digit boundaries: ``parseHTTPResponse2`` →
``parsehttpresponse2, parse, http, response, 2``. English stop words and one-letter parts are
dropped. Splits are memoised per identifier, since code repeats its identifiers.

This is *not* a model tokenizer: token budgets are counted by `CodeRetriever`'s token counter.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["code_tokens", "split_identifier", "words"]

_WORD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_PART_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

_STOPWORDS = frozenset(
    """a an and are as at be but by for if in into is it no not of on or such that the their then there
    these they this to was will with we you your i me my our he she its from has have had were been
    can could would should do does did so than too very just also any all some which what when where
    who how""".split()
)


@lru_cache(maxsize=1 << 18)
def split_identifier(word: str) -> tuple[str, ...]:
    """The tokens one identifier contributes: itself (lower-cased) then its parts, stop words out."""
    whole = word.lower().strip("_")
    if not whole:
        return ()
    parts = [p.lower() for chunk in word.split("_") if chunk for p in _PART_RE.findall(chunk)]
    out = [] if whole in _STOPWORDS else [whole]
    if len(parts) > 1:
        out.extend(p for p in parts if len(p) > 1 and p not in _STOPWORDS)
    return tuple(out)


def words(text: str) -> list[str]:
    """The identifiers and numbers of `text`, before splitting."""
    return _WORD_RE.findall(text)


def code_tokens(text: str) -> list[str]:
    """Tokens of `text` for BM25, in order (repeats kept: term frequency matters)."""
    out: list[str] = []
    extend = out.extend
    for word in _WORD_RE.findall(text):
        extend(split_identifier(word))
    return out
