"""`Lexicon`: term ids for the lexical index, and the term-count matrix of a batch of documents.

BM25 needs only each document's bag of terms (term → count) and its length, never token order, so
`Lexicon.count(texts)` turns documents straight into a sparse ``[D, V]`` count matrix. The terms
are `lagoon.context.tokens.code_tokens`'s (identifiers kept whole and split), but the work is done
per *distinct identifier*: every document's identifiers are mapped to identifier ids in one C-level
pass, each new identifier is split once (memoised for the lexicon's lifetime), and the expansion
identifier → terms is a vectorised gather. The counts equal those of ``Counter(code_tokens(text))``
(tested).

Term ids are append-only within one `Lexicon`; they are an in-memory numbering, not a file format
(segments store their own term lists, see `lagoon.context.segments`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np
import scipy.sparse as sp

from lagoon.context.tokens import code_tokens, split_identifier, words

__all__ = ["Lexicon"]


class Lexicon:
    """Term ↔ id, plus the memo identifier → term ids that `count` uses."""

    def __init__(self, terms: Iterable[str] = ()) -> None:
        self.terms: list[str] = []
        self.ids: dict[str, int] = {}
        for t in terms:
            self.add(t)
        self._word_ids: dict[str, int] = {}  # identifier → row of the memo
        self._word_ptr: list[int] = [0]  # memo rows as CSR: terms of row i are
        self._word_terms: list[int] = []  # _word_terms[_word_ptr[i]:_word_ptr[i + 1]]
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, term: str) -> int:
        """The id of `term`, assigned if new."""
        i = self.ids.get(term)
        if i is None:
            i = self.ids[term] = len(self.terms)
            self.terms.append(term)
        return i

    def map_terms(self, terms: Sequence[str]) -> np.ndarray:
        """[len(terms)] ids of `terms` (added where new)."""
        add = self.add
        return np.fromiter((add(t) for t in terms), dtype=np.int64, count=len(terms))

    def query_ids(self, text: str) -> dict[int, int]:
        """Known term id → how often it occurs in `text` (terms never indexed are dropped), in
        order of first occurrence."""
        out: dict[int, int] = {}
        get = self.ids.get
        for t in code_tokens(text):
            i = get(t)
            if i is not None:
                out[i] = out.get(i, 0) + 1
        return out

    def _learn(self, new_words: Iterable[str]) -> None:
        ptr, word_terms, word_ids = self._word_ptr, self._word_terms, self._word_ids
        ids, terms = self.ids, self.terms
        for w in new_words:
            word_ids[w] = len(ptr) - 1
            for t in split_identifier(w):
                i = ids.get(t)
                if i is None:
                    i = ids[t] = len(terms)
                    terms.append(t)
                word_terms.append(i)
            ptr.append(len(word_terms))
        self._arrays = None

    def count(self, texts: Sequence[str]) -> sp.csr_matrix:
        """[len(texts), len(self)] term counts (int32, canonical CSR), new terms added first."""
        per_doc = [words(t) for t in texts]
        flat = list(chain.from_iterable(per_doc))
        known = self._word_ids
        new = [w for w in dict.fromkeys(flat) if w not in known]
        if new:
            self._learn(new)
        if self._arrays is None:
            self._arrays = (np.asarray(self._word_ptr, np.int64), np.asarray(self._word_terms, np.int64))
        ptr, word_terms = self._arrays
        wid = np.fromiter(map(known.__getitem__, flat), dtype=np.int64, count=len(flat))  # [W]
        doc = np.repeat(np.arange(len(texts)), [len(d) for d in per_doc])  # [W]
        n_terms = ptr[wid + 1] - ptr[wid]  # [W] terms each identifier contributes
        total = int(n_terms.sum())
        ends = np.cumsum(n_terms)  # [W]
        # Position of every contributed term inside the memo: its identifier's first term + rank.
        pos = np.repeat(ptr[wid] - (ends - n_terms), n_terms) + np.arange(total)  # [T]
        rows, cols = np.repeat(doc, n_terms), word_terms[pos]  # [T], [T]
        m = sp.csr_matrix(
            (np.ones(total, np.int32), (rows, cols)), shape=(len(texts), len(self.terms)), dtype=np.int32
        )
        m.sum_duplicates()
        return m
