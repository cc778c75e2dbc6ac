"""A plain-language report of one agent run, read back from its session, and the check `make demo`
ends with: did every stage of the pipeline work?

`RunReport.from_workspace(repo)` reads the newest session in `repo`'s state folder. `problems()`
lists the stages that broke (no index, no snapshot, an unrouted step, a reply that was not a valid
action, a call without a result, a run that ended in an error); it is empty when the pipeline
worked, whether or not the model fixed the bug — a 135M model rarely does, and that is not a
failure of the pipeline. `render()` is the summary a newcomer reads.

    python -m lagoon.agent.run_report .demo/sample-repo   # exit 0 when the pipeline worked, else 1

This module is *not* an evaluation (see `lagoon.eval`): it checks plumbing, not task success.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lagoon.agent.session import DB_NAME, SessionStore
from lagoon.config import DEFAULT_STATE_DIR
from lagoon.errors import SessionError

__all__ = ["RunReport", "main"]

# How a run may end when the pipeline worked: the model submitted, or it ran out of steps/time.
_HEALTHY_EXITS = {"submitted", "limits_exceeded"}


@dataclass
class RunReport:
    session_id: str
    task: str
    exit_status: str
    exit_message: str
    index_built: bool
    snapshots: list[int] = field(default_factory=list)
    snapshot_chunks: list[str] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)  # per model call: route, mode, calls, tokens
    results: list[dict[str, Any]] = field(default_factory=list)  # per tool result: name, ok, exit code
    format_errors: list[str] = field(default_factory=list)
    validation_failures: int = 0
    state_dir: str = DEFAULT_STATE_DIR

    @classmethod
    def from_workspace(cls, repo: str | Path, state_dir: str = DEFAULT_STATE_DIR) -> RunReport:
        root = Path(repo).resolve() / state_dir
        if not (root / DB_NAME).is_file():
            raise SessionError(f"no session in {repo} (no {root / DB_NAME}); run `lagoon run TASK --repo {repo}` first")
        store = SessionStore(root / DB_NAME)
        try:
            sessions = store.list()
            if not sessions:
                raise SessionError(f"{root / DB_NAME} holds no session")
            info = sessions[0]  # newest first
            events = list(store.events(info["id"]))
        finally:
            store.close()
        index = root / "index"
        report = cls(info["id"], info["task"], "running", "", index.is_dir() and any(index.iterdir()),
                     state_dir=state_dir)
        for e in events:
            report._apply(e["kind"], e["payload"])
        return report

    def _apply(self, kind: str, p: dict[str, Any]) -> None:
        if kind == "context":
            self.snapshots.append(int(p.get("version", 0)))
            self.snapshot_chunks = list(p.get("chunks") or [])
        elif kind == "model":
            route = p.get("route") or {}
            usage = p.get("usage") or {}
            self.steps.append({
                "step": p.get("step"), "backend": p.get("backend"), "model": p.get("model"),
                "route_type": (route.get("classification") or {}).get("type"), "mode": p.get("mode"),
                "calls": [(c["name"], c.get("arguments") or {}) for c in p.get("calls") or []],
                "tokens": (usage.get("input_tokens", 0), usage.get("output_tokens", 0)),
                "latency_s": float(p.get("latency_s") or 0.0),
            })
        elif kind in ("tool_result", "tool_interrupted"):
            first = next((ln for ln in str(p.get("text", "")).splitlines() if ln.strip()), "")
            self.results.append({"step": p.get("step"), "name": p.get("name"),
                                 "ok": kind == "tool_result" and bool(p.get("ok")), "exit_code": p.get("exit_code"),
                                 "interrupted": kind == "tool_interrupted", "first_line": first.strip()})
        elif kind == "format_error":
            self.format_errors.append(str(p.get("error", "")))
        elif kind == "validation" and not p.get("ok", True):
            self.validation_failures += 1
        elif kind == "exit":
            self.exit_status, self.exit_message = str(p.get("status")), str(p.get("message", ""))

    # ------------------------------------------------------------------ verdict
    @property
    def actions(self) -> int:
        return sum(len(s["calls"]) for s in self.steps)

    def problems(self) -> list[str]:
        """The stages that broke; empty when the whole pipeline worked."""
        out = []
        if not self.index_built:
            out.append(f"index: the repository was not indexed (no {self.state_dir}/index)")
        if not self.snapshots or not self.snapshot_chunks:
            out.append("context: no snapshot with retrieved chunks was recorded")
        if not self.steps:
            out.append("model: the agent never called a model")
        if any(not s["backend"] for s in self.steps):
            out.append("routing: a step has no backend recorded")
        invalid = [s["step"] for s in self.steps if s["mode"] == "invalid" or not s["calls"]]
        if invalid or self.format_errors:
            out.append(f"actions: {len(self.format_errors)} format error(s); steps without a valid action: {invalid}")
        if len(self.results) < self.actions:
            out.append(f"tools: {self.actions} action(s) but {len(self.results)} result(s)")
        if self.exit_status not in _HEALTHY_EXITS:
            out.append(f"run: ended in {self.exit_status!r}: {self.exit_message}")
        return out

    def render(self) -> str:
        solved = self.exit_status == "submitted"
        tools = Counter(name for s in self.steps for name, _ in s["calls"])
        tokens_in = sum(s["tokens"][0] for s in self.steps)
        tokens_out = sum(s["tokens"][1] for s in self.steps)
        model = next((s["model"] for s in self.steps if s["model"]), "?")
        lines = [
            f"What happened (session {self.session_id}, task: {self.task!r}):",
            f"  1. index      the repository was indexed for search: {'yes' if self.index_built else 'NO'}",
            f"  2. context    snapshot v{max(self.snapshots, default=0)} holds {len(self.snapshot_chunks)} retrieved "
            f"chunks ({', '.join(self.snapshot_chunks[:3])}{', …' if len(self.snapshot_chunks) > 3 else ''})",
            f"  3. routing    {len(self.steps)} model call(s) routed to "
            f"{', '.join(sorted({str(s['backend']) for s in self.steps})) or 'nothing'} ({model})",
            f"  4. gate       the context was validated before every step ({self.validation_failures} failure(s))",
            f"  5. actions    {self.actions} valid action(s), {len(self.format_errors)} format error(s): "
            + ", ".join(f"{n}×{c}" for n, c in tools.most_common()),
            f"  6. tools      {len(self.results)} tool run(s), {sum(r['ok'] for r in self.results)} succeeded",
            f"  7. session    recorded to {self.state_dir}/{DB_NAME}; ended {self.exit_status!r}",
            f"  8. telemetry  {tokens_in} prompt / {tokens_out} completion tokens, "
            f"{sum(s['latency_s'] for s in self.steps):.0f} s in the model",
            "",
            "Steps:",
        ]
        for s in self.steps:
            outcome = [r for r in self.results if r["step"] == s["step"]]
            for name, args in s["calls"] or [("(no action)", {})]:
                lines.append(f"  {s['step']:>2}. {name:<8} {_brief(args)}")
            for r in outcome:
                lines.append(f"      → {'ok' if r['ok'] else 'failed'}: {r['first_line'][:80]}")
        problems = self.problems()
        lines.append("")
        if problems:
            lines += ["The pipeline BROKE:", *(f"  - {p}" for p in problems)]
        else:
            lines.append("The pipeline worked: every stage ran and every reply was one valid action.")
            lines.append("The bug was fixed and submitted." if solved else
                         f"The model did not fix the bug ({self.exit_message}). That is the model, not the "
                         "pipeline: a 135M model rarely solves it; point router.* at a stronger model for real work.")
        return "\n".join(lines)


def _brief(args: dict[str, Any]) -> str:
    """The argument a reader recognises a call by (a command, a path, a query …), else them all."""
    for key in ("command", "path", "query", "summary", "name"):
        if isinstance(args.get(key), str) and args[key]:
            return args[key].replace("\n", " ")[:70]
    return json.dumps(args)[:70] if args else ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m lagoon.agent.run_report REPO", file=sys.stderr)
        return 2
    try:
        report = RunReport.from_workspace(args[0])
    except SessionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report.render())
    return 1 if report.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
