"""Chunked-prefill attention over packed pages: no bf16 copy of the cached prefix.

One program per (sequence, block of BLOCK_M chunk tokens, KV head) serves the G query heads of
the group as BLOCK_M * G_PAD rows (row r = token r // G_PAD, head r % G_PAD), so each packed
prefix tile is unpacked once per group. One online softmax runs first over the prefix tiles
(dequantized in registers from the packed slots, window side entries tag-checked as in
decode), then over the chunk's own exact K/V (rotated once by the launcher) with the causal
mask. The accumulator lives in the rotated space and is un-rotated at the end (acc @ R).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TQSide, as_params, check_cache_alignment, next_pow2
from ._tl import dequant_halves, interpreting, mma
from .decode import lookup_tables, rotate_query


@triton.jit
def _tq_prefill_kernel(
    q_ptr,              # [T, Hq, D] dot dtype: rotated q * softmax_scale * log2(e)
    k_ptr, v_ptr,       # [T, Hkv, D] dot dtype: the chunk's rotated K/V (contiguous)
    out_ptr,            # [T, Hq, D] output dtype
    cu_q_ptr,           # [B + 1] int32
    seq_lens_ptr,       # [B] int32 (prefix + chunk)
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8
    block_table_ptr,    # [B, max_blocks] int32
    kcent_ptr, vcent_ptr,    # float32 codebooks
    ktab_ptr, vtab_ptr,      # lookup tables for KMODE / VMODE (see dequant_halves)
    rot_ptr,            # [D, D] float32, R / rotation_scale
    side_k_ptr, side_v_ptr, side_tag_ptr, side_check_ptr,  # TQSide (contiguous)
    G, block_size, W, num_kv_heads, rot_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_ct, stride_ch,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr,
    BLOCK_M: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SIDE: tl.constexpr, F32: tl.constexpr, COLS: tl.constexpr,
    KMODE: tl.constexpr, VMODE: tl.constexpr, KASM: tl.constexpr = "", VASM: tl.constexpr = "",
):
    b = tl.program_id(0)
    mb = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    if mb * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    ROWS: tl.constexpr = BLOCK_M * G_PAD
    HALF: tl.constexpr = D // 2
    offs_r = tl.arange(0, ROWS)
    tok = mb * BLOCK_M + offs_r // G_PAD                 # chunk-local token index of each row
    gi = offs_r % G_PAD
    rmask = (tok < q_len) & (gi < G)
    qh = h * G + gi
    offs_lo = tl.arange(0, HALF)
    offs_hi = HALF + offs_lo
    t64 = (q_start + tok).to(tl.int64)
    q_row = q_ptr + t64[:, None] * stride_qt + qh[:, None] * stride_qh
    q_lo = tl.load(q_row + offs_lo[None, :], mask=rmask[:, None], other=0.0)
    q_hi = tl.load(q_row + offs_hi[None, :], mask=rmask[:, None], other=0.0)
    dt = q_lo.dtype

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc_lo = tl.zeros([ROWS, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([ROWS, HALF], dtype=tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt
    head_off = h.to(tl.int64) * stride_ch
    win_start = seq_len - W

    # -- the cached prefix, from packed slots -------------------------------------------------
    for n0 in range(0, prefix, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < prefix
        blk = tl.load(bt_row + offs_n // block_size, mask=nmask, other=0).to(tl.int64)
        in_blk = (offs_n % block_size).to(tl.int64)
        # Slots are 4-byte aligned (launcher checks): lets the compiler load 4 bytes at a time.
        base = cache_ptr + tl.multiple_of(blk * stride_cb + in_blk * stride_ct + head_off, 4)

        k_lo, k_hi = dequant_halves(base, nmask, offs_lo, offs_hi, kcent_ptr, ktab_ptr,
                                    KBITS, D, dt, KMODE, KASM)
        ks = tl.load((base + KS_OFF).to(tl.pointer_type(tl.float16)), mask=nmask, other=0.0)
        s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
        s = s * ks.to(tl.float32)[None, :]

        use_side = offs_n < 0
        if HAS_SIDE:
            # Defined outside the runtime `if`: Triton scopes names bound inside it.
            entry = b.to(tl.int64) * W + offs_n % W
            side_off = (entry * num_kv_heads + h) * D
            if n0 + BLOCK_N > win_start:
                in_win = nmask & (offs_n >= win_start)
                tag = tl.load(side_tag_ptr + entry, mask=in_win, other=-1)
                chk = tl.load(side_check_ptr + entry * num_kv_heads + h, mask=in_win, other=0)
                packed_chk = tl.load((base + KS_OFF).to(tl.pointer_type(tl.int32)),
                                     mask=in_win, other=1)
                use_side = in_win & (tag.to(tl.int64) == blk * block_size + in_blk) & (
                    chk == packed_chk)
                sk_lo = tl.load(side_k_ptr + side_off[:, None] + offs_lo[None, :],
                                mask=use_side[:, None], other=0.0)
                sk_hi = tl.load(side_k_ptr + side_off[:, None] + offs_hi[None, :],
                                mask=use_side[:, None], other=0.0)
                s_side = (mma(q_lo, tl.trans(sk_lo.to(dt)), F32)
                          + mma(q_hi, tl.trans(sk_hi.to(dt)), F32))
                s = tl.where(use_side[None, :], s_side, s)

        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]
        m_i = m_new

        v_lo, v_hi = dequant_halves(base + V_OFF, nmask, offs_lo, offs_hi, vcent_ptr, vtab_ptr,
                                    VBITS, D, dt, VMODE, VASM)
        vs = tl.load((base + KS_OFF + 2).to(tl.pointer_type(tl.float16)), mask=nmask,
                     other=0.0)
        pv = p * vs.to(tl.float32)[None, :]
        if HAS_SIDE:
            if n0 + BLOCK_N > win_start:
                pv = tl.where(use_side[None, :], 0.0, pv)
                sv_lo = tl.load(side_v_ptr + side_off[:, None] + offs_lo[None, :],
                                mask=use_side[:, None], other=0.0)
                sv_hi = tl.load(side_v_ptr + side_off[:, None] + offs_hi[None, :],
                                mask=use_side[:, None], other=0.0)
                p_side = tl.where(use_side[None, :], p, 0.0).to(dt)
                acc_lo += mma(p_side, sv_lo.to(dt), F32)
                acc_hi += mma(p_side, sv_hi.to(dt), F32)
        pv = pv.to(dt)
        acc_lo += mma(pv, v_lo, F32)
        acc_hi += mma(pv, v_hi, F32)

    # -- the chunk itself, exact and causal ---------------------------------------------------
    chunk_end = tl.minimum(q_len, (mb + 1) * BLOCK_M)
    for n0 in range(0, chunk_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < chunk_end
        kv_off = ((q_start + offs_n).to(tl.int64) * num_kv_heads + h) * D
        kv_lo = kv_off[:, None] + offs_lo[None, :]
        kv_hi = kv_off[:, None] + offs_hi[None, :]
        k_lo = tl.load(k_ptr + kv_lo, mask=nmask[:, None], other=0.0)
        k_hi = tl.load(k_ptr + kv_hi, mask=nmask[:, None], other=0.0)
        s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= tok[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        pd = p.to(dt)
        v_lo = tl.load(v_ptr + kv_lo, mask=nmask[:, None], other=0.0)
        v_hi = tl.load(v_ptr + kv_hi, mask=nmask[:, None], other=0.0)
        acc_lo = acc_lo * alpha[:, None] + mma(pd, v_lo, F32)
        acc_hi = acc_hi * alpha[:, None] + mma(pd, v_hi, F32)
        m_i = m_new

    inv_l = 1.0 / tl.maximum(l_i, 1e-30)
    acc_lo = acc_lo * inv_l[:, None]
    acc_hi = acc_hi * inv_l[:, None]
    # Un-rotate out = acc @ R = acc_lo @ R[:D/2] + acc_hi @ R[D/2:], in column blocks.
    offs_c = tl.arange(0, COLS)
    for c0 in tl.static_range(0, D, COLS):
        r_lo = tl.load(rot_ptr + offs_lo[:, None] * D + (c0 + offs_c)[None, :])
        r_hi = tl.load(rot_ptr + offs_hi[:, None] * D + (c0 + offs_c)[None, :])
        if F32:
            o = (tl.dot(acc_lo, r_lo, input_precision="ieee")
                 + tl.dot(acc_hi, r_hi, input_precision="ieee"))
        else:
            o = tl.dot(acc_lo, r_lo) + tl.dot(acc_hi, r_hi)   # tf32, below the output's
        o = o * rot_scale
        tl.store(out_ptr + t64[:, None] * stride_ot + qh[:, None] * stride_oh
                 + (c0 + offs_c)[None, :], o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def tq_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, params, scale: float, side: TQSide | None = None,
               max_query_len: int | None = None, out: torch.Tensor | None = None,
               block_m: int | None = None, block_n: int = 32, num_warps: int = 4,
               num_stages: int = 1, lookup: int = 2) -> torch.Tensor:
    """Triton prefill over packed pages; same contract as `reference.tq_prefill_ref`.

    query [T, Hq, D]; key, value [T, Hkv, D] (the chunk's own K/V); cu_seqlens_q int32 [B+1];
    seq_lens int32 [B] = prefix + chunk; kv_cache uint8 [num_blocks, block_size, Hkv,
    slot_bytes]; block_table int32 [B, max_blocks]. max_query_len: the longest chunk (pass it
    to avoid a device->host sync). Returns [T, Hq, D] in query.dtype.
    """
    p = as_params(params, query.device)
    t, hq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    assert g * hkv == hq and kv_cache.stride(-1) == 1
    check_cache_alignment(kv_cache)
    if out is None:
        out = torch.empty_like(query)
    bsz = seq_lens.shape[0]
    if t == 0 or bsz == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    f32 = query.dtype == torch.float32 or interpreting(_tq_prefill_kernel)
    dot_dtype = query.dtype
    q = rotate_query(query, p, scale, dot_dtype)
    # The chunk's K/V rotated once here (T x Hkv x D, small next to the prefix).
    k = (key.float() @ p.rotation.T).to(dot_dtype).contiguous()
    v = (value.float() @ p.rotation.T).to(dot_dtype).contiguous()
    g_pad = next_pow2(g)
    if block_m is None:
        # 128 rows per program: 8.1 ms vs 12.4 (64 rows) and 20.4 (32 rows) at 32K cached +
        # 2K chunk, head 128, GQA 4, H100, before the 4-byte alignment hint.
        block_m = max(1, 128 // g_pad)
    has_side = side is not None and side.window > 0
    if has_side:
        assert all(x.is_contiguous() for x in side)
        sk, sv, stag, schk, w = *side, side.window
    else:
        sk = sv = stag = schk = seq_lens
        w = 1
    lay = p.layout
    kmode, vmode, kpair, vpair, kasm, vasm = lookup_tables(
        p, dot_dtype, lookup, allow_asm=not interpreting(_tq_prefill_kernel))
    grid = (bsz, triton.cdiv(max_query_len, block_m), hkv)
    _tq_prefill_kernel[grid](
        q, k, v, out, cu_seqlens_q, seq_lens, kv_cache, block_table,
        p.key_centroids, p.value_centroids, kpair, vpair, p.rotation_pm1,
        sk, sv, stag, schk,
        g, kv_cache.shape[1], w, hkv, p.rotation_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        D=d, KBITS=p.key_bits, VBITS=p.value_bits, V_OFF=lay.v_codes_offset,
        KS_OFF=lay.k_scale_offset, BLOCK_M=block_m, G_PAD=g_pad, BLOCK_N=block_n,
        HAS_SIDE=has_side, F32=f32, COLS=min(d, 64), KMODE=kmode, VMODE=vmode,
        KASM=kasm, VASM=vasm, num_warps=num_warps,
        num_stages=num_stages)
    return out
