"""KV caches the attention layers write into: `KVCache` (one preallocated row per sequence) and
`PagedKVCache` (a pool of fixed-size blocks shared by all sequences, with a prefix cache).

Both speak the same protocol to the engine:

    n_cached = cache.allocate(seq_id, prompt_ids)    # take a row / blocks; tokens already cached
    cache.ensure(seq_id, length)                     # make room for `length` tokens
    cache.prepare([seq_id, ...], input_pos)          # bind this forward step (input_pos [B, T])
    k_all, v_all, mask = cache.update(layer, k, v)   # called by every attention layer
    out = cache.attend(layer, q, k, v, pos, isa)     # or, decoding (T = 1): write, then attend in place
    cache.free(seq_id, token_ids)                    # give back; paged: keep full blocks for reuse

Prefix cache (paged only): a full block is keyed by a hash chained over every token up to its end,
so two prompts share a block only when everything before it matches too. Freed blocks keep their key
and are reused least-recently-freed last. Blocks are never written after they fill, so sharing needs
no copy-on-write. This module is *not* a scheduler: admission and eviction policy live in
`lagoon.engine.generate`.

`attend` is the decode path of layers that `use_native_attention` switched at load (plain softmax
attention: no window, sinks or other variants, which keep `update` + SDPA): it writes the step's keys and
values like `update`, then runs `lagoon::decode_attention` (`lagoon.engine.cpu_kernels`), which reads
each sequence's positions straight from the pools through `prepare`'s slot indices: no gather copy
of [B, S, K, D] per layer, no mask, one extern call a layer in the compiled step.

Shapes: L = layers, B = batch, T = new tokens, S = attended keys, K = kv heads, D = head dim.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from lagoon.errors import ContextWindowExceededError
from lagoon.model.args import ModelArgs

__all__ = ["KVCache", "PagedKVCache", "make_cache", "use_native_attention"]

log = logging.getLogger("lagoon.engine")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor whose pages the OS zeroes on first touch (calloc, through numpy) instead of a
    memset now: the pool is sized for `max_batch` full-length sequences (0.75 GB for SmolLM2 at the
    defaults, 0.2-0.6 s of a warm start to fill) and decoding touches only what it uses. Aligned to
    64 bytes, as torch's own allocations are (vectorized kernels)."""
    n = math.prod(shape) * dtype.itemsize
    raw = np.zeros(n + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64
    storage = torch.frombuffer(raw, dtype=torch.uint8, count=n, offset=start).untyped_storage()  # keeps raw alive
    # set_ on the storage, not .view(dtype) of the uint8 tensor: the compiled step then gets each pool
    # as a plain input (no view base, storage offset 0), as torch.zeros' were
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _mask(input_pos: torch.Tensor, S: int) -> torch.Tensor:
    # key j is visible to the query at absolute position p iff j <= p
    keys = torch.arange(S, device=input_pos.device)
    return (keys[None, None, :] <= input_pos[:, :, None])[:, None]  # [B, 1, T, S]


class KVCache:
    """One preallocated row of `max_seq_len` positions per concurrent sequence, plus one scratch row
    that padded decode slots write into (see `lagoon.engine.compile`)."""

    prefix_cache = False

    def __init__(self, args: ModelArgs, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> None:
        heads, dk, dv = args.kv_cache_dims  # MLA (DeepSeek-V3) caches its latent: 1 "head", dk != dv
        # one tensor per layer, so a compiled step's in-place writes stay in place
        self.k = [_zeros((max_batch + 1, max_seq_len, heads, dk), dtype) for _ in range(args.n_layers)]  # L x [rows, S_max, K, D]
        self.v = [_zeros((max_batch + 1, max_seq_len, heads, dv), dtype) for _ in range(args.n_layers)]
        self.max_seq_len = max_seq_len
        self.scratch = max_batch
        self.free_rows = list(range(max_batch))
        self.rows: dict[int, int] = {}
        self._bound: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int | None] | None = None

    def can_admit(self, n_tokens: int, reserved: int = 0) -> bool:
        return bool(self.free_rows) and n_tokens <= self.max_seq_len

    def growth(self, seq_id: int, total_tokens: int) -> int:
        return 0  # a row already holds max_seq_len positions

    def allocate(self, seq_id: int, prompt_ids: Sequence[int]) -> int:
        if not self.free_rows:
            raise RuntimeError("no free KV rows")  # scheduler checks can_admit first
        self.free_rows.sort()  # lowest rows first: a batch then tends to be a contiguous slice
        self.rows[seq_id] = self.free_rows.pop(0)
        return 0

    def ensure(self, seq_id: int, length: int) -> None:
        if length > self.max_seq_len:
            raise ContextWindowExceededError(
                f"sequence needs {length} positions; engine.max_seq_len is {self.max_seq_len}",
                needed=length, window=self.max_seq_len,
            )

    def free(self, seq_id: int, token_ids: Sequence[int] = ()) -> None:
        row = self.rows.pop(seq_id, None)
        if row is not None:
            self.free_rows.append(row)

    def prepare(self, seq_ids: Sequence[int | None], input_pos: torch.Tensor, static: bool = False) -> None:
        """Bind a step; a `None` id is a padding slot (writes the scratch row). `static` (a compiled
        step) always gathers rows, so the graph does not depend on which rows the batch holds."""
        rows = [self.scratch if s is None else self.rows[s] for s in seq_ids]
        S = int(input_pos.max()) + 1
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        start = rows[0] if contiguous and not static else None
        rows_t = torch.tensor(rows)
        read = rows_t[:, None] * self.max_seq_len + torch.arange(S)  # [B, S]: slots of the flattened pool
        self._bound = (rows_t, input_pos, _mask(input_pos, S), read, start)

    def bound_tensors(self) -> list[torch.Tensor]:
        return [t for t in self._bound if isinstance(t, torch.Tensor)]

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        rows, pos = self._bound[0][:, None], self._bound[1]  # [B, 1], [B, T]
        self.k[layer][rows, pos] = k.transpose(1, 2).to(self.k[layer].dtype)  # [B, T, K, D]
        self.v[layer][rows, pos] = v.transpose(1, 2).to(self.v[layer].dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               isa: str) -> torch.Tensor:
        """Decode (T = 1): write k, v [B, K, 1, D], then q [B, H, 1, D] attends over each sequence's
        positions 0..pos [B, 1] in place -> [B, H, 1, Dv]."""
        from lagoon.engine import cpu_kernels

        self._write(layer, k, v)
        kp, vp = self.k[layer], self.v[layer]
        out = torch.ops.lagoon.decode_attention(q[:, :, 0], kp.view(-1, *kp.shape[2:]), vp.view(-1, *vp.shape[2:]),
                                                self._bound[3], pos, q.shape[-1] ** -0.5, cpu_kernels.ISA_CODES[isa])
        return out.unsqueeze(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        rows, _, mask, _, start = self._bound
        S = mask.shape[-1]
        self._write(layer, k, v)
        if start is not None:
            ks = self.k[layer][start : start + rows.shape[0], :S]  # view, no copy
            vs = self.v[layer][start : start + rows.shape[0], :S]
        else:
            ks, vs = self.k[layer][rows, :S], self.v[layer][rows, :S]
        return ks.transpose(1, 2), vs.transpose(1, 2), mask  # [B, K, S, D] x2, [B, 1, T, S]


class PagedKVCache:
    """A pool of `num_blocks` blocks of `block_size` positions; sequences hold block tables."""

    def __init__(
        self, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype,
        max_seq_len: int, prefix_cache: bool = True,
    ) -> None:
        # one block past the pool is scratch: padded decode slots write there (see lagoon.engine.compile)
        heads, dk, dv = args.kv_cache_dims
        slots = (num_blocks + 1) * block_size
        self.k = [_zeros((slots, heads, dk), dtype) for _ in range(args.n_layers)]  # L x [slots, K, D]
        self.v = [_zeros((slots, heads, dv), dtype) for _ in range(args.n_layers)]
        self.scratch = num_blocks
        self.block_size, self.num_blocks, self.max_seq_len = block_size, num_blocks, max_seq_len
        self.prefix_cache = prefix_cache
        self.refs = [0] * num_blocks
        self.fresh = list(range(num_blocks))  # never keyed
        self.evictable: OrderedDict[int, None] = OrderedDict()  # keyed, refcount 0, oldest first
        self.key_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}
        self.tables: dict[int, list[int]] = {}
        self.hits = 0  # tokens served from the prefix cache (for telemetry and tests)
        self._bound: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._slot_rows: dict[int, tuple[int, torch.Tensor]] = {}  # seq -> (blocks, slots [blocks * bs])
        self._zeros = torch.zeros(max_seq_len, dtype=torch.int64)
        self._visible = torch.ones(max_seq_len, dtype=torch.bool)  # one query at p sees keys 0..p: all of them
        self._scratch_slots = num_blocks * block_size + torch.arange(max_seq_len) % block_size

    @property
    def free_blocks(self) -> int:
        return len(self.fresh) + len(self.evictable)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_admit(self, n_tokens: int, reserved: int = 0) -> bool:
        """Room for `n_tokens` beyond `reserved` blocks that running sequences will still take."""
        return n_tokens <= self.max_seq_len and self.blocks_for(n_tokens) + reserved <= self.free_blocks

    def growth(self, seq_id: int, total_tokens: int) -> int:
        """Blocks `seq_id` still needs to reach `total_tokens`."""
        return max(0, self.blocks_for(total_tokens) - len(self.tables.get(seq_id, ())))

    def _keys(self, token_ids: Sequence[int], n_blocks: int) -> list[int]:
        keys, h, bs = [], 0, self.block_size
        for i in range(n_blocks):
            h = hash((h, tuple(token_ids[i * bs : (i + 1) * bs])))
            keys.append(h)
        return keys

    def _take(self) -> int:
        if self.fresh:
            b = self.fresh.pop()
        elif self.evictable:
            b, _ = self.evictable.popitem(last=False)
            self.block_of.pop(self.key_of.pop(b), None)
        else:
            raise ContextWindowExceededError("the KV block pool is exhausted; raise engine.num_kv_blocks")
        self.refs[b] = 1
        return b

    def allocate(self, seq_id: int, prompt_ids: Sequence[int]) -> int:
        table: list[int] = []
        if self.prefix_cache:
            # leave at least one prompt token to compute, so the step yields logits
            for key in self._keys(prompt_ids, (len(prompt_ids) - 1) // self.block_size):
                b = self.block_of.get(key)
                if b is None:
                    break
                if self.refs[b] == 0:
                    self.evictable.pop(b, None)
                self.refs[b] += 1
                table.append(b)
        self.tables[seq_id] = table
        self._slot_rows.pop(seq_id, None)
        n = len(table) * self.block_size
        self.hits += n
        return n

    def ensure(self, seq_id: int, length: int) -> None:
        if length > self.max_seq_len:
            raise ContextWindowExceededError(
                f"sequence needs {length} positions; engine.max_seq_len is {self.max_seq_len}",
                needed=length, window=self.max_seq_len,
            )
        table = self.tables[seq_id]
        while len(table) * self.block_size < length:
            table.append(self._take())

    def free(self, seq_id: int, token_ids: Sequence[int] = ()) -> None:
        table = self.tables.pop(seq_id, None)
        self._slot_rows.pop(seq_id, None)
        if table is None:
            return
        keys = self._keys(token_ids, min(len(token_ids) // self.block_size, len(table))) if self.prefix_cache else []
        for i, b in enumerate(table):
            if i < len(keys) and b not in self.key_of and keys[i] not in self.block_of:
                self.key_of[b], self.block_of[keys[i]] = keys[i], b
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.evictable[b] = None
                else:
                    self.fresh.append(b)

    def bound_tensors(self) -> list[torch.Tensor]:
        return list(self._bound)

    def _slots(self, seq_id: int | None) -> torch.Tensor:
        """The cache slots of a sequence's positions 0.. (its block table unrolled), rebuilt only
        when the table grew: a decode step then slices it instead of rebuilding every index."""
        if seq_id is None:
            return self._scratch_slots
        table = self.tables[seq_id]
        have = self._slot_rows.get(seq_id)
        if have is None or have[0] != len(table):
            bs = self.block_size
            slots = (torch.tensor(table, dtype=torch.int64)[:, None] * bs + torch.arange(bs)).flatten()
            have = self._slot_rows[seq_id] = (len(table), slots)
        return have[1]

    def prepare(self, seq_ids: Sequence[int | None], input_pos: torch.Tensor, static: bool = False) -> None:
        """Bind a step; a `None` id is a padding slot (writes the scratch block). `static` changes
        nothing here: block reads are always a gather. Positions past a shorter sequence's
        blocks read slot 0 (masked)."""
        if len(seq_ids) == 1 and input_pos.shape[1] == 1:  # one sequence decoding (an agent's every step)
            p = int(input_pos)
            slots = self._slots(seq_ids[0])
            if p < len(slots):  # views of its slots and of an all-visible mask: no index built per step
                self._bound = (slots[p : p + 1].view(1, 1), slots[: p + 1].view(1, p + 1),
                               self._visible[: p + 1].view(1, 1, 1, p + 1))
                return
        S = int(input_pos.max()) + 1
        rows = [self._slots(s) for s in seq_ids]
        read = torch.stack([r[:S] if len(r) >= S else torch.cat([r, self._zeros[: S - len(r)]]) for r in rows])  # [B, S]
        write = read.gather(1, input_pos)  # [B, T]
        self._bound = (write, read, _mask(input_pos, S))

    def _write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        write, K = self._bound[0].flatten(), k.shape[1]
        self.k[layer][write] = k.transpose(1, 2).reshape(-1, K, k.shape[3]).to(self.k[layer].dtype)
        self.v[layer][write] = v.transpose(1, 2).reshape(-1, K, v.shape[3]).to(self.v[layer].dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
               isa: str) -> torch.Tensor:
        """Decode (T = 1): write k, v [B, K, 1, D], then q [B, H, 1, D] attends over each sequence's
        positions 0..pos [B, 1], read from the pool through the block tables -> [B, H, 1, Dv]."""
        from lagoon.engine import cpu_kernels

        self._write(layer, k, v)
        # the op itself, not cpu_kernels' wrapper (its lock is no graph's business): the library
        # is loaded, `use_native_attention` checked
        out = torch.ops.lagoon.decode_attention(q[:, :, 0], self.k[layer], self.v[layer], self._bound[1], pos,
                                                q.shape[-1] ** -0.5, cpu_kernels.ISA_CODES[isa])
        return out.unsqueeze(2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        _, read, mask = self._bound
        self._write(layer, k, v)
        ks, vs = self.k[layer][read], self.v[layer][read]  # [B, S, K, D]
        return ks.transpose(1, 2), vs.transpose(1, 2), mask


def make_cache(
    args: ModelArgs, *, paged: bool, max_batch: int, max_seq_len: int, dtype: torch.dtype,
    block_size: int = 16, num_blocks: int | None = None, prefix_cache: bool = True,
) -> KVCache | PagedKVCache:
    """`paged` is `model_deployment.memory.kv_cache_sharding`; `num_blocks` None sizes the pool for
    `max_batch` full-length sequences."""
    max_seq_len = min(max_seq_len, args.max_position_embeddings) if args.max_position_embeddings else max_seq_len
    if not paged:
        return KVCache(args, max_batch, max_seq_len, dtype)
    blocks = num_blocks or max_batch * -(-max_seq_len // block_size)
    return PagedKVCache(args, blocks, block_size, dtype, max_seq_len, prefix_cache)


def use_native_attention(model: torch.nn.Module, cache: KVCache | PagedKVCache) -> int:
    """Switch the decode attention (T = 1) of `model`'s plain softmax layers to `cache.attend` on
    Lagoon's kernel, where it runs: a CPU model, a float32 / bf16 cache, the kernel library loaded,
    ``LAGOON_NATIVE_ATTENTION`` not 0. Layers with a sliding window or sinks (and MLA) keep SDPA.
    Returns how many layers switched (0: all on SDPA); applied once at load, from outside the model."""
    from lagoon.engine import cpu_kernels
    from lagoon.engine.kernels import cpu_isa
    from lagoon.model.transformer import Attention

    why = None
    if os.environ.get("LAGOON_NATIVE_ATTENTION", "1").strip().lower() in ("0", "false", "no", "off"):
        why = "LAGOON_NATIVE_ATTENTION=0"
    elif cache.k and (cache.k[0].device.type != "cpu" or cache.k[0].dtype not in (torch.float32, torch.bfloat16)):
        why = f"a {cache.k[0].dtype} cache on {cache.k[0].device}"
    elif not cpu_kernels.available():
        why = cpu_kernels.unavailable_reason()
    if why is not None:
        log.info("decode attention stays SDPA (%s)", why)
        return 0
    isa = next(i for i in (cpu_isa(), "avx2", "default") if i == "default" or cpu_kernels.cpu_has(i))
    n = 0
    for mod in model.modules():
        if type(mod) is Attention and mod.window is None and mod.sinks is None:
            mod.decode_isa = isa
            n += 1
    return n
