"""Triton kernels vs their torch references, on the CPU through Triton's interpreter.

tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA before anything imports
triton (it must be set before the first import of triton.language to reach its library
helpers). The launchers know they are interpreted from the kernel objects. Shapes are tiny
(the interpreter runs numpy per program); the GPU tier (tests/gpu) has real ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from chunked_prompt import prompt_in_chunks  # noqa: E402

from vllm_turboquant.codec import TQConfig, TQLayerCodec  # noqa: E402
from vllm_turboquant.kernels import TQLayerParams, TQSide, read_slots  # noqa: E402
from vllm_turboquant.kernels import decode as _decode  # noqa: E402
from vllm_turboquant.kernels import store as _store  # noqa: E402
from vllm_turboquant.kernels._tl import interpreting  # noqa: E402
from vllm_turboquant.kernels.decode import tq_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import tq_prefill  # noqa: E402
from vllm_turboquant.kernels.reference import decode_slots, tq_unpack_pages_ref  # noqa: E402
from vllm_turboquant.kernels.unpack import tq_unpack_pages  # noqa: E402
from vllm_turboquant.kernels.reference import (own_attention_ref, tq_decode_ref,  # noqa: E402
                                                tq_prefill_ref, tq_store_ref)
from vllm_turboquant.kernels.store import tq_store  # noqa: E402

# inf - inf in the non-finite check warns in numpy; that is the point of the check.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

if not interpreting(_decode._tq_decode_split_kernel):
    pytest.skip("CPU interpreter tests: triton was imported without TRITON_INTERPRET=1 "
                "(a CUDA machine runs tests/gpu instead)", allow_module_level=True)

# Per output dtype: fp16/bf16 rounding of q, centroids, p and the output itself.
TOL = {torch.bfloat16: (4e-2, 2e-2), torch.float16: (5e-3, 5e-3), torch.float32: (2e-4, 2e-4)}


def assert_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    bad = (got.float() - want.float()).abs() > atol + rtol * want.float().abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        pairs = [(i, got[tuple(i)].item(), want[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off "
                             f"(atol {atol}, rtol {rtol}); first (index, got, want): {pairs}")


def make_params(name="turboquant", d=64, window=0, layer=2, align=0):
    codec = TQLayerCodec(TQConfig.from_name(name, window=window, align=align), d, layer)
    return codec, TQLayerParams.from_codec(codec)


def paged(lens, hkv, d, bs, params, dtype, side=None, permuted=False, seed=0):
    """Caches filled by the reference store; returns (cache, block_table, per-seq (k, v))."""
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(1, max((n + bs - 1) // bs for n in lens))
    nb = len(lens) * max_blocks + 2
    sb = params.layout.slot_bytes
    if permuted:
        cache = torch.zeros(nb, hkv, bs, sb, dtype=torch.uint8).permute(0, 2, 1, 3)
    else:
        cache = torch.zeros(nb, bs, hkv, sb, dtype=torch.uint8)
    bt = torch.randperm(nb, generator=gen)[:len(lens) * max_blocks]
    bt = bt.reshape(len(lens), max_blocks).int()
    seqs = []
    for b, n in enumerate(lens):
        k = (torch.randn(n, hkv, d, generator=gen) * 2 + 0.3).to(dtype)
        v = torch.randn(n, hkv, d, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = bt[b].long()[pos // bs] * bs + pos % bs
        tq_store_ref(k, v, cache, slots, params, side, torch.full_like(pos, b), pos,
                     torch.full_like(pos, n))
        seqs.append((k, v))
    return cache, bt, seqs


# -- store ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,dtype,bs,permuted", [("turboquant", torch.bfloat16, 16, False),
                                                    ("tq-k3v3", torch.float16, 32, True),
                                                    ("turboquant", torch.float32, 16, True)])
def test_store_writes_codec_bytes(name, dtype, bs, permuted):
    codec, params = make_params(name)
    t, hkv, d = 21, 2, 64
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(t, hkv, d, generator=gen) * 3).to(dtype)
    v = torch.randn(t, 2 * hkv, d, generator=gen).to(dtype)[:, ::2]     # strided heads
    k[4, 1, 7] = float("nan")
    v[9, 0, 0] = float("inf")
    nb = 3
    slots = torch.randperm(nb * bs, generator=gen)[:t]
    slots[[2, 11]] = -1                                                # padding
    shape = (nb, hkv, bs, params.layout.slot_bytes) if permuted else (
        nb, bs, hkv, params.layout.slot_bytes)
    c1 = torch.full(shape, 7, dtype=torch.uint8)
    if permuted:
        c1 = c1.permute(0, 2, 1, 3)
    c2 = c1.clone()
    tq_store(k, v, c1, slots, params)
    tq_store_ref(k, v, c2, slots, params)
    # A code may sit one level off where u is within float rounding of a boundary (the kernel
    # sums the rotation in another order); allow 1 byte in 500, seen: 0.
    diff = (c1 != c2).float().mean().item()
    assert diff <= 2e-3, f"{diff:.2%} of bytes differ"
    valid = slots[slots >= 0]
    want = codec.encode(k, v)[slots >= 0]
    every = torch.arange(nb * bs)
    stored = read_slots(c1, params.layout, every // bs, every % bs)  # [slots, Hkv, bytes]
    got = stored[valid]
    assert (got != want).float().mean().item() <= 2e-3
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[valid] = False
    assert (stored[untouched] == 7).all(), "padding slot written"
    nan_row = stored[slots[4], 1]
    ks = params.layout.k_scale_offset
    assert nan_row[ks:ks + 2].view(torch.float16).item() == 0.0     # non-finite -> zero


def test_store_window_side_copy():
    codec, params = make_params("turboquant", window=4)
    hkv, d, bs, w = 2, 64, 16, 4
    # Two requests: row 0 has 6 new tokens (positions 10..15), row 1 has 3 (0..2).
    pos = torch.tensor([10, 11, 12, 13, 14, 15, 0, 1, 2])
    rows = torch.tensor([0] * 6 + [1] * 3)
    send = torch.tensor([16] * 6 + [3] * 3)
    slots = torch.tensor([42, 43, 44, 45, 46, 47, 3, -1, 5])
    k = torch.randn(9, hkv, d, dtype=torch.bfloat16)
    v = torch.randn(9, hkv, d, dtype=torch.bfloat16)
    c1 = torch.zeros(4, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8)
    c2 = c1.clone()
    s1 = TQSide.empty(2, w, hkv, d, torch.bfloat16)
    s2 = TQSide.empty(2, w, hkv, d, torch.bfloat16)
    tq_store(k, v, c1, slots, params, s1, rows, pos, send)
    tq_store_ref(k, v, c2, slots, params, s2, rows, pos, send)
    assert torch.equal(c1, c2)
    assert torch.equal(s1.tag, s2.tag) and torch.equal(s1.check, s2.check)
    assert s1.tag[0].tolist() == [44, 45, 46, 47]        # positions 12..15 only
    assert s1.tag[1].tolist() == [3, -1, 5, -1]          # the padding token is not copied
    for a, b in ((s1.k, s2.k), (s1.v, s2.v)):
        assert_close(a, b, torch.bfloat16, "side copy")


@pytest.mark.parametrize("name", ["turboquant", "tq-k3v3"])
def test_store_rot_out_and_token_index(name):
    """The backend's two store calls of a mixed step: (1) every token, handing back the
    rotated K/V (zeros for the padding token) and writing no window entry where seq_end is
    out of reach; (2) a few tokens again through token_index, now with their entries."""
    codec, params = make_params(name, window=4)
    hkv, d, bs, w = 2, 64, 16, 4
    t = 7
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(t, hkv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(t, hkv, d, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([20, 21, 22, 23, -1, 25, 26])
    rows = torch.zeros(t, dtype=torch.int32)
    pos = torch.arange(t, dtype=torch.int32)
    no_side = torch.full((t,), 1 << 30, dtype=torch.int32)
    idx = torch.tensor([3, 5, 6, 0])          # the last tokens again (one pad, slot -1)
    idx_slots = torch.where(torch.arange(4) < 3, slots[idx], -1)
    end = torch.full((4,), t, dtype=torch.int32)
    results = []
    for store in (tq_store, tq_store_ref):
        cache = torch.zeros(3, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8)
        side = TQSide.empty(1, w, hkv, d, torch.bfloat16)
        rot = torch.full((2, t, hkv, d), float("nan"), dtype=torch.bfloat16)
        deq = (torch.full((t, hkv, d), float("nan"), dtype=torch.bfloat16),
               torch.full((t, hkv, d), float("nan"), dtype=torch.bfloat16),
               torch.full((t, hkv), 7, dtype=torch.int32))
        store(k, v, cache, slots, params, side, rows, pos, no_side, rot_out=(rot[0], rot[1]),
              deq_out=deq)
        assert (side.tag == -1).all(), "the first store wrote window entries"
        first = cache.clone()
        store(k, v, cache, idx_slots, params, side, rows[idx], pos[idx], end, token_index=idx)
        assert torch.equal(cache, first), "the second store changed packed bytes"
        results.append((cache, side, rot, deq))
    (c1, s1, r1, d1), (c2, s2, r2, d2) = results
    assert torch.equal(c1, c2)
    assert s1.tag[0].tolist() == [-1, 25, 26, 23]     # positions 5, 6, 3 -> ring 1, 2, 3
    assert torch.equal(s1.tag, s2.tag) and torch.equal(s1.check, s2.check)
    assert (r1[:, 4] == 0).all() and not r1.isnan().any()
    want_k = (k.float() @ params.rotation.T)
    want_k[4] = 0
    assert_close(r1[0], want_k, torch.bfloat16, "rotated keys")
    assert torch.equal(d1[2], d2[2]) and (d1[2][4] == 0).all() and (d1[2][:4] != 0).all()
    assert torch.equal(d1[0], d2[0]) and torch.equal(d1[1], d2[1])
    assert (d1[0][4] == 0).all() and (d1[1][4] == 0).all()
    assert_close(r1, r2, torch.bfloat16, "rot_out vs reference")
    assert_close(s1.k, s2.k, torch.bfloat16, "side copy")


@triton.jit
def _levels_probe(u_ptr, code_ptr, c_ptr, N: tl.constexpr, BOUNDS: tl.constexpr,
                  CENTS: tl.constexpr, BITS: tl.constexpr, SYM: tl.constexpr):
    offs = tl.arange(0, N)
    code, c = _store._levels(tl.load(u_ptr + offs), BOUNDS, CENTS, BITS, SYM)
    tl.store(code_ptr + offs, code)
    tl.store(c_ptr + offs, c)


@pytest.mark.parametrize("bits,d", [(4, 64), (3, 128), (2, 64), (4, 256)])
def test_store_levels_match_bucketize(bits, d):
    """The store's nearest-centroid search, both forms (the symmetric one counts half the
    bounds and nudges |u| of a non-positive u by one ulp), against torch.bucketize on every
    boundary, its negation, the floats next to both, +-0 and +-1: ties fall to the lower
    level, as bucketize's."""
    codec = TQLayerCodec(TQConfig.from_name("turboquant", key_bits=bits, value_bits=bits), d, 0)
    params = TQLayerParams.from_codec(codec)
    assert params.symmetric
    bounds, cents = codec.key_bounds, codec.key_centroids
    up = torch.nextafter(bounds, torch.full_like(bounds, 2.0))
    down = torch.nextafter(bounds, torch.full_like(bounds, -2.0))
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30])
    u = torch.cat([bounds, -bounds, up, down, -up, -down, special,
                   torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.2])
    n = 1 << (u.numel() - 1).bit_length()
    u = torch.cat([u, torch.zeros(n - u.numel())]).contiguous()
    idx = torch.bucketize(u, bounds)
    want_code = torch.where(idx >= 1 << (bits - 1), idx, (1 << (bits - 1)) - 1 - idx)
    for sym in (True, False):
        code = torch.zeros(n, dtype=torch.int32)
        c = torch.zeros(n)
        _levels_probe[(1,)](u, code, c, N=n, BOUNDS=params.codebooks[0],
                            CENTS=params.codebooks[1], BITS=bits, SYM=sym)
        bad = (code.long() != want_code).nonzero().flatten()
        assert bad.numel() == 0, (sym, [(u[i].item(), code[i].item(), want_code[i].item())
                                        for i in bad[:5]])
        assert torch.equal(c, cents[idx]), sym


@pytest.mark.parametrize("name", ["turboquant", "tq-k3v3"])
def test_store_variants_write_the_same(name):
    """Every tq_store option (keys and values stacked or not, symmetric or full centroid
    search, rotation loaded up front or per dot, tile sizes) writes the same slots, window
    entries, rotated / dequantized / own outputs: in the interpreter the rotation is the same
    fp32 dot in each, so they must agree bit for bit (strided inputs, padding, a nan row)."""
    codec, params = make_params(name, window=4)
    t, hkv, d, bs = 13, 2, 64, 16
    gen = torch.Generator().manual_seed(5)
    k = (torch.randn(t, hkv, d, generator=gen) * 2).to(torch.bfloat16)
    v = torch.randn(t, 2 * hkv, d, generator=gen).to(torch.bfloat16)[:, ::2]
    k[3, 1, 5] = float("nan")
    slots = torch.randperm(4 * bs, generator=gen)[:t]
    slots[[1, 7]] = -1
    rows = torch.zeros(t, dtype=torch.int32)
    pos = torch.arange(t, dtype=torch.int32)
    end = torch.full((t,), t, dtype=torch.int32)
    own_idx = torch.where(torch.arange(t) % 3 == 0, -1, torch.arange(t)).int()
    outs = []
    for kw in (dict(), dict(stack=False), dict(symmetric=False), dict(preload=False),
               dict(block_t=16, num_warps=4), dict(block_t=4, stack=False, symmetric=False)):
        cache = torch.full((4, bs, hkv, params.layout.slot_bytes), 7, dtype=torch.uint8)
        side = TQSide.empty(1, 4, hkv, d, torch.bfloat16)
        rot = torch.full((2, t, hkv, d), float("nan"), dtype=torch.bfloat16)
        deq = (torch.full((t, hkv, d), float("nan"), dtype=torch.bfloat16),
               torch.full((t, hkv, d), float("nan"), dtype=torch.bfloat16),
               torch.full((t, hkv), 7, dtype=torch.int32))
        own = (torch.zeros(t, hkv, d, dtype=torch.bfloat16),
               torch.zeros(t, hkv, d, dtype=torch.bfloat16), own_idx)
        tq_store(k, v, cache, slots, params, side, rows, pos, end, rot_out=(rot[0], rot[1]),
                 deq_out=deq, own_out=own, **kw)
        outs.append((kw, [cache, *side, rot, *deq, own[0], own[1]]))
    base = outs[0][1]
    assert (base[0] != 7).any() and (base[2] >= 0).any() and not base[5].isnan().any()
    for kw, got in outs[1:]:
        for i, (a, b) in enumerate(zip(got, base)):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (kw, i)


# -- decode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,g,bs,window,lookup,kt,prefetch,words", [
    (torch.bfloat16, 1, 16, 0, 1, False, False, True),
    (torch.float16, 3, 32, 0, 2, False, False, True),
    (torch.bfloat16, 3, 16, 8, 1, False, False, True),
    (torch.bfloat16, 3, 16, 8, 1, False, False, False),   # byte loads
    (torch.float16, 2, 32, 5, 0, False, False, True),     # generic mode: no word loads
    (torch.bfloat16, 4, 16, 0, 3, True, True, True),  # lookup 3 falls back to 1 when interpreted
    (torch.float16, 3, 32, 5, 1, True, False, True),
    (torch.bfloat16, 2, 16, 8, 2, False, True, False),
])
def test_decode_matches_reference(dtype, g, bs, window, lookup, kt, prefetch, words):
    codec, params = make_params("turboquant", window=window)
    hkv, d = 2, 64
    lens = [1, 37, 70, 0]                                   # one token, odd, padding row
    side = TQSide.empty(len(lens), window, hkv, d, dtype) if window else None
    cache, bt, _ = paged(lens, hkv, d, bs, params, dtype, side=side, permuted=bs == 32)
    if side is not None:
        side.tag[2, 69 % window] = 12345                      # a stale entry -> packed slot
    q = torch.randn(len(lens), hkv * g, d).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, block_n=16, lookup=lookup,
                    kt=kt, prefetch=prefetch, words=words)
    want = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, side)
    assert_close(got, want, dtype, "decode")
    assert got[3].abs().sum() == 0


@pytest.mark.parametrize("lens,window,prefetch", [
    ([100, 45], 24, True),    # 100: window from 76, tile 64 is mid split 1 of [48, 96)
    ([20, 7], 24, False),     # W > L: every tile (and split) is a tail tile
])
def test_decode_window_tail_splits(lens, window, prefetch):
    """The window's side-buffer logic runs only in the tail tiles (p >= L - W, tile-aligned):
    splits cut across the main/tail boundary, and a split fully inside the tail, must still
    merge to the reference, with one stale tag and one stale check taking the packed slot."""
    codec, params = make_params("turboquant", window=window)
    hkv, d, dtype = 2, 64, torch.float16
    side = TQSide.empty(len(lens), window, hkv, d, dtype)
    cache, bt, _ = paged(lens, hkv, d, 16, params, dtype, side=side)
    side.tag[0, (lens[0] - 3) % window] = 12345                # stale tag -> packed slot
    side.check[0, (lens[0] - 10) % window, 1] += 1           # stale check (head 1) -> packed
    q = torch.randn(len(lens), hkv * 3, d).to(dtype)
    sl = torch.tensor(lens, dtype=torch.int32)
    got = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, num_splits=3, block_n=16,
                    lookup=1, prefetch=prefetch)
    want = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, side)
    assert_close(got, want, dtype, "decode, window tail across splits")
    # The stale entries matter: without the side buffers the answer is different.
    plain = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, None)
    assert (plain - want).abs().max() > 1e-3


def test_decode_fused_launch_merges_in_the_last_split_program():
    """The default one-launch decode (query rotation and split merge in the split kernel)
    against the reference and the three-launch path, for a query that is a strided view,
    several split counts in a row (each launch must leave every counter at 0 again, or the
    next one never merges and `out`, NaN-filled here, keeps its NaN), one split, and both
    ways of rotating the query in the kernel (rotate_q 1 and 2)."""
    from vllm_turboquant.kernels.decode import split_counters
    codec, params = make_params("turboquant", window=8)
    hkv, g, d, dtype = 2, 3, 64, torch.bfloat16
    lens = [1, 37, 70]
    side = TQSide.empty(len(lens), 8, hkv, d, dtype)
    cache, bt, _ = paged(lens, hkv, d, 16, params, dtype, side=side)
    wide = torch.randn(len(lens), hkv * g + 2, d).to(dtype)
    q = wide[:, 1:1 + hkv * g]                                 # not contiguous over heads
    sl = torch.tensor(lens, dtype=torch.int32)
    want = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, side)
    for splits, rotate_q in ((3, 2), (5, 1), (1, 2), (3, 1)):
        out = torch.full((len(lens), hkv * g, d), float("nan"), dtype=dtype)
        got = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, num_splits=splits,
                        block_n=16, out=out, rotate_q=rotate_q)
        assert got is out
        assert_close(got, want, dtype, f"fused decode, {splits} splits")
        assert (split_counters(1, q.device) == 0).all(), "a counter was left nonzero"
        three = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, num_splits=splits,
                          block_n=16, fused=False)
        assert_close(got, three, dtype, f"fused vs three launches, {splits} splits")


def test_decode_more_splits_than_tiles_and_3bit():
    codec, params = make_params("tq-k3v3")
    hkv, d = 1, 64
    cache, bt, _ = paged([5, 40], hkv, d, 16, params, torch.float16)
    q = torch.randn(2, 4, d, dtype=torch.float16)
    sl = torch.tensor([5, 40], dtype=torch.int32)
    got = tq_decode(q, cache, bt, sl, params, 0.125, num_splits=7, block_n=16)
    want = tq_decode_ref(q, cache, bt, sl, params, 0.125)
    assert_close(got, want, torch.float16, "decode, empty splits")


# -- prefill ----------------------------------------------------------------------------------
def chunk_batch(lens, qlens, hkv, g, d, bs, params, dtype, window):
    """Sequences of `lens` tokens cached through the reference store (their window ring too);
    the last qlens[b] of each are the step's chunk. -> (side or None, cache, block table,
    the chunks' K and V [T, Hkv, D], random queries [T, Hkv * g, D], cu_seqlens_q, seq_lens)."""
    side = TQSide.empty(len(lens), window, hkv, d, dtype) if window else None
    cache, bt, seqs = paged(lens, hkv, d, bs, params, dtype, side=side)
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hkv * g, d).to(dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    return side, cache, bt, k, v, q, cu, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype,g,bs,window,name", [
    (torch.bfloat16, 1, 16, 0, "turboquant"),
    (torch.float16, 3, 32, 8, "turboquant"),
    (torch.float16, 2, 16, 0, "tq-k3v3"),
])
def test_prefill_matches_reference(dtype, g, bs, window, name):
    codec, params = make_params(name, window=window)
    hkv, d = 2, 64
    lens, qlens = [9, 45, 30], [9, 1, 13]     # fresh prefill, 1-token chunk, chunk + prefix
    side, cache, bt, k, v, q, cu, sl = chunk_batch(lens, qlens, hkv, g, d, bs, params, dtype,
                                                   window)
    got = tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                     block_n=16)
    want = tq_prefill_ref(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side)
    assert_close(got, want, dtype, "prefill")
    # The backend's call: the chunk's K/V handed over already rotated (the store's rot_out).
    kr = (k.float() @ params.rotation.T).to(dtype)
    vr = (v.float() @ params.rotation.T).to(dtype)
    got_r = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                       block_n=16, rotated=True)
    want_r = tq_prefill_ref(q, kr, vr, cu, sl, cache, bt, params, d ** -0.5, side,
                            rotated=True)
    assert_close(got_r, want_r, dtype, "prefill, rotated K/V")
    assert_close(got_r, want, dtype, "prefill, rotated K/V vs unrotated")
    # ... and the chunk's packed tokens from the store's dequantized copy (deq_out): the same
    # operands as reading their packed slots, so the same output up to summation order.
    deq = _chunk_deq(k, v, cu, sl, bt, bs, params, dtype, cache)
    for stages in (1, 2):
        got_d = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                           block_n=16, rotated=True, deq=deq, deq_stages=stages)
        diff = (got_d.float() - got_r.float()).norm() / got_r.float().norm()
        assert diff < 2e-3, f"deq copy vs packed slots: relative error {diff:.2e}"
        assert_close(got_d, want_r, dtype, "prefill, deq copy")
    # The kernel really reads the copy: doubled key centroids there change the output.
    bad = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                     block_n=16, rotated=True, deq=(deq[0] * 2, deq[1], deq[2]))
    assert (bad.float() - got_r.float()).norm() > 1e-2 * got_r.float().norm()


@pytest.mark.parametrize("g,window", [(3, 8), (6, 0)])
def test_prefill_dense_rows_match_padded_with_fewer_programs(g, window, monkeypatch):
    """dense_rows (the default without `own`): a program's rows are (token, head) pairs, G per
    token, so a program's tokens need not start at a multiple of block_m; the padded layout
    (each token next_pow2(G) rows) gives the same output up to summation order, both match
    the reference, and for G = 3 and 6 the dense grid has fewer programs per chunk."""
    from vllm_turboquant.kernels import prefill as pf

    grids = []
    launch = pf.launch

    def spy(kernel, grid, *a, **k):
        grids.append(grid)
        return launch(kernel, grid, *a, **k)

    monkeypatch.setattr(pf, "launch", spy)
    dtype = torch.float16
    _, params = make_params("turboquant", window=window)
    hkv, d = 2, 64
    lens, qlens = [9, 45, 30], [9, 1, 13]     # fresh prefill, 1-token chunk, chunk + prefix
    side, cache, bt, k, v, q, cu, sl = chunk_batch(lens, qlens, hkv, g, d, 16, params, dtype,
                                                   window)
    want = tq_prefill_ref(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side)
    dense = tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                       block_n=16)                        # the default without `own`
    padded = tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, block_m=4,
                        block_n=16, dense_rows=False)
    assert_close(dense, want, dtype, "prefill, dense rows (the default without own)")
    assert_close(padded, want, dtype, "prefill, padded rows")
    diff = (dense.float() - padded.float()).norm() / padded.float().norm()
    assert diff < 2e-3, f"dense vs padded rows: relative error {diff:.2e}"
    rows = 4 * (4 if g == 3 else 8)                       # block_m x next_pow2(g)
    assert grids[0][1] == -(-13 * g // rows) and grids[1][1] == -(-13 // 4)
    assert grids[0][1] < grids[1][1]


def _own_index(cu, window):
    """The backend's own-row index (backend/metadata.py): token i of chunk b -> row
    cu_k[b] + i of the FlashAttention copy if i < L_b - window, else -1; and cu_k."""
    lens = (cu[1:] - cu[:-1]).long()
    keys = (lens - window).clamp(min=0)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), keys.cumsum(0)])
    idx = []
    for b in range(len(lens)):
        i = torch.arange(int(lens[b]))
        idx.append(torch.where(i < keys[b], cu_k[b] + i, -1))
    return torch.cat(idx).int(), cu_k.int()


@pytest.mark.parametrize("window,align,g", [(0, 0, 2), (8, 0, 3), (8, 16, 3)])
def test_prefill_own_attention_from_flash_matches_reference(window, align, g, monkeypatch):
    """OWN: the chunk's own keys j <= t - W arrive as FlashAttention's (out, lse) over the
    store's own_out copy (C[code] * scale), the kernel adds the rest (prefix, the aligned
    window's packed band, the exact window): the policy's answer, unchanged; in the padded
    rows it takes by default with `own` and in dense rows."""
    from vllm_turboquant.kernels import prefill as pf

    row_g = []
    launch = pf.launch

    def spy(kernel, grid, *a, **k):
        row_g.append(k["ROW_G"])
        return launch(kernel, grid, *a, **k)

    monkeypatch.setattr(pf, "launch", spy)
    dtype, hkv, d, bs = torch.bfloat16, 2, 64, 16
    codec, params = make_params("turboquant", window=window, align=align)
    lens, qlens = [30, 45, 26, 40], [30, 20, 1, 11]   # fresh, continuation, decode-like, short
    side, cache, bt, k, v, q, cu, sl = chunk_batch(lens, qlens, hkv, g, d, bs, params, dtype,
                                                   window)
    scale = d ** -0.5
    kr = (k.float() @ params.rotation.T).to(dtype)
    vr = (v.float() @ params.rotation.T).to(dtype)
    want = tq_prefill_ref(q, kr, vr, cu, sl, cache, bt, params, scale, side, rotated=True)
    # the store's deq_out and own_out for the chunk tokens: Triton against the reference
    own_idx, cu_k = _own_index(cu, window)
    t = k.shape[0]
    slots = torch.empty(t, dtype=torch.long)
    for b in range(len(lens)):
        pos = torch.arange(lens[b] - qlens[b], lens[b])
        slots[int(cu[b]):int(cu[b + 1])] = bt[b].long()[pos // bs] * bs + pos % bs
    outs = []
    for store in (tq_store, tq_store_ref):
        deq = (torch.empty(t, hkv, d, dtype=dtype), torch.empty(t, hkv, d, dtype=dtype),
               torch.empty(t, hkv, dtype=torch.int32))
        own_kv = (torch.zeros(t, hkv, d, dtype=dtype), torch.zeros(t, hkv, d, dtype=dtype))
        store(k, v, cache, slots, params, deq_out=deq, own_out=(*own_kv, own_idx))
        outs.append((deq, own_kv))
    (deq, own_kv), (_, own_ref) = outs
    n_own = int(cu_k[-1])
    for got_kv, want_kv in zip(own_kv, own_ref):
        assert_close(got_kv[:n_own], want_kv[:n_own], dtype, "store own_out")
    assert own_kv[0][:n_own].abs().sum() > 0
    q_rot = _decode.rotate_query(q, params, scale)
    own = own_attention_ref(q_rot, *own_kv, cu, cu_k, window)
    got = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, side, block_m=4, block_n=16,
                     rotated=True, deq=deq, own=own, q_rotated=q_rot)
    assert_close(got, want, dtype, "prefill with own attention")
    assert row_g[-1] == (4 if g == 3 else g), "with own the default is the padded rows"
    if g == 3:
        dense = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, side, block_m=4,
                           block_n=16, rotated=True, deq=deq, own=own, q_rotated=q_rot,
                           dense_rows=True)
        assert row_g[-1] == 3
        assert_close(dense, want, dtype, "prefill with own attention, dense rows")
    # the kernel really takes the own part from `own`: another (out, lse) changes the answer
    bad = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, side, block_m=4, block_n=16,
                     rotated=True, deq=deq, own=(own[0] * 0.5, own[1]), q_rotated=q_rot)
    assert (bad.float() - want.float()).norm() > 1e-2 * want.float().norm()


def _prefix_copy_rows(cu, sl, window):
    """The backend's rows of the copy FlashAttention reads when it covers the cached prefix too
    (backend/metadata.py, own_prefix): request b's first K_b = max(seq_len_b - window, 0)
    positions at rows cu_k[b]..: its prefix positions < min(P_b, K_b) unpacked from the cache
    (tq_unpack_pages' req / pos / dst), then its chunk tokens i < L_b - window from the store
    (own_index). -> (own_index, cu_k, req, pos, dst)."""
    lens = (cu[1:] - cu[:-1]).long()
    prefix = sl.long() - lens
    keys = (sl.long() - window).clamp(min=0)
    n_pre = torch.minimum(prefix, keys)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), keys.cumsum(0)])
    idx, req, pos, dst = [], [], [], []
    for b in range(len(lens)):
        i = torch.arange(int(lens[b]))
        idx.append(torch.where(prefix[b] + i < keys[b], cu_k[b] + prefix[b] + i, -1))
        j = torch.arange(int(n_pre[b]))
        req.append(torch.full_like(j, b))
        pos.append(j)
        dst.append(cu_k[b] + j)
    cat = lambda xs: torch.cat(xs).int()  # noqa: E731
    return cat(idx), cu_k.int(), cat(req), cat(pos), cat(dst)


@pytest.mark.parametrize("dtype,name,bs", [(torch.bfloat16, "turboquant", 16),
                                           (torch.float16, "tq-k3v3", 32)])
def test_unpack_pages_matches_reference(dtype, name, bs):
    """Cached slots -> rows C[code] * scale: the kernel writes the reference's values, at the
    rows asked (rows with dst < 0 untouched), and they decode the slots."""
    codec, params = make_params(name)
    hkv, d = 2, 64
    lens = [37, 5, 70]
    cache, bt, _ = paged(lens, hkv, d, bs, params, dtype, permuted=True)
    g = torch.Generator().manual_seed(3)
    req = torch.cat([torch.full((n,), b) for b, n in enumerate(lens)])
    pos = torch.cat([torch.arange(n) for n in lens])
    perm = torch.randperm(len(req), generator=g)
    dst = perm.clone()
    dst[::7] = -1                                      # skipped rows
    req, pos, dst = req.int(), pos.int(), dst.int()
    outs = []
    for fn in (tq_unpack_pages, tq_unpack_pages_ref):
        ok = torch.full((len(req), hkv, d), 7.0, dtype=dtype)
        ov = torch.full((len(req), hkv, d), 7.0, dtype=dtype)
        fn(cache, bt, req, pos, dst, params, ok, ov)
        outs.append((ok, ov))
    (gk, gv), (wk, wv) = outs
    # (not bit for bit here: the CPU interpreter's fp32 -> bf16 cast rounds otherwise than
    # CUDA's, as noted for the store's deq copy; the GPU suite compares bits)
    assert_close(gk, wk, dtype, "unpacked keys vs reference")
    assert_close(gv, wv, dtype, "unpacked values vs reference")
    skipped = torch.ones(len(req), dtype=torch.bool)
    skipped[dst[dst >= 0].long()] = False
    assert bool((gk[skipped] == 7.0).all()) and bool((gk[~skipped] != 7.0).any())
    # the values are the slots' dequantized keys / values (up to the output dtype's rounding)
    keep = dst >= 0
    blocks = bt.long()[req[keep].long(), pos[keep].long() // bs]
    slots = read_slots(cache, params.layout, blocks, pos[keep].long() % bs)
    k_ref, v_ref = decode_slots(params, slots)
    assert_close(gk[dst[keep].long()], k_ref, dtype, "unpacked keys")
    assert_close(gv[dst[keep].long()], v_ref, dtype, "unpacked values")


@pytest.mark.parametrize("window,align,g", [(0, 0, 2), (8, 0, 3), (8, 16, 3)])
def test_prefill_own_prefix_from_flash_matches_reference(window, align, g):
    """OWN_PREFIX: FlashAttention's (out, lse) covers every key j <= t - W, the cached prefix
    unpacked by tq_unpack_pages and the chunk's own from the store, and the kernel adds only
    the window's part (prefix keys j > t - W, the aligned band, the exact window): the
    policy's answer, unchanged. Continuation chunks shorter and longer than the window."""
    dtype, hkv, d, bs = torch.bfloat16, 2, 64, 16
    codec, params = make_params("turboquant", window=window, align=align)
    lens, qlens = [30, 45, 26, 40, 50], [30, 20, 1, 11, 5]
    side, cache, bt, k, v, q, cu, sl = chunk_batch(lens, qlens, hkv, g, d, bs, params, dtype,
                                                   window)
    scale = d ** -0.5
    kr = (k.float() @ params.rotation.T).to(dtype)
    vr = (v.float() @ params.rotation.T).to(dtype)
    want = tq_prefill_ref(q, kr, vr, cu, sl, cache, bt, params, scale, side, rotated=True)
    own_idx, cu_k, req, pos, dst = _prefix_copy_rows(cu, sl, window)
    assert int(req.numel()) > 0
    t = k.shape[0]
    slots = torch.empty(t, dtype=torch.long)
    for b in range(len(lens)):
        p_ = torch.arange(lens[b] - qlens[b], lens[b])
        slots[int(cu[b]):int(cu[b + 1])] = bt[b].long()[p_ // bs] * bs + p_ % bs
    n_rows = int(cu_k[-1])
    deq = (torch.empty(t, hkv, d, dtype=dtype), torch.empty(t, hkv, d, dtype=dtype),
           torch.empty(t, hkv, dtype=torch.int32))
    own_kv = (torch.zeros(n_rows, hkv, d, dtype=dtype), torch.zeros(n_rows, hkv, d, dtype=dtype))
    tq_store(k, v, cache, slots, params, deq_out=deq, own_out=(*own_kv, own_idx))
    tq_unpack_pages(cache, bt, req, pos, dst, params, *own_kv)
    q_rot = _decode.rotate_query(q, params, scale)
    own = own_attention_ref(q_rot, *own_kv, cu, cu_k, window)
    got = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, side, block_m=4, block_n=16,
                     rotated=True, deq=deq, own=own, own_prefix=True, q_rotated=q_rot)
    assert_close(got, want, dtype, "prefill with the prefix through FlashAttention")
    # the kernel really skips the covered prefix: without own_prefix it is counted twice
    twice = tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, side, block_m=4,
                       block_n=16, rotated=True, deq=deq, own=own, q_rotated=q_rot)
    assert (twice.float() - want.float()).norm() > 1e-2 * want.float().norm()


def _chunk_deq(k, v, cu, seq_lens, bt, bs, params, dtype, cache):
    """The store's deq_out for the chunk tokens k, v (already in `cache`: same bytes again)."""
    t, hkv, d = k.shape
    slots = torch.empty(t, dtype=torch.long)
    for b in range(len(seq_lens)):
        s0, s1 = int(cu[b]), int(cu[b + 1])
        pos = torch.arange(int(seq_lens[b]) - (s1 - s0), int(seq_lens[b]))
        slots[s0:s1] = bt[b].long()[pos // bs] * bs + pos % bs
    before = cache.clone()
    deq = (torch.empty(t, hkv, d, dtype=dtype), torch.empty(t, hkv, d, dtype=dtype),
           torch.empty(t, hkv, dtype=torch.int32))
    tq_store_ref(k, v, cache, slots, params, deq_out=deq)
    assert torch.equal(cache, before)
    return deq


# The step that crashed `vllm serve` on CUDA (head 128, GQA 2, window 64, a fresh 256-token
# prompt; see tests/gpu/test_kernels_gpu.py "regression hunt"): the interpreter computes it
# correctly, so whatever fails there is GPU-specific; this keeps the logic pinned in CI.
def test_head128_window_step_store_then_prefill_then_side():
    dtype, d, hq, hkv, bs, w, n = torch.bfloat16, 128, 4, 2, 16, 64, 96
    codec, params = make_params("turboquant", d=d, window=w)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(n, hkv, d, generator=gen).to(dtype)
    v = torch.randn(n, hkv, d, generator=gen).to(dtype)
    q = torch.randn(n, hq, d, generator=gen).to(dtype)
    nb = n // bs + 2
    bt = torch.randperm(nb, generator=gen)[None].int()
    pos = torch.arange(n)
    slots = bt[0].long()[pos // bs] * bs + pos % bs
    rows, end = torch.zeros(n, dtype=torch.int32), torch.full((n,), n, dtype=torch.int32)
    caches, sides, outs = [], [], []
    for store, prefill in ((tq_store, tq_prefill), (tq_store_ref, tq_prefill_ref)):
        cache = torch.zeros(nb, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8)
        side = TQSide.empty(2, w, hkv, d, dtype)
        store(k, v, cache, slots, params)
        outs.append(prefill(q, k, v, torch.tensor([0, n], dtype=torch.int32),
                            torch.tensor([n], dtype=torch.int32), cache, bt, params,
                            d ** -0.5, side))
        store(k, v, cache, slots, params, side, rows, pos.int(), end)
        caches.append(cache)
        sides.append(side)
    assert_close(outs[0], outs[1], dtype, "prefill")
    assert (caches[0] != caches[1]).float().mean() < 1e-4
    assert torch.equal(sides[0].tag, sides[1].tag) and (sides[0].tag[0] >= 0).all()
    torch.testing.assert_close(sides[0].k.float(), sides[1].k.float(), atol=3e-2, rtol=3e-2)


def test_prefill_launch_override_is_used_and_validated(monkeypatch):
    """$VLLM_TURBOQUANT_PREFILL_CONFIG sets the launch defaults (what the H200 e2e run used),
    a bad value is a clear error, not a silent default."""
    from vllm_turboquant.kernels import prefill as pf

    seen = {}
    run = pf._tq_prefill_kernel.run

    def spy(*a, **k):
        seen.update(block_m=k["BLOCK_M"], block_n=k["BLOCK_N"], num_warps=k.get("num_warps"),
                    deq_stages=k["DEQ_STAGES"])
        return run(*a, **k)

    monkeypatch.setattr(pf._tq_prefill_kernel, "run", spy)
    d, hkv, hq = 64, 1, 2
    _, params = make_params("turboquant", d=d)
    lens = [9]
    cache, bt, chunks = paged(lens, hkv, d, 16, params, torch.bfloat16)
    q = torch.randn(9, hq, d).to(torch.bfloat16)
    cu, sl = torch.tensor([0, 9], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32)
    try:
        monkeypatch.setenv(pf._OVERRIDE_ENV,
                           '{"block_m": 4, "block_n": 16, "num_warps": 2, "deq_stages": 2}')
        pf.launch_override.cache_clear()
        got = tq_prefill(q, chunks[0][0], chunks[0][1], cu, sl, cache, bt, params, d ** -0.5)
        assert seen == {"block_m": 4, "block_n": 16, "num_warps": 2, "deq_stages": 2}
        want = tq_prefill_ref(q, chunks[0][0], chunks[0][1], cu, sl, cache, bt, params,
                              d ** -0.5)
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
        monkeypatch.setenv(pf._OVERRIDE_ENV, '{"dense_rows": 0}')
        pf.launch_override.cache_clear()
        assert pf.launch_override() == {"dense_rows": 0}
        for bad in ('{"block_m": 4, "warps": 2}', '{"block_m": 4.0}', "block_m=4", "[4]",
                    '{"dense_rows": 2}', '{"dense_rows": true}', '{"block_m": 0}'):
            monkeypatch.setenv(pf._OVERRIDE_ENV, bad)
            pf.launch_override.cache_clear()
            with pytest.raises(ValueError, match="VLLM_TURBOQUANT_PREFILL_CONFIG"):
                tq_prefill(q, chunks[0][0], chunks[0][1], cu, sl, cache, bt, params, d ** -0.5)
    finally:
        pf.launch_override.cache_clear()   # monkeypatch restores the variable itself


TILES = dict(block_m=4, block_n=16)   # several tiles and programs at 150 tokens


def test_prefill_invariant_same_bits_however_chunked():
    """invariant=True (VLLM_BATCH_INVARIANT): a 150-token prompt whole, in 32-token chunks and
    in uneven ones gives the same bits at every position, and matches the reference; the
    default order does not (control). tests/gpu repeats it at real shapes. Chunks have >= 2
    tokens: a 1-token one is a decode in the backend, and the launcher's query-rotation GEMM
    over Hq rows rounds differently in CPU BLAS than over more rows."""
    d, hq, hkv, w, bs, n = 64, 6, 2, 8, 4, 150
    _, params = make_params("turboquant", d, window=w)
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(n, hkv, d, generator=gen) for _ in range(2))
    q = torch.randn(n, hq, d, generator=gen)
    whole, cache, bt = prompt_in_chunks(q, k, v, [0, n], params, bs, w, True, 0, **TILES)
    uneven = [0, 2, 37, 90, 92, 148, n]
    for bounds in (list(range(0, n, 32)) + [n], uneven):
        got, _, _ = prompt_in_chunks(q, k, v, bounds, params, bs, w, True, 2, **TILES)
        bad = (got != whole).any(-1).any(-1).nonzero().flatten()
        assert bad.numel() == 0, f"chunks {bounds}: positions {bad[:10].tolist()} differ"
    want = tq_prefill_ref(q, k, v, torch.tensor([0, n]).int(), torch.tensor([n]).int(), cache,
                          bt, params, d ** -0.5, TQSide.empty(1, w, hkv, d, q.dtype))
    assert_close(whole, want, torch.float32, "invariant prefill")
    default = [prompt_in_chunks(q, k, v, b, params, bs, w, False, 0, **TILES)[0]
               for b in ([0, n], uneven)]
    assert not torch.equal(*default)
