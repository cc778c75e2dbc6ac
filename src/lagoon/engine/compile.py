"""`DecodeStep`: the scheduler's decode forward (one new token per sequence), compiled from outside.

The model stays the plain `Transformer`; this module compiles its forward for T = 1, gpt-fast style:

- two graphs: batch 1 (static, what an agent runs) and batch 2+ (the batch dimension dynamic in
  2..`max_batch`, what a server decoding several requests together runs); in both the attended
  length S is dynamic, so one graph serves every position. Batch 1 is made ready when the engine
  starts (`warm_up`), batch 2+ on first use. The warm-up writes only the cache's scratch row / block;
- weights and KV tensors are never baked into the artefact: the graph reads the model's and the
  cache's own tensors and writes the KV pools in place; the cache's bookkeeping (rows, block
  tables, mask) runs eagerly in `cache.prepare`;
- on CPU each graph is an AOTInductor package (`lagoon.engine.aoti_step`: exported non-strict,
  loaded by torch's C++ loader with the model's tensors as user-managed constants, ~0.01 s, no
  torch._dynamo / torch._inductor import on a warm start; Lagoon's kernels run through its proxy
  executor; MoE models too, through their static path); on CUDA (CUDA graphs) and where a package cannot
  be built, dynamo's ahead-of-time artefact (`torch.compile(...).aot_compile`: guards, bytecode and
  inductor's code, with the model and cache as arguments; loading it imports dynamo and inductor,
  ~1.8 s). `LAGOON_COMPILE_BACKEND=aoti|dynamo` forces one;
- saved to ``~/.cache/lagoon/compile/<key>/step-b{1,2}.{pt2,bin}``; the key hashes torch's version,
  the CPU's vector ISA, the device, the thread count, Lagoon's kernel library, the compile options and
  the model's tensor names / shapes / dtypes / settings and the KV layout. A second start loads the
  file: no re-tracing (SmolLM2-135M on 2 cores: a cold compile 35-95 s a graph; see docs/architecture.md);
- no guards per call: `__call__` routes each batch to the graph compiled for its shapes, under
  `no_grad`. A dynamo graph compiled in this process checks its guards on its first call; a loaded
  one is not given its guards (rebuilding them is a third of the load): the key stands for them,
  and the traced source is compared with the files now (a package records the hashes of the source
  files it was traced through), so an edited model file is compiled afresh;
- a cache entry that fails to load or whose source changed is logged, deleted and compiled
  afresh; a package that fails to compile is logged and dynamo tried next; any failure of dynamo's
  compile, or of a graph's first call, is logged with its reason, the entry is cleared, and that
  graph's batches run eagerly from then on: never worse than eager.

On a CUDA device the dynamo path asks inductor for CUDA graphs (``triton.cudagraphs``, the KV tensors
marked as static addresses); that branch is untested (no GPU was available), and with S dynamic
inductor may skip CUDA graphs for the step (`cudagraph_skip_dynamic_graphs`): a CUDA variant that
attends over a fixed length is not built. `LAGOON_CACHE_DIR` moves the cache root. This module is *not*
a scheduler (see `generate`) and does not choose kernels (see `lagoon.engine.kernels`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lagoon.cache_dir import cache_root
from lagoon.engine import cpu_kernels
from lagoon.engine.aoti_step import AOTI_OPTIONS
from lagoon.engine.kernels import cpu_isa
from lagoon.errors import ConfigError

__all__ = ["DecodeStep", "cache_root", "compile_key", "compile_enabled"]

log = logging.getLogger("lagoon.engine")

FORMAT = "aot-1"  # bump when what is saved per entry changes: old entries are then never read


def _inductor_options(device: torch.device) -> dict:
    # round bf16 intermediates where eager rounds them, so greedy tokens match the eager model's;
    # no size / alignment asserts in the wrapper: ~400 Python calls a step, 0.7 ms of a 14 ms step
    # (thread CPU time, 1 thread, SmolLM2-135M Q4_1); the graph's outputs are checked against eager
    # in tests/engine/test_compile.py
    opts: dict = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False,
                  **_loop_threads(device)}
    if device.type == "cuda":  # untested: replay the step as one CUDA graph
        opts["triton.cudagraphs"] = True
    return opts


def _loop_threads(device: torch.device) -> dict:
    # Lagoon's kernels thread on their own pool (cpu_kernels); the step's own loops (norms, RoPE,
    # SiLU, residual adds: a few thousand elements at decode) then run on the calling thread, so a
    # decode step has no OpenMP region left, no barrier to wait at for a descheduled thread
    # (docs/architecture.md "Under load"). The options are hashed into the key
    return {"cpp.threads": 1} if device.type == "cpu" and cpu_kernels.pool_in_use() else {}


def compile_enabled(config) -> bool:
    """`engine.compile`; when unset, on unless `LAGOON_COMPILE=0` (the default test run sets it)."""
    if config.compile is not None:
        return bool(config.compile)
    return os.environ.get("LAGOON_COMPILE", "1").strip() not in ("0", "false", "off", "no")


def compile_key(model: torch.nn.Module, device: torch.device, layout: str = "") -> str:
    """Hash of what a compiled step depends on: torch, CPU ISA / device, Lagoon's kernel library, the thread count (inductor
    bakes it into its kernels and dynamo guards on it), the model's tensors and `layout` (the KV
    cache's tensors, whose shapes the graph is specialized on: see `_cache_layout`)."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}|{torch.__version__}|{cpu_isa()}|{device}|{torch.get_num_threads()}|{type(model).__name__}".encode())
    h.update(cpu_kernels.build_tag().encode())  # the graph calls Lagoon's own ops by name (extern kernels)
    h.update(repr(sorted(_inductor_options(device).items())).encode())
    h.update(repr(sorted(AOTI_OPTIONS.items())).encode())
    h.update(layout.encode())
    for name, t in _tensors(model):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(repr(getattr(model, "args", "")).encode())  # eps, RoPE, windows: constants in the graph
    for name, mod in model.named_modules():
        h.update(f"{name}={type(mod).__name__}({mod.extra_repr()}){_plain_attrs(mod)};".encode())
    return h.hexdigest()[:20]


_PLAIN = (bool, int, float, str, type(None))


def _plain_attrs(mod: torch.nn.Module) -> str:
    # a module's plain Python settings (a router's top_k set by model_deployment, a window, a
    # softcap) are constants in the traced graph; a loaded graph has no guards to notice a change
    items = sorted((k, v) for k, v in vars(mod).items() if not k.startswith("_") and (
        isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v))))
    return repr(items)


def _tensors(model: torch.nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _cache_layout(cache, max_batch: int) -> str:
    # the graph is specialized on the KV tensors' shapes (max_seq_len, rows / blocks) and on the
    # batch range: another engine.max_seq_len gets its own entry instead of failing the guards
    parts = [type(cache).__name__, str(max_batch)]
    for name in ("k", "v"):
        ts = getattr(cache, name, None) or []
        parts += [f"{name}:{len(ts)}"] + [f"{tuple(t.shape)}:{t.dtype}" for t in ts[:1]]
    return "|".join(parts)


def _decode(model: torch.nn.Module, cache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    # module level, model and cache as arguments: the saved artefact refers to neither
    return model(tokens, pos, cache)[:, -1]  # [B, V]


@contextlib.contextmanager
def _inductor_cache(path: Path):
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def _vec_isa() -> str:
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return str(pick_vec_isa())


@contextlib.contextmanager
def _trusted_vec_isa(recorded: str | None):
    """Skip inductor's per-process ISA probe (a compile and a subprocess per ISA: ~1 s of a warm
    start) when trusting the CPU's flags picks the ISA the entry was compiled with; else probe."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    if recorded is None or valid_vec_isa_list.cache_info().currsize:  # probed already in this process
        yield
        return
    with config.patch({"cpp.vec_isa_ok": True}):
        same = _vec_isa() == recorded
    if not same:
        valid_vec_isa_list.cache_clear()
    yield


class DecodeStep:
    """`step(seq_ids, tokens [B, 1], pos [B, 1]) -> logits [B, V]` over `cache` (prepared here).

    `compile=False` runs the model eagerly (same cache calls). `max_batch` bounds the batch 2+
    graph's dynamic batch dimension (larger batches run eagerly). `progress` receives one line when
    a graph compiles (stderr by default)."""

    def __init__(
        self, model: torch.nn.Module, cache, *, max_batch: int, compile: bool = True,
        progress: Callable[[str], None] | None = None, backend: str | None = None,
    ) -> None:
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.progress = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.device = next(model.parameters()).device
        self.eager_reason: str | None = None if compile else "engine.compile is off"
        self.compiled_buckets: set[int] = set()  # graphs ready (compiled or loaded) in this process
        self.loaded_buckets: set[int] = set()  # ... of which loaded from the cache
        self.ready_s: dict[int, float] = {}  # seconds each graph took to load or compile
        self.warm_up_s = 0.0
        self._failed: dict[int, str] = {}
        self._fns: dict[int, Callable] = {}
        self._proven: set[int] = set()  # graphs whose first call succeeded
        self.enabled = compile
        self.backend = backend or _default_backend(model, self.device)
        self._last_pos = cache.max_seq_len - 1  # a step attending max_seq_len keys runs eagerly (see aoti_step)
        self.cache_dir: Path | None = (
            cache_root() / "compile" / compile_key(model, self.device, _cache_layout(cache, max_batch)) if compile else None)

    @property
    def compiled(self) -> bool:
        return self.enabled and bool(self.compiled_buckets)

    @staticmethod
    def bucket(n: int) -> int:
        """1 for a single sequence, 2 for the dynamic-batch graph."""
        return 1 if n == 1 else 2

    def entry(self, b: int, backend: str | None = None) -> Path:
        """The saved graph for bucket `b` (an AOTInductor package, or dynamo's artefact)."""
        return self.cache_dir / f"step-b{b}.{'pt2' if (backend or self.backend) == 'aoti' else 'bin'}"

    def _eager(self, seq_ids: Sequence[int | None], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.cache.prepare(list(seq_ids), pos)
        return self.model(tokens, pos, self.cache)[:, -1]

    def __call__(self, seq_ids: Sequence[int | None], tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = len(seq_ids)
        b = self.bucket(n)
        if not self.enabled or b in self._failed or n > self.max_batch or int(pos.max()) >= self._last_pos:
            return self._eager(seq_ids, tokens, pos)
        fn = self._fns.get(b) or self._ready(b, seq_ids, tokens, pos)
        if fn is None:
            return self._eager(seq_ids, tokens, pos)
        self.cache.prepare(list(seq_ids), pos, static=True)
        with torch.no_grad():  # grad mode is part of a dynamo graph's guards
            if b in self._proven:
                return fn(tokens, pos)
            try:  # a graph's first call: guards checked (compiled here), kernels loaded (from the cache)
                out = fn(tokens, pos)
            except Exception as exc:  # the step's KV writes are redone by the eager forward
                self._fail(b, _reason(exc))
                return self._eager(seq_ids, tokens, pos)
        if isinstance(fn, _DynamoGraph):
            fn.proven()  # from now on `__call__` routes each batch to the graph for its shapes
        self._proven.add(b)
        return out

    def _fail(self, b: int, reason: str) -> None:
        self._fns.pop(b, None)
        self.compiled_buckets.discard(b)
        self._failed[b] = reason
        self.eager_reason = reason
        log.warning("compiled decode step for batch %s failed (%s); running it eagerly and clearing %s",
                    "1" if b == 1 else "2+", reason, self.cache_dir)
        shutil.rmtree(self.cache_dir, ignore_errors=True)  # the next start compiles afresh

    def _ready(self, b: int, seq_ids, tokens, pos) -> Callable | None:
        """Load bucket `b`'s graph from the cache, else compile and save it (an AOTInductor package
        on CPU; dynamo's artefact on CUDA or when the package cannot be built);
        None (and eager from then on, with the reason logged) when nothing works."""
        fn, t0 = None, time.perf_counter()
        for backend in (self.backend, "dynamo") if self.backend == "aoti" else (self.backend,):
            entry = self.entry(b, backend)
            if entry.is_file():
                try:
                    fn = self._load(b, backend)
                    self.loaded_buckets.add(b)  # without guards: the key and the source check stand for them
                    break
                except Exception as exc:  # a corrupt, stale or foreign entry: compile afresh
                    log.warning("cached decode step %s could not be loaded (%s); compiling it afresh",
                                entry, _reason(exc))
                    _remove_entry(entry)
        if fn is None:
            self.progress(f"lagoon: compiling the decode step for batch {'1' if b == 1 else '2+'} "
                          f"(first start is slow; cached in {self.cache_dir}) ...")
            reasons = []
            for backend in (self.backend, "dynamo") if self.backend == "aoti" else (self.backend,):
                try:
                    fn = self._compile(b, seq_ids, tokens, pos, backend)
                    break
                except Exception as exc:  # AOTInductor failed: dynamo next; dynamo failed: eager
                    reasons.append(f"{backend}: {_reason(exc)}")
                    log.warning("compiling the decode step for batch %s with %s failed (%s)",
                                "1" if b == 1 else "2+", backend, _reason(exc))
                    _remove_entry(self.entry(b, backend))
            if fn is None:
                self._fail(b, "; ".join(reasons))
                return None
            self.progress(f"lagoon: decode step ready in {time.perf_counter() - t0:.1f} s")
        self._fns[b] = fn
        self.ready_s[b] = time.perf_counter() - t0
        self.compiled_buckets.add(b)
        return fn

    def _load(self, b: int, backend: str) -> Callable:
        if backend == "aoti":
            from lagoon.engine.aoti_step import load_package

            return load_package(self.entry(b, backend), self.model, self.cache)
        isa_file = self.cache_dir / "vec_isa"
        recorded = isa_file.read_text().strip() if isa_file.is_file() else None
        with _inductor_cache(self.cache_dir / "inductor"), _trusted_vec_isa(recorded):
            fn = _unguarded_class().deserialize(self.entry(b, backend).read_bytes())
        changed = _changed_source(fn)
        if changed:
            raise RuntimeError(f"the traced source changed since it was compiled: {changed}")
        return _DynamoGraph(fn, self.model, self.cache)

    def _compile(self, b: int, seq_ids, tokens: torch.Tensor, pos: torch.Tensor, backend: str) -> Callable:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        if backend == "aoti":
            from torch._inductor import config as inductor_config

            from lagoon.engine.aoti_step import compile_package, load_package

            root = self.cache_dir.parent / "inductor"
            with _inductor_cache(root), _own_build_dirs(root, self.entry(b, backend)), \
                    inductor_config.patch(_loop_threads(self.device)):
                compile_package(self.model, self.cache, self.entry(b, backend), batch=b, max_batch=self.max_batch)
            return load_package(self.entry(b, backend), self.model, self.cache)
        tokens, pos = tokens.clone(), pos.clone()  # marks stay off the caller's tensors
        self.cache.prepare(list(seq_ids), pos, static=True)
        for t in self.cache.bound_tensors():
            if t.dim() >= 2 and t.shape[-1] > 1:  # the attended length S (mask, block reads)
                torch._dynamo.mark_dynamic(t, t.dim() - 1)
            if b > 1:  # rows, positions, mask, block tables: [B, ...]
                torch._dynamo.mark_dynamic(t, 0, min=2, max=max(self.max_batch, 2))
        if b > 1:
            for t in (tokens, pos):
                torch._dynamo.mark_dynamic(t, 0, min=2, max=max(self.max_batch, 2))
        if self.device.type == "cuda":  # untested: CUDA graphs replay only over fixed KV addresses
            for t in [*getattr(self.cache, "k", ()), *getattr(self.cache, "v", ())]:
                torch._dynamo.mark_static_address(t)
        with _inductor_cache(self.cache_dir / "inductor"), torch.no_grad():
            fn = torch.compile(_decode, fullgraph=True, dynamic=False, options=_inductor_options(self.device))
            compiled = fn.aot_compile(((self.model, self.cache, tokens, pos), {}))
            if self.device.type == "cpu":
                (self.cache_dir / "vec_isa").write_text(_vec_isa())
            compiled.save_compiled_function(str(self.entry(b, backend)))  # atomic: a temp file, then a rename
        return _DynamoGraph(compiled, self.model, self.cache)

    def warm_up(self, batch: int = 1) -> None:
        """Load (or compile) the graph for `batch` now rather than on the first request."""
        if not self.enabled:
            return
        seq_ids = [None] * batch
        tokens = torch.zeros(batch, 1, dtype=torch.int64)
        pos = torch.ones(batch, 1, dtype=torch.int64)  # S = 2, so S is traced as dynamic
        # padding slots (`None`) only: every write lands in the cache's scratch row / block
        t0 = time.perf_counter()
        self(seq_ids, tokens, pos)
        self.warm_up_s = time.perf_counter() - t0  # load or compile, plus the first call


class _DynamoGraph:
    """dynamo's compiled `_decode` bound to the model and cache: `fn(tokens, pos)`."""

    def __init__(self, fn, model, cache) -> None:
        self.fn, self.model, self.cache = fn, model, cache

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.fn(self.model, self.cache, tokens, pos)

    def proven(self) -> None:
        self.fn.disable_guard_check()


BACKENDS = ("aoti", "dynamo")


def _default_backend(model: torch.nn.Module, device: torch.device) -> str:
    """AOTInductor on CPU, MoE models included (no dynamo / inductor import on a warm start); dynamo on
    CUDA (CUDA graphs). `LAGOON_COMPILE_BACKEND` forces one (benchmarks compare them)."""
    forced = os.environ.get("LAGOON_COMPILE_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ConfigError(f"LAGOON_COMPILE_BACKEND={forced!r} is unknown; use one of {', '.join(BACKENDS)} or unset it")
        return forced
    return "aoti" if device.type == "cpu" else "dynamo"


def _remove_entry(entry: Path) -> None:
    for f in (entry, entry.with_suffix(".constants.pt")):
        with contextlib.suppress(OSError):  # e.g. the cache root is not a folder: nothing to remove
            f.unlink(missing_ok=True)


@contextlib.contextmanager
def _own_build_dirs(root: Path, package: Path):
    """Remove the build folder an AOTInductor compile of `package` leaves under inductor's cache `root`
    (the package holds what it needs): the new folder holding the package's own generated sources, so
    another process's build in progress is never touched; inductor's ISA probes stay for the next compile."""
    import zipfile

    before = set(os.listdir(root)) if root.is_dir() else set()
    try:
        yield
    finally:
        try:
            with zipfile.ZipFile(package) as z:
                ours = {Path(n).name for n in z.namelist() if n.endswith(".cpp")}
        except (OSError, zipfile.BadZipFile):
            ours = set()
        for name in set(os.listdir(root)) - before if root.is_dir() and ours else ():
            if any((root / name / f).is_file() for f in ours):
                shutil.rmtree(root / name, ignore_errors=True)


def _unguarded_class():
    """dynamo's `AOTCompiledFunction`, loaded without rebuilding its guard manager (0.55 s of a
    1.6 s load, thread CPU time, SmolLM2-135M): the cache key (torch, ISA, threads, the model's
    tensors, args and modules, the KV layout) and `_changed_source` decide whether an entry fits,
    and `DecodeStep` routes batches to the graph compiled for their shapes itself. Guards stay on
    for graphs compiled in this process (checked on their first call)."""
    from torch._dynamo.aot_compile import AOTCompiledFunction

    class Unguarded(AOTCompiledFunction):
        def __post_init__(self) -> None:  # AOTCompiledFunction's, less the guard manager
            self._artifacts.check_compatibility()  # Python / torch / device versions
            self.fn = self._artifacts.runtime_env.forward_callable(
                self._artifacts.backend_id, self._artifacts.compiled_fn, extra_globals=self._extra_globals)
            self._guard_check_enabled = False

        def __call__(self, *args, **kwargs):
            return self.fn(*args, **kwargs)

    return Unguarded


def _changed_source(fn) -> str | None:
    """The first source (Lagoon's or torch's) traced into `fn` that differs from the file now."""
    import importlib

    from torch._dynamo.package import _hash_sourcelines

    for code in fn.source_info().inlined_sources:
        module = importlib.import_module(code.module)
        if _hash_sourcelines(module, code.firstlineno, code.lastlineno) != code.checksum:
            return f"{code.module} lines {code.firstlineno}-{code.lastlineno}"
    return None


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
