"""`CodeRetriever`: the agent's answer to "what code matters for this query?" (`protocols.Retriever`).

Each `retrieve` brings the index up to date (a no-op scan when nothing changed), takes BM25's top
`context.lexical_candidates`, reranks them with MiniLM when `context.rerank` is on and the extra is
installed, then selects at most `k` (default `context.top_k`) chunks in rank order whose *rendered*
text fits `budget_tokens` (default `context.token_budget`). The budget is a hard cap: it is checked
on the output of `render()` with the retriever's token counter, and chunks that would overflow it
are skipped in favour of later, smaller ones.

`files(query, k)` ranks whole files instead (bug localization: "which file must change?"): BM25's
top `FILE_POOL` chunks are aggregated per file as a decayed sum of their scores (best chunk + half
the second + a quarter of the third …), so a file with several matching chunks beats one with a
single lucky chunk; a file whose path (or dotted module name) the query spells out, as a traceback
does, can be boosted (`path_boost`, off by default); test files are left out unless asked for.

This is *not* the prompt assembler: it renders retrieved code only (see `lagoon.agent.memory`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lagoon.config import DEFAULT_STATE_DIR, ContextSection
from lagoon.context.chunking import Chunk
from lagoon.context.index import CodeIndex, Hit
from lagoon.token_estimate import approx_token_count

__all__ = ["CodeRetriever", "FileHit", "render", "rank_files", "is_test_path", "names_of"]

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]

FILE_POOL = 1000
"""Chunks (BM25's best) aggregated by `files()`."""
FILE_DECAY = 0.5
"""Weight ratio between a file's successive chunk scores in its decayed sum."""
PATH_BOOST = 0.0
"""Relative score bonus of a file the query names (``django/db/models/query.py``, ``sympy.core.expr``).
Off by default: on 189 SWE-bench Lite issues a bonus of 0.5 left recall@1 unchanged and cost 0.016
at recall@5 (tracebacks name many files besides the one to fix)."""
_TEST_DIRS = frozenset({"tests", "test", "testing"})


@dataclass(frozen=True)
class FileHit:
    path: str
    score: float
    hits: tuple[Hit, ...]
    """The file's chunk hits, best first."""


def is_test_path(path: str) -> bool:
    """A test file by convention: under tests/, test/ or testing/, test_*.py, *_test.py, conftest.py."""
    parts = PurePosixPath(path).parts
    name = parts[-1] if parts else ""
    return (
        bool(_TEST_DIRS.intersection(parts[:-1]))
        or name.startswith("test_")
        or name.endswith(("_test.py", "_tests.py"))
        or name in ("conftest.py", "tests.py")
    )


def names_of(path: str) -> list[str]:
    """How a query may spell a file: its path, without a src/ or lib/ prefix, and as a module."""
    out = [path]
    for prefix in ("src/", "lib/"):
        if path.startswith(prefix):
            out.append(path[len(prefix) :])
    stem = [n[: -len(PurePosixPath(n).suffix)] if PurePosixPath(n).suffix else n for n in out]
    out.extend(m.replace("/", ".") for m in stem if "/" in m)
    return out


def rank_files(
    hits: Sequence[Hit],
    k: int = 10,
    *,
    query: str = "",
    include_tests: bool = False,
    suffixes: tuple[str, ...] | None = None,
    decay: float = FILE_DECAY,
    path_boost: float = PATH_BOOST,
) -> list[FileHit]:
    """Files of `hits` ranked by the decayed sum of their chunk scores (`hits` best first), times
    ``1 + path_boost`` for a file that `query` names."""
    per: dict[str, list[Hit]] = {}
    for h in hits:
        path = h.chunk.path
        if suffixes is not None and not path.endswith(suffixes):
            continue
        if not include_tests and is_test_path(path):
            continue
        per.setdefault(path, []).append(h)
    ranked = []
    for path, hs in per.items():
        hs.sort(key=lambda h: -h.score)
        score = sum(h.score * decay**i for i, h in enumerate(hs))
        if query and any(re.search(re.escape(n) + r"(?!\w)", query) for n in names_of(path)):
            score *= 1.0 + path_boost
        ranked.append(FileHit(path, score, tuple(hs)))
    ranked.sort(key=lambda f: -f.score)
    return ranked[:k]


def render(chunks: Sequence[Chunk]) -> str:
    """Chunks as the model sees them: a location line, then a fenced block (headers, then text)."""
    parts = []
    for c in chunks:
        title = f"### {c.path}:{c.start_line}-{c.end_line}" + (f" ({c.symbol})" if c.symbol else "")
        body = (c.header + "\n" if c.header else "") + c.text.rstrip("\n")
        parts.append(f"{title}\n```{c.language}\n{body}\n```")
    return "\n\n".join(parts)


class CodeRetriever:
    """BM25 → optional MiniLM rerank → top-k within a token budget, over one repository."""

    def __init__(
        self,
        repo: Path,
        config: ContextSection,
        *,
        token_counter: TokenCounter | None = None,
        index: CodeIndex | None = None,
        auto_update: bool = True,
        state_dir: str = DEFAULT_STATE_DIR,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.config = config
        self.state_dir = state_dir
        self.count_tokens: TokenCounter = token_counter or approx_token_count
        self.index = index or CodeIndex(self.repo, config, state_dir=state_dir)
        self.auto_update = auto_update
        self._reranker = None

    @property
    def reranker(self):
        """The Reranker, or None when `context.rerank` is off or the extra is missing."""
        if not self.config.rerank:
            return None
        if self._reranker is None:
            from lagoon.context.rerank import Reranker, reranker_available

            if not reranker_available():
                return None
            self._reranker = Reranker(self.repo / self.state_dir / "embeddings.sqlite", self.config.rerank_weight)
        self._reranker.weight = self.config.rerank_weight
        return self._reranker

    def candidates(self, query: str) -> list[Hit]:
        """Ranked hits before budget selection (BM25, reranked when enabled)."""
        if self.auto_update:
            self.index.update()
        hits = self.index.search(query, self.config.lexical_candidates)
        reranker = self.reranker
        if reranker is not None and len(hits) > 1:
            hits = reranker.rerank(query, hits)
        return hits

    def files(
        self,
        query: str,
        k: int = 10,
        *,
        include_tests: bool = False,
        suffixes: tuple[str, ...] | None = None,
    ) -> list[FileHit]:
        """The `k` files most likely to matter for `query` (see the module docstring), best first."""
        if self.auto_update:
            self.index.update()
        hits = self.index.search(query, FILE_POOL)
        return rank_files(hits, k, query=query, include_tests=include_tests, suffixes=suffixes)

    def retrieve(self, query: str, *, k: int | None = None, budget_tokens: int | None = None) -> list[Chunk]:
        """At most `k` chunks, best first, whose rendering takes at most `budget_tokens` tokens."""
        k = self.config.top_k if k is None else k
        budget = self.config.token_budget if budget_tokens is None else budget_tokens
        if k <= 0 or budget <= 0:
            return []
        return self.select([h.chunk for h in self.candidates(query)], k=k, budget_tokens=budget)

    def select(self, ranked: Sequence[Chunk], *, k: int, budget_tokens: int) -> list[Chunk]:
        """Greedy in rank order: keep a chunk if the rendering of all kept chunks still fits."""
        chosen: list[Chunk] = []
        for chunk in ranked:
            if len(chosen) >= k:
                break
            if self.count_tokens(render([*chosen, chunk])) <= budget_tokens:
                chosen.append(chunk)
        return chosen

    def render(self, chunks: Sequence[Chunk]) -> str:
        return render(chunks)
