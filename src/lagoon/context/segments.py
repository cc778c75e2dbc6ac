"""`Segment`: an immutable batch of indexed chunks with their term counts, in memory and on disk.

The lexical index is a list of segments (LSM-style): a large base segment plus small delta
segments written by incremental updates. A segment never changes once written; a chunk that is
replaced or deleted is only marked dead in memory (`Segment.kill`), and which chunks are live is
decided by the index manifest (`lagoon.context.index`), not by the segment. BM25 statistics are
global and computed at query time over the live chunks of all segments (`lagoon.context.bm25`), so
scores do not depend on how chunks happen to be spread over segments.

On disk a segment is a folder ``seg-<id>/``: chunks.json (the chunks' fields as columns), text.bin
+ text_offsets.npy (their UTF-8 text), terms.json (the segment's own term list) and indptr.npy,
indices.npy, counts.npy (the ``[D, V_local]`` CSR term-count matrix in those local ids). Writing
goes to a temp folder that is renamed into place, so a segment folder is either whole or absent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from lagoon.context.chunking import Chunk
from lagoon.context.lexicon import Lexicon

__all__ = ["Segment", "SegmentBuilder", "document_text"]


def document_text(chunk: Chunk) -> str:
    """What BM25 indexes for a chunk: the path and symbol make file and function names searchable
    even when the body never says them."""
    return f"{chunk.path}\n{chunk.symbol or ''}\n{chunk.header}\n{chunk.text}"


class Segment:
    """Chunks + their ``[D, V]`` term counts (lexicon ids) + which of them are still live."""

    def __init__(self, name: str, chunks: list[Chunk], counts: sp.csr_matrix) -> None:
        self.name = name
        self.chunks = chunks
        self.counts = counts  # [D, V_at_build] int32
        self.lengths = np.asarray(counts.sum(axis=1)).ravel().astype(np.int64)  # [D] tokens per doc
        by_term = counts.tocsc()  # [D, V] column-major: the postings of each term
        self.post_ptr = by_term.indptr  # [V + 1]
        self.post_doc = by_term.indices  # [nnz] document of each posting
        self.post_tf = by_term.data.astype(np.float64)  # [nnz] term frequency
        self.alive = np.ones(len(chunks), dtype=bool)  # [D]
        self.df = np.diff(self.post_ptr).astype(np.int64)  # [V] live documents holding each term
        self.n_terms = int(counts.shape[1])

    def __len__(self) -> int:
        return len(self.chunks)

    def kill(self, first: int, n: int) -> None:
        """Mark chunks ``first .. first + n - 1`` dead (their terms leave the live counts)."""
        rows = np.arange(first, first + n)
        rows = rows[self.alive[rows]]
        if len(rows) == 0:
            return
        self.alive[rows] = False
        ptr = self.counts.indptr
        terms = np.concatenate([self.counts.indices[ptr[r] : ptr[r + 1]] for r in rows])
        self.df -= np.bincount(terms, minlength=self.n_terms)

    def keep_only(self, alive: np.ndarray) -> None:
        """Set the live mask wholesale ([D] bool) and recount the live document frequencies."""
        self.alive = alive.astype(bool)
        row_alive = np.repeat(self.alive, np.diff(self.counts.indptr))  # [nnz]
        self.df = np.bincount(self.counts.indices[row_alive], minlength=self.n_terms).astype(np.int64)

    @classmethod
    def build(cls, name: str, chunks: list[Chunk], lexicon: Lexicon) -> Segment:
        """Tokenize and count `chunks` (new terms are added to `lexicon`)."""
        return cls(name, chunks, lexicon.count([document_text(c) for c in chunks]))

    @classmethod
    def merge(cls, name: str, parts: Sequence[tuple[Segment, int, int]], n_terms: int) -> Segment:
        """A new segment of the rows ``(segment, first, n)``, in that order; nothing is re-tokenized."""
        sources = list({id(s): s for s, _, _ in parts}.values())
        base = {id(s): 0 for s in sources}
        offset = 0
        for s in sources:
            base[id(s)] = offset
            offset += len(s)
        stacked = sp.vstack([_widen(s.counts, n_terms) for s in sources], format="csr") if sources else None
        rows = np.concatenate(
            [np.arange(base[id(s)] + a, base[id(s)] + a + n) for s, a, n in parts] or [np.zeros(0, np.int64)]
        )
        chunks = [s.chunks[i] for s, a, n in parts for i in range(a, a + n)]
        counts = stacked[rows] if stacked is not None else sp.csr_matrix((0, n_terms), dtype=np.int32)
        return cls(name, chunks, counts.astype(np.int32))

    # -- disk -----------------------------------------------------------------------------------
    def write(self, folder: Path, lexicon: Lexicon) -> None:
        """Write this segment's files into `folder` (an existing, not yet live, folder)."""
        chunks = self.chunks
        paths = list(dict.fromkeys(c.path for c in chunks))
        path_ids = {p: i for i, p in enumerate(paths)}
        cols = {
            "paths": paths,
            "path": [path_ids[c.path] for c in chunks],
            "start": [c.start_line for c in chunks],
            "end": [c.end_line for c in chunks],
            "symbol": [c.symbol for c in chunks],
            "language": [c.language for c in chunks],
            "hash": [c.content_hash for c in chunks],
            "header": [c.header for c in chunks],
        }
        (folder / "chunks.json").write_text(json.dumps(cols))
        texts = [c.text.encode("utf-8", "surrogatepass") for c in chunks]
        (folder / "text.bin").write_bytes(b"".join(texts))
        lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
        np.save(folder / "text_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        used = np.unique(self.counts.indices)  # lexicon ids this segment uses, ascending
        (folder / "terms.json").write_text(json.dumps([lexicon.terms[i] for i in used.tolist()]))
        np.save(folder / "indptr.npy", self.counts.indptr.astype(np.int64))
        np.save(folder / "indices.npy", np.searchsorted(used, self.counts.indices).astype(np.int32))
        np.save(folder / "counts.npy", self.counts.data.astype(np.int32))

    @classmethod
    def read(cls, folder: Path, lexicon: Lexicon) -> Segment:
        """Load a segment written by `write`; its terms are mapped into `lexicon` (added if new).
        Raises OSError / ValueError / KeyError when files are missing or disagree."""
        cols = json.loads((folder / "chunks.json").read_text())
        blob = (folder / "text.bin").read_bytes()
        text_offsets = np.load(folder / "text_offsets.npy").tolist()
        paths = cols["paths"]
        chunks = [
            Chunk(paths[pi], a, b, sym, lang, blob[t0:t1].decode("utf-8", "surrogatepass"), h, hd)
            for pi, a, b, sym, lang, h, hd, t0, t1 in zip(
                cols["path"],
                cols["start"],
                cols["end"],
                cols["symbol"],
                cols["language"],
                cols["hash"],
                cols["header"],
                text_offsets[:-1],
                text_offsets[1:],
                strict=True,
            )
        ]
        terms = json.loads((folder / "terms.json").read_text())
        indptr = np.load(folder / "indptr.npy")
        local = np.load(folder / "indices.npy")
        data = np.load(folder / "counts.npy")
        if len(indptr) != len(chunks) + 1 or len(local) != len(data) or int(indptr[-1]) != len(data):
            raise ValueError(f"{folder.name}: chunk and term-count files disagree")
        if len(local) and (int(local.max()) >= len(terms) or int(local.min()) < 0):
            raise ValueError(f"{folder.name}: term ids out of range")
        ids = lexicon.map_terms(terms)  # [V_local] lexicon id of each local term
        counts = sp.csr_matrix((data, ids[local], indptr), shape=(len(chunks), len(lexicon)))
        counts.sort_indices()
        return cls(folder.name, chunks, counts)


class SegmentBuilder:
    """Collects chunks for a new segment, counting their terms in batches as they arrive (so a big
    build tokenizes while worker processes are still parsing)."""

    BATCH = 8192

    def __init__(self, lexicon: Lexicon) -> None:
        self.lexicon = lexicon
        self.chunks: list[Chunk] = []
        self._pieces: list[sp.csr_matrix] = []
        self._counted = 0

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, chunks: Sequence[Chunk]) -> None:
        self.chunks.extend(chunks)
        if len(self.chunks) - self._counted >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        todo = self.chunks[self._counted :]
        if todo:
            self._pieces.append(self.lexicon.count([document_text(c) for c in todo]))
            self._counted = len(self.chunks)

    def build(self, name: str) -> Segment:
        self._flush()
        n_terms = len(self.lexicon)
        if not self._pieces:
            return Segment(name, [], sp.csr_matrix((0, n_terms), dtype=np.int32))
        counts = sp.vstack([_widen(p, n_terms) for p in self._pieces], format="csr", dtype=np.int32)
        return Segment(name, self.chunks, counts)


def _widen(m: sp.csr_matrix, n_cols: int) -> sp.csr_matrix:
    """The same rows with `n_cols` columns (term ids only grow, so this only adds empty columns)."""
    return sp.csr_matrix((m.data, m.indices, m.indptr), shape=(m.shape[0], n_cols))
