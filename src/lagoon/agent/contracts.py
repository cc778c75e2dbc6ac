"""The typed contracts between the coordinated agents (pydantic): what each role is given and returns.

    retriever   RetrieverInput(task, evidence)                 → RetrieverOutput(files, notes)
    coder       CoderInput(task, files, notes, findings, round) → CoderOutput(summary, files_changed)
    verifier    VerifierInput(task, summary, files_changed)     → VerifierOutput(passed, findings, test_command)

Every contract carries the context `version` it was built on. Inputs are built by the coordinator;
outputs are what a role's model submits (a JSON object as `submit`'s summary) and are validated on
the way out (`parse_output`): extra keys, a wrong type or a missing field is a `ContractError`
naming the role and the field. This module holds data only; `lagoon.agent.coordinator` runs them.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lagoon.errors import ContractError

__all__ = [
    "CoderInput", "CoderOutput", "ContractError", "RetrieverInput", "RetrieverOutput", "ROLES",
    "VerifierInput", "VerifierOutput", "parse_output",
]


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrieverInput(_Contract):
    task: str
    evidence: list[str] = Field(default_factory=list)
    """What earlier hops learned (the verifier's findings), to steer the search."""
    version: int = 0


class RetrieverOutput(_Contract):
    files: list[str] = Field(min_length=1)
    """Repository-relative paths of the files the task is about, most relevant first."""
    notes: str = ""
    """What the coder should know about them (the symbol, the suspected fault)."""


class CoderInput(_Contract):
    task: str
    files: list[str]
    notes: str = ""
    findings: list[str] = Field(default_factory=list)
    """The verifier's findings when it sent the coder back (empty on the first round)."""
    round: int = 1
    version: int = 0


class CoderOutput(_Contract):
    summary: str = Field(min_length=1)
    files_changed: list[str] = Field(default_factory=list)


class VerifierInput(_Contract):
    task: str
    summary: str
    files_changed: list[str]
    version: int = 0


class VerifierOutput(_Contract):
    passed: bool
    findings: list[str] = Field(default_factory=list)
    """Why it failed (failing tests, tracebacks), for the coder's next round."""
    test_command: str = ""


ROLES: dict[str, tuple[type[_Contract], type[_Contract]]] = {
    "retriever": (RetrieverInput, RetrieverOutput),
    "coder": (CoderInput, CoderOutput),
    "verifier": (VerifierInput, VerifierOutput),
}


def parse_output(role: str, text: str) -> Any:
    """The role's output contract from its submitted summary (a JSON object)."""
    _, out_type = ROLES[role]
    body = text.removeprefix("submitted:").strip()
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end < start:
        raise ContractError(f"{role}: submitted no JSON object; expected {out_type.__name__} "
                            f"({', '.join(out_type.model_fields)})")
    try:
        return out_type.model_validate(json.loads(body[start:end + 1]))
    except (ValueError, ValidationError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else {"msg": str(exc), "loc": ()}
        where = ".".join(str(x) for x in detail.get("loc", ())) or "(the object)"
        raise ContractError(f"{role}: output breaks {out_type.__name__} at {where}: {detail['msg']}") from None
