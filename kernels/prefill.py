"""Chunked-prefill attention over packed pages: no bf16 copy of the cached prefix.

One program per (sequence, block of rows, KV head) serves the G query heads of the group as
ROWS = BLOCK_M * G_PAD rows of (token, head) pairs, so each packed prefix tile is unpacked once
per group and program. The rows may be dense (ROW_G = G rows per token: row r of the chunk
is token r // G, head r % G), so a group of 3 (SmolLM2's 9 / 3 heads) fills all 128 rows
with 42-43 tokens instead of padding each token to 4 rows (32 tokens and a quarter of the rows
masked): a quarter fewer programs for the same chunk; the launcher takes them where they
measured faster (tq_prefill's dense_rows). Precision follows the decode step (see
reference.tq_prefill_ref): the query at position t reads key j exactly iff j > t - W.
One online softmax runs first over packed tiles (the cached prefix and the chunk's own tokens
older than the window, dequantized in registers; prefix keys inside the window come from the
side copy, tag-checked as in decode), then over the band of the chunk's own exact K/V inside
the window (rotated once by the launcher). With `deq` (what the backend passes on CUDA) the
chunk's own older tokens are not unpacked from their slots but read from the store's
dequantized copy (centroids + scale words: the same operands), as contiguous pipelined
tiles. The accumulator lives in the rotated space and is un-rotated at the end (acc @ R).
The chunk must be stored in the cache before the call.
"""

from __future__ import annotations

import functools
import json
import os

import torch
import triton
import triton.language as tl

from ._common import TQSide, as_params, cdiv, next_pow2, page_align, unused_arg
from ._launch import launch
from ._tl import dequant_halves, interpreting, mma
from .decode import _tile_base, lookup_tables, rotate_query


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Base-2 online softmax step for masked scores s [ROWS, N] (-inf = masked) -> (p, alpha
    to rescale the accumulators by, new running max, new running sum). A row with no key yet
    (all -inf so far) keeps max -inf and gets p = alpha = 0 instead of nan."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _own_part(own_o_ptr, own_lse_ptr, t64, qh, rmask, offs_lo, offs_hi, stride_qt, stride_qh,
              stride_lh, stride_lt):
    """The rows' attention over their chunk's own keys j <= t - W as online-softmax state
    (running max m, sum l, accumulator halves [ROWS, D/2] float32): FlashAttention's
    normalized output o with lse = ln(sum exp(ln2 * s)) is, in base 2, m = lse * log2(e),
    l = 1, acc = o. A row with no key there (the first W rows of a chunk; lse +-inf or nan)
    or masked: m = -inf, l = 0, acc = 0."""
    lse = tl.load(own_lse_ptr + qh * stride_lh + t64 * stride_lt, mask=rmask,
                  other=float("inf"))
    has = rmask & (tl.abs(lse) < float("inf"))          # false for +-inf and nan
    m = tl.where(has, lse * 1.4426950408889634, float("-inf"))
    l = tl.where(has, 1.0, 0.0)
    o_row = own_o_ptr + t64[:, None] * stride_qt + qh[:, None] * stride_qh
    o_lo = tl.load(o_row + offs_lo[None, :], mask=has[:, None], other=0.0).to(tl.float32)
    o_hi = tl.load(o_row + offs_hi[None, :], mask=has[:, None], other=0.0).to(tl.float32)
    return m, l, o_lo, o_hi


@triton.jit
def _win_lo(pos, WIN: tl.constexpr, ALIGN: tl.constexpr):
    """First key position the query at `pos` reads exactly (reference.window_start): the
    window's pos - WIN + 1, clipped to the start of pos's own ALIGN-token block (ALIGN > 0)."""
    lo = pos - WIN + 1
    if ALIGN > 0:
        lo = tl.maximum(lo, (pos // ALIGN) * ALIGN)
    return lo


@triton.jit
def _packed_scores(q_lo, q_hi, cache_ptr, bt_row, offs_n, nmask, h, stride_cb,
                   kcent_ptr, ktab_ptr, offs_lo, offs_hi, BS: tl.constexpr,
                   SLOT: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr,
                   ALIGN_B: tl.constexpr, KBITS: tl.constexpr, D: tl.constexpr,
                   F32: tl.constexpr, KMODE: tl.constexpr, KASM: tl.constexpr):
    """Scores of the rows' queries against the packed keys at positions offs_n [N] (through
    the block table) -> (block id, row in block, pointers [N] to the value codes and the scale
    words, scores [ROWS, N] float32 = q . C[codes] * key scale)."""
    blk, in_blk, kp, vp, sp = _tile_base(cache_ptr, bt_row, offs_n, nmask, h, stride_cb, BS,
                                         SLOT, V_OFF, KS_OFF, ALIGN_B)
    k_lo, k_hi = dequant_halves(kp, nmask, offs_lo, offs_hi, kcent_ptr, ktab_ptr, KBITS, D,
                                q_lo.dtype, KMODE, KASM)
    ks = tl.load(sp.to(tl.pointer_type(tl.float16)), mask=nmask, other=0.0)
    s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
    return blk, in_blk, vp, sp, s * ks.to(tl.float32)[None, :]


@triton.jit
def _side_held(side_tag_ptr, side_check_ptr, sp, entry, cand, blk, in_blk, block_size,
               num_kv_heads, h):
    """Which candidate side entries hold an exact copy of these slots: the entry's tag is the
    slot's global index and its check word equals the packed slot's scale word (so an entry a
    later token overwrote, or another request's, reads packed)."""
    tag = tl.load(side_tag_ptr + entry, mask=cand, other=-1)
    chk = tl.load(side_check_ptr + entry * num_kv_heads + h, mask=cand, other=0)
    packed_chk = tl.load(sp.to(tl.pointer_type(tl.int32)), mask=cand, other=1)
    return cand & (tag.to(tl.int64) == blk * block_size + in_blk) & (chk == packed_chk)


@triton.jit
def _exact_halves(own_ptr, side_ptr, own_off, side_off, own, held, offs_lo, offs_hi, dt):
    """Exact K (or V) rows of one tile as halves [N, D/2] in dt: the chunk's own rotated row
    (own_ptr + own_off) where `own`, the side copy (side_ptr + side_off) where `held`, else 0."""
    lo = tl.where(own[:, None],
                  tl.load(own_ptr + own_off[:, None] + offs_lo[None, :], mask=own[:, None],
                          other=0.0),
                  tl.load(side_ptr + side_off[:, None] + offs_lo[None, :], mask=held[:, None],
                          other=0.0).to(dt))
    hi = tl.where(own[:, None],
                  tl.load(own_ptr + own_off[:, None] + offs_hi[None, :], mask=own[:, None],
                          other=0.0),
                  tl.load(side_ptr + side_off[:, None] + offs_hi[None, :], mask=held[:, None],
                          other=0.0).to(dt))
    return lo, hi


@triton.jit
def _invariant_tiles(q_lo, q_hi, k_ptr, v_ptr, cache_ptr, bt_row, kcent_ptr,
                     vcent_ptr, ktab_ptr, vtab_ptr, side_k_ptr, side_v_ptr, side_tag_ptr,
                     side_check_ptr, m_i, l_i, acc_lo, acc_hi, b, h, q_start, prefix, pos_r,
                     first_pos, last_pos, W, num_kv_heads, stride_cb,
                     offs_lo, offs_hi, BS: tl.constexpr, SLOT: tl.constexpr,
                     ALIGN_B: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr,
                     VBITS: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr,
                     BLOCK_N: tl.constexpr, HAS_SIDE: tl.constexpr, F32: tl.constexpr,
                     WIN: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr,
                     KASM: tl.constexpr, VASM: tl.constexpr, ALIGN: tl.constexpr):
    """The batch-invariant order (VLLM_BATCH_INVARIANT=1): one online softmax over key tiles
    at absolute positions [0, BLOCK_N), [BLOCK_N, 2 BLOCK_N), ... up to the program's last
    row, each key read from the one source the precision policy names for its row: exact (the
    chunk's own rotated K/V, or a prefix key's held side copy) inside the row's window, else
    its packed slot, the chunk's own older tokens included. A row's arithmetic then depends on
    its position and the cache contents only, not on where its chunk starts, how long it is,
    or which rows share its program (tiles past a row's position are masked out: p = 0 and
    alpha = 1 leave its accumulators bit for bit unchanged), so chunked and unchunked
    prefills of the same tokens give the same bits (a prefix-cache hit too, where the side copy
    still holds the prefix's newest tokens). The default loops' split of a tile between a
    packed and an exact pass (and the deq copy's contiguous tiles) do not."""
    dt = q_lo.dtype
    lo_r = _win_lo(pos_r, WIN, ALIGN)
    lo_first = _win_lo(first_pos, WIN, ALIGN)
    for n0 in range(0, last_pos + 1, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n <= last_pos
        blk, in_blk, vp, sp, s = _packed_scores(
            q_lo, q_hi, cache_ptr, bt_row, offs_n, nmask, h, stride_cb, kcent_ptr, ktab_ptr,
            offs_lo, offs_hi, BS, SLOT, V_OFF, KS_OFF, ALIGN_B, KBITS, D, F32, KMODE, KASM)
        # Exact keys of this tile: the chunk's own (rotated K/V) and prefix keys whose side
        # copy is held, inside each row's window. Only tiles reaching the first row's window
        # have any; for the others `exact` stays all false (the same bits as computing it).
        exact = (offs_n[None, :] < 0) & (pos_r[:, None] < 0)
        own = offs_n < 0
        held = offs_n < 0
        own_off = ((q_start + offs_n - prefix).to(tl.int64) * num_kv_heads + h) * D
        side_off = ((b.to(tl.int64) * W + offs_n % W) * num_kv_heads + h) * D
        in_window = n0 + BLOCK_N > lo_first
        if HAS_SIDE:
            if in_window:
                own = nmask & (offs_n >= prefix)
                entry = b.to(tl.int64) * W + offs_n % W
                cand = nmask & (offs_n < prefix) & (offs_n >= lo_first)
                held = _side_held(side_tag_ptr, side_check_ptr, sp, entry, cand, blk, in_blk,
                                  BS, num_kv_heads, h)
                exact = (own | held)[None, :] & (offs_n[None, :] >= lo_r[:, None])
                ek_lo, ek_hi = _exact_halves(k_ptr, side_k_ptr, own_off, side_off, own, held,
                                             offs_lo, offs_hi, dt)
                s_exact = mma(q_lo, tl.trans(ek_lo), F32) + mma(q_hi, tl.trans(ek_hi), F32)
                s = tl.where(exact, s_exact, s)
        s = tl.where(nmask[None, :] & (offs_n[None, :] <= pos_r[:, None]), s, float("-inf"))
        p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
        m_i = m_new
        v_lo, v_hi = dequant_halves(vp, nmask, offs_lo, offs_hi, vcent_ptr, vtab_ptr,
                                    VBITS, D, dt, VMODE, VASM)
        vs = tl.load((sp + 2).to(tl.pointer_type(tl.float16)), mask=nmask, other=0.0)
        pv = tl.where(exact, 0.0, p * vs.to(tl.float32)[None, :]).to(dt)
        acc_lo = acc_lo * alpha[:, None] + mma(pv, v_lo, F32)
        acc_hi = acc_hi * alpha[:, None] + mma(pv, v_hi, F32)
        if HAS_SIDE:
            if in_window:
                ev_lo, ev_hi = _exact_halves(v_ptr, side_v_ptr, own_off, side_off, own, held,
                                             offs_lo, offs_hi, dt)
                p_exact = tl.where(exact, p, 0.0).to(dt)
                acc_lo += mma(p_exact, ev_lo, F32)
                acc_hi += mma(p_exact, ev_hi, F32)
    return m_i, l_i, acc_lo, acc_hi


# A mixed step hands this kernel its batch rows from nd on (backend/impl.py): seq_lens[nd:] and
# the deq scale words [nd:] start 16-byte aligned or not depending on nd. Their loads are
# scalar, so alignment buys nothing; specializing on it compiled a second variant the first
# time nd % 4 != 0 (2.4 s in a served step, H200, 2026-12-03).
@triton.jit(do_not_specialize_on_alignment=["cu_q_ptr", "seq_lens_ptr", "block_table_ptr",
                                            "deq_s_ptr", "side_tag_ptr", "side_check_ptr",
                                            "own_lse_ptr"],
            # own_lse is [Hq, T]: its head stride is this step's token count
            do_not_specialize=["stride_lh", "stride_lt"])
def _tq_prefill_kernel(
    q_ptr,              # [T, Hq, D] dot dtype: rotated q * softmax_scale * log2(e)
    k_ptr, v_ptr,       # [T, Hkv, D] dot dtype: the chunk's rotated K/V (contiguous)
    out_ptr,            # [T, Hq, D] output dtype
    cu_q_ptr,           # [B + 1] int32
    seq_lens_ptr,       # [B] int32 (prefix + chunk)
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8, head-major pages
    block_table_ptr,    # [B, max_blocks] int32
    kcent_ptr, vcent_ptr,    # float32 codebooks
    ktab_ptr, vtab_ptr,      # lookup tables for KMODE / VMODE (see dequant_halves)
    rot_ptr,            # [D, D] float32, R / rotation_scale
    side_k_ptr, side_v_ptr, side_tag_ptr, side_check_ptr,  # TQSide (contiguous)
    deq_k_ptr, deq_v_ptr,    # [T, Hkv, D] dot dtype: the chunk's centroids C[code] (when DEQ)
    deq_s_ptr,          # [T, Hkv] int32: the chunk's slot scale words (when DEQ)
    own_o_ptr,          # [T, Hq, D] dot dtype: attention over the own keys j <= t - WIN (OWN)
    own_lse_ptr,        # [Hq, T] float32: its natural log-sum-exp, +-inf = no key (OWN)
    G, W, num_kv_heads, rot_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_cb, stride_lh, stride_lt,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, SLOT: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, G_PAD: tl.constexpr, ROW_G: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SIDE: tl.constexpr, F32: tl.constexpr, COLS: tl.constexpr, WIN: tl.constexpr,
    KMODE: tl.constexpr, VMODE: tl.constexpr, KASM: tl.constexpr = "", VASM: tl.constexpr = "",
    DEQ: tl.constexpr = False, DEQ_STAGES: tl.constexpr = 1,
    INVARIANT: tl.constexpr = False, ALIGN: tl.constexpr = 0, ALIGN_B: tl.constexpr = 4,
    OWN: tl.constexpr = False, OWN_PREFIX: tl.constexpr = False,
):
    """OWN (with DEQ): the attention of each row over its chunk's own keys j <= t - WIN comes
    precomputed (own_o, own_lse: FlashAttention over the chunk's dequantized copy, in the
    rotated space, with softmax scale ln 2 on these prescaled queries); the deq loop then
    covers only the keys in (t - WIN, last_packed(t)], which the aligned window reads packed
    (none for an unaligned one), and the two parts are merged by log-sum-exp after the loops.
    OWN_PREFIX (with OWN): own_o / own_lse cover the cached prefix's keys j <= t - WIN too
    (FlashAttention over the prefix unpacked by kernels/unpack.py, then the chunk's own), so
    the packed-prefix loop reads only the prefix keys inside the rows' windows (j > t - WIN:
    at most the prefix's last WIN tokens, for the chunk's first rows).
    ROW_G: rows per chunk token, G (dense rows) or G_PAD (each token padded to a power of two,
    the only layout before 2026-12-07); tq_prefill's dense_rows picks it."""
    b = tl.program_id(0)
    # Longest rows first: under causal masking the last blocks of a chunk do the most tiles,
    # and the GPU starts programs in launch order.
    mb = tl.num_programs(1) - 1 - tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    ROWS: tl.constexpr = BLOCK_M * G_PAD
    r0 = mb * ROWS                          # the program's first row of the chunk's T x ROW_G
    if r0 >= q_len * ROW_G:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len

    HALF: tl.constexpr = D // 2
    offs_r = tl.arange(0, ROWS)
    tok = (r0 + offs_r) // ROW_G                          # chunk-local token index of each row
    gi = (r0 + offs_r) % ROW_G
    rmask = (tok < q_len) & (gi < G)
    tok_first = r0 // ROW_G                               # the program's first token
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
    # Precision policy (the decode step's): query position t reads key j exactly iff
    # j >= _win_lo(t) (j > t - WIN, clipped to t's own ALIGN-token block), else its packed
    # slot. Rows of this program: positions first_pos..last_pos; _win_lo grows with t, so
    # lo_first / lo_last bound every row's.
    pos_r = prefix + tok                                  # [ROWS] position of each row's query
    chunk_end = tl.minimum(q_len, (r0 + ROWS - 1) // ROW_G + 1)   # chunk-local token end
    first_pos = prefix + tok_first
    last_pos = prefix + chunk_end - 1
    last_packed = _win_lo(pos_r, WIN, ALIGN) - 1   # the newest key each row reads packed
    lo_first = _win_lo(first_pos, WIN, ALIGN)
    lo_last = _win_lo(last_pos, WIN, ALIGN)

    if INVARIANT:
        m_i, l_i, acc_lo, acc_hi = _invariant_tiles(
            q_lo, q_hi, k_ptr, v_ptr, cache_ptr, bt_row, kcent_ptr, vcent_ptr,
            ktab_ptr, vtab_ptr, side_k_ptr, side_v_ptr, side_tag_ptr, side_check_ptr,
            m_i, l_i, acc_lo, acc_hi, b, h, q_start, prefix, pos_r, first_pos, last_pos,
            W, num_kv_heads, stride_cb, offs_lo, offs_hi, BLOCK_SIZE, SLOT, ALIGN_B,
            D, KBITS, VBITS, V_OFF, KS_OFF, BLOCK_N, HAS_SIDE, F32, WIN, KMODE, VMODE,
            KASM, VASM, ALIGN)
    else:
        # -- packed slots: the cached prefix, and the chunk's own tokens older than the window ----
        # (the backend stored the chunk before attending; prefix keys inside a row's window come
        # from the side copy when it holds them, tag- and scale-checked as in decode)
        packed_end = tl.maximum(prefix, tl.minimum(seq_len, lo_last))
        # DEQ: the chunk's own packed tokens come from the store's dequantized copy (the loop
        # after this one), so this loop covers the cached prefix only.
        gather_end = packed_end
        if DEQ:
            gather_end = prefix
        gather_lo = 0
        if OWN_PREFIX:   # prefix keys j <= t - WIN came with own_o: the window's part remains
            gather_lo = (tl.maximum(first_pos - WIN + 1, 0) // BLOCK_N) * BLOCK_N
        for n0 in range(gather_lo, gather_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < gather_end
            blk, in_blk, vp, sp, s = _packed_scores(
                q_lo, q_hi, cache_ptr, bt_row, offs_n, nmask, h, stride_cb, kcent_ptr,
                ktab_ptr, offs_lo, offs_hi, BLOCK_SIZE, SLOT, V_OFF, KS_OFF, ALIGN_B, KBITS, D,
                F32, KMODE, KASM)
            # prefix keys: every row; chunk keys: only rows whose window they have left
            valid = nmask[None, :] & ((offs_n[None, :] < prefix)
                                      | (offs_n[None, :] <= last_packed[:, None]))
            if OWN_PREFIX:
                valid = valid & (offs_n[None, :] + WIN > pos_r[:, None])

            # [ROWS, BLOCK_N] "read exactly"; defined outside the runtime `if` (Triton scopes
            # names bound inside it).
            exact = (offs_n[None, :] < 0) & (pos_r[:, None] < 0)
            held = offs_n < 0
            if HAS_SIDE:
                entry = b.to(tl.int64) * W + offs_n % W
                side_off = (entry * num_kv_heads + h) * D
                if (n0 + BLOCK_N > lo_first) & (n0 < prefix):
                    cand = nmask & (offs_n < prefix) & (offs_n >= lo_first)
                    held = _side_held(side_tag_ptr, side_check_ptr, sp, entry, cand, blk,
                                      in_blk, BLOCK_SIZE, num_kv_heads, h)
                    exact = held[None, :] & (offs_n[None, :] > last_packed[:, None])
                    sk_lo = tl.load(side_k_ptr + side_off[:, None] + offs_lo[None, :],
                                    mask=held[:, None], other=0.0)
                    sk_hi = tl.load(side_k_ptr + side_off[:, None] + offs_hi[None, :],
                                    mask=held[:, None], other=0.0)
                    s_side = (mma(q_lo, tl.trans(sk_lo.to(dt)), F32)
                              + mma(q_hi, tl.trans(sk_hi.to(dt)), F32))
                    s = tl.where(exact, s_side, s)

            s = tl.where(valid, s, float("-inf"))
            p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
            acc_lo = acc_lo * alpha[:, None]
            acc_hi = acc_hi * alpha[:, None]
            m_i = m_new

            v_lo, v_hi = dequant_halves(vp, nmask, offs_lo, offs_hi, vcent_ptr, vtab_ptr,
                                        VBITS, D, dt, VMODE, VASM)
            vs = tl.load((sp + 2).to(tl.pointer_type(tl.float16)), mask=nmask, other=0.0)
            pv = p * vs.to(tl.float32)[None, :]
            if HAS_SIDE:
                if (n0 + BLOCK_N > lo_first) & (n0 < prefix):
                    pv = tl.where(exact, 0.0, pv)
                    sv_lo = tl.load(side_v_ptr + side_off[:, None] + offs_lo[None, :],
                                    mask=held[:, None], other=0.0)
                    sv_hi = tl.load(side_v_ptr + side_off[:, None] + offs_hi[None, :],
                                    mask=held[:, None], other=0.0)
                    p_side = tl.where(exact, p, 0.0).to(dt)
                    acc_lo += mma(p_side, sv_lo.to(dt), F32)
                    acc_hi += mma(p_side, sv_hi.to(dt), F32)
            pv = pv.to(dt)
            acc_lo += mma(pv, v_lo, F32)
            acc_hi += mma(pv, v_hi, F32)

        # -- DEQ: the chunk's own keys older than each row's window, from the store's copy -------
        # Same operands as the packed loop (centroids in the dot dtype, fp16 scales), read as
        # contiguous tiles: no block-table gather, no unpacking, pipelined loads.
        if DEQ:
            own_end = packed_end - prefix                      # chunk-local
            own_lo = 0
            if OWN:   # keys j <= t - WIN came with own_o; only (t - WIN, last_packed] remain
                own_lo = (tl.maximum(tok_first - WIN + 1, 0) // BLOCK_N) * BLOCK_N
            for n0 in tl.range(own_lo, own_end, BLOCK_N, num_stages=DEQ_STAGES):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < own_end
                row = (q_start + offs_n).to(tl.int64) * num_kv_heads + h
                kv_lo = row[:, None] * D + offs_lo[None, :]
                kv_hi = row[:, None] * D + offs_hi[None, :]
                k_lo = tl.load(deq_k_ptr + kv_lo, mask=nmask[:, None], other=0.0)
                k_hi = tl.load(deq_k_ptr + kv_hi, mask=nmask[:, None], other=0.0)
                word = tl.load(deq_s_ptr + row, mask=nmask, other=0)
                ks = (word & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
                vs = ((word >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
                s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
                s = s * ks.to(tl.float32)[None, :]
                keep = nmask[None, :] & (offs_n[None, :] + prefix <= last_packed[:, None])
                if OWN:
                    keep = keep & (offs_n[None, :] + WIN > tok[:, None])
                s = tl.where(keep, s, float("-inf"))
                p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
                pv = (p * vs.to(tl.float32)[None, :]).to(dt)
                v_lo = tl.load(deq_v_ptr + kv_lo, mask=nmask[:, None], other=0.0)
                v_hi = tl.load(deq_v_ptr + kv_hi, mask=nmask[:, None], other=0.0)
                acc_lo = acc_lo * alpha[:, None] + mma(pv, v_lo, F32)
                acc_hi = acc_hi * alpha[:, None] + mma(pv, v_hi, F32)
                m_i = m_new

        # -- the chunk's own keys inside each row's window, exact and causal ----------------------
        if WIN > 0:   # static: presets without a window read every key from its packed slot
            band = (tl.maximum(lo_first - prefix, 0) // BLOCK_N) * BLOCK_N
            for n0 in range(band, chunk_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                nmask = offs_n < chunk_end
                kv_off = ((q_start + offs_n).to(tl.int64) * num_kv_heads + h) * D
                kv_lo = kv_off[:, None] + offs_lo[None, :]
                kv_hi = kv_off[:, None] + offs_hi[None, :]
                k_lo = tl.load(k_ptr + kv_lo, mask=nmask[:, None], other=0.0)
                k_hi = tl.load(k_ptr + kv_hi, mask=nmask[:, None], other=0.0)
                s = mma(q_lo, tl.trans(k_lo), F32) + mma(q_hi, tl.trans(k_hi), F32)
                keep = (nmask[None, :] & (offs_n[None, :] <= tok[:, None])
                        & (offs_n[None, :] + prefix > last_packed[:, None]))
                s = tl.where(keep, s, float("-inf"))
                p, alpha, m_new, l_i = _softmax_step(s, m_i, l_i)
                pd = p.to(dt)
                v_lo = tl.load(v_ptr + kv_lo, mask=nmask[:, None], other=0.0)
                v_hi = tl.load(v_ptr + kv_hi, mask=nmask[:, None], other=0.0)
                acc_lo = acc_lo * alpha[:, None] + mma(pd, v_lo, F32)
                acc_hi = acc_hi * alpha[:, None] + mma(pd, v_hi, F32)
                m_i = m_new

    if OWN:
        # merge the own part: out = (acc + 2^(m_o - m) o) / (l + 2^(m_o - m)) in the running
        # max m of both (a row may have neither: m stays -inf, l 0, out 0)
        m_o, l_o, o_lo, o_hi = _own_part(own_o_ptr, own_lse_ptr, t64, qh, rmask, offs_lo,
                                         offs_hi, stride_qt, stride_qh, stride_lh, stride_lt)
        m_new = tl.maximum(m_i, m_o)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_k = tl.exp2(m_i - m_use)
        a_o = tl.exp2(m_o - m_use)
        l_i = l_i * a_k + l_o * a_o
        acc_lo = acc_lo * a_k[:, None] + o_lo * a_o[:, None]
        acc_hi = acc_hi * a_k[:, None] + o_hi * a_o[:, None]
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


_OVERRIDE_ENV = "VLLM_TURBOQUANT_PREFILL_CONFIG"


@functools.lru_cache(maxsize=None)
def launch_override() -> dict:
    """Launch-config defaults from $VLLM_TURBOQUANT_PREFILL_CONFIG, a JSON object with any of
    block_m, block_n, num_warps, deq_stages (positive ints) and dense_rows (0 or 1: the rows'
    layout, see _tq_prefill_kernel's ROW_G); a tuning knob: benchmarks/layer_step.py --sweep
    measures the candidates and --best prints the fastest correct one in this form. Read once."""
    raw = os.environ.get(_OVERRIDE_ENV, "").strip()
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except ValueError:
        cfg = None
    sizes = {"block_m", "block_n", "num_warps", "deq_stages"}
    dense = cfg.get("dense_rows", 1) if isinstance(cfg, dict) else None
    if (not isinstance(cfg, dict) or set(cfg) - sizes - {"dense_rows"}
            or not all(type(cfg[k]) is int and cfg[k] > 0 for k in sizes & set(cfg))
            or type(dense) is not int or dense not in (0, 1)):
        raise ValueError(f"{_OVERRIDE_ENV}: expected positive ints for block_m, block_n, "
                         f"num_warps, deq_stages and 0 or 1 for dense_rows, got {raw!r}")
    return cfg


def tq_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, params, scale: float, side: TQSide | None = None,
               max_query_len: int | None = None, out: torch.Tensor | None = None,
               rotated: bool = False, block_m: int | None = None, block_n: int | None = None,
               num_warps: int | None = None, num_stages: int = 1,
               lookup: int = 3, deq=None, deq_stages: int | None = None,
               invariant: bool = False, own=None, own_prefix: bool = False,
               q_rotated: torch.Tensor | None = None,
               dense_rows: bool | None = None) -> torch.Tensor:
    """Triton prefill over packed pages; same contract as `reference.tq_prefill_ref`.

    query [T, Hq, D]; key, value [T, Hkv, D] (the chunk's own K/V; rotated=True: already
    rotated, in query.dtype, contiguous, e.g. tq_store's rot_out); cu_seqlens_q int32 [B+1];
    seq_lens int32 [B] = prefix + chunk; kv_cache uint8 [num_blocks, block_size, Hkv,
    slot_bytes] (head-major dense pages, docs/layout.md); block_table int32 [B, max_blocks].
    max_query_len: the longest chunk (pass it to avoid a device->host sync). Returns
    [T, Hq, D] in query.dtype.
    deq: optional (dk, dv, scales), the store's deq_out for these T tokens (dk, dv in
    query.dtype): the chunk's own tokens older than the window are then read from it instead
    of their packed slots (same values, contiguous loads; deq_stages pipelines them).
    own: optional (own_o [T, Hq, D] in query.dtype, own_lse [Hq, T] float32, any strides),
    with deq: each row's attention over its chunk's own keys j <= t - W (W the window, 0
    without one), dequantized (C[code] * scale), with q_rotated as queries and softmax scale
    ln 2 (FlashAttention's output and natural log-sum-exp, +inf for a row without keys):
    the kernel then reads only the remaining own keys and merges the two by log-sum-exp (see
    _tq_prefill_kernel's OWN).
    own_prefix: `own` also covers each row's cached prefix keys j <= t - W (FlashAttention
    over the copy with the prefix unpacked first, kernels/unpack.py): the kernel then reads
    from the packed prefix only the keys inside the rows' windows.
    q_rotated: rotate_query(query, params, scale), when the caller has it already.
    invariant: batch-invariant order (vLLM's VLLM_BATCH_INVARIANT; see _invariant_tiles):
    a row's output is bit for bit the same however its prompt was chunked; takes no deq
    (the chunk's own older tokens are unpacked from their slots like the prefix's).
    lookup 3 (register prmt lookups; was 2, the 16-entry table): lookup 2 with a window
    faulted at head 128 on the H100/H200 (tests/gpu/crash_matrix.py) and is refused there.
    Launch config (block_m rows of tokens x padded group = 128 rows, block_n 32, 4 warps): the
    fastest correct one of `benchmarks/layer_step.py --sweep` on the H200 (2026-12-02,
    benchmarks/results/h200-20261202/layer_step.json), both shapes swept: SmolLM2 mixed step
    (64 decodes x 1K + a 1,984-token chunk at 2K) 412 us vs 550 at 8 warps (the previous
    default, chosen from spill counts alone) and 452-2,771 for the other 7; head 128, 32/8
    heads, 2K chunk at 8K: 2,701 us vs 2,947 at 8 warps. Head 256 keeps 8 warps (not swept).
    dense_rows: a program's block_m * next_pow2(G) rows are (token, head) pairs packed densely,
    G rows per token, instead of next_pow2(G) rows per token with the padding masked: for G = 3
    a quarter fewer programs for the same chunk (no change where G is a power of two). Default:
    dense without `own`, padded with it, as one SmolLM2 layer measured on the H100
    (benchmarks/results/h100-20261207/, 2026-12-07): without `own` dense took 0.80-0.85x the
    GPU time at 7,700-token chunks (fresh, beside 47 decodes, over a 7,700-token prefix) and
    0.98x at a 2,048-token chunk; with `own` (the backend's CUDA path) 1.03-1.05x in all four.
    $VLLM_TURBOQUANT_PREFILL_CONFIG overrides it (see launch_override).
    """
    p = as_params(params, query.device)
    t, hq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    assert g * hkv == hq and kv_cache.stride(-1) == 1
    align_b = page_align(kv_cache, p.layout)     # also validates the cache
    if out is None:
        out = torch.empty_like(query)
    bsz = seq_lens.shape[0]
    if t == 0 or bsz == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    f32 = query.dtype == torch.float32 or interpreting(_tq_prefill_kernel)
    dot_dtype = query.dtype
    # One GEMM over all T rows. Invariance needs it to round each row the same for any T: so
    # does vLLM's own projections' invariance (cuBLAS without split-K on Hopper, its
    # VLLM_BATCH_INVARIANT settings). CPU BLAS does not at one token (T x Hq = Hq rows), seen
    # in the interpreter; one-token chunks are decodes in the backend. Rotating q inside the
    # kernel (a tl.dot feeding the score dots) gave wrong output on the H200 (triton 3.6,
    # 2026-12-02, tests/gpu/crash_matrix.py "inv" cases): not used.
    q = rotate_query(query, p, scale) if q_rotated is None else q_rotated
    if rotated:   # the store already wrote them rotated (the backend's path: no extra ops)
        assert key.dtype == value.dtype == dot_dtype
        assert key.is_contiguous() and value.is_contiguous()
        k, v = key, value
    else:         # rotated once here (T x Hkv x D, small next to the prefix)
        k = (key.float() @ p.rotation.T).to(dot_dtype).contiguous()
        v = (value.float() @ p.rotation.T).to(dot_dtype).contiguous()
    g_pad = next_pow2(g)
    tuned = launch_override()
    block_n = block_n or tuned.get("block_n", 32)
    # 4 warps at heads 64/128 (swept, see the docstring); head 256 keeps 8 (its [128, 128] fp32
    # accumulator halves, what the GPU suite ran; not swept)
    num_warps = num_warps or tuned.get("num_warps", 4 if d <= 128 else 8)
    if block_m is None:
        # 128 rows per program: 8.1 ms vs 12.4 (64 rows) and 20.4 (32 rows) at 32K cached +
        # 2K chunk, head 128, GQA 4, H100, before the 4-byte alignment hint.
        block_m = tuned.get("block_m") or max(1, 128 // g_pad)
    has_side = side is not None and side.window > 0
    if has_side:
        assert all(x.is_contiguous() for x in side)
        sk, sv, stag, schk, w = *side, side.window
        win = w
    else:
        sk = sv = stag = schk = unused_arg(p, query.device)
        w, win = 1, 0          # ring size (unused), precision window (none)
    if invariant and deq is not None:
        raise ValueError("tq_prefill: invariant=True reads every packed key from its slot; "
                         "pass deq=None")
    if deq is not None:
        dk, dv, dsc = deq
        assert dk.shape == dv.shape == (t, hkv, d) and dsc.shape == (t, hkv)
        assert dk.dtype == dv.dtype == dot_dtype and dsc.dtype == torch.int32
        assert all(x.is_contiguous() for x in deq)
    else:
        dk = dv = dsc = unused_arg(p, query.device)
    if own is not None:
        if deq is None or invariant:
            raise ValueError("tq_prefill: own needs deq (and is not batch-invariant)")
        own_o, own_lse = own
        assert own_o.shape == (t, hq, d) and own_o.dtype == dot_dtype
        assert own_o.stride() == q.stride() and own_lse.shape == (hq, t)
        assert own_lse.dtype == torch.float32
        lse_strides = own_lse.stride()
    else:
        own_o = own_lse = unused_arg(p, query.device)
        lse_strides = (0, 0)
        if own_prefix:
            raise ValueError("tq_prefill: own_prefix needs own")
    if deq_stages is None:
        # Pipeline depth of the deq loop's loads (benchmarks/layer_step.py --sweep, H200,
        # 2026-12-02, benchmarks/results/h200-20261202b/): head 64 fresh 7,700-token prompt
        # 560 us at 3 stages vs 654 at 2 and 766 at 1 (1,067 without the deq copy); head 128,
        # 32/8 heads, 2K chunk at 8K: 2,356 us at 1 vs 2,780 at 2 or 3.
        deq_stages = tuned.get("deq_stages", 3 if d <= 64 else 1)
    lay = p.layout
    kmode, vmode, kpair, vpair, kasm, vasm = lookup_tables(
        p, dot_dtype, lookup, allow_asm=not interpreting(_tq_prefill_kernel))
    if has_side and d >= 128 and (kmode, vmode) != (3, 3) and query.is_cuda:
        # H200 and H100, triton 3.6 (tests/gpu/crash_matrix.py, 2026-12-02): with a window at
        # head 128 the table-gather paths fault ("illegal memory access", 4-bit lookup 2) or
        # return wrong output (block_m 32; 3-bit codes, mode 0); the register lookup (mode 3)
        # is right. The 256-entry pair table (mode 1) is a gather too and was never run there.
        raise ValueError("tq_prefill: table-lookup dequantization (lookup 1 or 2, or codes of "
                         "other than 4 bits) with a window at head size >= 128 is miscompiled "
                         "on CUDA (triton 3.6); use 4-bit codes with lookup=3 (the default)")
    if dense_rows is None:   # see the docstring: measured per path
        dense_rows = bool(tuned.get("dense_rows", own is None))
    row_g = g if dense_rows else g_pad
    grid = (bsz, cdiv(max_query_len * row_g, block_m * g_pad), hkv)
    launch(_tq_prefill_kernel, grid,
        q, k, v, out, cu_seqlens_q, seq_lens, kv_cache, block_table,
        p.key_centroids, p.value_centroids, kpair, vpair, p.rotation_pm1,
        sk, sv, stag, schk, dk, dv, dsc, own_o, own_lse,
        g, w, hkv, p.rotation_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        kv_cache.stride(0), *lse_strides,
        D=d, KBITS=p.key_bits, VBITS=p.value_bits, SLOT=lay.slot_bytes,
        V_OFF=lay.v_codes_offset,
        KS_OFF=lay.k_scale_offset, BLOCK_SIZE=kv_cache.shape[1], BLOCK_M=block_m, G_PAD=g_pad,
        ROW_G=row_g,
        BLOCK_N=block_n,
        HAS_SIDE=has_side, F32=f32, COLS=min(d, 64), WIN=win, KMODE=kmode, VMODE=vmode,
        KASM=kasm, VASM=vasm, DEQ=deq is not None, DEQ_STAGES=deq_stages,
        INVARIANT=invariant, OWN=own is not None, OWN_PREFIX=bool(own_prefix),
        ALIGN=p.align if has_side else 0,
        ALIGN_B=align_b, num_warps=num_warps,
        num_stages=num_stages)
    return out
