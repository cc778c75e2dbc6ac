"""`LiveView`: the table `lagoon run` shows while the agent works, fed by the agent's events.

Events are the session's JSON payloads (`lagoon.agent.loop.Agent.emit`); each kind the view shows is
read once into a typed record here (`ModelStep`, `ToolStep`, `Eviction`), so a key the view expects
and the loop does not write fails in one place instead of showing an empty column. Not a log: the
session store is the record; this is a view of it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

__all__ = ["LiveView", "ModelStep", "ToolStep", "Eviction"]

_COLUMNS = ("step", "tool", "argument", "exit", "route", "tokens in/out", "ctx v")


@dataclass(frozen=True)
class ModelStep:
    """A ``model`` event: who answered, the router's task type, the tokens."""

    backend: str
    route_type: str
    """The router's classification (RETRIEVAL_BOUND / REASONING_BOUND); "" without a router."""
    input_tokens: int
    output_tokens: int

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> ModelStep:
        usage = payload.get("usage") or {}
        route = payload.get("route") or {}  # protocols.RouteReport.to_dict()
        return cls(str(payload.get("backend") or ""), str((route.get("classification") or {}).get("type") or ""),
                   int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0))


@dataclass(frozen=True)
class ToolStep:
    """A ``tool_result`` or ``tool_interrupted`` event."""

    step: int
    name: str
    argument: str
    """The argument that says most: the command, path, query or summary."""
    status: str
    """The exit code, "" for a tool without one, or "interrupted"."""

    @classmethod
    def of(cls, kind: str, payload: Mapping[str, Any]) -> ToolStep:
        args = payload.get("arguments") or {}
        arg = str(args.get("command") or args.get("path") or args.get("query") or args.get("summary") or "")
        code = payload.get("exit_code")
        status = "interrupted" if kind == "tool_interrupted" else ("" if code is None else str(code))
        return cls(int(payload.get("step") or 0), str(payload.get("name") or ""), arg.replace("\n", " "), status)


@dataclass(frozen=True)
class Eviction:
    """A ``memory`` event: a turn left the prompt for long-term memory, with its summary's source."""

    step: int
    source: str
    error: str

    @classmethod
    def of(cls, payload: Mapping[str, Any]) -> Eviction:
        return cls(int(payload.get("step") or 0), str(payload.get("source") or ""), str(payload.get("error") or ""))


class LiveView:
    """A rich table of steps (tool, exit code, route, tokens) updated from the agent's events."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.rows: list[list[str]] = []
        self.last_model: ModelStep | None = None
        self.version: Any = ""
        self.live = Live(self._table(), console=console, refresh_per_second=8, transient=False)

    def _table(self) -> Table:
        table = Table(title="lagoon run", expand=False)
        for col in _COLUMNS:
            table.add_column(col)
        for row in self.rows[-25:]:
            table.add_row(*row)
        return table

    def __call__(self, kind: str, payload: Any) -> None:
        if kind == "model":
            self.last_model = ModelStep.of(payload)
        elif kind == "context":
            self.version = payload.get("version")
        elif kind in ("tool_result", "tool_interrupted"):
            tool, model = ToolStep.of(kind, payload), self.last_model
            route = (model.route_type or model.backend) if model else ""
            tokens = f"{model.input_tokens}/{model.output_tokens}" if model else "0/0"
            self.rows.append([str(tool.step), tool.name, tool.argument[:60], tool.status, route, tokens,
                              str(self.version)])
        elif kind == "memory":
            ev = Eviction.of(payload)
            note = f"{ev.source} summary" + (f" ({ev.error[:30]})" if ev.error else "")
            self.rows.append([str(ev.step), "evicted", note, "", "", "", ""])
        elif kind == "assumption" and payload.get("holds") is False:  # drift: a claim stopped holding
            self.rows.append(["", "drift", f"{payload.get('name', '')}: {payload.get('claim', '')}"[:60], "", "", "",
                              str(self.version)])
        elif kind == "hop_result":  # coordinated mode: a role's validated output
            self.rows.append(["", f"hop {payload.get('role', '')}", json.dumps(payload.get("output", {}))[:60], "",
                              "", "", str(payload.get("version", ""))])
        elif kind == "format_error":
            self.rows.append([str(payload.get("step", "")), "format error", str(payload.get("error", ""))[:60],
                              "", "", "", ""])
        self.live.update(self._table())
