"""Chunking by syntax in every supported language, broken files, splitting and line windows."""

from __future__ import annotations

import pytest

from lagoon.context.chunking import chunk_file, chunk_lines
from lagoon.context.languages import LANGUAGES, language_for
from lagoon.protocols import ChunkLike


def _check_spans(chunks, text):
    lines = text.split("\n")
    for c in chunks:
        assert c.text == "\n".join(lines[c.start_line - 1 : c.end_line]) + (
            "\n" if c.end_line < len(lines) else ""
        ), c


@pytest.mark.parametrize(
    ("path", "symbols"),
    [
        ("pkg/geometry.py", {"Circle", "Circle.__init__", "Circle.area", "parse_http_header"}),
        ("web/app.js", {"renderWidget", "Store.get", "Store.set"}),
        ("web/view.tsx", {"Props", "Title"}),
        ("svc/main.go", {"HandleRequest"}),
        ("core/lib.rs", {"Cache", "Cache.evict_oldest", "Cache.insert"}),
        ("java/Queue.java", {"Queue.enqueueItem", "Queue.dequeueItem"}),
        ("native/ring.c", {"ring_buffer_push"}),
        ("native/vec.cpp", {"la.Matrix.transposeInPlace", "la.Matrix.determinant"}),
    ],
)
def test_each_language_chunks_by_definition(path, symbols, sample_text):
    text = sample_text(path)
    chunks = chunk_file(path, text, 4096)
    got = {c.symbol for c in chunks}
    assert symbols <= got, got
    assert all(isinstance(c, ChunkLike) for c in chunks)
    assert {c.language for c in chunks} == {language_for(path).name}
    _check_spans(chunks, text)


def test_every_registered_language_parses():
    for name in LANGUAGES:
        assert LANGUAGES[name].suffixes
    assert language_for("x.tsx").name == "tsx" and language_for("x.ts").name == "typescript"


def test_methods_carry_their_class_header_and_module_code_is_kept(sample_text):
    all_chunks = chunk_file("pkg/geometry.py", sample_text("pkg/geometry.py"), 4096)
    chunks = {c.symbol: c for c in all_chunks}
    assert chunks["Circle.area"].header == "class Circle:"
    assert "return math.pi" in chunks["Circle.area"].text
    module = [c for c in all_chunks if c.symbol is None]
    assert module and "import math" in module[0].text and "UNIT = 1.0" in module[0].text


def test_broken_file_still_chunks_its_good_functions(sample_text):
    chunks = {c.symbol: c for c in chunk_file("pkg/broken.py", sample_text("pkg/broken.py"), 4096)}
    assert {"ok_before", "ok_after"} <= set(chunks)
    assert chunks["ok_after"].text.startswith("def ok_after")


def test_long_definition_splits_at_statement_boundaries_under_the_cap():
    body = "".join(
        f"    total_{i} = compute({i})\n    if total_{i}:\n        emit(total_{i})\n" for i in range(80)
    )
    text = f"def long_function(x):\n{body}    return x\n"
    chunks = chunk_file("m.py", text, 500)
    assert len(chunks) > 5
    assert all(len(c.text) <= 500 for c in chunks)
    assert all(c.symbol == "long_function" for c in chunks)
    # Pieces are contiguous, cover the function, and start at a statement (never mid-`if`).
    assert chunks[0].start_line == 1 and chunks[-1].end_line == text.count("\n")
    for a, b in zip(chunks, chunks[1:], strict=False):
        assert b.start_line == a.end_line + 1
        assert b.text.lstrip().startswith(("total_", "if total_")), b.text[:40]  # never mid-`if`
    assert chunks[1].header == "def long_function(x):"
    _check_spans(chunks, text)


def test_other_text_files_become_overlapping_windows():
    text = "".join(f"line {i}\n" for i in range(100))
    chunks = chunk_lines("notes.txt", text, 4096)
    assert len(chunks) >= 3
    assert chunks[0].start_line == 1 and chunks[-1].end_line == 100
    assert all(b.start_line <= a.end_line for a, b in zip(chunks, chunks[1:], strict=False))  # overlap
    assert all(c.language == "text" and c.symbol is None for c in chunk_file("README.md", text, 4096))


def test_content_hash_follows_text():
    a = chunk_file("a.py", "def f():\n    return 1\n", 4096)[0]
    b = chunk_file("b.py", "def f():\n    return 1\n", 4096)[0]
    c = chunk_file("a.py", "def f():\n    return 2\n", 4096)[0]
    assert a.content_hash == b.content_hash != c.content_hash


def test_pathologically_deep_file_falls_back_to_windows():
    text = "x = " + " + ".join(f"v{i}" for i in range(5000)) + "\n\ndef after():\n    return 1\n"
    chunks = chunk_file("deep.py", text, 4096)
    assert chunks and all(len(c.text) <= 4096 for c in chunks)
    assert any("def after" in c.text for c in chunks)
