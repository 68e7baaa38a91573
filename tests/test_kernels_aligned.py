"""The aligned window (TQConfig.align): the query at position t reads key j exactly iff
j > t - W and j // A == t // A. Kernels against their references under TRITON_INTERPRET=1,
and the property the policy exists for: a chunk that starts on a block boundary never needs
an exact copy of an earlier token, so a prefix-cache hit (an empty ring) reads what a miss
reads (docs/design-notes.md, "A block-aligned window")."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from chunked_prompt import prompt_in_chunks  # noqa: E402
from test_kernels_triton import _chunk_deq, assert_close, paged  # noqa: E402

from vllm_turboquant.codec import TQConfig, TQLayerCodec  # noqa: E402
from vllm_turboquant.kernels import TQLayerParams, TQSide  # noqa: E402
from vllm_turboquant.kernels.decode import tq_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import tq_prefill  # noqa: E402
from vllm_turboquant.kernels.reference import (tq_decode_ref, tq_prefill_ref,  # noqa: E402
                                               window_start)


def aligned_params(window, align, d=64, layer=2):
    cfg = TQConfig("t", key_bits=4, value_bits=4, window=window, align=align)
    return TQLayerParams.from_codec(TQLayerCodec(cfg, d, layer))


def test_window_start():
    assert [window_start(t, 8, 0) for t in (0, 7, 8, 20)] == [-7, 0, 1, 13]
    assert [window_start(t, 8, 16) for t in (0, 15, 16, 20, 31)] == [0, 8, 16, 16, 24]
    t = torch.tensor([0, 15, 16, 20, 31])
    assert window_start(t, 8, 16).tolist() == [0, 8, 16, 16, 24]
    assert TQConfig("x", align=16).align == 0          # no window: nothing to clip
    assert TQConfig.from_name("turboquant", window=0).align == 0


@pytest.mark.parametrize("window,align,bs,prefetch", [(16, 16, 16, False), (8, 16, 16, True),
                                                      (24, 16, 32, False)])
def test_decode_aligned_matches_reference(window, align, bs, prefetch):
    params = aligned_params(window, align)
    hkv, d, dtype = 2, 64, torch.bfloat16
    lens = [1, 16, 17, 37, 70, 0]          # first token of a block, one past it, mid-block
    side = TQSide.empty(len(lens), window, hkv, d, dtype)
    cache, bt, _ = paged(lens, hkv, d, bs, params, dtype, side=side)
    q = torch.randn(len(lens), hkv * 3, d).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, block_n=16, lookup=1,
                    prefetch=prefetch, num_splits=2)
    want = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, side)
    assert_close(got, want, dtype, "aligned decode")
    # The clip matters: the sliding window reads more exact keys where t % A < W - 1.
    sliding = tq_decode_ref(q, cache, bt, sl, aligned_params(window, 0), d ** -0.5, side)
    assert (sliding[2].float() - want[2].float()).abs().max() > 1e-3    # t = 16: clipped
    assert torch.equal(sliding[1], want[1])                             # t = 15: window inside


@pytest.mark.parametrize("window,align", [(16, 16), (8, 16)])
def test_prefill_aligned_matches_reference(window, align):
    params = aligned_params(window, align)
    hkv, d, dtype, bs = 2, 64, torch.float16, 16
    lens, qlens = [40, 45, 30], [40, 1, 13]     # fresh prompt, 1-token chunk, mid-block chunk
    side = TQSide.empty(len(lens), window, hkv, d, dtype)
    cache, bt, seqs = paged(lens, hkv, d, bs, params, dtype, side=side)
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hkv * 3, d).to(dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    want = tq_prefill_ref(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side)
    for kw in (dict(), dict(deq=_chunk_deq(k, v, cu, sl, bt, bs, params, dtype, cache)),
               dict(invariant=True)):
        kr = (k.float() @ params.rotation.T).to(dtype)
        vr = (v.float() @ params.rotation.T).to(dtype)
        got = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                         block_n=16, rotated=True, **kw)
        assert_close(got, want, dtype, f"aligned prefill {sorted(kw)}")
    sliding = tq_prefill_ref(q, k, v, cu, sl, cache, bt, aligned_params(window, 0),
                             d ** -0.5, side)
    assert (sliding.float() - want.float()).abs().max() > 1e-3


@pytest.mark.parametrize("window", [16, 8])
def test_aligned_chunk_on_block_boundary_needs_no_ring(window):
    """A 96-token prompt in 16-token-block pages, invariant order: whole, in 32-token chunks,
    and in those chunks with the ring emptied before the chunks at 32 and 64 (what a
    prefix-cache hit on 32 or 64 cached tokens sees) gives the same bits with align 16. The
    sliding window (align 0) does not: its queries just past 32 read keys before 32 exactly."""
    d, hq, hkv, bs, n = 64, 6, 2, 16, 96
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
    q = torch.randn(n, hq, d, generator=gen)
    bounds = [0, 32, 64, n]
    tiles = dict(block_m=4, block_n=16)
    runs = {}
    for align in (16, 0):
        params = aligned_params(window, align)
        runs[align] = [prompt_in_chunks(q, k, v, b, params, bs, window, True, 0, wipe_side_at=w,
                                        **tiles)[0]
                       for b, w in (([0, n], ()), (bounds, ()), (bounds, (32, 64)))]
    whole, chunked, hit = runs[16]
    assert torch.equal(chunked, whole)
    assert torch.equal(hit, whole), "an aligned chunk read an exact copy from before its block"
    s_whole, s_chunked, s_hit = runs[0]
    assert torch.equal(s_chunked, s_whole)
    assert not torch.equal(s_hit[32:40], s_whole[32:40])     # control: the sliding window does
