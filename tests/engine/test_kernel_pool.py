"""Lagoon's kernel thread pool (`csrc/pool.cpp`, `lagoon.engine.cpu_kernels.kernel_pool`): every
kernel that runs on it (q4 / i8 matvec, the MoE expert products, decode attention) gives exactly
what it gives on torch's `at::parallel_for` (each output element is computed by the same code
whatever thread runs its chunk, so the comparison is bit-exact) on fresh random inputs, across
chunk counts and thread counts 1-4; a worker stalled by the test hook before it claims anything
does not hold the caller back (the caller takes every chunk), one stalled holding a chunk is waited
for; a process exits cleanly with a stalled worker, and a forked child runs the kernels."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from lagoon.engine import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="Lagoon's native kernels did not build")


def _isa() -> str:
    return next(i for i in ("avx512", "avx2", "default") if cpu_kernels.cpu_has(i))


@pytest.fixture
def threads():
    before, was = torch.get_num_threads(), cpu_kernels.kernel_pool()
    yield
    torch.set_num_threads(before)
    cpu_kernels.kernel_pool(was)
    torch.ops.lagoon.pool_release()


def _q4(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    blocks = N * K // 32
    d = torch.rand(blocks, 1, generator=g) * 0.02 + 1e-3
    m = -torch.rand(blocks, 1, generator=g) * 0.15
    q = torch.randint(0, 16, (blocks, 32), generator=g, dtype=torch.uint8)
    return cpu_kernels.pack_q4(d, m, q, N, K)


def _i8(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    return cpu_kernels.pack_i8(*cpu_kernels.quantize_i8(torch.randn(N, K, generator=g)))


def _cases(g: torch.Generator, isa: str):
    """(name, call) pairs on fresh random inputs: tile counts 1..3072, so 1..(8 x threads) chunks."""
    for N, K, M in [(16, 64, 1), (37, 96, 3), (576, 576, 1), (1536, 576, 5), (49152 // 16, 576, 2)]:
        wq, wi = _q4(N, K, g), _i8(N, K, g)
        x = torch.randn(M, K, generator=g)
        yield f"q4 {N}x{K} M={M}", lambda x=x, w=wq, N=N: cpu_kernels.q4_matvec(x, w, N, isa)
        yield f"i8 {N}x{K} M={M} bf16", lambda x=x.bfloat16(), w=wi, N=N: cpu_kernels.i8_matvec(x, w, N, isa)
    for layout, E, k, N, K, T in [("q4", 8, 2, 256, 128, 3), ("i8", 16, 4, 96, 64, 5), ("q4", 4, 2, 40, 96, 1)]:
        packed = torch.stack([(_q4 if layout == "q4" else _i8)(N, K, g) for _ in range(E)])
        ids = torch.randint(0, E, (T, k), generator=g)
        x = torch.randn(T, k, K, generator=g) if layout == "i8" else torch.randn(T, K, generator=g)
        yield f"moe {layout} E={E} k={k}", lambda x=x, p=packed, i=ids, N=N, lay=layout: cpu_kernels.moe_matvec(
            x, p, i, N, isa, lay)
    for B, H, Kh, D, lens in [(1, 9, 3, 64, [1500]), (3, 8, 2, 64, [5, 700, 300]), (2, 4, 4, 32, [40, 9])]:
        S, pool = max(lens), sum(lens) + 8
        kp = torch.randn(pool, Kh, D, generator=g).bfloat16()
        vp = torch.randn(pool, Kh, D, generator=g).bfloat16()
        slots = torch.stack([torch.randperm(pool, generator=g)[:S] for _ in range(B)])
        q = torch.randn(B, H, D, generator=g)
        pos = torch.tensor(lens) - 1
        yield f"attention B={B} S={lens}", lambda q=q, kp=kp, vp=vp, s=slots, p=pos, D=D: cpu_kernels.decode_attention(
            q, kp, vp, s, p, D**-0.5, isa)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_kernel_on_the_pool_equals_at_parallel_for(threads, n):
    torch.set_num_threads(n)
    g = torch.Generator().manual_seed(100 + n)
    chunk_counts = set()
    for name, call in _cases(g, _isa()):
        cpu_kernels.kernel_pool(False)
        ref = call()
        cpu_kernels.kernel_pool(True)
        jobs = cpu_kernels.pool_stats().jobs
        for _ in range(3):  # different claim orders each time
            y = call()
            assert torch.equal(y, ref), f"{name} at {n} threads differs from at::parallel_for"
        st = cpu_kernels.pool_stats()
        if st.jobs > jobs:
            chunk_counts.add(st.last_chunks)
    if n > 1:  # the pool really split the work, in many ways
        assert len(chunk_counts) >= 3 and max(chunk_counts) >= 4 * n, chunk_counts
        assert cpu_kernels.pool_stats().workers == n - 1


def _head(g: torch.Generator, isa: str):
    N, K = 49152 // 8, 576  # a big job: 384 tiles
    w = _q4(N, K, g)
    return lambda x: cpu_kernels.q4_matvec(x, w, N, isa), K


def _reference(call, x):
    was = cpu_kernels.kernel_pool(False)
    try:
        return call(x)
    finally:
        cpu_kernels.kernel_pool(was)


@pytest.mark.parametrize("n", [2, 3])
def test_a_worker_stalled_before_claiming_does_not_hold_the_caller(threads, n):
    torch.set_num_threads(n)
    g = torch.Generator().manual_seed(7 + n)
    call, K = _head(g, _isa())
    call(torch.randn(1, K, generator=g))  # the crew is up
    torch.ops.lagoon.pool_hold(1, 60_000_000)  # stalled until released (at most a minute)
    for _ in range(2000):  # until a worker has woken to a job and stalled on it
        call(torch.randn(1, K, generator=g))
        if cpu_kernels.pool_stats().held:
            break
    assert cpu_kernels.pool_stats().held, "no worker ever picked up a job"
    try:
        for _ in range(20):
            x = torch.randn(2, K, generator=g)
            assert torch.equal(call(x), _reference(call, x))
            st = cpu_kernels.pool_stats()
            # returned while the worker still stalls: the caller did not wait for it
            assert st.held
            if n == 2:  # the only worker is stalled: the caller took every chunk
                assert st.last_caller_chunks == st.last_chunks > 1
            else:
                assert st.last_chunks > 1
    finally:
        torch.ops.lagoon.pool_release()
    for _ in range(2000):
        if not cpu_kernels.pool_stats().held:
            break
        time.sleep(0.01)
    assert not cpu_kernels.pool_stats().held


def test_a_worker_stalled_holding_a_chunk_is_waited_for(threads):
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(11)
    call, K = _head(g, _isa())
    call(torch.randn(1, K, generator=g))
    stalls = cpu_kernels.pool_stats().stalls
    torch.ops.lagoon.pool_hold(2, 200_000)  # the next worker to claim a chunk sits on it for 0.2 s
    caught = 0
    for _ in range(200):
        x = torch.randn(3, K, generator=g)
        y = call(x)
        st = cpu_kernels.pool_stats()
        assert torch.equal(y, _reference(call, x))  # the stalled chunk was finished before the call returned
        if st.stalls > stalls:
            assert st.last_caller_chunks < st.last_chunks  # the worker's chunk was in this call
            caught += 1
            break
    assert caught == 1, "no worker ever claimed a chunk"


def test_calls_from_two_threads_at_once_are_both_right(threads):
    import threading

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(5)
    call, K = _head(g, _isa())
    xs = [torch.randn(2, K, generator=g) for _ in range(4)]
    refs = [_reference(call, x) for x in xs]
    crowded, wrong = cpu_kernels.pool_stats().crowded, []

    def hammer(k: int) -> None:
        torch.set_num_threads(2)
        for i in range(60):
            if not torch.equal(call(xs[(i + k) % 4]), refs[(i + k) % 4]):
                wrong.append((k, i))

    ts = [threading.Thread(target=hammer, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    hammer(2)
    for t in ts:
        t.join()
    assert not wrong
    # the op releases the GIL, so the threads did meet: the later one ran its call inline
    assert cpu_kernels.pool_stats().crowded > crowded


_EXIT = r"""
import os, sys, torch
from lagoon.engine import compute, cpu_kernels
torch.set_num_threads(2)
assert cpu_kernels.kernel_pool() == (os.environ["LAGOON_KERNEL_POOL"] == "1")
g = torch.Generator().manual_seed(3)
blocks = 512 * 256 // 32
w = cpu_kernels.pack_q4(torch.rand(blocks, 1, generator=g) * 0.02, -torch.rand(blocks, 1, generator=g) * 0.1,
                        torch.randint(0, 16, (blocks, 32), generator=g, dtype=torch.uint8), 512, 256)
x = torch.randn(2, 256, generator=g)
ref = cpu_kernels.q4_matvec(x, w, 512, "default")
def on_compute():
    torch.set_num_threads(2)
    return cpu_kernels.q4_matvec(x, w, 512, "default")
assert torch.equal(compute.call(on_compute), ref)
if cpu_kernels.kernel_pool():  # (libgomp's pool hangs in a forked child: at::parallel_for is not tried)
    pid = os.fork()
    if pid == 0:  # the child has no workers: a fresh crew
        os._exit(0 if torch.equal(cpu_kernels.q4_matvec(x, w, 512, "default"), ref) else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
torch.ops.lagoon.pool_hold(1, 600_000_000)
for _ in range(200):
    cpu_kernels.q4_matvec(x, w, 512, "default")
print("exiting", cpu_kernels.pool_stats().held, flush=True)
"""


@pytest.mark.parametrize("pool", ["1", "0"])
def test_the_process_exits_cleanly_and_forks_with_the_pool(pool):
    import os

    env = {**os.environ, "LAGOON_KERNEL_POOL": pool}
    out = subprocess.run([sys.executable, "-c", _EXIT], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "exiting" in out.stdout and "terminate called" not in out.stderr


def test_the_compiled_steps_loops_and_cache_key_follow_the_pool(threads):
    from lagoon.engine.compile import _inductor_options, compile_key

    cpu, m = torch.device("cpu"), torch.nn.Linear(32, 32)
    cpu_kernels.kernel_pool(True)
    on = _inductor_options(cpu), compile_key(m, cpu)
    cpu_kernels.kernel_pool(False)
    off = _inductor_options(cpu), compile_key(m, cpu)
    assert on[0]["cpp.threads"] == 1 and "cpp.threads" not in off[0]
    assert on[1] != off[1]  # a step compiled for one is never loaded for the other


@pytest.mark.slow  # two cold AOTInductor compiles of a tiny model (20-110 s each on 2 shared cores)
def test_a_package_built_for_the_pool_has_no_openmp_region(tmp_path, monkeypatch, threads):
    import zipfile

    from test_decode_attention import _decode, _model

    from lagoon.engine.compile import DecodeStep
    from lagoon.engine.kv_cache import make_cache, use_native_attention
    from lagoon.model.args import ModelArgs

    monkeypatch.setenv("LAGOON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LAGOON_COMPILE_BACKEND", "aoti")
    torch.set_num_threads(2)
    # an MLP of 2048: inductor splits its SiLU-and-multiply loop over 2 threads unless told not to
    args = ModelArgs(family="llama", vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                     intermediate_size=2048, max_position_embeddings=256)
    kw = dict(paged=True, max_batch=2, max_seq_len=64, dtype=torch.float32, block_size=8)
    prompts = [[5, 9, 33, 2, 71]]
    sources = {}
    for on in (True, False):
        cpu_kernels.kernel_pool(on)
        m = _model(args, torch.float32)
        with torch.no_grad():
            ref_cache = make_cache(args, **kw)
            use_native_attention(m, ref_cache)
            ref = _decode(m, ref_cache, prompts, 3)
            cache = make_cache(args, **kw)
            step = DecodeStep(m, cache, max_batch=2, compile=True, progress=lambda line: None)
            got = _decode(m, cache, prompts, 3, step)
        assert step.compiled_buckets == {1} and not step.eager_reason
        assert float((got - ref).norm() / ref.norm()) <= 1e-4
        with zipfile.ZipFile(step.entry(1)) as z:
            sources[on] = "\n".join(z.read(n).decode() for n in z.namelist() if n.endswith("kernel.cpp"))
    assert "#pragma omp" in sources[False]  # (the check below can fail)
    assert "#pragma omp" not in sources[True]
