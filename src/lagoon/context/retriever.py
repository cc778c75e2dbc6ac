"""`CodeRetriever`: the agent's answer to "what code matters for this query?" (`protocols.Retriever`).

Each `retrieve` brings the index up to date (a no-op scan when nothing changed), takes BM25's top
`context.lexical_candidates`, reranks them with MiniLM when `context.rerank` is on and the extra is
installed, then selects at most `k` (default `context.top_k`) chunks in rank order whose *rendered*
text fits `budget_tokens` (default `context.token_budget`). The budget is a hard cap: it is checked
on the output of `render()` with the retriever's token counter, and chunks that would overflow it
are skipped in favour of later, smaller ones.

This is *not* the prompt assembler: it renders retrieved code only (see `lagoon.agent.memory`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from lagoon.config import ContextSection
from lagoon.context.chunking import Chunk
from lagoon.context.index import CodeIndex, Hit
from lagoon.testing import approx_token_count

__all__ = ["CodeRetriever", "render"]

log = logging.getLogger(__name__)

TokenCounter = Callable[[str], int]


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
    ) -> None:
        self.repo = Path(repo).resolve()
        self.config = config
        self.count_tokens: TokenCounter = token_counter or approx_token_count
        self.index = index or CodeIndex(self.repo, config)
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
            self._reranker = Reranker(self.repo / ".lagoon" / "embeddings.sqlite", self.config.rerank_weight)
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
