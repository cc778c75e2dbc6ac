"""Lagoon's native CPU kernels: `csrc/q4_matvec.cpp`, a 4-bit GGUF matrix-vector product with int8
activations (`torch.ops.lagoon.q4_matvec`) and the same for int8 weights in blocks of 32 (GGUF Q8_0;
the output head: `torch.ops.lagoon.i8_matvec`), `csrc/moe_matvec.cpp`, both for an MoE layer's routed
experts (`moe_matvec`: each slot reads only its chosen expert's tiles), `csrc/decode_attention.cpp`,
decode attention read in place from a KV pool through slot indices (`decode_attention`, used by
`lagoon.engine.kv_cache`'s `attend`); built from source at first use and loaded as torch ops.

Why: torch's `_weight_int4pack_mm_for_cpu` widens every nibble to float and multiplies in float
(~11 GB/s of weights on this machine, half of a decode step of the embedded model). Quantizing the
activation row to int8 per block of 32 (llama.cpp's Q8_1 idea) turns each block's dot product into
integer multiply-adds (`vpdpbusd` on AVX-512 VNNI, `vpmaddubsw` + `vpmaddwd` on AVX2), 3-6x faster
per call at decode shapes (benchmarks/bench_kernels.py). The cost is the activations' rounding:
per block of 32 a relative error of about 1/254 of the block's largest value.

Build: the sources are compiled once with the C++ compiler `$CXX` (default ``g++``, the one inductor
uses too) against torch's headers into ``cache_root()/kernels/<tag>/lagoon_kernels.so``, atomically;
`tag` hashes the sources, torch's version, the compiler and its flags. A later start loads that file
directly (no build machinery imported). If building or loading fails (no compiler, say) the reason
is logged once and `available()` is False: `lagoon.engine.kernels` then plans torch's int4 / int8
kernels as before. ``LAGOON_NATIVE_KERNELS=0`` skips the library the same way. The ops are
registered with a fake (meta) implementation, so inductor's compiled decode step calls them as
extern kernels.

Threads: the kernels split their work on Lagoon's own pool (`csrc/pool.h`, `torch.get_num_threads()`
threads: the caller and persistent workers claiming chunks from an atomic counter), not on torch's
OpenMP pool, whose barrier at the end of every parallel region waits for a thread the OS has
descheduled (a decode step runs ~150 of them: docs/architecture.md "Under load"). The caller takes
every chunk a late worker has not claimed and waits only for chunks in flight. `kernel_pool(False)`
or ``LAGOON_KERNEL_POOL=0`` (read when the library loads) runs them on `at::parallel_for` as before;
`lagoon.engine.compile` then also leaves inductor's own loops parallel (see `pool_in_use`).
``torch.ops.lagoon.pool_tune(chunks_per_thread, caller_spin_us, worker_spin_us)`` changes the pool's
chunking and spin times for experiments (defaults 8, 50, 100: longer spins lost 40-50% decode speed
on a 2-core machine shared with other jobs).

`pack_q4` and `pack_i8` own the weight layouts the kernel reads (described in the C++ source); `Q4_LAYOUT` names it
for caches of packed weights. This module does not choose kernels (`lagoon.engine.kernels` does).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from lagoon.atomic import atomic_path
from lagoon.cache_dir import cache_root

__all__ = ["ISA_CODES", "Q4_LAYOUT", "SOURCE", "available", "build_tag", "library", "pack_q4", "q4_matvec",
           "unavailable_reason", "TILE", "cpu_has", "i8_matvec", "pack_i8", "quantize_i8", "moe_matvec",
           "decode_attention", "SOURCES", "kernel_pool", "pool_in_use", "pool_stats", "PoolStats"]

log = logging.getLogger("lagoon.engine")

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "q4_matvec.cpp"
# every C++ file under csrc/ is compiled into the one library (each registers its ops with
# TORCH_LIBRARY_FRAGMENT or, q4_matvec.cpp, TORCH_LIBRARY); headers are hashed into the tag too
SOURCES = tuple(sorted(CSRC.glob("*.cpp")))
ISA_CODES = {"default": 0, "avx2": 1, "avx512": 2}  # the C++ `isa` argument
Q4_LAYOUT = "q4-tile16-f16dm-1|i8-tile16-sums-1"  # raise when pack_q4's or pack_i8's layout changes
TILE = 16  # output rows a tile
_TILE_BYTES = 4 * 64 + 2 * TILE * 2
_I8_TILE_BYTES = 8 * 64 + TILE * 2 + TILE * 2
_FLAGS = ("-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w")


def _compiler() -> str:
    return os.environ.get("CXX") or "g++"


def build_tag() -> str:
    """Hash of what the built library depends on: its source, torch, the compiler and flags."""
    h = hashlib.sha256()
    for f in sorted(CSRC.glob("*.[ch]*")):  # the .cpp files and the headers they share
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(f"|{torch.__version__}|{_compiler()}|{' '.join(_FLAGS)}|{torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return h.hexdigest()[:16]


@dataclass
class _State:
    tried: bool = False
    path: Path | None = None
    reason: str = ""


_state = _State()
_lock = threading.Lock()


def _enabled() -> bool:
    return os.environ.get("LAGOON_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def library() -> Path | None:
    """The loaded kernel library (built first if needed), or None when it cannot be had (the reason
    is logged once per process and kept in `unavailable_reason()`)."""
    with _lock:
        if not _state.tried:
            _state.tried = True
            try:
                if not _enabled():
                    raise _Off("LAGOON_NATIVE_KERNELS=0")
                _state.path = _load()
            except _Off as exc:
                _state.reason = str(exc)
                log.info("native CPU kernels off (%s); using torch's int4 / int8 kernels", exc)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _state.reason = f"{type(exc).__name__}: {exc}"
                log.warning("native CPU kernels unavailable (%s); using torch's int4 / int8 kernels", _state.reason)
        return _state.path


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str:
    library()
    return _state.reason


class _Off(Exception):
    pass


def _load() -> Path:
    target = cache_root() / "kernels" / build_tag() / "lagoon_kernels.so"
    if not target.is_file():
        _build(target)
    if not hasattr(torch.ops.lagoon, "decode_attention"):  # a second load (another cache dir) would re-register
        try:
            torch.ops.load_library(str(target))
        except OSError as exc:  # a truncated or foreign file: nothing got loaded, so build it again once
            log.warning("%s does not load (%s); rebuilding it", target, exc)
            target.unlink(missing_ok=True)
            _build(target)
            try:
                torch.ops.load_library(str(target))
            except OSError as again:
                raise OSError(f"{target} does not load even after a rebuild ({again}); check $CXX") from None
        _register_fake()
    return target


def _build(target: Path) -> None:
    from torch.utils.cpp_extension import include_paths, library_paths  # only when building

    log.warning("building Lagoon's native CPU kernels into %s (once, ~10 s)", target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".so") as tmp:
        cmd = [*shlex.split(_compiler()), *_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in include_paths()), *map(str, SOURCES), *(f"-L{p}" for p in library_paths()),
               "-lc10", "-ltorch_cpu", "-o", str(tmp)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
        except subprocess.CalledProcessError as exc:
            tail = "\n".join((exc.stderr or "").strip().splitlines()[-5:])
            raise RuntimeError(f"{cmd[0]} failed (exit {exc.returncode}): {tail}") from None


def _register_fake() -> None:
    @torch.library.register_fake("lagoon::q4_matvec")
    def _(x: torch.Tensor, packed: torch.Tensor, n: int, isa: int) -> torch.Tensor:
        torch._check(x.dim() == 2 and packed.dim() == 3 and x.shape[1] == packed.shape[1] * 32)
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("lagoon::i8_matvec")
    def _(x: torch.Tensor, packed: torch.Tensor, n: int, isa: int) -> torch.Tensor:
        torch._check(x.dim() == 2 and packed.dim() == 3 and x.shape[1] == packed.shape[1] * 32)
        return x.new_empty((x.shape[0], n))

    for op in ("q4_moe_matvec", "i8_moe_matvec"):  # lagoon.engine.packed_experts
        @torch.library.register_fake(f"lagoon::{op}")
        def _(x: torch.Tensor, packed: torch.Tensor, ids: torch.Tensor, n: int, isa: int) -> torch.Tensor:
            torch._check(packed.dim() == 4 and x.shape[-1] == packed.shape[2] * 32 and ids.dim() == 2)
            return x.new_empty((ids.shape[0], ids.shape[1], n), dtype=torch.float32)

    @torch.library.register_fake("lagoon::decode_attention")
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
          scale: float, isa: int) -> torch.Tensor:
        torch._check(q.dim() == 3 and k.dim() == 3 and v.dim() == 3 and slots.dim() == 2)
        return q.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def _require() -> None:
    if library() is None:
        raise RuntimeError(f"Lagoon's native CPU kernels are unavailable: {_state.reason}")


def cpu_has(isa: str) -> bool:
    """Whether this CPU runs the kernel variant `isa` (the loaded library asks the CPU)."""
    return library() is not None and bool(torch.ops.lagoon.cpu_has(ISA_CODES[isa]))


def q4_matvec(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    """x [M, K] (float32 or bf16) · Wᵀ -> [M, n] in x's dtype, W packed by `pack_q4`; `isa` one of
    `ISA_CODES` (the CPU must have it)."""
    _require()
    return torch.ops.lagoon.q4_matvec(x, packed, n, ISA_CODES[isa])


def i8_matvec(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str) -> torch.Tensor:
    """x [M, K] (float32 or bf16) · Wᵀ -> [M, n] in x's dtype, W packed by `pack_i8`."""
    _require()
    return torch.ops.lagoon.i8_matvec(x, packed, n, ISA_CODES[isa])


def moe_matvec(x: torch.Tensor, packed: torch.Tensor, ids: torch.Tensor, n: int, isa: str, layout: str) -> torch.Tensor:
    """The routed experts' product (`csrc/moe_matvec.cpp`): x [T, K] or [T, k, K], `packed` [E, ...]
    (one `pack_q4` (layout ``q4``) or `pack_i8` (``i8``) weight per expert), ids [T, k] -> [T, k, n]
    float32, each slot through its own expert."""
    _require()
    op = torch.ops.lagoon.q4_moe_matvec if layout == "q4" else torch.ops.lagoon.i8_moe_matvec
    return op(x, packed, ids, n, ISA_CODES[isa])

def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor,
                     scale: float, isa: str) -> torch.Tensor:
    """One new token per sequence attending over its cached keys, read from the pools in place:
    q [B, H, D], k [N, K, D] / v [N, K, Dv] pools (float32 or bf16), slots [B, S] int64 (the slot of
    each position), pos [B] int64 (the query's position: it sees keys 0..pos) -> [B, H, Dv] in q's
    dtype; H / K query heads share a kv head (SDPA's enable_gqa). See csrc/decode_attention.cpp."""
    _require()
    return torch.ops.lagoon.decode_attention(q, k, v, slots, pos, scale, ISA_CODES[isa])


def kernel_pool(on: bool | None = None) -> bool:
    """Whether the kernels run on Lagoon's pool (True) or torch's `at::parallel_for`; `on` switches
    it for the process (from the next call) and the previous setting is returned. The library must
    be available."""
    _require()
    return bool(torch.ops.lagoon.pool_set(-1 if on is None else int(bool(on))))


def pool_in_use() -> bool:
    """The kernels are loaded and run on Lagoon's pool (what a compiled step's loops are built for)."""
    return library() is not None and kernel_pool()


@dataclass(frozen=True)
class PoolStats:
    workers: int  # alive (threads - 1 once a job has run)
    jobs: int  # parallel calls run on the pool so far
    last_chunks: int  # chunks of the last job
    last_caller_chunks: int  # of which the calling thread ran
    held: bool  # a worker is stalled by the test hook (`torch.ops.lagoon.pool_hold`) now
    stalls: int  # times the hook has stalled a worker
    crowded: int  # calls that found another thread's job on the pool and ran inline on their own thread


def pool_stats() -> PoolStats:
    _require()
    w, j, c, m, h, s, x = torch.ops.lagoon.pool_stats()
    return PoolStats(w, j, c, m, bool(h), s, x)


def quantize_i8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (d [N, K/32] f16, q [N, K] int8 in -127..127): GGUF Q8_0's rounding (d =
    block absmax / 127), so a weight dequantized from a Q8_0 file gets its own codes back."""
    N, K = w.shape
    blocks = w.float().reshape(N, K // 32, 32)
    d = (blocks.abs().amax(-1) / 127).to(torch.float16)  # [N, K/32]
    inv = torch.where(d > 0, 1 / d.float(), torch.zeros((), dtype=torch.float32))
    q = torch.round(blocks * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8).reshape(N, K)
    return d, q


def pack_i8(d: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The kernel's layout of an int8 weight w = d·q in blocks of 32 along each row (d [N, K/32],
    stored as f16; q [N, K] int8 in -127..127): uint8 [ceil(N/16), K/32, 576]."""
    N, K = q.shape
    if K % 32:
        raise ValueError(f"pack_i8: in_features {K} is not a multiple of 32")
    if q.numel() and int(q.min()) < -127:  # AVX2 moves x's sign onto w: -128 would overflow
        raise ValueError("pack_i8: codes must lie in -127..127")
    nt, kb = -(-N // TILE), K // 32
    pad = nt * TILE - N
    d = d.reshape(N, kb).to(torch.float16)
    if pad:
        q, d = torch.cat([q, q.new_zeros(pad, K)]), torch.cat([d, d.new_zeros(pad, kb)])
    q = q.reshape(nt, TILE, kb, 8, 4).permute(0, 2, 3, 1, 4)  # [tile, block, chunk, row, byte]
    sums = q.to(torch.int32).sum((2, 4)).to(torch.int16)  # [tile, block, row]: |sum| <= 32·127
    d = d.reshape(nt, TILE, kb).transpose(1, 2)  # [tile, block, row]
    out = torch.cat([q.reshape(nt, kb, 512).view(torch.uint8), sums.contiguous().view(torch.uint8),
                     d.contiguous().view(torch.uint8)], dim=-1)
    assert out.shape[-1] == _I8_TILE_BYTES
    return out.contiguous()


def pack_q4(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, out_features: int,
            in_features: int) -> torch.Tensor:
    """The kernel's layout of a weight w = d·q + m (blocks of 32 along each row; d, m [N*K/32] any
    float dtype, stored as f16; q [N*K/32, 32] codes 0..15): uint8 [ceil(N/16), K/32, 320]."""
    N, K = out_features, in_features
    if K % 32:
        raise ValueError(f"pack_q4: in_features {K} is not a multiple of 32")
    nt, kb = -(-N // TILE), K // 32
    q = q.reshape(N, kb, 32).to(torch.uint8)
    d, m = (t.reshape(N, kb).to(torch.float16) for t in (d, m))
    pad = nt * TILE - N  # zero rows: their outputs are never written
    if pad:
        q = torch.cat([q, q.new_zeros(pad, kb, 32)])
        d, m = (torch.cat([t, t.new_zeros(pad, kb)]) for t in (d, m))
    q = q.reshape(nt, TILE, kb, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)  # [tile, block, chunk, row, byte, nibble]
    nibbles = (q[..., 0] | (q[..., 1] << 4)).reshape(nt, kb, 256)
    d, m = (t.reshape(nt, TILE, kb).transpose(1, 2).contiguous().view(torch.uint8) for t in (d, m))  # [nt, kb, 32]
    out = torch.cat([nibbles, d, m], dim=-1).contiguous()
    assert out.shape[-1] == _TILE_BYTES
    return out
