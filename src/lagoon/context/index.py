"""The on-disk lexical index of a repository: chunks plus a `bm25s` BM25 index over their tokens.

`CodeIndex(repo, config).update()` brings the index in line with the working tree. It is
incremental: a file whose size and mtime are unchanged is not read; one whose content hash is
unchanged is not re-parsed; deleted (or newly ignored) files drop out. Chunk tokens are kept per
chunk, so only changed files are re-tokenized; the BM25 matrix itself is rebuilt over all chunks.

Layout under ``<repo>/.lagoon/index/``: ``CURRENT`` names the live generation folder
``gen-<id>/`` (manifest.json, chunks.json, tokens.npy, offsets.npy, vocab.json, bm25/). An update
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

from lagoon.config import ContextSection
from lagoon.context.chunking import Chunk, chunk_file, content_hash
from lagoon.context.fileset import FileSet
from lagoon.context.tokens import code_tokens
from lagoon.errors import IndexCorruptError

__all__ = ["CodeIndex", "Hit", "UpdateStats", "FORMAT_VERSION", "index_dir"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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
                raise ValueError(f"format {manifest.get('format')} (this Lagoon reads {FORMAT_VERSION})")
            if manifest.get("max_chunk_size") != self.config.max_chunk_size:
                log.info("context.max_chunk_size changed; the index will be rebuilt")
                return False
            raw_chunks = json.loads((gen / "chunks.json").read_text())
            flat = np.load(gen / "tokens.npy")
            offsets = np.load(gen / "offsets.npy")
            vocab_list = json.loads((gen / "vocab.json").read_text())
            bm25 = bm25s.BM25.load(str(gen / "bm25"), mmap=False) if raw_chunks else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexCorruptError(
                f"{gen}: the index cannot be read ({exc}); rebuild it with `lagoon index {self.repo} --rebuild`"
            ) from exc
        keys = ("path", "start_line", "end_line", "symbol", "language", "text", "content_hash", "header")
        chunks = [Chunk(**dict(zip(keys, row, strict=True))) for row in raw_chunks]
        files: dict[str, _FileRecord] = {}
        for path, (h, size, mtime_ns, first, n) in manifest["files"].items():
            toks = [flat[offsets[i] : offsets[i + 1]] for i in range(first, first + n)]
            files[path] = _FileRecord(h, size, mtime_ns, chunks[first : first + n], toks)
        self._files, self._chunks, self._bm25 = files, chunks, bm25
        self._vocab = {t: i for i, t in enumerate(vocab_list)}
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
        vocab = self._vocab
        ids = [vocab.setdefault(t, len(vocab)) for t in _document_tokens(chunk)]
        return np.asarray(ids, dtype=np.int32)

    def _commit(self, files: dict[str, _FileRecord]) -> None:
        chunks = [c for rec in files.values() for c in rec.chunks]
        tokens = [t for rec in files.values() for t in rec.tokens]
        bm25 = None
        if chunks:
            bm25 = bm25s.BM25()
            corpus = [t.tolist() for t in tokens]
            bm25.index((corpus, dict(self._vocab)), create_empty_token=False, show_progress=False)
        self._write(files, chunks, tokens, bm25)
        self._files, self._chunks, self._bm25 = files, chunks, bm25

    def _write(self, files, chunks, tokens, bm25) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        gen_id = uuid.uuid4().hex[:12]
        tmp = self.dir / f"tmp-{gen_id}"
        tmp.mkdir()
        try:
            _write_generation(tmp, self.config, files, chunks, tokens, self._vocab, bm25)
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


def _document_tokens(chunk: Chunk) -> list[str]:
    # The path and symbol make file and function names searchable even when the body never says them.
    return code_tokens(f"{chunk.path}\n{chunk.symbol or ''}\n{chunk.header}\n{chunk.text}")


def _write_generation(folder: Path, config, files, chunks, tokens, vocab, bm25) -> None:
    """Write every file of one generation into `folder` (which is not yet live)."""
    manifest_files, first = {}, 0
    for path, rec in files.items():
        manifest_files[path] = [rec.hash, rec.size, rec.mtime_ns, first, len(rec.chunks)]
        first += len(rec.chunks)
    rows = [
        [c.path, c.start_line, c.end_line, c.symbol, c.language, c.text, c.content_hash, c.header]
        for c in chunks
    ]
    (folder / "chunks.json").write_text(json.dumps(rows))
    lengths = np.fromiter((len(t) for t in tokens), dtype=np.int64, count=len(tokens))
    np.save(folder / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    np.save(folder / "tokens.npy", np.concatenate(tokens) if tokens else np.zeros(0, np.int32))
    vocab_list = [""] * len(vocab)
    for t, i in vocab.items():
        vocab_list[i] = t
    (folder / "vocab.json").write_text(json.dumps(vocab_list))
    if bm25 is not None:
        bm25.save(str(folder / "bm25"))
    manifest = {
        "format": FORMAT_VERSION,
        "max_chunk_size": config.max_chunk_size,
        "created_at": time.time(),
        "files": manifest_files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
