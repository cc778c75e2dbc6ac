"""CodeRetriever: top-k within a hard token budget measured on the rendered text."""

from __future__ import annotations

import pytest

from lagoon.context.retriever import CodeRetriever, render
from lagoon.protocols import Retriever
from lagoon.testing import approx_token_count


def test_is_a_retriever_and_returns_ranked_chunks(repo, config):
    r = CodeRetriever(repo, config)
    assert isinstance(r, Retriever)
    chunks = r.retrieve("parse http header line")
    assert chunks[0].symbol == "parse_http_header"
    assert len(chunks) <= config.top_k


def test_top_k_config_and_argument(repo, config):
    r = CodeRetriever(repo, config.model_copy(update={"top_k": 2, "token_budget": 100_000}))
    assert len(r.retrieve("return self")) == 2
    assert len(r.retrieve("return self", k=3)) == 3


def test_budget_is_a_hard_cap_on_the_rendering(repo, config):
    r = CodeRetriever(repo, config.model_copy(update={"top_k": 5}))
    wide = r.retrieve("return self map key value", budget_tokens=100_000)
    assert len(wide) >= 3
    full = approx_token_count(render(wide))
    for budget in (full - 1, full // 2, 40):
        got = r.retrieve("return self map key value", budget_tokens=budget)
        assert approx_token_count(r.render(got)) <= budget
        assert got != wide  # the full selection no longer fits
    assert r.retrieve("return self map key value", budget_tokens=1) == []


def test_budget_skips_a_big_chunk_for_smaller_later_ones(repo, config):
    big = "def render_big_report(rows):\n" + "".join(
        f"    rows.append(render_row({i}))\n" for i in range(200)
    )
    (repo / "pkg" / "report.py").write_text(big + "\n\ndef render_small(row):\n    return row\n")
    r = CodeRetriever(repo, config)
    got = r.retrieve("render big report rows small", budget_tokens=200)
    assert got and all(c.symbol != "render_big_report" for c in got)
    assert approx_token_count(render(got)) <= 200


def test_custom_token_counter_is_used(repo, config):
    calls = []

    def counter(text: str) -> int:
        calls.append(text)
        return len(text)  # one token per character

    r = CodeRetriever(repo, config, token_counter=counter)
    got = r.retrieve("circle area radius", budget_tokens=400)
    assert calls and len(render(got)) <= 400


def test_retrieve_sees_file_edits_without_a_manual_update(repo, config):
    r = CodeRetriever(repo, config)
    r.retrieve("circle")
    (repo / "pkg" / "new.py").write_text("def brand_new_helper():\n    return 1\n")
    assert r.retrieve("brand new helper")[0].symbol == "brand_new_helper"


def test_rerank_off_by_config_uses_bm25_order(repo, config):
    r = CodeRetriever(repo, config.model_copy(update={"rerank": False}))
    assert r.reranker is None
    lexical = [h.chunk for h in r.index.search("circle radius area", config.lexical_candidates)]
    assert r.retrieve("circle radius area", k=3, budget_tokens=100_000) == lexical[:3]


def test_render_shows_location_symbol_and_header(repo, config):
    r = CodeRetriever(repo, config)
    chunk = next(c for c in r.retrieve("circle area") if c.symbol == "Circle.area")
    text = render([chunk])
    assert text.startswith(f"### pkg/geometry.py:{chunk.start_line}-{chunk.end_line} (Circle.area)")
    assert "class Circle:\n    def area" in text


def test_token_budget_config_is_the_default_cap(repo, config):
    wide = CodeRetriever(repo, config.model_copy(update={"token_budget": 100_000})).retrieve(
        "return self map key"
    )
    budget = approx_token_count(render(wide)) - 1
    tight = CodeRetriever(repo, config.model_copy(update={"token_budget": budget}))
    got = tight.retrieve("return self map key")
    assert got != wide and approx_token_count(render(got)) <= budget


def test_lexical_candidates_bounds_the_candidate_pool(repo, config):
    for n in (1, 3):
        r = CodeRetriever(repo, config.model_copy(update={"lexical_candidates": n, "top_k": 5}))
        assert len(r.candidates("return self")) == n
        assert len(r.retrieve("return self", budget_tokens=100_000)) == n


def test_context_imports_and_retrieves_without_torch(repo):
    import subprocess
    import sys

    code = (
        "import sys; from lagoon.config import ContextSection; from lagoon.context import CodeRetriever;"
        f"r = CodeRetriever({str(repo)!r}, ContextSection(rerank=False)); assert r.retrieve('circle area');"
        "print('torch' in sys.modules, 'sentence_transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_rank_files_decayed_sum_path_boost_and_tests_left_out():
    from lagoon.context.chunking import Chunk
    from lagoon.context.index import Hit
    from lagoon.context.retriever import is_test_path, names_of, rank_files

    def hit(path, score, line=1):
        return Hit(Chunk(path, line, line, None, "python", "x", f"{path}{line}"), score)

    hits = [
        hit("pkg/lucky.py", 9.5),
        hit("pkg/many.py", 7.0, 1),
        hit("pkg/many.py", 6.0, 2),
        hit("tests/test_many.py", 20.0),
        hit("pkg/named.py", 4.0),
        hit("README.md", 30.0),
    ]
    ranked = rank_files(hits, 10, suffixes=(".py",))
    assert [f.path for f in ranked] == ["pkg/many.py", "pkg/lucky.py", "pkg/named.py"]
    assert ranked[0].score == pytest.approx(7.0 + 0.5 * 6.0)
    assert [h.score for h in ranked[0].hits] == [7.0, 6.0]
    # A file the query names (path or dotted module, not a longer name that merely starts with it).
    named = rank_files(hits, 10, query='File "/x/pkg/named.py", line 3', suffixes=(".py",), path_boost=2.0)
    assert named[0].path == "pkg/named.py" and named[0].score == pytest.approx(12.0)
    assert (
        rank_files(hits, 10, query="see pkg.named", suffixes=(".py",), path_boost=2.0)[0].path
        == "pkg/named.py"
    )
    assert (
        rank_files(hits, 10, query="pkg.named_other", suffixes=(".py",), path_boost=2.0)[0].path
        == "pkg/many.py"
    )
    assert "tests/test_many.py" in [f.path for f in rank_files(hits, 10, include_tests=True)]
    assert is_test_path("a/tests/b.py") and is_test_path("a/test_b.py") and is_test_path("conftest.py")
    assert not is_test_path("a/contest.py") and not is_test_path("a/testing_utils.py")
    assert "_pytest.python" in names_of("src/_pytest/python.py")


def test_retriever_files_ranks_the_defining_file_first(repo, config):
    r = CodeRetriever(repo, config)
    files = r.files("circle radius area", 3)
    assert files[0].path == "pkg/geometry.py"
    assert all(f.hits for f in files)
