"""The on-disk index: what is indexed, incremental updates, persistence and crash safety."""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import pytest
import scipy.sparse as sp

import lagoon.context.index as index_mod
from lagoon.config import ContextSection
from lagoon.context.bm25 import SegmentedBM25
from lagoon.context.index import CodeIndex, index_dir
from lagoon.context.lexicon import Lexicon
from lagoon.context.segments import Segment
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


def _crash_in_segment_write(monkeypatch):
    def boom(self, folder, lexicon):
        (folder / "chunks.json").write_text("[half written")
        raise RuntimeError("simulated crash while writing a segment")

    monkeypatch.setattr(Segment, "write", boom)


def _crash_before_manifest(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash after the segment, before the manifest")

    monkeypatch.setattr(index_mod, "_write_manifest", boom)


@pytest.mark.parametrize("crash", [_crash_in_segment_write, _crash_before_manifest])
def test_crash_during_update_leaves_old_index_usable(repo, config, monkeypatch, crash):
    ix = CodeIndex(repo, config)
    ix.update()
    (repo / "pkg" / "geometry.py").write_text("def replaced_everything():\n    return 0\n")
    crash(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ix.update()
    monkeypatch.undo()
    survivor = CodeIndex(repo, config)
    assert survivor._load()
    assert survivor.search("http header parse", 1)[0].chunk.symbol == "parse_http_header"
    assert not any(p.name.startswith("tmp-") for p in index_dir(repo).iterdir())
    # The crashed instance falls back to the old manifest, and a new update redoes the work.
    assert ix.search("http header parse", 1)[0].chunk.symbol == "parse_http_header"
    assert ix.update().changed == 1
    assert survivor.update().changed == 1
    assert survivor.search("replaced everything", 1)[0].chunk.symbol == "replaced_everything"
    assert not survivor.search("http header parse", 1)


def test_corrupt_index_is_reported_then_rebuilt(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    seg = index_dir(repo) / ix.segments[0]
    (seg / "chunks.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="--rebuild"):
        CodeIndex(repo, config).search("circle", 1)
    fresh = CodeIndex(repo, config)
    assert fresh.update().written
    assert fresh.search("circle area", 1)[0].chunk.symbol == "Circle.area"


def test_missing_segment_is_reported(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    shutil.rmtree(index_dir(repo) / ix.segments[0])
    with pytest.raises(IndexCorruptError, match="missing"):
        CodeIndex(repo, config).search("circle", 1)


def test_update_writes_a_small_delta_segment(repo, config, monkeypatch):
    monkeypatch.setattr(index_mod, "MERGE_FRACTION", 10.0)  # the sample repo is tiny: no merge yet
    ix = CodeIndex(repo, config)
    ix.update()
    base = ix.segments[0]
    geo = repo / "pkg" / "geometry.py"
    geo.write_text(geo.read_text() + "\ndef spline_knots(): pass\n")
    stats = ix.update()
    assert stats.segments == 2 and ix.segments[0] == base
    delta = Segment.read(index_dir(repo) / ix.segments[1], Lexicon())
    assert {c.path for c in delta.chunks} == {"pkg/geometry.py"}
    assert ix.search("spline knots", 1)[0].chunk.symbol == "spline_knots"
    # The old chunks of the file are dead: every live chunk appears exactly once.
    keys = [(c.path, c.start_line, c.end_line) for c in ix.chunks]
    assert len(keys) == len(set(keys))


def test_max_chunk_size_change_rebuilds(repo, config):
    CodeIndex(repo, config).update()
    small = ContextSection(rerank=False, max_chunk_size=64)
    ix = CodeIndex(repo, small)
    stats = ix.update()
    assert stats.added == stats.files and all(len(c.text) <= 64 for c in ix.chunks)


def test_segmented_bm25_matches_bm25s_reference():
    """Random documents spread over three segments, some rows dead: scores equal bm25s's over the
    live rows alone."""
    import bm25s

    rng = np.random.default_rng(1234)
    n_vocab = 300
    docs = [rng.integers(0, n_vocab, size=rng.integers(1, 60)).tolist() for _ in range(400)]
    segs, live_docs = [], []
    for part in (docs[:250], docs[250:330], docs[330:]):
        counts = sp.csr_matrix(
            (
                np.ones(sum(map(len, part)), np.int32),
                (np.repeat(np.arange(len(part)), [len(d) for d in part]), np.concatenate(part)),
            ),
            shape=(len(part), n_vocab),
        )
        seg = Segment("seg", [None] * len(part), counts)
        alive = rng.random(len(part)) > 0.2
        seg.keep_only(alive)
        segs.append(seg)
        live_docs.extend(d for d, a in zip(part, alive, strict=True) if a)
    ref = bm25s.BM25()
    ref.index((live_docs, {i: i for i in range(n_vocab)}), create_empty_token=False, show_progress=False)
    scorer = SegmentedBM25(segs)
    alive_all = np.concatenate([s.alive for s in segs])
    for _ in range(20):
        query = rng.integers(0, n_vocab, size=rng.integers(1, 8)).tolist()
        mult = {t: query.count(t) for t in query}
        got = scorer.scores(mult)
        assert not got[~alive_all].any()
        np.testing.assert_allclose(got[alive_all], ref.get_scores_from_ids(query), rtol=1e-5, atol=1e-6)


def test_lexicon_counts_equal_the_tokenizer(repo, config):
    from collections import Counter

    from lagoon.context.segments import document_text
    from lagoon.context.tokens import code_tokens

    ix = CodeIndex(repo, config)
    ix.update()
    lex = Lexicon()
    texts = [document_text(c) for c in ix.chunks] + ["parseHTTPResponse2 the_x __init__ 42 a"]
    counts = lex.count(texts[:5])
    counts = sp.vstack([sp.csr_matrix((counts.data, counts.indices, counts.indptr), shape=(5, len(lex)))])
    rest = lex.count(texts[5:])  # a second batch reuses and extends the same ids
    for i, text in enumerate(texts):
        row = counts[i] if i < 5 else rest[i - 5]
        got = {lex.terms[j]: int(v) for j, v in zip(row.indices, row.data, strict=True)}
        assert got == dict(Counter(code_tokens(text))), text[:60]


def _score_map(ix: CodeIndex, query: str) -> dict[tuple[str, int, int], float]:
    return {(h.chunk.path, h.chunk.start_line, h.chunk.end_line): h.score for h in ix.search(query, 10_000)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_scores_equal_a_fresh_build_on_random_edits(tmp_path, config, monkeypatch, seed):
    """Random edit/add/delete sequences with tiny merge thresholds (so deltas and both kinds of
    merge happen): after every update, every score equals a from-scratch build's, exactly."""
    monkeypatch.setattr(index_mod, "MAX_SEGMENTS", 3)
    monkeypatch.setattr(index_mod, "MERGE_FRACTION", 0.6)
    rng = random.Random(seed)
    vocab = "alpha beta gamma delta parse_header readFile cache_evict Socket timeout retry".split()

    def body() -> str:
        return "".join(
            f"def {rng.choice(vocab)}_{i}(x):\n    return {' + '.join(rng.sample(vocab, 3))}\n\n"
            for i in range(rng.randint(1, 4))
        )

    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    for i in range(8):
        (repo / "pkg" / f"m{i}.py").write_text(body())
    ix = CodeIndex(repo, config)
    ix.update()
    queries = ["parse header", "read file timeout", "alpha beta", "cache evict retry socket"]
    seen_segments = set()
    for step in range(12):
        files = sorted((repo / "pkg").glob("*.py"))
        action = rng.choice(["edit", "edit", "add", "delete"] if len(files) > 2 else ["add"])
        if action == "edit":
            rng.choice(files).write_text(body())
        elif action == "add":
            (repo / "pkg" / f"n{step}.py").write_text(body())
        else:
            rng.choice(files).unlink()
        stats = ix.update()
        seen_segments.add(stats.segments)
        ref_repo = tmp_path / f"ref{step}"
        shutil.copytree(repo, ref_repo, ignore=shutil.ignore_patterns(".lagoon"))
        ref = CodeIndex(ref_repo, config)
        ref.update()
        reloaded = CodeIndex(repo, config)
        for q in queries:
            assert _score_map(ix, q) == _score_map(ref, q), (step, q)
            assert _score_map(reloaded, q) == _score_map(ref, q), (step, q)
        assert sorted(c.location for c in ix.chunks) == sorted(c.location for c in ref.chunks)
        shutil.rmtree(ref_repo)
    assert max(seen_segments) > 1


def test_parallel_parse_equals_serial(tmp_path, repo, config, monkeypatch):
    """Worker processes (fork, single-threaded callers only) give the same chunks and scores."""
    serial_repo = tmp_path / "serial"
    shutil.copytree(repo, serial_repo)
    serial = CodeIndex(serial_repo, config)
    serial.update()
    monkeypatch.setattr(index_mod, "PARALLEL_MIN_FILES", 2)
    monkeypatch.setattr(index_mod, "_BATCH_FILES", 3)
    # pytest's own helper threads sleep; the workers only read and parse files.
    monkeypatch.setattr(index_mod, "_fork_is_safe", lambda: True)
    used = []
    real = index_mod.ProcessPoolExecutor
    monkeypatch.setattr(index_mod, "ProcessPoolExecutor", lambda *a, **k: used.append(1) or real(*a, **k))
    par = CodeIndex(repo, config)
    par.update()
    assert used
    assert [c.to_dict() for c in par.chunks] == [c.to_dict() for c in serial.chunks]
    for q in ("http header parse", "evict oldest", "render widget"):
        assert _score_map(par, q) == _score_map(serial, q)
