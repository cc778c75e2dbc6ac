"""`submit`: the model says the task is done; the loop ends the run with `Submitted`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.tools import ToolOutput
from lagoon.protocols import ToolSpec

__all__ = ["SubmitTool"]


class SubmitTool:
    name = "submit"
    spec = ToolSpec(
        name="submit",
        description="Finish the task. Call it once the change is made and verified; summary says what you did.",
        parameters={
            "type": "object",
            "properties": {"summary": {"type": "string", "description": "What was changed and how it was checked."}},
            "required": [],
        },
    )

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        summary = arguments.get("summary") or ""
        return ToolOutput(text=f"submitted: {summary}".strip(), submitted=True)
