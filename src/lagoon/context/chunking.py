"""Split a source file into `Chunk`s that follow its syntax.

Files in a language of `lagoon.context.languages` are parsed with tree-sitter (which always yields a
tree, so files with syntax errors still chunk). Each function, method or class becomes a chunk whose
`header` holds the first line of every enclosing container (``class Foo(Base):``) for context.
Containers are split into members; the code between members (class attributes, module imports and
constants) becomes chunks of its own, named after the container (``None`` at module level).
A definition longer than `max_chunk_size` characters is split at statement boundaries of its body,
recursively; a single statement still too long falls back to line windows. Every other text file
becomes line windows with overlap.

`Chunk.text` is exactly the source lines `start_line..end_line` (1-based, inclusive); the header is
kept apart so line numbers stay true. This module does not read files or decide which files to
index (see `lagoon.context.index`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import accumulate

import tree_sitter

from lagoon.context.languages import LanguageSpec, language_for, parser_for

__all__ = ["Chunk", "chunk_file", "chunk_lines", "content_hash"]

WINDOW_LINES = 40
WINDOW_OVERLAP = 8


def content_hash(text: str) -> str:
    """Stable short hash of a text (BLAKE2b, 16 bytes, hex)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A contiguous span of one file. Satisfies `lagoon.protocols.ChunkLike`."""

    path: str
    start_line: int
    end_line: int
    symbol: str | None
    language: str
    text: str
    content_hash: str
    header: str = ""
    """First lines of the enclosing containers, outermost first (context, not part of `text`)."""

    @property
    def location(self) -> str:
        return f"{self.path}:{self.start_line}-{self.end_line}"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "start_line": self.start_line,
            "end_line": self.end_line,
            "symbol": self.symbol,
            "language": self.language,
            "text": self.text,
            "content_hash": self.content_hash,
            "header": self.header,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Chunk:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class _Lines:
    """The file's lines with prefix sums of their lengths, so a span's size is O(1)."""

    def __init__(self, text: str) -> None:
        # Split on "\n" only: tree-sitter counts rows that way (str.splitlines also splits on \f …).
        parts = text.split("\n")
        self.lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else []) or [""]
        self.offsets = [0, *accumulate(len(line) for line in self.lines)]

    def size(self, first: int, last: int) -> int:
        return self.offsets[last + 1] - self.offsets[first]

    def text(self, first: int, last: int) -> str:
        return "".join(self.lines[first : last + 1])

    def blank(self, first: int, last: int) -> bool:
        return all(not line.strip() for line in self.lines[first : last + 1])


class _Chunker:
    def __init__(self, path: str, text: str, spec: LanguageSpec, max_chars: int) -> None:
        self.path, self.spec, self.max = path, spec, max_chars
        self.src = _Lines(text)
        self.out: list[Chunk] = []

    # -- emitting -------------------------------------------------------------------------------
    def emit(self, first: int, last: int, symbol: str | None, header: tuple[str, ...]) -> None:
        lines = self.src.lines
        while first <= last and not lines[first].strip():
            first += 1
        while last >= first and not lines[last].strip():
            last -= 1
        if first > last:
            return
        if self.src.size(first, last) > self.max:
            self.windows(first, last, symbol, header)
            return
        text = self.src.text(first, last)
        self.out.append(
            Chunk(
                self.path,
                first + 1,
                last + 1,
                symbol,
                self.spec.name,
                text,
                content_hash(text),
                "\n".join(header),
            )
        )

    def windows(self, first: int, last: int, symbol: str | None, header: tuple[str, ...]) -> None:
        for a, b in _windows(self.src, first, last, self.max):
            text = self.src.text(a, b)[: self.max]
            self.out.append(
                Chunk(
                    self.path,
                    a + 1,
                    b + 1,
                    symbol,
                    self.spec.name,
                    text,
                    content_hash(text),
                    "\n".join(header),
                )
            )

    # -- walking --------------------------------------------------------------------------------
    def definitions(self, node: tree_sitter.Node) -> list[tuple[tree_sitter.Node, tree_sitter.Node]]:
        """(outer, definition) pairs directly inside `node`, looking through non-definition nodes."""
        found = []
        for child in node.named_children:
            if child.type in self.spec.definitions:
                found.append((child, child))
            elif child.type in self.spec.wrappers:
                inner = next((c for c in child.named_children if c.type in self.spec.definitions), None)
                if inner is not None:
                    found.append((child, inner))
                else:
                    found.extend(self.definitions(child))
            elif child.named_child_count:
                found.extend(self.definitions(child))
        return found

    def gaps(
        self, first: int, last: int, members: list[tree_sitter.Node], symbol, header, own_row=-1
    ) -> None:
        """Chunks for the code between members; trivial gaps (only the container's own first line,
        or only punctuation such as a closing brace) are left out: every member's header has it."""
        spans, cursor = [], first
        for m in members:
            if m.start_point.row > cursor:
                spans.append((cursor, m.start_point.row - 1))
            cursor = max(cursor, m.end_point.row + 1)
        spans.append((cursor, last))
        for a, b in spans:
            rows = [r for r in range(a, b + 1) if self.src.lines[r].strip()] if a <= b else []
            if all(r == own_row or not any(ch.isalnum() for ch in self.src.lines[r]) for r in rows):
                continue
            self.emit(a, b, symbol, header)

    def visit(self, outer: tree_sitter.Node, node: tree_sitter.Node, parent: str | None, header) -> None:
        name = _name(node)
        symbol = f"{parent}.{name}" if parent and name else (name or parent)
        first, last = outer.start_point.row, _last_row(outer)
        if node.type in self.spec.containers:
            members = self.definitions(node)
            nested = any(d.type in self.spec.containers for _, d in members)
            if members and (self.src.size(first, last) > self.max or len(members) > 1 or nested):
                inner_header = (*header, self.src.lines[node.start_point.row].rstrip())
                self.gaps(first, last, [o for o, _ in members], symbol, header, own_row=node.start_point.row)
                for o, d in members:
                    self.visit(o, d, symbol, inner_header)
                return
        if self.src.size(first, last) <= self.max:
            self.emit(first, last, symbol, header)
        else:
            self.split(node, first, last, symbol, header)

    def split(self, node: tree_sitter.Node, first: int, last: int, symbol, header) -> None:
        """Pack consecutive body statements into chunks under the cap; recurse into big ones."""
        body = node.child_by_field_name("body") or node
        stmts = [c for c in body.named_children if c.end_point.row >= first and c.start_point.row <= last]
        if not stmts or (
            len(stmts) == 1 and stmts[0].start_point.row == first and _last_row(stmts[0]) == last
        ):
            self.windows(first, last, symbol, header)
            return
        sig = (*header, self.src.lines[first].rstrip())
        group_start, group_header = first, header
        for stmt in stmts:
            s, e = max(stmt.start_point.row, group_start), min(_last_row(stmt), last)
            if s > e:
                continue
            if self.src.size(group_start, e) <= self.max:
                continue
            if s > group_start:
                self.emit(group_start, s - 1, symbol, group_header)
            if self.src.size(s, e) > self.max:
                self.split(stmt, s, e, symbol, sig)
                group_start = e + 1
            else:
                group_start = s
            group_header = sig
        self.emit(group_start, last, symbol, group_header)


def _last_row(node: tree_sitter.Node) -> int:
    # A node ending at column 0 ends on the previous line (its trailing newline).
    row, col = node.end_point
    return max(node.start_point.row, row - 1) if col == 0 else row


def _name(node: tree_sitter.Node) -> str | None:
    for field in ("name", "declarator", "type"):
        child = node.child_by_field_name(field)
        while (
            child is not None
            and field == "declarator"
            and child.child_by_field_name("declarator") is not None
        ):
            child = child.child_by_field_name("declarator")
        if child is not None and child.text is not None:
            text = child.text.decode("utf-8", "replace")
            if "\n" not in text and len(text) <= 120:
                return text
    return None


def _windows(src: _Lines, first: int, last: int, max_chars: int) -> list[tuple[int, int]]:
    spans, a = [], first
    while a <= last:
        b = a
        while b < last and b - a + 1 < WINDOW_LINES and src.size(a, b + 1) <= max_chars:
            b += 1
        spans.append((a, b))
        if b >= last:
            break
        a = max(a + 1, b + 1 - WINDOW_OVERLAP if b - a + 1 > 2 * WINDOW_OVERLAP else b + 1)
    return spans


def chunk_lines(path: str, text: str, max_chars: int, language: str = "text") -> list[Chunk]:
    """Line windows (``WINDOW_LINES`` lines, ``WINDOW_OVERLAP`` overlap, at most `max_chars`)."""
    src = _Lines(text)
    out = []
    for a, b in _windows(src, 0, len(src.lines) - 1, max_chars):
        if src.blank(a, b):
            continue
        body = src.text(a, b)[:max_chars]
        out.append(Chunk(path, a + 1, b + 1, None, language, body, content_hash(body)))
    return out


def chunk_file(path: str, text: str, max_chars: int) -> list[Chunk]:
    """Chunks of one file's text; `path` (repo-relative, '/'-separated) picks the language."""
    spec = language_for(path)
    if spec is None:
        return chunk_lines(path, text, max_chars)
    tree = parser_for(spec.name).parse(text.encode("utf-8", "surrogatepass"))
    chunker = _Chunker(path, text, spec, max_chars)
    try:
        members = chunker.definitions(tree.root_node)
        chunker.gaps(0, len(chunker.src.lines) - 1, [o for o, _ in members], None, ())
        for outer, node in members:
            chunker.visit(outer, node, None, ())
    except RecursionError:  # pathologically deep trees (generated code): fall back to windows
        return chunk_lines(path, text, max_chars, spec.name)
    chunker.out.sort(key=lambda c: (c.start_line, c.end_line))
    return chunker.out
