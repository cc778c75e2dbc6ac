"""Lagoon's MoE expert kernels (`csrc/moe_matvec.cpp`: `torch.ops.lagoon.q4_moe_matvec` /
`i8_moe_matvec`, through `cpu_kernels.moe_matvec`): every slot against the float product with its
expert's 4-bit / 8-bit weight on fresh random inputs (each activation off by at most half an int8
step of its block, as the dense kernel's test bounds it), equal to the dense op on that expert alone,
for shared and per-slot inputs, expert counts, k and shapes that are not multiples of a tile, each
ISA variant; bad ids and shapes are refused; the op inside a compiled graph equals eager."""

from __future__ import annotations

import pytest
import torch

from lagoon.engine import cpu_kernels

ISAS = ("avx512", "avx2", "default")


def _need(isa: str) -> None:
    if not cpu_kernels.cpu_has(isa):
        pytest.skip(f"this CPU has no {isa}, or the kernels did not build ({cpu_kernels.unavailable_reason()})")


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|y − x·wᵀ| allowed [M, N] (see tests/engine/test_cpu_kernels.py): amax/254 per block of x."""
    M, K = x.shape
    amax = x.abs().reshape(M, K // 32, 32).amax(-1)
    wabs = w.abs().reshape(w.shape[0], K // 32, 32).sum(-1)
    return (amax / 254) @ wabs.t() * (1 + 1e-3) + 1e-5 * (x.abs() @ w.abs().t())


def _experts(layout: str, E: int, N: int, K: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed [E, ...], the float weights the kernel holds [E, N, K])."""
    packs, ws = [], []
    for _ in range(E):
        if layout == "q4":
            blocks = N * K // 32
            d = torch.rand(blocks, 1, generator=g) * 0.02 + 1e-3
            m = -torch.rand(blocks, 1, generator=g) * 0.15
            q = torch.randint(0, 16, (blocks, 32), generator=g, dtype=torch.uint8)
            ws.append((q.float() * d.half().float() + m.half().float()).reshape(N, K))
            packs.append(cpu_kernels.pack_q4(d, m, q, N, K))
        else:
            d, q = cpu_kernels.quantize_i8(torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g))
            ws.append((q.float().reshape(N, K // 32, 32) * d.float().unsqueeze(-1)).reshape(N, K))
            packs.append(cpu_kernels.pack_i8(d, q))
    return torch.stack(packs), torch.stack(ws)


def _dense(x: torch.Tensor, packed: torch.Tensor, n: int, isa: str, layout: str) -> torch.Tensor:
    op = cpu_kernels.q4_matvec if layout == "q4" else cpu_kernels.i8_matvec
    return op(x, packed, n, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["q4", "i8"])
@pytest.mark.parametrize("E,k,N,K", [(8, 2, 40, 96), (5, 3, 16, 32), (16, 4, 67, 160), (3, 3, 1, 64)])
def test_each_slot_matches_its_experts_float_product(isa, layout, E, k, N, K):
    _need(isa)
    g = torch.Generator().manual_seed(E * 7919 + k * 101 + N * 13 + K + (layout == "i8"))
    packed, w = _experts(layout, E, N, K, g)
    for T in (1, 2, 5, 11):  # decode, a small batch, a prefill chunk: slots of one expert share its tiles
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k], distinct per token
        if T == 11:
            ids[:, 0] = ids[0, 0]  # one expert chosen by every token: more than 4 rows of one expert
        for per_slot in (False, True):
            shape = (T, k, K) if per_slot else (T, K)
            x = torch.randn(*shape, generator=g) * torch.rand(K, generator=g) * 3  # uneven channel scales
            y = cpu_kernels.moe_matvec(x, packed, ids, N, isa, layout)
            assert y.shape == (T, k, N) and y.dtype == torch.float32
            for t in range(T):
                for j in range(k):
                    xs = x[t, j : j + 1] if per_slot else x[t : t + 1]
                    e = int(ids[t, j])
                    ref = xs.double() @ w[e].double().t()
                    assert bool(((y[t, j].double() - ref[0]).abs() <= _bound(xs, w[e])[0].double()).all())
                    # the dense op on that expert alone gives the same bits (batch-invariant tiles)
                    assert torch.equal(y[t, j], _dense(xs, packed[e], N, isa, layout)[0])
            xb = x.bfloat16()  # bf16 in, fp32 out: the same quantized activations as bf16's fp32 values
            assert torch.equal(cpu_kernels.moe_matvec(xb, packed, ids, N, isa, layout),
                               cpu_kernels.moe_matvec(xb.float(), packed, ids, N, isa, layout))


def test_isas_agree_and_repeated_ids_are_fine():
    _need("avx2")
    g = torch.Generator().manual_seed(4)
    packed, w = _experts("q4", 6, 48, 256, g)
    x = torch.randn(7, 256, generator=g)
    ids = torch.randint(0, 6, (7, 4), generator=g)  # a token may pick one expert twice (the kernel does not care)
    ys = [cpu_kernels.moe_matvec(x, packed, ids, 48, isa, "q4") for isa in ISAS if cpu_kernels.cpu_has(isa)]
    for y in ys[1:]:
        assert torch.allclose(y, ys[0], rtol=1e-5, atol=1e-5)
    ref = torch.einsum("tk,tjnk->tjn", x.double(), w[ids].double())
    assert float((ys[0].double() - ref).norm() / ref.norm()) <= 1e-2


def test_bad_ids_and_shapes_are_refused():
    _need("default")
    g = torch.Generator().manual_seed(5)
    packed, _ = _experts("q4", 4, 16, 64, g)
    x = torch.randn(2, 64, generator=g)
    with pytest.raises(RuntimeError, match="outside 0..3"):
        cpu_kernels.moe_matvec(x, packed, torch.tensor([[0, 4], [1, 2]]), 16, "default", "q4")
    with pytest.raises(RuntimeError, match="outside 0..3"):
        cpu_kernels.moe_matvec(x, packed, torch.tensor([[0, -1], [1, 2]]), 16, "default", "q4")
    with pytest.raises(RuntimeError, match="int64"):
        cpu_kernels.moe_matvec(x, packed, torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), 16, "default", "q4")
    with pytest.raises(RuntimeError, match="K = 32"):
        cpu_kernels.moe_matvec(x[:, :32], packed, torch.tensor([[0, 1], [1, 2]]), 16, "default", "q4")
    with pytest.raises(RuntimeError, match="k = 2 slots"):
        cpu_kernels.moe_matvec(torch.randn(2, 3, 64), packed, torch.tensor([[0, 1], [1, 2]]), 16, "default", "q4")
    assert cpu_kernels.moe_matvec(x[:0], packed, torch.zeros(0, 2, dtype=torch.long), 16, "default", "q4").shape == (0, 2, 16)


def test_the_op_in_a_compiled_graph_equals_eager():
    _need("avx2")
    isa = "avx512" if cpu_kernels.cpu_has("avx512") else "avx2"
    g = torch.Generator().manual_seed(6)
    gu, _ = _experts("q4", 4, 64, 64, g)  # gate and up rows of 4 experts, I = 32
    down, _ = _experts("i8", 4, 64, 32, g)

    code = cpu_kernels.ISA_CODES[isa]

    def experts(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # the ops as the compiled step calls them
        gate, up = torch.ops.lagoon.q4_moe_matvec(x, gu, ids, 64, code).chunk(2, dim=-1)
        return torch.ops.lagoon.i8_moe_matvec(torch.nn.functional.silu(gate) * up, down, ids, 64, code)

    x, ids = torch.randn(3, 64, generator=g), torch.randint(0, 4, (3, 2), generator=g)
    compiled = torch.compile(experts, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(x, ids), experts(x, ids), rtol=1e-5, atol=1e-6)
