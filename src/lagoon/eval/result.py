"""`TrialResult`: what one eval trial produced, as one typed record (a row of ``results.jsonl``).

`run_trial` fills it in stages (setup, agent, tests); `summarize` and the HTML report read it. It is
a pydantic model that forbids unknown fields, also on assignment, so a misspelled or dead key is an
error where it is written, not a silent `.get(...) or 0` where it is read. ``results.jsonl`` rows
are `to_row()` dicts (format version 1); `from_row` reads them back and names a bad field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lagoon.errors import TaskSpecError

__all__ = ["TrialResult", "CommandRecord", "TokenCounts", "RESULT_FORMAT_VERSION", "Status"]

RESULT_FORMAT_VERSION = 1

Status = Literal["passed", "failed", "error", "environment_unsupported"]

_STRICT = ConfigDict(extra="forbid", validate_assignment=True)


class CommandRecord(BaseModel):
    model_config = _STRICT

    command: str
    exit_code: int | None = None


class TokenCounts(BaseModel):
    model_config = _STRICT

    input: int = 0
    output: int = 0
    total: int = 0


class TrialResult(BaseModel):
    model_config = _STRICT

    format_version: int = RESULT_FORMAT_VERSION
    task_id: str
    attempt: int = 0
    agent: str
    format: str
    """Task format: tb1, tb2 or swebench."""
    category: str | None = None
    difficulty: str | None = None
    repo: str | None = None
    created_at: str | None = None
    held_out: bool = False
    """Never feeds router fitting or calibration (`is_held_out`)."""
    sandbox: str = ""
    status: Status = "failed"
    passed: bool = False
    reward: float | None = None
    failure_mode: str | None = None
    error: str | None = None
    agent_exit: str | None = None
    """The agent's own exit status (`RunResult.exit_status`) for agent 'lagoon'."""
    steps: int = 0
    commands: list[CommandRecord] = Field(default_factory=list)
    command_success_rate: float | None = None
    tokens: TokenCounts = Field(default_factory=TokenCounts)
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    test_duration_s: float = 0.0
    validation_failures: int = 0
    backends: dict[str, int] = Field(default_factory=dict)
    """Model calls per route key that answered."""
    expert_load: list[int] | None = None
    """Tokens routed to each expert (summed over MoE layers) by in-process MoE models during the
    trial; None when no such model ran."""
    tests: dict[str, bool] = Field(default_factory=dict)
    test_output: str = ""

    @property
    def scored(self) -> bool:
        """Counted in rates: an environment that could not be built says nothing about the agent."""
        return self.status != "environment_unsupported"

    def to_row(self) -> dict[str, Any]:
        """The JSON-able ``results.jsonl`` row."""
        return self.model_dump(mode="json")

    @classmethod
    def from_row(cls, row: Any, where: str = "result") -> TrialResult:
        try:
            return cls.model_validate(row)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(row)"
            raise TaskSpecError(f"{where}: field {field!r}: {first['msg']}; not a Lagoon trial result") from None
