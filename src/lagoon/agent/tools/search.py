"""`search`: ask the context retriever for the code that matters to a query (path, lines, symbol, text)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.tools import ToolArgumentError, ToolOutput, require_str
from lagoon.protocols import Retriever, ToolSpec

__all__ = ["SearchTool", "render_chunks"]

MAX_K = 50  # more chunks than fit any prompt; a model asking for 10**9 gets told, not obeyed


def render_chunks(chunks: Any) -> str:
    parts = []
    for c in chunks:
        symbol = f" ({c.symbol})" if getattr(c, "symbol", None) else ""
        parts.append(f"--- {c.path}:{c.start_line}-{c.end_line}{symbol}\n{c.text}")
    return "\n".join(parts)


class SearchTool:
    name = "search"
    spec = ToolSpec(
        name="search",
        description="Search the repository's code by meaning and keywords; returns the best matching chunks.",
        parameters={
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "What you are looking for."},
                "k": {"type": "integer", "description": f"How many chunks, 1 to {MAX_K} (default from config)."},
            },
            "required": ["query"],
        },
    )

    def __init__(self, retriever: Retriever, *, budget_tokens: int | None = None) -> None:
        self.retriever = retriever
        self.budget_tokens = budget_tokens

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        query = require_str(arguments, "query", self.name)
        k = arguments.get("k")
        if isinstance(k, str) and k.strip().isdigit():  # models write numbers as strings now and then
            k = int(k)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K):
            raise ToolArgumentError(f"search: k must be an integer from 1 to {MAX_K} (got {k!r}); or leave it out")
        chunks = list(self.retriever.retrieve(query, k=k, budget_tokens=self.budget_tokens))
        if not chunks:
            return ToolOutput(text=f"no code matched {query!r}")
        return ToolOutput(text=render_chunks(chunks), files=tuple(sorted({c.path for c in chunks})))
