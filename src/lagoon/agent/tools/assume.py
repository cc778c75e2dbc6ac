"""`assume`: the model declares an assumption — a named claim and the check that decides it.

The check is a shell command (holds when it exits 0) or Python code (holds when `python -c CODE`
exits 0; use `assert`). It runs at once — an assumption must hold when declared, so one whose check
fails (or cannot run) is refused with what the check printed — and again before every later model
call whenever it could have changed (`lagoon.agent.assumptions`); a failing one is drift, and with
`validation.reject_unverified_assumptions` it stops the run after
`validation.max_consecutive_validation_failures` failed checks in a row. Declaring more than
`context.max_assumptions_per_snapshot` is refused; declaring an existing name replaces it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.assumptions import MODEL_KINDS, AssumptionBook
from lagoon.agent.tools import ToolArgumentError, ToolOutput, require_str
from lagoon.protocols import ToolSpec

__all__ = ["AssumeTool", "describe"]


def describe(a: Any) -> str:
    state = {True: "holds", False: "does NOT hold", None: "was not checked"}[a.holds]
    return f"assumption {a.name!r} ({a.claim}) {state}" + (f" — {a.detail}" if a.detail else "")


class AssumeTool:
    name = "assume"
    spec = ToolSpec(
        name="assume",
        description=(
            "Declare an assumption your work rests on, with a check that proves it: a shell command "
            "(holds when it exits 0) or Python code (holds when it runs without error; use assert). It is "
            "re-checked before every step; if it stops holding you are told, and the run may stop."
        ),
        parameters={
            "type": "object",
            "properties": {
                "name": {"type": "string", "description": "A short unique name, e.g. tests_collect."},
                "claim": {"type": "string", "description": "What you assume, in words."},
                "check": {"type": "string", "description": "The shell command or Python code that checks it."},
                "kind": {"type": "string", "enum": list(MODEL_KINDS), "description": "shell (default) or python."},
                "watch": {"type": "array", "items": {"type": "string"},
                          "description": "Files whose change can change the result (default: re-check after every command or edit)."},
            },
            "required": ["name", "claim", "check"],
        },
    )

    def __init__(self, book: AssumptionBook, *, max_assumptions: int) -> None:
        self.book = book
        self.max_assumptions = max_assumptions

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        name = require_str(arguments, "name", self.name).strip()
        claim = require_str(arguments, "claim", self.name).strip()
        check = require_str(arguments, "check", self.name).strip()
        kind = arguments.get("kind") or "shell"
        watch = arguments.get("watch") or []
        if not name or not check:
            raise ToolArgumentError("assume: name and check must not be empty")
        if kind not in MODEL_KINDS:
            raise ToolArgumentError(f"assume: kind {kind!r} is not one of {', '.join(MODEL_KINDS)}")
        if not isinstance(watch, list) or not all(isinstance(w, str) for w in watch):
            raise ToolArgumentError("assume: watch must be a list of file paths")
        if name not in self.book.declared and len(self.book.declared) >= self.max_assumptions:
            raise ToolArgumentError(
                f"assume: at most {self.max_assumptions} assumptions per snapshot "
                f"(context.max_assumptions_per_snapshot); yours are: {', '.join(self.book.declared)}. "
                "Reuse a name to replace one.")
        a = self.book.declare(name, claim, check, kind, watch)
        if a.holds is not True:
            self.book.retract(name)
            return ToolOutput(text=f"not declared: the check of {name!r} fails now ({a.detail}); an assumption "
                                   "must hold when you declare it", ok=False)
        return ToolOutput(text=describe(a), meta={"assumption": a.to_dict()})
