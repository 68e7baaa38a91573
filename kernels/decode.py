"""Split-KV decode attention straight over packed TurboQuant slots.

Stage 1: one program per (sequence, KV head, split) serves all G query heads of the GQA group,
so each packed byte is read once per group (vLLM's built-in kernel re-reads it per query
head). The program rotates and pre-scales its G query rows by softmax_scale * log2(e) itself
(a [G, D] x [D, D] tensor-core dot; `fused=False` does it in a GEMM launch first). Per tile
of BLOCK_N tokens: unpack the key codes and look the centroids up (on CUDA with `prmt` byte
permutes in registers, `_common.prmt_dequant_asm`; elsewhere from a tiny L1-resident
table), scores = q @ C[codes]^T on tensor cores, times the per-token key scale;
online softmax in base 2; the values are accumulated in the rotated space as
(p * v_scale) @ C[v_codes]. With a recent-token window, the tiles wholly below seq_len - W
run that same packed-only loop; the (at most ceil(W / BLOCK_N) + 1) tail tiles run a second
loop in which tag- and check-verified side entries (exact) replace packed ones.
Stage 2: the last split program of each (sequence, KV head) to finish (an atomic count)
merges the splits by their log-sum-exp and un-rotates once: out = acc @ R. So a decode is
one launch per layer (vLLM's FlashAttention: one); `fused=False` runs stage 2 as a second.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (TQSide, as_params, cached, default_num_splits, next_pow2, page_align,
                      pair_table, prmt_dequant_asm, stored_order, unused_arg)
from ._launch import launch
from ._tl import (decode_bytes, dequant_halves, interpreting, load_code_bytes, mma,
                  slot_ptrs)

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_base(cache_ptr, bt_row, offs_n, nmask, h, stride_cb, BS: tl.constexpr,
               SLOT: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr,
               ALIGN_B: tl.constexpr):
    """Token positions offs_n [N] -> (block id int64, row in block int64, uint8 pointers to
    their key codes, value codes and scale words in KV head h's plane of the page)."""
    blk = tl.load(bt_row + offs_n // BS, mask=nmask, other=0).to(tl.int64)
    in_blk = (offs_n % BS).to(tl.int64)
    kp, vp, sp = slot_ptrs(cache_ptr, blk, in_blk, h, stride_cb, BS, SLOT, V_OFF, KS_OFF,
                           ALIGN_B)
    return blk, in_blk, kp, vp, sp


@triton.jit
def _tile_bytes(kp, vp, sp, nmask, offs_lo, WORDS: tl.constexpr):
    """The raw bytes of one tile of 4-bit slots, for decoding later (PREFETCH): key and value
    code tiles [N, D/2] uint8 (loaded as int32 words when WORDS) and the scale words [N]
    int32."""
    HALF: tl.constexpr = offs_lo.shape[0]
    if WORDS:
        kb = load_code_bytes(kp, nmask, 0, HALF)
        vb = load_code_bytes(vp, nmask, 0, HALF)
    else:
        kb = tl.load(kp[:, None] + offs_lo[None, :], mask=nmask[:, None], other=0)
        vb = tl.load(vp[:, None] + offs_lo[None, :], mask=nmask[:, None], other=0)
    sc = tl.load(sp.to(tl.pointer_type(tl.int32)), mask=nmask, other=0)
    return kb, vb, sc


@triton.jit
def _online_softmax(s, m_i, l_i):
    """Base-2 online softmax step for scores s [G, N] (masked entries -inf) -> (p [G, N],
    alpha [G] to rescale the accumulators by, new running max, new running sum)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


# num_splits follows the step's decode count (backend/impl.decode_splits) and mixed steps run
# this kernel eagerly: left unspecialized, so a new batch size compiles nothing mid-serving.
@triton.jit(do_not_specialize=["num_splits"])
def _tq_decode_split_kernel(
    q_ptr,              # [B, Hq, D] dot dtype: rotated q * softmax_scale * log2(e)
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8, head-major pages
    block_table_ptr,    # [B, max_blocks] int32
    seq_lens_ptr,       # [B] int32
    kcent_ptr,          # [2**KBITS] float32
    vcent_ptr,          # [2**VBITS] float32
    ktab_ptr,           # lookup table for KMODE (see dequant_halves)
    vtab_ptr,           # lookup table for VMODE
    side_k_ptr, side_v_ptr,  # [B, W, Hkv, D] model dtype (contiguous)
    side_tag_ptr,       # [B, W] int32
    side_check_ptr,     # [B, W, Hkv] int32
    part_o_ptr,         # [B, Hq, S, D] float32: normalized partial outputs (rotated)
    part_lse_ptr,       # [B, Hq, S] float32: log2-sum-exp of each split
    rotq_ptr,           # [D, D] q's dtype: R^T / rotation_scale (+-1), when ROTATE_Q
    rot_ptr,            # [D, D] float32: R / rotation_scale, when FUSED (the un-rotation)
    count_ptr,          # [>= B * Hkv] int32, zero between launches: splits done, when FUSED
    out_ptr,            # [B, Hq, D] output dtype, when FUSED
    num_splits, G, W, num_kv_heads, q_alpha, rot_scale,
    stride_qb, stride_qh,
    stride_bt, stride_cb, stride_ob, stride_oh,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, SLOT: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, HAS_SIDE: tl.constexpr, F32: tl.constexpr,
    KMODE: tl.constexpr, VMODE: tl.constexpr, KASM: tl.constexpr, VASM: tl.constexpr,
    KT: tl.constexpr, PREFETCH: tl.constexpr, WORDS: tl.constexpr, ALIGN: tl.constexpr = 0,
    ALIGN_B: tl.constexpr = 4, ROTATE_Q: tl.constexpr = 0, FUSED: tl.constexpr = False,
    BLOCK_S: tl.constexpr = 64, COLS: tl.constexpr = 64,
):
    """ALIGN (the preset's `align`, 0 = none): the window's exact reads start no earlier than
    the query's own ALIGN-token block. KT: scores as K @ q^T (the dequantized key tile is the
    MMA's register operand A, the loop-invariant q^T the shared-memory operand B) instead of
    q @ K^T (key tile through shared memory every iteration). PREFETCH (byte-table modes 1-3
    only): the code bytes and scales of tile i+1 are loaded into registers before tile i is
    decoded, so HBM latency overlaps the arithmetic without shared-memory pipeline stages.
    ROTATE_Q (0 = q arrives rotated): q arrives as the model gives it and each program rotates
    its G heads itself, q @ R^T * q_alpha on tensor cores (exact +-1 products, fp32 sums, one
    rounding to q's dtype: what `rotate_query` does in a launch of its own). 1: the dot's
    result feeds the score dots in registers; 2: it goes through this program's own part_o
    row first (written, barrier, read back: 2 x G x D floats, L2-resident), so no dot feeds
    another dot directly, the pattern triton 3.6 once miscompiled in the prefill kernel
    (docs/kernels-notes.md, "rotated q inside the kernel"). FUSED: stage 2 in this launch:
    each program writes its partials, counts itself done on count_ptr[b, h] (acq_rel
    atomic), and the last of the num_splits programs of (b, h) merges them and writes out
    (then zeroes the counter for the next launch)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    HALF: tl.constexpr = D // 2
    offs_g = tl.arange(0, BLOCK_G)
    offs_lo = tl.arange(0, HALF)
    offs_hi = HALF + offs_lo
    offs_t = tl.arange(0, BLOCK_N)
    gmask = offs_g < G
    qh = h * G + offs_g
    # The head is handled as two halves [0, D/2) and [D/2, D): with 4-bit codes byte j holds
    # coordinates j and j + D/2, so scores = q_lo.k_lo + q_hi.k_hi needs no interleaving.
    q_row = q_ptr + b.to(tl.int64) * stride_qb + qh[:, None] * stride_qh
    if ROTATE_Q > 0:
        offs_d = tl.arange(0, D)
        q_raw = tl.load(q_row + offs_d[None, :], mask=gmask[:, None], other=0.0)   # [G, D]
        dt = q_raw.dtype
        rt_lo = tl.load(rotq_ptr + offs_d[:, None] * D + offs_lo[None, :])         # [D, D/2]
        rt_hi = tl.load(rotq_ptr + offs_d[:, None] * D + offs_hi[None, :])
        q_lo = (mma(q_raw, rt_lo, F32) * q_alpha).to(dt)
        q_hi = (mma(q_raw, rt_hi, F32) * q_alpha).to(dt)
        if ROTATE_Q == 2:
            # this program's part_o row (overwritten by its partial output at the end)
            scratch = (part_o_ptr + ((b.to(tl.int64) * num_kv_heads * G + qh) * num_splits
                                     + split)[:, None] * D)
            tl.store(scratch + offs_lo[None, :], q_lo.to(tl.float32), mask=gmask[:, None])
            tl.store(scratch + offs_hi[None, :], q_hi.to(tl.float32), mask=gmask[:, None])
            tl.debug_barrier()
            q_lo = tl.load(scratch + offs_lo[None, :], mask=gmask[:, None], other=0.0).to(dt)
            q_hi = tl.load(scratch + offs_hi[None, :], mask=gmask[:, None], other=0.0).to(dt)
    else:
        q_lo = tl.load(q_row + offs_lo[None, :], mask=gmask[:, None], other=0.0)
        q_hi = tl.load(q_row + offs_hi[None, :], mask=gmask[:, None], other=0.0)
        dt = q_lo.dtype
    if KT:
        qt_lo = tl.trans(q_lo)                                                  # [D/2, G]
        qt_hi = tl.trans(q_hi)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_G, HALF], dtype=tl.float32)
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt

    # Only positions >= win_start (seq_len - W, or the start of the query's own ALIGN-token
    # block if that is later) can come from the window. Tiles are aligned to BLOCK_N
    # globally (split starts are multiples of it), so [start, main_end) is the packed-only part
    # of this split (the loop below is the no-window kernel's) and [max(start, main_end), end)
    # the at most ceil(W / BLOCK_N) + 1 tiles that do the side-buffer work (the second loop).
    # m/l/acc run on through both, so the split's LSE covers both.
    main_end = end
    if HAS_SIDE:
        win_start = seq_len - W
        if ALIGN > 0:
            win_start = tl.maximum(win_start, ((seq_len - 1) // ALIGN) * ALIGN)
        win_tile0 = (tl.maximum(win_start, 0) // BLOCK_N) * BLOCK_N
        main_end = tl.minimum(end, win_tile0)

    if PREFETCH:
        offs_n = start + offs_t
        nmask = offs_n < main_end
        blk, in_blk, kp, vp, sp = _tile_base(cache_ptr, bt_row, offs_n, nmask, h, stride_cb,
                                             BLOCK_SIZE, SLOT, V_OFF, KS_OFF, ALIGN_B)
        kb, vb, sc = _tile_bytes(kp, vp, sp, nmask, offs_lo, WORDS)

    for n0 in range(start, main_end, BLOCK_N):
        if PREFETCH:
            c_mask, c_kb, c_vb, c_sc = nmask, kb, vb, sc
            offs_n = n0 + BLOCK_N + offs_t
            nmask = offs_n < main_end
            blk, in_blk, kp, vp, sp = _tile_base(cache_ptr, bt_row, offs_n, nmask, h,
                                                 stride_cb, BLOCK_SIZE, SLOT, V_OFF, KS_OFF,
                                                 ALIGN_B)
            kb, vb, sc = _tile_bytes(kp, vp, sp, nmask, offs_lo, WORDS)
            k_lo, k_hi = decode_bytes(c_kb, ktab_ptr, dt, KMODE, KASM)
            ks = (c_sc & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        else:
            c_offs = n0 + offs_t
            c_mask = c_offs < main_end
            c_blk, c_in_blk, c_kp, c_vp, c_sp = _tile_base(
                cache_ptr, bt_row, c_offs, c_mask, h, stride_cb, BLOCK_SIZE, SLOT, V_OFF,
                KS_OFF, ALIGN_B)
            k_lo, k_hi = dequant_halves(c_kp, c_mask, offs_lo, offs_hi, kcent_ptr, ktab_ptr,
                                        KBITS, D, dt, KMODE, KASM, WORDS)
            # Both fp16 scales as one int32: K scale low, V scale high (little endian).
            c_sc = tl.load(c_sp.to(tl.pointer_type(tl.int32)), mask=c_mask, other=0)
            ks = (c_sc & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        if KT:
            s = tl.trans(mma(k_lo, qt_lo, F32) + mma(k_hi, qt_hi, F32))
        else:
            s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
        s = s * ks.to(tl.float32)[None, :]                                       # [G, N]
        s = tl.where(c_mask[None, :], s, float("-inf"))
        p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
        acc_lo = acc_lo * alpha[:, None]
        acc_hi = acc_hi * alpha[:, None]

        if PREFETCH:
            v_lo, v_hi = decode_bytes(c_vb, vtab_ptr, dt, VMODE, VASM)
        else:
            v_lo, v_hi = dequant_halves(c_vp, c_mask, offs_lo, offs_hi, vcent_ptr,
                                        vtab_ptr, VBITS, D, dt, VMODE, VASM, WORDS)
        vs = ((c_sc >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
        pv = (p * vs.to(tl.float32)[None, :]).to(dt)
        acc_lo += mma(pv, v_lo, F32)
        acc_hi += mma(pv, v_hi, F32)

    if HAS_SIDE:
        # Tail tiles (only in the split(s) that reach win_start): packed or exact side entry
        # per token, decided once per tile by the tag (this slot) and check (same scales) test.
        # (tl.range(..., num_stages=1) here: head 64 stack 16 -> 0 B but head 128 264 -> 400.)
        for n0 in range(tl.maximum(start, main_end), end, BLOCK_N):
            c_offs = n0 + offs_t
            c_mask = c_offs < end
            c_blk, c_in_blk, c_kp, c_vp, c_sp = _tile_base(
                cache_ptr, bt_row, c_offs, c_mask, h, stride_cb, BLOCK_SIZE, SLOT, V_OFF,
                KS_OFF, ALIGN_B)
            # Both fp16 scales as one int32; the whole word is also the side entry's check.
            sc = tl.load(c_sp.to(tl.pointer_type(tl.int32)), mask=c_mask, other=0)
            entry = b.to(tl.int64) * W + c_offs % W
            in_win = c_mask & (c_offs >= win_start)
            tag = tl.load(side_tag_ptr + entry, mask=in_win, other=-1)
            chk = tl.load(side_check_ptr + entry * num_kv_heads + h, mask=in_win, other=0)
            use_side = in_win & (tag.to(tl.int64) == c_blk * BLOCK_SIZE + c_in_blk) & (
                chk == sc)
            side_off = (entry * num_kv_heads + h) * D

            k_lo, k_hi = dequant_halves(c_kp, c_mask & ~use_side, offs_lo, offs_hi,
                                        kcent_ptr, ktab_ptr, KBITS, D, dt, KMODE, KASM, WORDS)
            ks = (sc & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            # Side rows get key scale 1 and the exact key; packed rows the dequantized one.
            ks = tl.where(use_side, 1.0, ks)
            sk_lo = tl.load(side_k_ptr + side_off[:, None] + offs_lo[None, :],
                            mask=use_side[:, None], other=0.0).to(dt)
            sk_hi = tl.load(side_k_ptr + side_off[:, None] + offs_hi[None, :],
                            mask=use_side[:, None], other=0.0).to(dt)
            k_lo = tl.where(use_side[:, None], sk_lo, k_lo)
            k_hi = tl.where(use_side[:, None], sk_hi, k_hi)
            s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
            s = s * ks[None, :]
            s = tl.where(c_mask[None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc_lo = acc_lo * alpha[:, None]
            acc_hi = acc_hi * alpha[:, None]

            v_lo, v_hi = dequant_halves(c_vp, c_mask & ~use_side, offs_lo, offs_hi,
                                        vcent_ptr, vtab_ptr, VBITS, D, dt, VMODE, VASM, WORDS)
            vs = ((sc >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            vs = tl.where(use_side, 1.0, vs)
            sv_lo = tl.load(side_v_ptr + side_off[:, None] + offs_lo[None, :],
                            mask=use_side[:, None], other=0.0).to(dt)
            sv_hi = tl.load(side_v_ptr + side_off[:, None] + offs_hi[None, :],
                            mask=use_side[:, None], other=0.0).to(dt)
            v_lo = tl.where(use_side[:, None], sv_lo, v_lo)
            v_hi = tl.where(use_side[:, None], sv_hi, v_hi)
            pv = (p * vs[None, :]).to(dt)
            acc_lo += mma(pv, v_lo, F32)
            acc_hi += mma(pv, v_hi, F32)

    # Empty split (start >= end): l = 0, lse = -inf, o = 0.
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    inv_l = 1.0 / tl.maximum(l_i, 1e-30)
    row = (b.to(tl.int64) * num_kv_heads * G + qh) * num_splits + split          # [G]
    o_row = part_o_ptr + row[:, None] * D
    tl.store(o_row + offs_lo[None, :], acc_lo * inv_l[:, None], mask=gmask[:, None])
    tl.store(o_row + offs_hi[None, :], acc_hi * inv_l[:, None], mask=gmask[:, None])
    tl.store(part_lse_ptr + row, lse, mask=gmask)
    if FUSED:
        # Every thread's partial stores are ordered before the release of the count (the
        # barrier, then one thread's gpu-scope acq_rel atomic, as CUTLASS's semaphore does);
        # the last program's acquire orders its .cg reads of the others' partials after it.
        tl.debug_barrier()
        counter = count_ptr + b * num_kv_heads + h
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == num_splits - 1:
            tl.store(counter, 0)
            _merge_splits(part_o_ptr, part_lse_ptr, rot_ptr, out_ptr, b, h, num_splits, G,
                          num_kv_heads, rot_scale, stride_ob, stride_oh, D, BLOCK_G, BLOCK_S,
                          COLS, F32)


@triton.jit
def _merge_splits(part_o_ptr, part_lse_ptr, rot_ptr, out_ptr, b, h, num_splits, G,
                  num_kv_heads, rot_scale, stride_ob, stride_oh, D: tl.constexpr,
                  BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, COLS: tl.constexpr,
                  F32: tl.constexpr):
    """Merge the num_splits partials of (sequence b, KV head h) by their log-sum-exp and
    un-rotate once: out[b, h*G:(h+1)*G] = (sum_s w_s o_s) @ R * rot_scale. The partials are
    read with .cg (from L2, not L1): in the fused kernel other programs wrote them."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    gmask = offs_g < G
    qh = h * G + offs_g
    row0 = (b.to(tl.int64) * num_kv_heads * G + qh) * num_splits                   # [G]
    lse = tl.load(part_lse_ptr + row0[:, None] + offs_s[None, :],
                  mask=gmask[:, None] & (offs_s[None, :] < num_splits), other=float("-inf"),
                  cache_modifier=".cg")
    m = tl.max(lse, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wsum = tl.sum(tl.exp2(lse - m_safe[:, None]), axis=1)
    acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
    for s in range(num_splits):
        ls = tl.load(part_lse_ptr + row0 + s, mask=gmask, other=float("-inf"),
                     cache_modifier=".cg")
        o = tl.load(part_o_ptr + (row0 + s)[:, None] * D + offs_d[None, :],
                    mask=gmask[:, None], other=0.0, cache_modifier=".cg")
        acc += tl.exp2(ls - m_safe)[:, None] * o
    acc = acc / tl.maximum(wsum, 1e-30)[:, None]
    # Un-rotate: out = acc @ R, in column blocks so R never needs D x D registers (D = 256).
    offs_c = tl.arange(0, COLS)
    for c0 in tl.static_range(0, D, COLS):
        r = tl.load(rot_ptr + offs_d[:, None] * D + (c0 + offs_c)[None, :])
        if F32:
            o = tl.dot(acc, r, input_precision="ieee") * rot_scale
        else:
            o = tl.dot(acc, r) * rot_scale  # tf32: 10-bit mantissa, below bf16/fp16 output
        tl.store(out_ptr + b.to(tl.int64) * stride_ob + qh[:, None] * stride_oh
                 + (c0 + offs_c)[None, :], o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _tq_decode_merge_kernel(
    part_o_ptr,         # [B, Hq, S, D] float32
    part_lse_ptr,       # [B, Hq, S] float32
    rot_ptr,            # [D, D] float32, R / rotation_scale
    out_ptr,            # [B, Hq, D] output dtype
    num_splits, G, num_kv_heads, rot_scale,
    stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, COLS: tl.constexpr,
    F32: tl.constexpr,
):
    """Stage 2 as its own launch (fused=False): one program per (sequence, KV head)."""
    _merge_splits(part_o_ptr, part_lse_ptr, rot_ptr, out_ptr, tl.program_id(0),
                  tl.program_id(1), num_splits, G, num_kv_heads, rot_scale, stride_ob,
                  stride_oh, D, BLOCK_G, BLOCK_S, COLS, F32)


def default_block_n(head_size: int) -> int:
    """Tokens per tile: 64 for every head size. H100, register `prmt` lookup, 2 stages
    (docs/kernels-notes.md, v3): head 128 block 64 = 555 us vs 586-594 (128) at batch 32 x
    16K, 548 vs 623 at 128 x 4K, 164 vs 178 at 32 x 4K; block 128 wins only at 1 x 16K
    (58 vs 63 us). Head 64 was already best at 64; head 256 keeps two [64, 128] halves."""
    return 64


def decode_defaults(head_size: int, tables: bool) -> dict:
    """tq_decode's default launch config. With byte tables (4-bit keys and values) at head
    sizes 64 and 128: code bytes as int32 words, the next tile's bytes prefetched into
    registers, 128-token tiles, 1 stage. H200, CUDA graph p50, head-major pages, 16-token
    blocks, `benchmarks/kernels.py --only decode_ab` (benchmarks/results/h200-20261203b/):
    412 us vs 474 for the byte tiles at batch 32 x 16K head 128 (FA3 bf16: 503 in the same
    session), 419 vs 448 at 128 x 4K, 55.9 vs 57.1 at 1 x 32K (64-token tiles: 55.5), 107 vs
    125 at 32 x 16K head 64 (SmolLM2's). Otherwise (3-bit codes, the generic mode, head 256:
    not measured with words) byte loads, 64-token tiles, 2 stages."""
    if tables and head_size <= 128:
        return dict(block_n=128, num_stages=1, prefetch=True, words=True)
    return dict(block_n=default_block_n(head_size), num_stages=2, prefetch=False, words=False)


def lookup_tables(params, dot_dtype, lookup=2, allow_asm=True):
    """(KMODE, VMODE, key table, value table, key asm, value asm) for dequant_halves:
    `lookup` (1 = 256-entry pair table, 2 = 16-entry codebook in the dot dtype, 3 = register
    `prmt` lookups, falling back to 1 where not allowed (CPU interpreter) or the codebook is
    not symmetric) where the bits are 4 and the dot runs in fp16/bf16; mode 0 (generic
    per-code lookup) otherwise."""
    ok = lookup in (1, 2, 3) and dot_dtype in (torch.float16, torch.bfloat16)

    def table(cent, bits, which):
        if not (ok and bits == 4):
            return 0, cached(params, "no_table", lambda: torch.zeros(
                256, dtype=torch.int32, device=cent.device)), ""
        if lookup == 3 and allow_asm:
            asm = cached(params, ("asm", which, dot_dtype),
                         lambda: prmt_dequant_asm(cent, dot_dtype))
            if asm is not None:
                return 3, cached(params, "no_table", lambda: torch.zeros(
                    256, dtype=torch.int32, device=cent.device)), asm
        if lookup in (1, 3):
            return 1, cached(params, ("pair", which, dot_dtype),
                             lambda: pair_table(cent, dot_dtype)), ""
        return 2, cached(params, ("cent_stored", which, dot_dtype),
                         lambda: stored_order(cent).to(dot_dtype).contiguous()), ""

    kmode, kt, kasm = table(params.key_centroids, params.key_bits, "k")
    vmode, vt, vasm = table(params.value_centroids, params.value_bits, "v")
    return kmode, vmode, kt, vt, kasm, vasm


def _rotation_t(params, dtype) -> torch.Tensor:
    """R^T / rotation_scale (the +-1 matrix, exact in every float dtype) in `dtype`."""
    return cached(params, ("pm1_t", dtype), lambda: params.rotation_pm1.T.to(dtype).contiguous())


def _query_alpha(params, scale: float) -> float:
    """What the +-1 rotation of a query is multiplied by: rotation_scale * scale * log2(e)."""
    return params.rotation_scale * scale * _LOG2E


def rotate_query(query: torch.Tensor, params, scale: float) -> torch.Tensor:
    """query [..., D] -> rotated (x @ R.T), pre-scaled by scale * log2(e), in query.dtype.

    One addmm with the scalar folded into alpha: the +-1 matrix R / rotation_scale is exact
    in fp16/bf16, so the products are exact, the sum accumulates in fp32 and the result is
    rounded once (what float(), matmul, mul and to() did in four ops)."""
    d = query.shape[-1]
    rt = _rotation_t(params, query.dtype)
    zero = cached(params, ("zero", query.dtype),
                  lambda: torch.zeros((), dtype=query.dtype, device=rt.device))
    out = torch.addmm(zero, query.reshape(-1, d), rt, beta=0,
                      alpha=_query_alpha(params, scale))
    return out.view(query.shape)


# Split counters of the fused kernel, per device: int32, all zero between launches (the last
# program of each (sequence, KV head) puts its counter back to 0). 65,536 covers batch x KV
# heads of any vLLM configuration we serve (1,024 sequences x 64 heads); a larger grid grows it
# outside CUDA-graph capture and is an error inside one (the buffer must outlive the graph).
_COUNTERS: dict = {}
_MIN_COUNTERS = 1 << 16


def split_counters(n: int, device) -> torch.Tensor:
    """The device's zeroed counter buffer with at least n entries (see _COUNTERS)."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"tq_decode: {n} split counters needed while a CUDA graph is captured, "
                f"{0 if buf is None else buf.numel()} allocated: call "
                "kernels.decode.split_counters(n, device) before capture")
        buf = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def tq_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
              seq_lens: torch.Tensor, params, scale: float, side: TQSide | None = None,
              num_splits: int | None = None, out: torch.Tensor | None = None,
              block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
              lookup: int = 3, kt: bool = False, prefetch: bool | None = None,
              words: bool | None = None, fused: bool = True,
              rotate_q: int = 2) -> torch.Tensor:
    """Triton split-KV decode over packed slots; same contract as `reference.tq_decode_ref`.

    query [B, Hq, D] fp16/bf16 (fp32 is computed in fp32); kv_cache uint8
    [num_blocks, block_size, Hkv, slot_bytes], head-major dense pages (docs/layout.md; any
    block stride, any order of the last 3 dims);
    block_table int32 [B, max_blocks]; seq_lens int32 [B] (0 = padding row -> zeros).
    num_splits: fixed split count (pass one for CUDA graphs); default from the shapes only.
    out: optional [B, Hq, D] output buffer. Returns [B, Hq, D] in query.dtype.
    Tuning knobs: block_n tokens per tile, num_warps, num_stages, lookup (0 generic, 1 pair
    table, 2 nibble table, 3 register prmt lookups on CUDA), kt (key tile as the MMA's
    register operand), prefetch (next tile's bytes loaded before this one is decoded),
    words (code bytes loaded as int32 words); prefetch and words need 4-bit keys and values
    (a byte-table mode). None = the default of `decode_defaults`.
    fused (default): one launch per call, the query rotation and the merge of the splits in
    the split kernel (ROTATE_Q, FUSED); False: three (rotate_query's GEMM, split, merge).
    Both give the same result up to the summation order of the query rotation. rotate_q: the
    fused form's query rotation, 2 (default) through the program's scratch row, 1 straight
    into the score dots (the kernel's ROTATE_Q).
    block_size (kv_cache.shape[1]) is a compile-time constant of the kernel: positions map to
    pages by shifts, not integer division.
    """
    p = as_params(params, query.device)
    bsz, hq, d = query.shape
    hkv = kv_cache.shape[2]
    g = hq // hkv
    assert g * hkv == hq and kv_cache.stride(-1) == 1
    align_b = page_align(kv_cache, p.layout)     # also validates the cache
    f32 = query.dtype == torch.float32 or interpreting(_tq_decode_split_kernel)
    dot_dtype = query.dtype          # fp32 queries compute in fp32
    q_alpha = _query_alpha(p, scale)
    if fused:
        q = query                    # rotated in the kernel (ROTATE_Q)
        rotq = _rotation_t(p, query.dtype)
        assert query.stride(-1) == 1
    else:
        q = rotate_query(query, p, scale)
        rotq = unused_arg(p, query.device)
    if out is None:
        out = torch.empty_like(query)
    if bsz == 0:
        return out
    block_size = kv_cache.shape[1]
    kmode, vmode, kpair, vpair, kasm, vasm = lookup_tables(
        p, dot_dtype, lookup, allow_asm=not interpreting(_tq_decode_split_kernel))
    tables = kmode != 0 and vmode != 0
    dflt = decode_defaults(d, tables)
    block_n = dflt["block_n"] if block_n is None else block_n
    num_stages = dflt["num_stages"] if num_stages is None else num_stages
    prefetch = dflt["prefetch"] if prefetch is None else bool(prefetch) and tables
    words = dflt["words"] if words is None else bool(words) and tables
    if num_splits is None:
        # The split count of 64-token tiles whatever block_n is: what the backend passes
        # (backend/impl.decode_splits) and what decode_ab measured every config with.
        num_splits = default_num_splits(bsz, hkv, block_table.shape[1] * block_size,
                                        query.device, default_block_n(d))
    part_o = torch.empty(bsz, hq, num_splits, d, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(bsz, hq, num_splits, dtype=torch.float32, device=query.device)
    has_side = side is not None and side.window > 0
    if has_side:
        assert all(x.is_contiguous() for x in side)
        sk, sv, stag, schk, w = *side, side.window
    else:
        sk = sv = stag = schk = unused_arg(p, query.device)
        w = 1
    lay = p.layout
    block_g = max(16, next_pow2(g))   # tl.dot needs M >= 16; padded rows load zeros
    counters = split_counters(bsz * hkv, query.device) if fused else unused_arg(p, query.device)
    # BLOCK_S: one value for every split count up to 64 (default_num_splits' cap), so a new
    # count is no new compile (its lse row is 64 floats per head: nothing to save)
    block_s = max(64, next_pow2(num_splits))
    launch(_tq_decode_split_kernel, (bsz, hkv, num_splits),
        q, kv_cache, block_table, seq_lens, p.key_centroids, p.value_centroids,
        kpair, vpair, sk, sv, stag, schk, part_o, part_lse, rotq, p.rotation_pm1, counters,
        out,
        num_splits, g, w, hkv, q_alpha, p.rotation_scale,
        q.stride(0), q.stride(1), block_table.stride(0), kv_cache.stride(0), out.stride(0),
        out.stride(1),
        D=d, KBITS=p.key_bits, VBITS=p.value_bits, SLOT=lay.slot_bytes, V_OFF=lay.v_codes_offset,
        KS_OFF=lay.k_scale_offset, BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_G=block_g,
        HAS_SIDE=has_side,
        F32=f32, KMODE=kmode, VMODE=vmode, KASM=kasm, VASM=vasm, KT=bool(kt),
        PREFETCH=prefetch, WORDS=words, ALIGN=p.align if has_side else 0,
        ALIGN_B=align_b, ROTATE_Q=rotate_q if fused else 0, FUSED=fused, BLOCK_S=block_s,
        COLS=min(d, 64),
        num_warps=num_warps, num_stages=num_stages)
    if not fused:
        launch(_tq_decode_merge_kernel, (bsz, hkv),
            part_o, part_lse, p.rotation_pm1, out,
            num_splits, g, hkv, p.rotation_scale, out.stride(0), out.stride(1),
            D=d, BLOCK_G=block_g, BLOCK_S=block_s, COLS=min(d, 64), F32=f32, num_warps=4)
    return out
