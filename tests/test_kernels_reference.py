"""The torch references of the kernels vs a naive per-token codec.decode + softmax attention."""

from __future__ import annotations

import pytest
import torch

from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.kernels import TQLayerParams, TQSide, read_slots, write_slots
from vllm_turboquant.kernels.reference import (decode_slots, encode_slots, scale_check,
                                                tq_decode_ref, tq_prefill_ref, tq_store_ref)


def make_cache(num_blocks, block_size, hkv, slot_bytes, permuted=False):
    if permuted:  # [blocks, heads, tokens, bytes] storage viewed as the logical layout
        return torch.zeros(num_blocks, hkv, block_size, slot_bytes,
                           dtype=torch.uint8).permute(0, 2, 1, 3)
    return torch.zeros(num_blocks, block_size, hkv, slot_bytes, dtype=torch.uint8)


def fill_sequences(codec, params, lens, hkv, block_size, *, permuted=False, seed=0,
                   dtype=torch.float32):
    """Random K/V for each sequence, written through tq_store_ref into shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    d = codec.head_size
    max_blocks = max(1, max((n + block_size - 1) // block_size for n in lens))
    num_blocks = len(lens) * max_blocks + 3
    cache = make_cache(num_blocks, block_size, hkv, codec.layout.slot_bytes, permuted)
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = perm[:len(lens) * max_blocks].reshape(len(lens), max_blocks).int()
    keys, values = [], []
    for b, n in enumerate(lens):
        k = (torch.randn(n, hkv, d, generator=gen) * 2 + 0.5).to(dtype)
        v = torch.randn(n, hkv, d, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = block_table[b].long()[pos // block_size] * block_size + pos % block_size
        tq_store_ref(k, v, cache, slots, params)
        keys.append(k)
        values.append(v)
    return cache, block_table, keys, values


def naive_attention(q, k, v, scale, causal_offset=None):
    """q [M, Hq, D], k/v [N, Hkv, D] float32 in the original space -> [M, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    s = torch.einsum("mhd,nhd->hmn", q, k) * scale
    if causal_offset is not None:
        i = torch.arange(q.shape[0])[:, None]
        j = torch.arange(k.shape[0])[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    return torch.einsum("hmn,nhd->mhd", s.softmax(-1), v)


@pytest.fixture(scope="module", params=[(64, "turboquant"), (128, "tq-k3v3")])
def codec(request):
    d, name = request.param
    return TQLayerCodec(TQConfig.from_name(name), d, layer=3)


def test_encode_slots_matches_codec_bytes(codec):
    params = TQLayerParams.from_codec(codec)
    x = torch.randn(5, 3, codec.head_size) * 3
    y = torch.randn(5, 3, codec.head_size)
    x[1, 2, 7] = float("nan")
    y[4, 0, 0] = float("inf")
    slots, _, _ = encode_slots(params, x, y)
    assert torch.equal(slots, codec.encode(x, y))
    k, v = decode_slots(params, slots)
    kc, vc = codec.decode_rotated(slots)
    assert torch.equal(k, kc) and torch.equal(v, vc)
    assert k[1, 2].abs().sum() == 0 and v[4, 0].abs().sum() == 0


@pytest.mark.parametrize("permuted", [False, True])
def test_store_ref_writes_codec_bytes_and_skips_padding(codec, permuted):
    params = TQLayerParams.from_codec(codec)
    hkv, bs = 2, 4
    cache = make_cache(5, bs, hkv, codec.layout.slot_bytes, permuted)
    cache.fill_(7)
    k = torch.randn(6, hkv, codec.head_size, dtype=torch.bfloat16)
    v = torch.randn(6, hkv, codec.head_size, dtype=torch.bfloat16)
    slots = torch.tensor([3, -1, 17, 0, -1, 9])
    tq_store_ref(k, v, cache, slots, params)
    want = codec.encode(k, v)
    lay = codec.layout
    every = torch.arange(5 * bs)
    stored = read_slots(cache, lay, every // bs, every % bs)          # [slots, Hkv, bytes]
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(stored[s], want[t])
    written = {s for s in slots.tolist() if s >= 0}
    untouched = [s for s in range(5 * bs) if s not in written]
    assert all((stored[s] == 7).all() for s in untouched)


@pytest.mark.parametrize("permuted", [False, True])
def test_page_layout_is_head_major_planes(codec, permuted):
    """docs/layout.md, "One page": block n, KV head h is one run of bs * slot_bytes bytes at
    n * page + h * bs * slot_bytes: bs key-code rows, then bs value-code rows, then bs scale
    words; whatever order the view's last three dims have."""
    lay = codec.layout
    hkv, bs, nb = 3, 4, 2
    sb = lay.slot_bytes
    cache = make_cache(nb, bs, hkv, sb, permuted)
    gen = torch.Generator().manual_seed(3)
    slots = torch.randint(0, 256, (nb * bs, hkv, sb), generator=gen, dtype=torch.uint8)
    every = torch.arange(nb * bs)
    write_slots(cache, lay, every // bs, every % bs, slots)
    assert torch.equal(read_slots(cache, lay, every // bs, every % bs), slots)
    flat = cache.as_strided((nb * bs * hkv * sb,), (1,))          # the raw bytes
    kw, vw = lay.v_codes_offset, lay.k_scale_offset - lay.v_codes_offset
    sw = sb - lay.k_scale_offset
    for s_id in (0, 5, nb * bs - 1):
        n, t = divmod(s_id, bs)
        for h in range(hkv):
            head = n * bs * hkv * sb + h * bs * sb
            assert torch.equal(flat[head + t * kw:head + (t + 1) * kw], slots[s_id, h, :kw])
            v0 = head + bs * kw + t * vw
            assert torch.equal(flat[v0:v0 + vw], slots[s_id, h, kw:kw + vw])
            s0 = head + bs * (kw + vw) + t * sw
            assert torch.equal(flat[s0:s0 + sw], slots[s_id, h, kw + vw:])


def test_page_align_validates_the_cache(codec):
    """What every launcher calls first: dense blocks in any dim order are taken (16-byte code
    rows when sizes allow), a block that is not one dense run is refused, not misread."""
    from vllm_turboquant.kernels._common import page_align
    lay = codec.layout
    sb = lay.slot_bytes
    assert page_align(make_cache(3, 16, 2, sb), lay) == 16
    assert page_align(make_cache(3, 16, 2, sb, permuted=True), lay) == 16
    assert page_align(make_cache(3, 1, 1, sb), lay) == 4        # 1 * slot_bytes % 16 != 0
    wide = torch.zeros(3, 16, 2, 2 * sb, dtype=torch.uint8)[..., :sb]   # gaps between slots
    with pytest.raises(ValueError, match="dense pages"):
        page_align(wide, lay)
    with pytest.raises(ValueError, match="dense pages"):
        read_slots(wide, lay, torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("lens,hq,hkv,bs", [([1, 7, 33], 4, 2, 4), ([20], 3, 1, 16)])
def test_decode_ref_matches_naive(codec, lens, hq, hkv, bs):
    params = TQLayerParams.from_codec(codec)
    cache, bt, keys, values = fill_sequences(codec, params, lens, hkv, bs, permuted=True)
    q = torch.randn(len(lens), hq, codec.head_size)
    scale = codec.head_size ** -0.5
    got = tq_decode_ref(q, cache, bt, torch.tensor(lens, dtype=torch.int32), codec, scale)
    for b, n in enumerate(lens):
        kd, vd = codec.decode(codec.encode(keys[b], values[b]))
        want = naive_attention(q[b:b + 1], kd, vd, scale)[0]
        torch.testing.assert_close(got[b], want, atol=2e-5, rtol=2e-5)


def test_decode_ref_padding_row_is_zero(codec):
    params = TQLayerParams.from_codec(codec)
    cache, bt, _, _ = fill_sequences(codec, params, [5, 3], 1, 4)
    q = torch.randn(2, 2, codec.head_size)
    out = tq_decode_ref(q, cache, bt, torch.tensor([5, 0], dtype=torch.int32), params, 0.1)
    assert out[1].abs().sum() == 0 and out[0].abs().sum() > 0


@pytest.mark.parametrize("lens,qlens", [([9, 40], [9, 5]), ([1, 17], [1, 1])])
def test_prefill_ref_matches_naive(codec, lens, qlens):
    """No window: every key, the chunk's own included, is read from its packed slot (what a
    decode step reads), so the chunking never changes the result."""
    params = TQLayerParams.from_codec(codec)
    hq, hkv, bs = 4, 2, 8
    cache, bt, keys, values = fill_sequences(codec, params, lens, hkv, bs)
    d = codec.head_size
    qs = [torch.randn(m, hq, d) for m in qlens]
    cu = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    kchunk = torch.cat([k[n - m:] for k, n, m in zip(keys, lens, qlens)])
    vchunk = torch.cat([v[n - m:] for v, n, m in zip(values, lens, qlens)])
    scale = d ** -0.5
    got = tq_prefill_ref(torch.cat(qs), kchunk, vchunk, cu, torch.tensor(lens, dtype=torch.int32),
                         cache, bt, params, scale)
    for b, (n, m) in enumerate(zip(lens, qlens)):
        kd, vd = codec.decode(codec.encode(keys[b], values[b]))
        want = naive_attention(qs[b], kd, vd, scale, causal_offset=n - m)
        torch.testing.assert_close(got[cu[b]:cu[b + 1]], want, atol=2e-5, rtol=2e-5)


def _prefill_in_chunks(params, k, v, q, chunks, window, bs=4):
    """Prefill one sequence chunk by chunk as the backend does (store the chunk's packed slots,
    attend, then write its window side entries); returns the outputs [n, Hq, D]."""
    n, hkv, d = k.shape
    cache = make_cache(n // bs + 2, bs, hkv, params.layout.slot_bytes)
    bt = torch.arange(n // bs + 2, dtype=torch.int32).flip(0)[None]
    side = TQSide.empty(1, window, hkv, d, dtype=torch.float32) if window else None
    outs, start = [], 0
    for m in chunks:
        pos = torch.arange(start, start + m)
        slots = bt[0].long()[pos // bs] * bs + pos % bs
        tq_store_ref(k[pos], v[pos], cache, slots, params)
        outs.append(tq_prefill_ref(q[pos], k[pos], v[pos], torch.tensor([0, m], dtype=torch.int32),
                                   torch.tensor([start + m], dtype=torch.int32), cache, bt,
                                   params, d ** -0.5, side))
        if side is not None:
            z = torch.zeros(m, dtype=torch.long)
            tq_store_ref(k[pos], v[pos], cache, slots, params, side, z, pos,
                         torch.full((m,), start + m))
        start += m
    return torch.cat(outs)


@pytest.mark.parametrize("window", [0, 6])
def test_prefill_ref_chunking_never_changes_the_result(window):
    """One chunk, uneven chunks (some shorter, some longer than the window) and token by token
    give the same attention, and it is the per-query window policy computed naively."""
    codec = TQLayerCodec(TQConfig.from_name("turboquant", window=window), 64, layer=1)
    params = TQLayerParams.from_codec(codec)
    n, hkv, hq = 23, 2, 4
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(n, hkv, 64, generator=gen) * 2 + 0.5
    v = torch.randn(n, hkv, 64, generator=gen)
    q = torch.randn(n, hq, 64, generator=gen)
    whole = _prefill_in_chunks(params, k, v, q, [n], window)
    for chunks in ([5, 9, 2, 7], [1] * n):
        torch.testing.assert_close(_prefill_in_chunks(params, k, v, q, chunks, window), whole,
                                   atol=2e-5, rtol=2e-5)
    kd, vd = codec.decode(codec.encode(k, v))
    want = torch.empty_like(whole)
    for t in range(n):
        j = torch.arange(t + 1)
        exact = (j > t - window)[:, None, None]
        want[t] = naive_attention(q[t:t + 1], torch.where(exact, k[:t + 1], kd[:t + 1]),
                                  torch.where(exact, v[:t + 1], vd[:t + 1]), 64 ** -0.5)[0]
    torch.testing.assert_close(whole, want, atol=2e-5, rtol=2e-5)
    if window:   # the window really is used: without it the result differs
        assert not torch.allclose(_prefill_in_chunks(params, k, v, q, [n], 0), whole, atol=1e-3)


def test_window_side_is_exact_and_tag_checked():
    codec = TQLayerCodec(TQConfig.from_name("tq-k3v3", window=4), 64, layer=0)
    params = TQLayerParams.from_codec(codec)
    hkv, bs, n = 1, 4, 10
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(n, hkv, 64, generator=gen)
    v = torch.randn(n, hkv, 64, generator=gen)
    cache = make_cache(4, bs, hkv, codec.layout.slot_bytes)
    bt = torch.tensor([[2, 0, 3]], dtype=torch.int32)
    pos = torch.arange(n)
    slots = bt[0].long()[pos // bs] * bs + pos % bs
    side = TQSide.empty(1, 4, hkv, 64, dtype=torch.float32)
    z = torch.zeros(n, dtype=torch.long)
    tq_store_ref(k, v, cache, slots, params, side, z, pos, torch.full((n,), n))
    # Only the last 4 positions were copied; the ring holds their slot ids and scale bytes.
    assert sorted(side.tag[0].tolist()) == sorted(slots[-4:].tolist())
    assert torch.equal(side.check[0, pos[-4:] % 4, 0],
                       scale_check(params, read_slots(cache, params.layout, slots[-4:] // bs,
                                                      slots[-4:] % bs)[:, 0]))
    q = torch.randn(1, 2, 64, generator=gen)
    lens = torch.tensor([n], dtype=torch.int32)
    got = tq_decode_ref(q, cache, bt, lens, params, 0.125, side)
    kd, vd = codec.decode(codec.encode(k, v))
    kd[-4:], vd[-4:] = k[-4:], v[-4:]
    want = naive_attention(q, kd, vd, 0.125)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A stale tag (the entry belongs to another slot) falls back to the packed slot.
    side.tag[0, (n - 1) % 4] = 12345
    got2 = tq_decode_ref(q, cache, bt, lens, params, 0.125, side)
    kd[-1], vd[-1] = codec.decode(codec.encode(k[-1], v[-1]))
    torch.testing.assert_close(got2, naive_attention(q, kd, vd, 0.125), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, got2)


# -- the register-lookup PTX of decode's MODE 3, run on a model of the few PTX ops it uses ----
def _run_ptx(asm: str, inputs: dict[int, int]) -> list[int]:
    """Execute the PTX subset of `prmt_dequant_asm` (mov/shl/shr/not/and/or/xor/mul.lo/prmt
    in its default mode) on Python ints; returns $0..$3."""
    regs = {f"${i}": v for i, v in inputs.items()}
    mask = 0xFFFFFFFF

    def val(x):
        return int(x, 0) if x[0].isdigit() else regs[x]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line[0] in "{}." or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *srcs = [a.strip() for a in rest.split(",")]
        a = [val(x) for x in srcs]
        if op == "prmt.b32":
            t, r = (a[0] & mask) | ((a[1] & mask) << 32), 0
            for i in range(4):
                sel = (a[2] >> (4 * i)) & 0xF
                byte = (t >> (8 * (sel & 7))) & 0xFF
                if sel & 8:                                   # sign-replicate mode
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        else:
            r = {"mov.b32": lambda: a[0], "shl.b32": lambda: a[0] << a[1],
                 "shr.b32": lambda: a[0] >> a[1], "not.b32": lambda: ~a[0],
                 "and.b32": lambda: a[0] & a[1], "or.b32": lambda: a[0] | a[1],
                 "xor.b32": lambda: a[0] ^ a[1], "mul.lo.u32": lambda: a[0] * a[1]}[op]()
        regs[dst] = r & mask
    return [regs[f"${i}"] for i in range(4)]


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prmt_dequant_asm_matches_codebook(d, dtype):
    from vllm_turboquant.kernels._common import prmt_dequant_asm, stored_order
    codec = TQLayerCodec(TQConfig.from_name("turboquant"), d, layer=0)
    cent = codec.key_centroids
    asm = prmt_dequant_asm(cent, dtype)
    assert asm is not None
    # a nibble is a stored (sign-magnitude) code: it decodes to C[sign_magnitude(nibble)]
    want = stored_order(cent).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2 ** 32, (300,), generator=gen, dtype=torch.int64).tolist()
    words += [0, 0xFFFFFFFF, 0x0F0F0F0F, 0xF0F0F0F0, 0x87654321, 0x12345678]
    for w in words:
        out = _run_ptx(asm, {4: w})
        halves = [(r >> s) & 0xFFFF for r in out for s in (0, 16)]   # lo0..3, hi0..3
        for k in range(4):
            byte = (w >> (8 * k)) & 0xFF
            assert halves[k] == want[byte & 15], (hex(w), k)
            assert halves[4 + k] == want[byte >> 4], (hex(w), k)
    # Not symmetric -> no asm (the launcher falls back to the pair table).
    assert prmt_dequant_asm(cent + 0.01, dtype) is None


@pytest.mark.parametrize("name", ["turboquant", "tq-k4v4"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_4bit_presets_take_the_register_lookup(name, d):
    """The plugin admits 4-bit window presets at heads 128/256 on CUDA because their prefill
    runs the register (prmt) dequantization; tq_prefill refuses the table paths there. That
    needs codebooks exactly symmetric in fp16 and bf16, else a server would fail at its first
    prefill instead of at startup."""
    pytest.importorskip("triton")
    from vllm_turboquant.kernels.decode import lookup_tables

    params = TQLayerParams.from_codec(TQLayerCodec(TQConfig.from_name(name), d, layer=1))
    for dtype in (torch.float16, torch.bfloat16):
        kmode, vmode, *_ = lookup_tables(params, dtype, lookup=3, allow_asm=True)
        assert (kmode, vmode) == (3, 3), (name, d, dtype)
