"""Fixtures for the context tests: a small multi-language repository written into tmp_path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lagoon.config import ContextSection

SAMPLE = {
    "pkg/geometry.py": '''
        """Shapes and their areas."""
        import math

        UNIT = 1.0


        class Circle:
            """A circle of a given radius."""

            def __init__(self, radius):
                self.radius = radius

            def area(self):
                return math.pi * self.radius ** 2


        def parse_http_header(line):
            name, _, value = line.partition(":")
            return name.strip().lower(), value.strip()
        ''',
    "pkg/broken.py": """
        def ok_before():
            return 1

        def broken(:
            pass

        def ok_after():
            return 2
        """,
    "web/app.js": """
        export function renderWidget(el) {
          return el.innerHTML;
        }
        class Store { get(key) { return this.map[key]; }
          set(key, v) { this.map[key] = v; } }
        """,
    "web/view.tsx": """
        interface Props { title: string }
        export function Title(props: Props) {
          return <h1>{props.title}</h1>;
        }
        """,
    "svc/main.go": """
        package main

        func (s *Server) HandleRequest(path string) error {
        \tif path == "" {
        \t\treturn nil
        \t}
        \treturn nil
        }
        """,
    "core/lib.rs": """
        struct Cache { size: usize }
        impl Cache {
            fn evict_oldest(&mut self) { self.size -= 1; }
            fn insert(&mut self) { self.size += 1; }
        }
        """,
    "java/Queue.java": """
        class Queue {
            void enqueueItem(int x) { }
            int dequeueItem() { return 0; }
        }
        """,
    "native/ring.c": """
        #include <stdio.h>
        static int ring_buffer_push(int *buf, int x) {
            if (x < 0) { return -1; }
            return 0;
        }
        """,
    "native/vec.cpp": """
        namespace la {
        class Matrix {
          public:
            int transposeInPlace() { return 0; }
            int determinant() { return 1; }
        };
        }
        """,
    "README.md": "# Sample\n\n" + "".join(f"Line {i} about the sample project.\n" for i in range(60)),
    "build/generated.py": "def generated_code():\n    return 0\n",
    ".gitignore": "build/\n*.log\n",
    "debug.log": "def logged_function(): pass\n",
}


def write_repo(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = write_repo(tmp_path / "repo", SAMPLE)
    (r / "blob.bin").write_bytes(b"\x00\x01binary def not_indexed\x00" * 10)
    return r


@pytest.fixture
def config() -> ContextSection:
    return ContextSection(rerank=False)


@pytest.fixture
def sample_text():
    """The dedented text of a SAMPLE file by path."""
    return lambda path: textwrap.dedent(SAMPLE[path]).lstrip("\n")
