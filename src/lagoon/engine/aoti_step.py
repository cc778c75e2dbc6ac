"""AOTInductor packages of the decode step: how `lagoon.engine.compile.DecodeStep` saves and loads a
graph on CPU, so that a warm start needs neither torch._dynamo nor torch._inductor.

`compile_package` exports the T = 1 forward non-strict (`torch.export`, through `StepModule`: the KV
pools registered as buffers the graph writes in place, the cache's bound tensors — rows / slots,
positions, mask — as inputs, the attended length S dynamic, the batch dimension static 1 or dynamic
in 2..max_batch) and packages it with AOTInductor *without* constants: the model's tensors and the KV
pools are handed to the package at load as user-managed constants (the package reads the model's own
memory: no copy of the weights on disk or in RAM). `load_package` opens it with the C++ loader alone
(`torch._C._aoti.AOTIModelPackageLoader`, ~0.01 s).

What a package does not carry, and where it is kept instead:
- constants inductor creates while lowering (not the model's tensors: e.g. the int4 group-size
  scalars of torch's `_weight_int4pack_mm_for_cpu` lowering, tensors created in `forward`) are
  captured from inductor's graph at compile time and saved beside the package
  (``<entry>.constants.pt``, written before the package, atomically); a package whose saved
  constants are missing is unloadable, never given guessed values;
- a package has no dynamo source check: its metadata records a hash of every source file that
  shapes the traced graph (`traced_sources`: Lagoon's model/ and moe/ packages, the engine's KV cache
  and kernel modules, and the file of every module class in the model), compared with the files at
  load; an edited file makes the package stale (recompiled by the caller);
- custom ops the graph calls: Lagoon's (``lagoon::q4_matvec``, ``i8_matvec``, the MoE matvecs,
  ``decode_attention``: `SHIMS`) are called as C functions (``csrc/aoti_shims.cpp``, in Lagoon's
  kernel library) that the package's library leaves undefined: `load_package` loads the kernel
  library and makes its symbols global first, and a package opened without it fails to load. Any
  other op outside aten / prims runs through AOTInductor's proxy executor, which finds it in the
  dispatcher by name and boxes its arguments on every call (~2-5 us each: a decode step makes 100+
  such calls). The names of all of them are recorded in the metadata and each is resolved before
  the package is opened; a package of an older `FORMAT` (proxy calls) is refused as stale.

This module is not a scheduler and does not decide when to compile (see `lagoon.engine.compile`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lagoon.atomic import atomic_path
from lagoon.engine import cpu_kernels

__all__ = ["PackagedStep", "StepModule", "compile_package", "constants_path", "load_package", "traced_sources",
           "AOTI_OPTIONS", "FORMAT", "SHIMS"]

# inductor / AOTInductor settings of every package (also hashed into the cache key by `compile`)
AOTI_OPTIONS: dict = {
    "aot_inductor.package_constants_in_so": False,  # the model's tensors are given at load (user-managed)
    # ... and live: their values at compile time must not be baked into the code. By default inductor
    # inlines a 0-d or a 1-D tensor of <= 8 values as literals (`GraphLowering.get_attr`): an MoE router's
    # window share, quarantine mask and bias over <= 8 experts (zeros at compile time, updated in place
    # between steps) were baked as zeros, so a package ignored the load penalty and quarantine
    "always_keep_tensor_constants": True,
    "emulate_precision_casts": True,  # round bf16 intermediates where eager does (greedy tokens match)
    "fx_graph_cache": False,  # the package is the cache; the constants capture needs a real codegen
}
FORMAT = "aoti-2"  # aoti-2: Lagoon's ops as C shims (aoti-1 called them through the proxy executor)
# op -> the C declaration of its shim in csrc/aoti_shims.cpp (inductor's ABI: handles, int64_t,
# double, the result through the last argument); inductor names the function aoti_torch_cpu_<op>
_H = "AtenTensorHandle"
SHIMS: dict[str, str] = {
    "lagoon::q4_matvec": f"AOTITorchError aoti_torch_cpu_q4_matvec({_H}, {_H}, int64_t, int64_t, {_H}*)",
    "lagoon::i8_matvec": f"AOTITorchError aoti_torch_cpu_i8_matvec({_H}, {_H}, int64_t, int64_t, {_H}*)",
    "lagoon::q4_moe_matvec": f"AOTITorchError aoti_torch_cpu_q4_moe_matvec({_H}, {_H}, {_H}, int64_t, int64_t, {_H}*)",
    "lagoon::i8_moe_matvec": f"AOTITorchError aoti_torch_cpu_i8_moe_matvec({_H}, {_H}, {_H}, int64_t, int64_t, {_H}*)",
    "lagoon::decode_attention": (f"AOTITorchError aoti_torch_cpu_decode_attention({_H}, {_H}, {_H}, {_H}, {_H}, "
                                 f"double, int64_t, {_H}*)"),
}
_BUILTIN_NAMESPACES = frozenset({"aten", "prims"})
_ROOT = Path(__file__).resolve().parent.parent  # src/lagoon
# Lagoon's sources a traced decode step runs beyond its module classes' own files
_TRACED = ("model", "moe", "engine/kv_cache.py", "engine/kernels.py", "engine/cpu_kernels.py",
           "engine/gguf_linear.py", "engine/gguf_moe.py", "engine/mxfp4.py", "engine/csrc", "quant")


def constants_path(package: Path) -> Path:
    """Where the constants inductor made for `package` are kept."""
    return package.with_suffix(".constants.pt")


class StepModule(nn.Module):
    """`forward(tokens [B, 1], pos [B, 1], bound) -> logits [B, V]`, the model's T = 1 forward over
    `cache`, with the cache's pools as this module's buffers (``kv_k_<layer>`` / ``kv_v_<layer>``,
    written in place by the graph) and `bound` the tensors of `cache.bound_tensors()` in order."""

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "cache", cache)  # not a submodule: its tensors are registered below
        self.layers = len(cache.k)
        for i in range(self.layers):
            self.register_buffer(f"kv_k_{i}", cache.k[i], persistent=False)
            self.register_buffer(f"kv_v_{i}", cache.v[i], persistent=False)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, bound: list[torch.Tensor]) -> torch.Tensor:
        c = self.cache
        pools = c.k, c.v
        c.k = [getattr(self, f"kv_k_{i}") for i in range(self.layers)]  # the traced buffers
        c.v = [getattr(self, f"kv_v_{i}") for i in range(self.layers)]
        it = iter(bound)  # the bound tuple's tensors from the inputs, its other entries kept
        c._bound = tuple(next(it) if isinstance(x, torch.Tensor) else x for x in c._bound)
        try:
            return self.model(tokens, pos, c)[:, -1]
        finally:
            c.k, c.v = pools

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the package may ask for, by the name it knows it under (tied weights under each
        name); also plain tensor attributes of modules, which export lifts under their path: bound live
        like buffers, so an in-place update between steps reaches the package (a saved copy would not)."""
        out = {}
        for prefix, mod in self.named_modules(remove_duplicate=False):
            for k, v in vars(mod).items():
                if isinstance(v, torch.Tensor) and not k.startswith("__"):
                    out[f"{prefix}.{k}" if prefix else k] = v
        out.update(self.named_parameters(remove_duplicate=False))
        out.update(self.named_buffers(remove_duplicate=False))
        return out


def traced_sources(model: nn.Module, cache) -> dict[str, str]:
    """Hash of every source file the traced step depends on, by path."""
    files: set[Path] = set()
    for rel in _TRACED:
        p = _ROOT / rel
        files.update(q for q in p.rglob("*") if q.suffix in (".py", ".cpp", ".h")) if p.is_dir() else files.add(p)
    import inspect

    for obj in {type(m) for m in model.modules()} | {type(cache)}:
        for klass in obj.__mro__:
            if klass.__module__.split(".")[0] in ("torch", "builtins"):
                continue
            with contextlib.suppress(TypeError, OSError):
                files.add(Path(inspect.getsourcefile(klass)).resolve())
    return {_portable(f): hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in sorted(files) if f.is_file()}


def _portable(f: Path) -> str:
    """Lagoon's own files by their path inside the package: checkouts sharing ~/.cache/lagoon with the
    same sources then share a package instead of recompiling it for each other's absolute paths."""
    return f"lagoon/{f.relative_to(_ROOT).as_posix()}" if f.is_relative_to(_ROOT) else str(f)


def _changed(recorded: dict[str, str]) -> str | None:
    for path, digest in recorded.items():
        f = _ROOT / path.removeprefix("lagoon/") if path.startswith("lagoon/") else Path(path)
        now = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.is_file() else "missing"
        if now != digest:
            return path
    return None


def _custom_ops(gm: torch.fx.GraphModule) -> list[str]:
    ops = set()
    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            for node in mod.graph.nodes:
                t = node.target
                if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace not in _BUILTIN_NAMESPACES:
                    ops.add(t.name().split(".")[0])  # "ns::name"
    return sorted(ops)


@contextlib.contextmanager
def _capturing_constants(known: set[str], into: dict[str, torch.Tensor]) -> Iterator[list[bool]]:
    """Record the constants inductor hands to AOTInductor's C++ codegen that are not `known` tensors."""
    from torch._inductor.codecache import AotCodeCompiler

    raw = AotCodeCompiler.__dict__["compile"]
    original = AotCodeCompiler.compile
    seen = [False]

    def compile(graph, *args, **kwargs):
        seen[0] = True
        for name in graph.constants:
            if name in graph.folded_constants:
                continue
            fqn = graph.dynamo_flat_name_to_original_fqn.get(name) or graph.allocated_constant_name.get(name, name)
            if fqn not in known:
                into[fqn] = graph.get_original_value_of_constant(name).detach().clone()
        return original(graph, *args, **kwargs)

    AotCodeCompiler.compile = staticmethod(compile)
    try:
        yield seen
    finally:
        AotCodeCompiler.compile = raw


def compile_package(model: nn.Module, cache, path: Path, *, batch: int, max_batch: int) -> None:
    """Export the step for `batch` (1: static; 2: dynamic in 2..max_batch) and package it to `path`
    (its constants first, then the package, each atomically). Leaves `cache` bound to padding."""
    from torch.export import Dim, export

    B = 1 if batch == 1 else max(2, min(3, max_batch))
    S = min(B + 6, cache.max_seq_len)  # not equal to B: export would unify the two sizes
    pos = torch.full((B, 1), S - 1, dtype=torch.int64)
    cache.prepare([None] * B, pos, static=True)  # padding slots: writes land in the scratch row / block
    bound = [t.clone() for t in cache.bound_tensors()]  # no input aliases another (KVCache binds pos itself)
    tokens = torch.zeros(B, 1, dtype=torch.int64)
    # S = max_seq_len (the very last position) is left out: at that length the KV row's `[:S]` slice
    # is the whole row and export specializes on it; `DecodeStep` runs that step eagerly
    dim_s = Dim("S", min=2, max=max(cache.max_seq_len - 1, 3))
    dim_b = Dim("B", min=2, max=max(max_batch, 3)) if batch > 1 else None

    def spec(t: torch.Tensor) -> dict[int, Dim] | None:
        d = {}
        if t.dim() >= 2 and t.shape[-1] == S:  # the attended length (mask, block reads)
            d[t.dim() - 1] = dim_s
        if dim_b is not None:
            d[0] = dim_b
        return d or None

    step = StepModule(model, cache)
    step.training = False  # this wrapper only: the model's modules keep their modes (the cache key hashes them)
    shapes = (spec(tokens), spec(pos), [spec(t) for t in bound])
    with torch.no_grad():
        ep = export(step, (tokens, pos.clone(), bound), dynamic_shapes=shapes, strict=False)
    known = set(step.tensors())
    ops = _custom_ops(ep.graph_module)
    meta = {"format": FORMAT, "ops": ",".join(ops), "sources": json.dumps(traced_sources(model, cache))}
    extras: dict[str, torch.Tensor] = {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt2") as tmp, torch.no_grad():
        with _capturing_constants(known, extras) as seen:
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(tmp), inductor_configs={**AOTI_OPTIONS, "aot_inductor.metadata": meta,
                                                             "aot_inductor.custom_ops_to_c_shims": _shims(ops)})
        if not seen[0]:
            raise RuntimeError("AOTInductor's codegen did not run, so its constants could not be recorded")
        meta_extras = sorted(extras)
        with atomic_path(constants_path(path)) as ctmp:
            torch.save({"names": meta_extras, "tensors": extras}, ctmp)
    cache.prepare([None] * B, pos, static=True)


class PackagedStep:
    """A loaded package: `step(tokens, pos) -> logits [B, V]` over the bound cache."""

    def __init__(self, loader, cache, keep: dict[str, torch.Tensor]) -> None:
        self.loader, self.cache = loader, cache
        self._keep = keep  # user-managed constants: the package reads these tensors' memory

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.loader.run([tokens, pos, *self.cache.bound_tensors()])[0]


def _shims(ops: list[str]) -> dict:
    """inductor's `custom_ops_to_c_shims` for the graph's `ops` that have a shim."""
    return {getattr(torch.ops.lagoon, op.split("::")[1]).default: [SHIMS[op]] for op in ops if op in SHIMS}


def _resolve_ops(ops: list[str]) -> None:
    if any(op.startswith("lagoon::") for op in ops):
        lib = cpu_kernels.library()
        if lib is None:
            raise RuntimeError(f"the package calls Lagoon's ops but its kernel library is unavailable "
                               f"({cpu_kernels.unavailable_reason()})")
        _export_symbols(lib)  # whatever this process's SHIMS: the package's own library decides what it calls
    for op in ops:
        ns, name = op.split("::")
        try:
            getattr(getattr(torch.ops, ns), name)
        except (AttributeError, RuntimeError):
            raise RuntimeError(f"the package calls {op}, which is not registered in this process") from None


def _export_symbols(lib: Path) -> None:
    # torch.ops.load_library opens the kernel library RTLD_LOCAL; the package's library finds the
    # shims (undefined in it) only among global symbols: reopening the loaded file with
    # RTLD_NOLOAD | RTLD_GLOBAL promotes it, loading nothing new
    import ctypes
    import os

    try:
        ctypes.CDLL(str(lib), mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError as exc:  # Lagoon's ops were registered from another file than `lib`
        raise RuntimeError(f"the package calls Lagoon's ops as C shims, but {lib} is not the loaded kernel "
                           f"library ({exc})") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The package's own metadata (what `compile_package` recorded), without opening its library."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("_metadata.json"))
        return json.loads(z.read(name))


def load_package(path: Path, model: nn.Module, cache) -> PackagedStep:
    """Open `path` over `model`'s and `cache`'s own tensors; raises (with the reason) when the package
    is unreadable, stale (a traced source changed) or lacks a constant."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise RuntimeError(f"the package's format is {meta.get('format')!r}, not {FORMAT!r} (compiled by an older Lagoon)")
    changed = _changed(json.loads(meta.get("sources", "{}")))
    if changed:
        raise RuntimeError(f"the traced source changed since it was compiled: {changed}")
    ops = [op for op in meta.get("ops", "").split(",") if op]
    _resolve_ops(ops)
    saved = torch.load(constants_path(path), weights_only=True) if constants_path(path).is_file() else None
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1)  # one caller at a time: no locks
    state = StepModule(model, cache).tensors()
    if saved is not None:
        state.update(saved["tensors"])
    missing = [f for f in loader.get_constant_fqns() if f not in state]
    if missing:
        raise RuntimeError(f"no tensor for the package's constant(s) {', '.join(missing[:3])}"
                           f"{' ...' if len(missing) > 3 else ''} (its saved constants are missing or stale)")
    consts = {f: state[f] for f in loader.get_constant_fqns()}
    loader.load_constants(consts, False, True, True)  # user-managed: the package reads these tensors
    return PackagedStep(loader, cache, consts)
