"""The on-disk index: what is indexed, incremental updates, persistence and crash safety."""

from __future__ import annotations

import os

import numpy as np
import pytest

import lagoon.context.index as index_mod
from lagoon.config import ContextSection
from lagoon.context.index import CodeIndex, FlatBM25, index_dir
from lagoon.errors import IndexCorruptError


def _paths(ix: CodeIndex) -> set[str]:
    return set(ix.files)


def test_indexes_repo_minus_gitignore_binaries_excludes_and_big_files(repo, config):
    (repo / "node_modules" / "dep").mkdir(parents=True)
    (repo / "node_modules" / "dep" / "index.js").write_text("function vendored() {}\n")
    (repo / "huge.py").write_text("x = 1\n" * 50_000)
    ix = CodeIndex(repo, config.model_copy(update={"max_file_bytes": 100_000}))
    stats = ix.update()
    paths = _paths(ix)
    assert {"pkg/geometry.py", "web/app.js", "README.md", ".gitignore"} <= paths
    assert "build/generated.py" not in paths  # .gitignore'd directory
    assert "debug.log" not in paths  # .gitignore'd pattern
    assert "blob.bin" not in paths  # binary
    assert "node_modules/dep/index.js" not in paths  # context.exclude
    assert "huge.py" not in paths  # context.max_file_bytes
    assert not any(p.startswith(".lagoon/") for p in paths)
    assert stats.added == len(paths) and stats.written


def test_exclude_config_takes_effect(repo, config):
    ix = CodeIndex(repo, config.model_copy(update={"exclude": ["web/"]}))
    ix.update()
    assert not any(p.startswith("web/") for p in _paths(ix))


def test_nested_gitignore(repo, config):
    (repo / "pkg" / ".gitignore").write_text("secret_*.py\n")
    (repo / "pkg" / "secret_keys.py").write_text("def hidden(): pass\n")
    ix = CodeIndex(repo, config)
    ix.update()
    assert "pkg/secret_keys.py" not in _paths(ix)


def test_search_finds_by_split_identifiers(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    hits = ix.search("http header parse", k=3)
    assert hits and hits[0].chunk.symbol == "parse_http_header"
    assert hits[0].score > 0
    assert ix.search("evict oldest", k=1)[0].chunk.symbol == "Cache.evict_oldest"
    assert ix.search("zzzz_not_a_word", k=3) == []


def test_incremental_edit_add_delete(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    noop = ix.update()
    assert not noop.written and noop.added == noop.changed == noop.removed == 0

    geo = repo / "pkg" / "geometry.py"
    geo.write_text(geo.read_text() + "\n\ndef tessellate_polygon(points):\n    return points\n")
    (repo / "pkg" / "extra.py").write_text("def quaternion_multiply(a, b):\n    return a\n")
    (repo / "web" / "app.js").unlink()
    stats = ix.update()
    assert (stats.added, stats.changed, stats.removed) == (1, 1, 1)
    assert stats.reparsed_chunks < len(ix.chunks)
    assert ix.search("tessellate polygon", 1)[0].chunk.symbol == "tessellate_polygon"
    assert ix.search("quaternion multiply", 1)[0].chunk.path == "pkg/extra.py"
    assert not any(h.chunk.path == "web/app.js" for h in ix.search("render widget", 5))

    # A fresh process sees the same index from disk, without re-parsing anything.
    again = CodeIndex(repo, config)
    assert again.update().written is False
    assert again.search("quaternion multiply", 1)[0].chunk.path == "pkg/extra.py"


def test_touch_without_change_does_not_reparse(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    geo = repo / "pkg" / "geometry.py"
    st = geo.stat()
    os.utime(geo, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000))
    stats = ix.update()
    assert stats.changed == 0 and stats.reparsed_chunks == 0


def test_crash_during_write_leaves_old_index_usable(repo, config, monkeypatch):
    ix = CodeIndex(repo, config)
    ix.update()
    (repo / "pkg" / "geometry.py").write_text("def replaced_everything():\n    return 0\n")

    def boom(folder, *args, **kwargs):
        (folder / "chunks.json").write_text("[half written")
        raise RuntimeError("simulated crash while writing the index")

    monkeypatch.setattr(index_mod, "_write_generation", boom)
    with pytest.raises(RuntimeError):
        CodeIndex(repo, config).update()
    monkeypatch.undo()
    survivor = CodeIndex(repo, config)
    assert survivor._load()
    assert survivor.search("http header parse", 1)[0].chunk.symbol == "parse_http_header"
    assert not any(p.name.startswith("tmp-") for p in index_dir(repo).iterdir())
    assert survivor.update().changed == 1
    assert survivor.search("replaced everything", 1)[0].chunk.symbol == "replaced_everything"


def test_corrupt_index_is_reported_then_rebuilt(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    gen = index_dir(repo) / (index_dir(repo) / "CURRENT").read_text().strip()
    (gen / "chunks.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="--rebuild"):
        CodeIndex(repo, config).search("circle", 1)
    fresh = CodeIndex(repo, config)
    assert fresh.update().written
    assert fresh.search("circle area", 1)[0].chunk.symbol == "Circle.area"


def test_max_chunk_size_change_rebuilds(repo, config):
    CodeIndex(repo, config).update()
    small = ContextSection(rerank=False, max_chunk_size=64)
    ix = CodeIndex(repo, small)
    stats = ix.update()
    assert stats.added == stats.files and all(len(c.text) <= 64 for c in ix.chunks)


def test_flat_bm25_matches_bm25s_reference_builder():
    import bm25s

    rng = np.random.default_rng(1234)
    n_vocab = 300
    docs = [rng.integers(0, n_vocab, size=rng.integers(1, 60)).tolist() for _ in range(400)]
    vocab = {i: i for i in range(n_vocab)}
    ref = bm25s.BM25()
    ref.index((docs, dict(vocab)), create_empty_token=False, show_progress=False)
    lengths = np.array([len(d) for d in docs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    fast = FlatBM25.build(np.concatenate(docs).astype(np.int32), offsets, n_vocab)
    for _ in range(20):
        query = rng.integers(0, n_vocab, size=rng.integers(1, 8)).tolist()
        np.testing.assert_allclose(
            fast.get_scores_from_ids(query), ref.get_scores_from_ids(query), rtol=1e-5, atol=1e-6
        )


def test_memoised_token_ids_equal_the_tokenizer(repo, config):
    from lagoon.context.index import _document_text
    from lagoon.context.tokens import code_tokens

    ix = CodeIndex(repo, config)
    ix.update()
    inverse = {i: t for t, i in ix._vocab.items()}
    for path, rec in ix._files.items():
        for chunk, ids in zip(rec.chunks, rec.tokens, strict=True):
            assert [inverse[int(i)] for i in ids] == code_tokens(_document_text(chunk)), path
