"""Probe, not the engine's path: the embedded model's batch-1 decode step through AOTInductor instead
of dynamo's saved artefact, to measure what a warm start would cost without importing torch._dynamo /
torch._inductor (docs/architecture.md, "Warm start").

`compile` exports the step non-strict (the paged KV pools registered as buffers the graph mutates,
S dynamic) and packages it without constants; `load` (run it in a fresh process) opens the package with
`torch._C._aoti.AOTIModelPackageLoader` alone, hands it the model's and the pools' own tensors as
user-managed constants, runs one step and compares the logits and the KV write with the eager model.
The 210 int4 group-size scalars inductor lifts to constants (``constantN``) are given as 32, the
GGUF block size: what a real path would record at compile time.

    .venv/bin/python benchmarks/probe_aoti_step.py compile [--package PATH]   # ~3 min on 2 cores
    .venv/bin/python benchmarks/probe_aoti_step.py load [--package PATH]
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build():
    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.engine import resolve_model
    from lagoon.engine.kv_cache import make_cache

    torch.set_num_threads(2)
    model = load_checkpoint(resolve_model("embedded"), "native")
    return model, make_cache(model.args, paged=True, max_batch=8, max_seq_len=4096, dtype=torch.bfloat16)


class Step(nn.Module):
    """The T = 1 forward with the cache's pools as buffers and its bound tensors as inputs."""

    def __init__(self, model: nn.Module, cache) -> None:
        super().__init__()
        self.model, self.cache, self.n = model, cache, len(cache.k)
        for i in range(self.n):
            self.register_buffer(f"k{i}", cache.k[i], persistent=False)
            self.register_buffer(f"v{i}", cache.v[i], persistent=False)

    def forward(self, tokens, pos, write, read, mask):
        c = self.cache
        c.k = [getattr(self, f"k{i}") for i in range(self.n)]
        c.v = [getattr(self, f"v{i}") for i in range(self.n)]
        c._bound = (write, read, mask)
        return self.model(tokens, pos, c)[:, -1]  # [1, V]


def step_inputs(cache, p: int = 5) -> list[torch.Tensor]:
    tokens, pos = torch.tensor([[42]]), torch.tensor([[p]])
    cache.prepare([None], pos, static=True)
    return [tokens, pos, *cache._bound]


def compile_package(path: str) -> None:
    model, cache = build()
    pools = list(cache.k), list(cache.v)
    step = Step(model, cache).eval()
    S = torch.export.Dim("S", min=2, max=4096)
    t = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(step, tuple(step_inputs(cache)), dynamic_shapes=(None, None, None, {1: S}, {3: S}),
                                 strict=False)
    cache.k, cache.v = pools
    print(f"export {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch._inductor.aoti_compile_and_package(ep, package_path=path, inductor_configs={
        "aot_inductor.package_constants_in_so": False, "emulate_precision_casts": True})
    print(f"AOTInductor compile {time.perf_counter() - t:.1f} s, package {os.path.getsize(path) / 1e6:.1f} MB")


def load_package(path: str) -> None:
    model, cache = build()
    t1 = time.perf_counter()
    loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, -1)
    step = Step(model, cache)
    state = {**dict(step.named_parameters()), **dict(step.named_buffers())}
    group = torch.tensor(32, dtype=torch.int64)
    loader.load_constants({f: state.get(f, group) for f in loader.get_constant_fqns()}, False, False, True)
    t2 = time.perf_counter()
    x = step_inputs(cache)
    out = loader.run(x)[0]
    t3 = time.perf_counter()
    print(f"process start to a ready step {t3 - T0:.2f} s: package load {t2 - t1:.3f} s, first run {t3 - t2:.3f} s; "
          f"torch._dynamo imported: {'torch._dynamo' in sys.modules}, torch._inductor: {'torch._inductor' in sys.modules}")
    for _ in range(3):
        t = time.perf_counter()
        loader.run(step_inputs(cache, 6))
        print(f"step {1e3 * (time.perf_counter() - t):.1f} ms")
    ref_model, ref_cache = build()
    with torch.no_grad():
        ref_cache.prepare([None], torch.tensor([[5]]), static=True)
        ref = ref_model(torch.tensor([[42]]), torch.tensor([[5]]), ref_cache)[:, -1]
    w = x[2].flatten()
    print(f"logits max |diff| vs eager {(out.float() - ref.float()).abs().max().item():.3g}; "
          f"KV written in place: {torch.equal(cache.k[3][w], ref_cache.k[3][w]) and bool(cache.k[3][w].any())}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("compile", "load"))
    ap.add_argument("--package", default=os.path.join(os.path.expanduser("~"), ".cache", "lagoon", "probe", "step-b1.pt2"))
    a = ap.parse_args()
    (compile_package if a.what == "compile" else load_package)(a.package)
