"""BM25 over the live chunks of several segments, with global statistics taken at query time.

The formula is bm25s's default (the Lucene variant), so scores match ``bm25s.BM25()`` built over
the live chunks alone (tested to float32 rounding):

    idf(t)    = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(d)  = Σ_{t in query} idf(t) · tf(t, d) / (tf(t, d) + k1 · (1 - b + b · |d| / avgdl))

with N, df and avgdl counted over live chunks only, and each query term's part multiplied by its
weight (bm25s: its occurrences in the query).
The per-posting parts that depend on avgdl are recomputed from the global numbers after every
update (`refresh`), so the scores of an index that was updated incrementally are *bit-identical* to
those of a from-scratch build over the same files (tested on random edit sequences): per document,
the same float operations run in the same order.

This is *not* a retriever: ranking, reranking and budgets live in `lagoon.context.retriever`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lagoon.context.segments import Segment

__all__ = ["SegmentedBM25", "K1", "B"]

K1 = 1.5
B = 0.75


class SegmentedBM25:
    """Scores over the concatenation of `segments`' rows (dead rows score 0)."""

    def __init__(self, segments: Sequence[Segment]) -> None:
        self.segments = list(segments)
        sizes = [len(s) for s in self.segments]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64) if sizes else np.zeros(1)
        self.n_slots = int(self.offsets[-1])
        self._offsets = [int(o) for o in self.offsets[:-1]]
        self.refresh()

    def refresh(self) -> None:
        """Recompute N, avgdl and the length norms after segments' live masks changed."""
        segs = self.segments
        self.n_live = int(sum(int(s.alive.sum()) for s in segs))
        total_len = int(sum(int(s.lengths[s.alive].sum()) for s in segs))
        avgdl = total_len / self.n_live if self.n_live else 1.0
        # Per posting: the tf part of the formula, 0 for dead rows. Elementwise, so precomputing it
        # here gives the same floats as computing it per query. [nnz_s] each
        self._tf_part = []
        for s in segs:
            norm = K1 * ((1 - B) + B * s.lengths / avgdl)  # [D_s]
            part = s.post_tf / (s.post_tf + norm[s.post_doc])
            part *= s.alive[s.post_doc]
            self._tf_part.append(part)

    def scores(self, query: dict[int, float]) -> np.ndarray:
        """[slots] BM25 score of every row for `query` (term id → weight: its occurrences, or any
        other per-term factor)."""
        out = np.zeros(self.n_slots, dtype=np.float64)
        if not self.n_live:
            return out
        n = self.n_live
        segs = self.segments
        for term, mult in query.items():
            df = sum(int(s.df[term]) for s in segs if term < s.n_terms)
            if df <= 0:
                continue
            weight = mult * float(np.log(1.0 + (n - df + 0.5) / (df + 0.5)))
            for s, off, part in zip(segs, self._offsets, self._tf_part, strict=True):
                if term >= s.n_terms:
                    continue
                a, b = s.post_ptr[term], s.post_ptr[term + 1]
                if a == b:
                    continue
                if off:
                    out[off + s.post_doc[a:b]] += weight * part[a:b]
                else:
                    out[s.post_doc[a:b]] += weight * part[a:b]
        return out
