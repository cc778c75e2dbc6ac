"""The on-disk lexical index of a repository: chunks plus a `bm25s` BM25 index over their tokens.

`CodeIndex(repo, config).update()` brings the index in line with the working tree. It is
incremental: a file whose size and mtime are unchanged is not read; one whose content hash is
unchanged is not re-parsed; deleted (or newly ignored) files drop out. Chunk tokens are kept per
chunk, so only changed files are re-tokenized; the BM25 matrix itself is rebuilt over all chunks.

Layout under ``<repo>/.lagoon/index/``: ``CURRENT`` names the live generation folder
``gen-<id>/`` (manifest.json, chunks.json with the chunks' fields as columns, text.bin with their
UTF-8 text, tokens.npy + offsets.npy with their token ids, vocab.json). The BM25 matrix is not
stored: `bm25s` rebuilds it from the token ids on load, through a vectorised `build_index_from_ids`
(`FlatBM25`, checked against bm25s's own builder in the tests). An update
writes a complete new generation into ``tmp-<id>/``, renames it to ``gen-<id>/``, then replaces
``CURRENT`` atomically; a crash at any point leaves the previous generation live and readable.

`search(query, k)` returns BM25 hits only; reranking and token budgets live in
`lagoon.context.retriever`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np
import scipy.sparse as sp

from lagoon.config import ContextSection
from lagoon.context.chunking import Chunk, chunk_file, content_hash
from lagoon.context.fileset import FileSet
from lagoon.context.tokens import code_tokens, split_identifier, words
from lagoon.errors import IndexCorruptError

__all__ = ["CodeIndex", "Hit", "UpdateStats", "FlatBM25", "FORMAT_VERSION", "index_dir"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
_TMP_MAX_AGE_S = 3600.0

Progress = Callable[[int, int, str], None]


def index_dir(repo: Path) -> Path:
    return Path(repo).resolve() / ".lagoon" / "index"


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float


@dataclass(frozen=True)
class UpdateStats:
    files: int
    added: int
    changed: int
    removed: int
    reparsed_chunks: int
    chunks: int
    written: bool
    seconds: float


@dataclass
class _FileRecord:
    hash: str
    size: int
    mtime_ns: int
    chunks: list[Chunk]
    tokens: list[np.ndarray]  # one int32 array of vocab ids per chunk


class CodeIndex:
    """BM25 over a repository's chunks, kept current by `update()`."""

    def __init__(self, repo: Path, config: ContextSection) -> None:
        self.repo = Path(repo).resolve()
        self.config = config
        self.dir = index_dir(self.repo)
        self.fileset = FileSet(self.repo, config)
        self._files: dict[str, _FileRecord] | None = None
        self._vocab: dict[str, int] = {}
        self._chunks: list[Chunk] = []
        self._bm25: bm25s.BM25 | None = None
        self._word_ids: dict[str, tuple[int, ...]] = {}
        self._memo_vocab: dict[str, int] | None = None

    # -- reading --------------------------------------------------------------------------------
    @property
    def chunks(self) -> list[Chunk]:
        self._ensure()
        return self._chunks

    @property
    def files(self) -> dict[str, str]:
        """Indexed path → content hash."""
        self._ensure()
        assert self._files is not None
        return {p: r.hash for p, r in self._files.items()}

    def search(self, query: str, k: int = 10) -> list[Hit]:
        """The `k` best chunks by BM25 (score > 0), best first. Builds the index if there is none."""
        self._ensure()
        if self._bm25 is None or not self._chunks:
            return []
        ids = [self._vocab[t] for t in code_tokens(query) if t in self._vocab]
        if not ids:
            return []
        scores = self._bm25.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(self._chunks[i], float(scores[i])) for i in top if scores[i] > 0]

    def _ensure(self) -> None:
        if self._files is None:
            if not self._load():
                self.update()

    def _load(self) -> bool:
        """Load the live generation; False if there is none. Corrupt files raise IndexCorruptError."""
        try:
            name = (self.dir / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return False
        gen = self.dir / name
        try:
            manifest = json.loads((gen / "manifest.json").read_text())
            if manifest.get("format") != FORMAT_VERSION:
                log.info(
                    "index format %s is not %s; the index will be rebuilt",
                    manifest.get("format"),
                    FORMAT_VERSION,
                )
                return False
            if manifest.get("max_chunk_size") != self.config.max_chunk_size:
                log.info("context.max_chunk_size changed; the index will be rebuilt")
                return False
            cols = json.loads((gen / "chunks.json").read_text())
            blob = (gen / "text.bin").read_bytes()
            text_offsets = np.load(gen / "text_offsets.npy")
            flat = np.load(gen / "tokens.npy")
            offsets = np.load(gen / "offsets.npy")
            vocab_list = json.loads((gen / "vocab.json").read_text())
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
                    text_offsets[:-1].tolist(),
                    text_offsets[1:].tolist(),
                    strict=True,
                )
            ]
            if len(offsets) != len(chunks) + 1 or (len(flat) and int(flat.max()) >= len(vocab_list)):
                raise ValueError("chunk, token and vocabulary files disagree")
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise IndexCorruptError(
                f"{gen}: the index cannot be read ({exc}); rebuild it with `lagoon index {self.repo} --rebuild`"
            ) from exc
        files: dict[str, _FileRecord] = {}
        for path, (h, size, mtime_ns, first, n) in manifest["files"].items():
            toks = [flat[offsets[i] : offsets[i + 1]] for i in range(first, first + n)]
            files[path] = _FileRecord(h, size, mtime_ns, chunks[first : first + n], toks)
        self._vocab = {t: i for i, t in enumerate(vocab_list)}
        self._files, self._chunks = files, chunks
        self._bm25 = FlatBM25.build(flat, offsets, len(self._vocab)) if chunks else None
        return True

    # -- updating -------------------------------------------------------------------------------
    def update(self, *, rebuild: bool = False, progress: Progress | None = None) -> UpdateStats:
        """Re-scan the repository and persist a new generation if anything changed."""
        t0 = time.perf_counter()
        old: dict[str, _FileRecord] = {}
        if not rebuild:
            try:
                if self._files is not None or self._load():
                    old = self._files or {}
            except IndexCorruptError as exc:
                log.warning("%s; rebuilding from scratch", exc)
        if rebuild or not old:
            self._vocab = {}
        current = self.fileset.scan()
        new: dict[str, _FileRecord] = {}
        added = changed = reparsed = 0
        touched = False
        for n, (path, st) in enumerate(current.items()):
            if progress is not None:
                progress(n, len(current), path)
            rec = old.get(path)
            if rec is not None and rec.size == st.size and rec.mtime_ns == st.mtime_ns:
                new[path] = rec
                continue
            text = self.fileset.read(path)
            if text is None:
                continue
            h = content_hash(text)
            if rec is not None and rec.hash == h:
                new[path] = _FileRecord(h, st.size, st.mtime_ns, rec.chunks, rec.tokens)
                touched = True
                continue
            chunks = chunk_file(path, text, self.config.max_chunk_size)
            new[path] = _FileRecord(h, st.size, st.mtime_ns, chunks, [self._token_ids(c) for c in chunks])
            reparsed += len(chunks)
            added += rec is None
            changed += rec is not None
        if progress is not None:
            progress(len(current), len(current), "")
        removed = len(old.keys() - new.keys())
        written = bool(added or changed or removed or touched or not old or self._files is None)
        if written:
            self._commit(new)
        else:
            self._files = new
        return UpdateStats(
            len(new), added, changed, removed, reparsed, len(self._chunks), written, time.perf_counter() - t0
        )

    def _token_ids(self, chunk: Chunk) -> np.ndarray:
        """Vocabulary ids of `code_tokens(document text)`, memoised per identifier (same result)."""
        vocab, memo = self._vocab, self._word_ids
        if len(memo) and self._memo_vocab is not vocab:
            memo.clear()
        self._memo_vocab = vocab
        out: list[int] = []
        for word in words(_document_text(chunk)):
            ids = memo.get(word)
            if ids is None:
                ids = memo[word] = tuple(vocab.setdefault(t, len(vocab)) for t in split_identifier(word))
            out.extend(ids)
        return np.array(out, dtype=np.int32)

    def _commit(self, files: dict[str, _FileRecord]) -> None:
        chunks = [c for rec in files.values() for c in rec.chunks]
        tokens = [t for rec in files.values() for t in rec.tokens]
        lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32)
        bm25 = FlatBM25.build(flat, offsets, len(self._vocab)) if chunks else None
        self._write(files, chunks, flat, offsets)
        self._files, self._chunks, self._bm25 = files, chunks, bm25

    def _write(self, files, chunks, flat, offsets) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        gen_id = uuid.uuid4().hex[:12]
        tmp = self.dir / f"tmp-{gen_id}"
        tmp.mkdir()
        try:
            _write_generation(tmp, self.config, files, chunks, flat, offsets, self._vocab)
            gen = self.dir / f"gen-{gen_id}"
            tmp.rename(gen)
            pointer = self.dir / f"CURRENT.{gen_id}"
            pointer.write_text(gen.name)
            os.replace(pointer, self.dir / "CURRENT")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._collect(keep=gen.name)

    def _collect(self, keep: str) -> None:
        now = time.time()
        for entry in self.dir.iterdir():
            stale_tmp = entry.name.startswith("tmp-") and now - entry.stat().st_mtime > _TMP_MAX_AGE_S
            if (entry.name.startswith("gen-") and entry.name != keep) or stale_tmp:
                shutil.rmtree(entry, ignore_errors=True)


def _document_text(chunk: Chunk) -> str:
    # The path and symbol make file and function names searchable even when the body never says them.
    return f"{chunk.path}\n{chunk.symbol or ''}\n{chunk.header}\n{chunk.text}"


def _write_generation(folder: Path, config, files, chunks, flat, offsets, vocab) -> None:
    """Write every file of one generation into `folder` (which is not yet live)."""
    manifest_files, first = {}, 0
    for path, rec in files.items():
        manifest_files[path] = [rec.hash, rec.size, rec.mtime_ns, first, len(rec.chunks)]
        first += len(rec.chunks)
    path_ids = {p: i for i, p in enumerate(files)}
    cols = {
        "paths": list(files),
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
    text_lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    np.save(folder / "text_offsets.npy", np.concatenate([[0], np.cumsum(text_lengths)]).astype(np.int64))
    np.save(folder / "tokens.npy", flat)
    np.save(folder / "offsets.npy", offsets)
    vocab_list = [""] * len(vocab)
    for t, i in vocab.items():
        vocab_list[i] = t
    (folder / "vocab.json").write_text(json.dumps(vocab_list))
    manifest = {
        "format": FORMAT_VERSION,
        "max_chunk_size": config.max_chunk_size,
        "created_at": time.time(),
        "files": manifest_files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


class _FlatCorpus:
    """Token ids of all documents as one flat array plus offsets (what `FlatBM25` builds from)."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1


class FlatBM25(bm25s.BM25):
    """bm25s's BM25 (Lucene variant) with a vectorised `build_index_from_ids`, bm25s's own hook for
    custom builders: one sparse matrix op instead of a Python loop per document."""

    @classmethod
    def build(cls, flat: np.ndarray, offsets: np.ndarray, n_vocab: int) -> FlatBM25:
        bm25 = cls()
        vocab = {i: i for i in range(n_vocab)}
        bm25.index(
            bm25s.tokenization.Tokenized(_FlatCorpus(flat, offsets), vocab),
            create_empty_token=False,
            show_progress=False,
        )
        return bm25

    def build_index_from_ids(
        self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False
    ):
        if self.method != "lucene" or not isinstance(corpus_token_ids, _FlatCorpus):
            return super().build_index_from_ids(
                unique_token_ids, corpus_token_ids, show_progress, leave_progress
            )
        flat, offsets = corpus_token_ids.flat, corpus_token_ids.offsets
        n_docs, n_vocab = len(offsets) - 1, len(unique_token_ids)
        lengths = np.diff(offsets)  # [D]
        doc = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)  # [T]
        # [D, V] term counts, column-major; duplicates (repeated tokens) are summed.
        counts = sp.csc_matrix((np.ones(len(flat), np.float32), (doc, flat)), shape=(n_docs, n_vocab))
        counts.sum_duplicates()
        df = np.diff(counts.indptr)  # [V] documents containing each token
        idf = np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))  # [V]
        tf = counts.data.astype(np.float64)  # [nnz]
        avg = lengths.mean() if n_docs else 1.0
        norm = self.k1 * ((1 - self.b) + self.b * lengths[counts.indices] / avg)  # [nnz]
        data = np.repeat(idf, df) * tf / (norm + tf)
        self.nonoccurrence_array = None
        return {
            "data": data.astype(self.dtype),
            "indices": counts.indices.astype(self.int_dtype),
            "indptr": counts.indptr,
            "num_docs": n_docs,
        }
