"""One request's prompt run through the kernels chunk by chunk, as the backend runs it; shared
by the interpreter tests (tests/test_kernels_triton.py) and the GPU suite (tests/gpu)."""

from __future__ import annotations

import torch

from vllm_turboquant.kernels import TQSide
from vllm_turboquant.kernels.prefill import tq_prefill
from vllm_turboquant.kernels.store import tq_store


def prompt_in_chunks(q, k, v, bounds, params, block_size, window, invariant, seed,
                     side_rows=2, wipe_side_at=(), **prefill_kw):
    """q [n, Hq, D], k/v [n, Hkv, D]; bounds: the chunk edges [0, ..., n]. Per chunk: store
    (packed slots, rotated K/V back, no window entries yet), prefill over the packed prefix,
    then the chunk's last W tokens into the window ring of batch row 0. Blocks are shuffled
    by `seed`. wipe_side_at: chunk starts before which the ring is emptied, as for a request
    whose prefix is a prefix-cache hit (another request wrote those tokens' side entries).
    Returns (outputs [n, Hq, D], cache, block table)."""
    n, hkv, d = k.shape
    dev = q.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    nb = -(-n // block_size) + 3
    bt = torch.randperm(nb, device=dev, generator=gen)[None].int()
    pos = torch.arange(n, device=dev)
    slots = bt[0].long()[pos // block_size] * block_size + pos % block_size
    cache = torch.zeros(nb, block_size, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                        device=dev)
    side = TQSide.empty(side_rows, window, hkv, d, q.dtype, dev)
    rows = torch.zeros(n, dtype=torch.int32, device=dev)
    outs = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        c = slice(lo, hi)
        if lo in wipe_side_at:
            side.tag.fill_(-1)
        rot = torch.empty(2, hi - lo, hkv, d, dtype=q.dtype, device=dev)
        # invariant: the store's fixed tiles, as the backend's ops.store(invariant=True): else
        # the tile (hence the rotation's summation order) follows the chunk's token count
        tq_store(k[c], v[c], cache, slots[c], params, side, rows[c], pos[c].int(),
                 torch.full_like(rows[c], 1 << 30), rot_out=(rot[0], rot[1]),
                 fixed_tiles=invariant)
        cu = torch.tensor([0, hi - lo], dtype=torch.int32, device=dev)
        sl = torch.tensor([hi], dtype=torch.int32, device=dev)
        outs.append(tq_prefill(q[c], rot[0], rot[1], cu, sl, cache, bt, params, d ** -0.5,
                               side, max_query_len=hi - lo, rotated=True, invariant=invariant,
                               **prefill_kw))
        idx = torch.arange(max(lo, hi - window), hi, device=dev)
        tq_store(k, v, cache, slots[idx], params, side, rows[idx], pos.int()[idx],
                 torch.full_like(rows[idx], hi), token_index=idx, fixed_tiles=invariant)
    return torch.cat(outs), cache, bt
