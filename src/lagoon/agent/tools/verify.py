"""`verify`: re-run one assumption's check now (or every one the model declared) and report."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.assumptions import AssumptionBook
from lagoon.agent.tools import ToolArgumentError, ToolOutput
from lagoon.agent.tools.assume import describe
from lagoon.protocols import ToolSpec

__all__ = ["VerifyTool"]


class VerifyTool:
    name = "verify"
    spec = ToolSpec(
        name="verify",
        description="Re-run the check of an assumption now (by name; without a name, all of yours).",
        parameters={
            "type": "object",
            "properties": {"name": {"type": "string", "description": "The assumption's name."}},
            "required": [],
        },
    )

    def __init__(self, book: AssumptionBook) -> None:
        self.book = book

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        name = arguments.get("name")
        if name is not None and not isinstance(name, str):
            raise ToolArgumentError("verify: name must be a string")
        if name:
            try:
                drifts = [self.book.verify(name)]
            except KeyError as exc:
                raise ToolArgumentError(f"verify: {exc.args[0]}") from None
        else:
            drifts = [self.book.verify(n) for n in list(self.book.declared)]
            if not drifts:
                return ToolOutput(text="no assumptions declared yet; use assume first", ok=False)
        ok = all(d.assumption.holds is True for d in drifts)
        return ToolOutput(text="\n".join(describe(d.assumption) for d in drifts), ok=ok,
                          meta={"assumptions": [d.assumption.to_dict() for d in drifts]})
