"""The complexity score of a snapshot, counted on syntax trees.

For every chunk in a language Lagoon parses, the chunk's text is parsed with tree-sitter and the
nodes that are definitions (functions, methods, classes …) or branches (if, loops, cases, catch,
conditional expressions …) are counted, per `lagoon.context.languages`. Plain-text chunks add 0.
A chunk cut out of a larger definition still parses (tree-sitter recovers from errors), so every
node tree-sitter recognises counts.

This is *not* a cyclomatic-complexity tool: it is a cheap, language-neutral size-of-logic signal.
"""

from __future__ import annotations

from collections.abc import Iterable

import tree_sitter

from lagoon.context.chunking import Chunk
from lagoon.context.languages import LANGUAGES, parser_for

__all__ = ["complexity_score", "count_nodes"]


def count_nodes(root: tree_sitter.Node, kinds: frozenset[str]) -> int:
    """Nodes of `root`'s tree whose type is in `kinds` (iterative walk with a cursor)."""
    count = 0
    cursor = root.walk()
    while True:
        if cursor.node.type in kinds:
            count += 1
        if cursor.goto_first_child() or cursor.goto_next_sibling():
            continue
        while True:
            if not cursor.goto_parent():
                return count
            if cursor.goto_next_sibling():
                break


def complexity_score(chunks: Iterable[Chunk]) -> int:
    """Definitions plus branches over all chunks' syntax trees."""
    total = 0
    for chunk in chunks:
        spec = LANGUAGES.get(chunk.language)
        if spec is None:
            continue
        tree = parser_for(spec.name).parse(chunk.text.encode("utf-8", "surrogatepass"))
        total += count_nodes(tree.root_node, spec.definitions | spec.branches)
    return total
