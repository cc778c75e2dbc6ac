"""Paged KV cache: block accounting, prefix reuse gives the same logits as a full prefill."""

from __future__ import annotations

import torch

from lagoon.engine.kv_cache import PagedKVCache, make_cache
from lagoon.model.args import ModelArgs
from lagoon.model.transformer import Transformer

ARGS = ModelArgs(family="llama", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                 intermediate_size=64, max_position_embeddings=256)


def _model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ARGS).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return m


def _prefill(m, cache, sid, ids):
    n = cache.allocate(sid, ids)
    cache.ensure(sid, len(ids))
    pos = torch.arange(n, len(ids))[None]
    cache.prepare([sid], pos)
    with torch.no_grad():
        return m(torch.tensor([ids[n:]]), pos, cache)[0, -1], n


def test_prefix_reuse_matches_full_prefill():
    m = _model()
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 64, (40,), generator=g).tolist()
    a = prefix + [1, 2, 3]
    b = prefix + [9, 8, 7, 6]
    cache = make_cache(ARGS, paged=True, max_batch=2, max_seq_len=128, dtype=torch.float32, block_size=8)
    _prefill(m, cache, 0, a)
    cache.free(0, a)
    got, n = _prefill(m, cache, 1, b)
    assert n == 40  # five full blocks of the shared prefix were reused
    with torch.no_grad():
        ref = m(torch.tensor([b]))[0, -1]
    assert float((got - ref).norm() / ref.norm()) <= 1e-5

    off = make_cache(ARGS, paged=True, max_batch=2, max_seq_len=128, dtype=torch.float32, block_size=8,
                     prefix_cache=False)
    _prefill(m, off, 0, a)
    off.free(0, a)
    assert _prefill(m, off, 1, b)[1] == 0


def test_blocks_are_returned_and_evicted_lru():
    cache = PagedKVCache(ARGS, num_blocks=4, block_size=4, dtype=torch.float32, max_seq_len=64)
    cache.allocate(0, list(range(8)))
    cache.ensure(0, 8)
    assert cache.free_blocks == 2 and not cache.can_admit(12)
    cache.free(0, list(range(8)))
    assert cache.free_blocks == 4  # keyed blocks stay reusable but count as free
    cache.allocate(1, list(range(100, 116)))
    cache.ensure(1, 16)  # needs every block: the keyed ones are evicted
    assert cache.free_blocks == 0
    cache.free(1, [])
    assert cache.allocate(2, list(range(9))) == 0  # the old prefix was evicted


def test_pools_start_zeroed_aligned_and_writable():
    # the pools are calloc'ed (zeroed by the OS on first touch), not filled: they must still read as
    # zeros, be 64-byte aligned and own their memory for in-place writes
    m = _model()
    for paged in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            cache = make_cache(m.args, paged=paged, max_batch=2, max_seq_len=64, dtype=dtype)
            for t in (*cache.k, *cache.v):
                assert t.dtype == dtype and t.is_contiguous() and t.data_ptr() % 64 == 0 and t.storage_offset() == 0
                assert t._base is None  # not a view: the compiled step sees the pools as torch.zeros' were
                assert not t.any()
            x = torch.randn(cache.k[0].shape).to(dtype)
            cache.k[0].copy_(x)
            assert torch.equal(cache.k[0], x) and not cache.k[1].any()


def _reference_binding(cache: PagedKVCache, seq_ids, input_pos: torch.Tensor):
    # every index rebuilt from the block tables (what prepare computed each step before it kept
    # each sequence's unrolled slots): slot = block * block_size + offset
    bs, S = cache.block_size, int(input_pos.max()) + 1
    rows = []
    for s in seq_ids:
        table = [cache.scratch] * -(-S // bs) if s is None else cache.tables[s]
        rows.append([table[j // bs] * bs + j % bs if j // bs < len(table) else None for j in range(S)])
    write = torch.tensor([[rows[b][int(p)] for p in input_pos[b]] for b in range(len(seq_ids))])
    keys = torch.arange(S)
    return write, rows, (keys[None, None, :] <= input_pos[:, :, None])[:, None]


def test_prepare_binds_the_slots_of_each_block_table():
    # sequences that grow across block boundaries, share a prefix-cached table start, are freed
    # and their ids reused, decoded together with padding slots: the bound write / read / mask
    # indices equal ones rebuilt from the tables (reads past a shorter sequence are masked)
    g = torch.Generator().manual_seed(5)
    cache = PagedKVCache(ARGS, num_blocks=40, block_size=4, dtype=torch.float32, max_seq_len=64)
    prompts = {0: torch.randint(0, 64, (9,), generator=g).tolist()}
    prompts[1] = prompts[0][:8] + [5, 6, 7]
    cache.allocate(0, prompts[0])
    cache.ensure(0, 9)
    cache.free(0, prompts[0])  # two full blocks keyed for the next prompt
    cache.allocate(0, prompts[0])
    assert cache.allocate(1, prompts[1]) == 8
    cache.allocate(2, [1, 2])
    lens = {0: 9, 1: 11, 2: 2}
    for step in range(12):
        # steps 3, 9 decode sequence 1 alone, 0 and 6 a padding slot alone (prepare's batch-1 fast path)
        ids = [0, None, 1, 2] if step % 3 else ([1] if step % 2 else [None])
        for s in ids:
            if s is not None:
                cache.ensure(s, lens[s] + 1)
        pos = torch.tensor([[lens[s] if s is not None else 3] for s in ids])
        if step == 5:  # a prefill of several tokens for sequence 2 alone
            ids, pos = [2], torch.arange(lens[2], lens[2] + 6)[None]
            cache.ensure(2, lens[2] + 6)
            lens[2] += 5
        cache.prepare(ids, pos)
        write, read, mask = cache._bound
        ref_write, ref_rows, ref_mask = _reference_binding(cache, ids, pos)
        assert torch.equal(write, ref_write) and torch.equal(mask, ref_mask)
        for b, row in enumerate(ref_rows):
            visible = mask[b, 0, -1]
            assert read[b][visible].tolist() == [x for x, v in zip(row, visible.tolist(), strict=True) if v]
        for s in ids:
            if s is not None:
                lens[s] += 1
        if step == 7:  # sequence 2 finishes; its id comes back with a new prompt
            cache.free(2, [])
            cache.allocate(2, [3] * 5)
            cache.ensure(2, 5)
            lens[2] = 5
