"""Context engineering: what code matters for a task, and whether what the agent knows is still true.

    files ──FileSet──▶ chunking (tree-sitter, per language) ──▶ CodeIndex (term counts in LSM
    segments on disk under .lagoon/index/, BM25 with global statistics at query time) ──▶
    CodeRetriever (BM25 → MiniLM rerank → top-k within a token budget; or `files()`) ──▶ ContextManager.create_snapshot (versioned, assumptions, file hashes, complexity)
                 ──▶ validate / increment_version / consumed-chunk TTL ──▶ SQLite audit trail

Imports without torch: the rerank stage loads sentence-transformers only when it is first used.
"""

from lagoon.context.chunking import Chunk, chunk_file
from lagoon.context.index import CodeIndex, Hit, UpdateStats
from lagoon.context.retriever import CodeRetriever, FileHit, render
from lagoon.context.snapshot import ContextManager, Reason, Snapshot, ValidationReport

__all__ = [
    "Chunk",
    "chunk_file",
    "CodeIndex",
    "Hit",
    "UpdateStats",
    "CodeRetriever",
    "FileHit",
    "render",
    "ContextManager",
    "Snapshot",
    "Reason",
    "ValidationReport",
]
