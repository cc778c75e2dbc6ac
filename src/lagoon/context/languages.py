"""Which files Lagoon parses with tree-sitter, and which syntax nodes are chunk boundaries.

A registry: language name → `LanguageSpec` (file suffixes, the grammar wheel's module and loader,
the node types that are *definitions* and the subset that are *containers*). Containers (classes,
impl blocks, namespaces) are split into their members; other definitions (functions) stay whole
unless they are too long. Grammars come from per-language wheels (`tree_sitter_python.language()`
…) and are loaded lazily, once per process. Files with no spec here are chunked as plain text.

This module is *not* a parser: it only names grammars and node types for `lagoon.context.chunking`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import PurePath

import tree_sitter

__all__ = ["LanguageSpec", "LANGUAGES", "language_for", "parser_for"]


@dataclass(frozen=True)
class LanguageSpec:
    name: str
    suffixes: tuple[str, ...]
    module: str
    loader: str
    definitions: frozenset[str]
    containers: frozenset[str]
    wrappers: frozenset[str] = frozenset()
    """Nodes that wrap a definition (decorators, `export`): the chunk starts at the wrapper."""
    branches: frozenset[str] = frozenset()
    """Control-flow nodes counted by the snapshot's complexity score."""


_JS_DEFS = {
    "function_declaration",
    "generator_function_declaration",
    "class_declaration",
    "method_definition",
}
_JS_BRANCHES = {
    "if_statement",
    "for_statement",
    "for_in_statement",
    "while_statement",
    "do_statement",
    "switch_case",
    "catch_clause",
    "ternary_expression",
}
_TS_DEFS = _JS_DEFS | {
    "abstract_class_declaration",
    "interface_declaration",
    "type_alias_declaration",
    "enum_declaration",
    "module",
    "internal_module",
}
_TS_CONTAINERS = {
    "class_declaration",
    "abstract_class_declaration",
    "interface_declaration",
    "module",
    "internal_module",
}
_C_BRANCHES = {
    "if_statement",
    "for_statement",
    "while_statement",
    "do_statement",
    "case_statement",
    "conditional_expression",
}

LANGUAGES: dict[str, LanguageSpec] = {
    spec.name: spec
    for spec in (
        LanguageSpec(
            "python",
            (".py", ".pyi"),
            "tree_sitter_python",
            "language",
            frozenset({"function_definition", "class_definition"}),
            frozenset({"class_definition"}),
            frozenset({"decorated_definition"}),
            frozenset(
                {
                    "if_statement",
                    "elif_clause",
                    "for_statement",
                    "while_statement",
                    "try_statement",
                    "except_clause",
                    "with_statement",
                    "match_statement",
                    "case_clause",
                    "conditional_expression",
                    "boolean_operator",
                }
            ),
        ),
        LanguageSpec(
            "javascript",
            (".js", ".jsx", ".mjs", ".cjs"),
            "tree_sitter_javascript",
            "language",
            frozenset(_JS_DEFS),
            frozenset({"class_declaration"}),
            frozenset({"export_statement"}),
            frozenset(_JS_BRANCHES),
        ),
        LanguageSpec(
            "typescript",
            (".ts", ".mts", ".cts"),
            "tree_sitter_typescript",
            "language_typescript",
            frozenset(_TS_DEFS),
            frozenset(_TS_CONTAINERS),
            frozenset({"export_statement"}),
            frozenset(_JS_BRANCHES),
        ),
        LanguageSpec(
            "tsx",
            (".tsx",),
            "tree_sitter_typescript",
            "language_tsx",
            frozenset(_TS_DEFS),
            frozenset(_TS_CONTAINERS),
            frozenset({"export_statement"}),
            frozenset(_JS_BRANCHES),
        ),
        LanguageSpec(
            "go",
            (".go",),
            "tree_sitter_go",
            "language",
            frozenset({"function_declaration", "method_declaration", "type_declaration"}),
            frozenset(),
            frozenset(),
            frozenset(
                {
                    "if_statement",
                    "for_statement",
                    "expression_case",
                    "type_case",
                    "communication_case",
                }
            ),
        ),
        LanguageSpec(
            "rust",
            (".rs",),
            "tree_sitter_rust",
            "language",
            frozenset(
                {
                    "function_item",
                    "impl_item",
                    "struct_item",
                    "enum_item",
                    "trait_item",
                    "mod_item",
                    "macro_definition",
                }
            ),
            frozenset({"impl_item", "trait_item", "mod_item"}),
            frozenset(),
            frozenset(
                {"if_expression", "for_expression", "while_expression", "loop_expression", "match_arm"}
            ),
        ),
        LanguageSpec(
            "java",
            (".java",),
            "tree_sitter_java",
            "language",
            frozenset(
                {
                    "class_declaration",
                    "interface_declaration",
                    "enum_declaration",
                    "record_declaration",
                    "method_declaration",
                    "constructor_declaration",
                }
            ),
            frozenset(
                {"class_declaration", "interface_declaration", "enum_declaration", "record_declaration"}
            ),
            frozenset(),
            frozenset(
                {
                    "if_statement",
                    "for_statement",
                    "enhanced_for_statement",
                    "while_statement",
                    "do_statement",
                    "switch_label",
                    "catch_clause",
                    "ternary_expression",
                }
            ),
        ),
        LanguageSpec(
            "c",
            (".c", ".h"),
            "tree_sitter_c",
            "language",
            frozenset({"function_definition", "struct_specifier", "enum_specifier", "type_definition"}),
            frozenset(),
            frozenset(),
            frozenset(_C_BRANCHES),
        ),
        LanguageSpec(
            "cpp",
            (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx"),
            "tree_sitter_cpp",
            "language",
            frozenset(
                {
                    "function_definition",
                    "class_specifier",
                    "struct_specifier",
                    "namespace_definition",
                    "enum_specifier",
                }
            ),
            frozenset({"class_specifier", "struct_specifier", "namespace_definition"}),
            frozenset({"template_declaration"}),
            frozenset(_C_BRANCHES | {"catch_clause", "for_range_loop"}),
        ),
    )
}

_BY_SUFFIX = {suffix: spec for spec in LANGUAGES.values() for suffix in spec.suffixes}


def language_for(path: str | PurePath) -> LanguageSpec | None:
    """The spec for a file by its suffix, or None for files chunked as plain text."""
    return _BY_SUFFIX.get(PurePath(path).suffix.lower())


@cache
def parser_for(name: str) -> tree_sitter.Parser:
    """A tree-sitter parser for a language in `LANGUAGES` (one per process, per language)."""
    spec = LANGUAGES.get(name)
    if spec is None:  # a caller's bug, not user input (names come from LANGUAGES itself)
        raise KeyError(f"unknown language {name!r}; known: {', '.join(sorted(LANGUAGES))}")
    module = importlib.import_module(spec.module)
    return tree_sitter.Parser(tree_sitter.Language(getattr(module, spec.loader)()))
