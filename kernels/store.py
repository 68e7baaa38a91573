"""Fused quantize-on-write: rotate, quantize, bit-pack and write K/V slots into paged blocks.

One program encodes BLOCK_T tokens of one KV head, keys and values. When keys and values share
a codebook (every preset: equal bits) the program stacks them into one tile of 2 * BLOCK_T
rows (keys, then values), so each step below runs once per program instead of twice:
  y = x @ R^T on tensor cores (R = +-1 matrix times 1/sqrt(b): the products of fp16/bf16
  inputs are exact, accumulation fp32, so this is the codec's fp32 matmul up to summation
  order); the row statistics (non-finite check and |y|^2, then <y, c> and |c|^2) as two
  reductions of two operands each; the nearest centroid by counting the boundaries below
  u = y / |y| (= torch.bucketize) against the codebook held as compile-time constants
  (immediates: no loads, no gather); the least-squares (or norm) scale; bit-plane packing;
  the two fp16 scales; optionally the window side copy and the attention-side outputs.
Every load is issued at the top of the program: a decode step stores one token per request,
so the kernel's time is its latency chain, not its bandwidth (docs/kernels-notes.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TQSide, _num_sms, as_params, cached, cdiv, page_align, stored_order
from ._launch import launch
from ._tl import interpreting, sign_magnitude, slot_ptrs, store_codes

_FP16_MAX = 65504.0


@triton.jit
def _load_rt(rot_ptr, cols, offs_d, D: tl.constexpr):
    """R^T[:, cols] ([D, len(cols)], rot_ptr's dtype) from R^T stored row-major (the launcher
    hands the transpose: each thread's part of a row is contiguous, 16-byte loads)."""
    return tl.load(rot_ptr + offs_d[:, None] * D + cols[None, :])


@triton.jit
def _rotate(x, rt, rot_scale, ROT: tl.constexpr, DT16: tl.constexpr):
    """x [N, D] float32 (from fp16/bf16: <= 11 significant bits, exact in tf32) times R^T
    columns rt: tf32 or 16-bit tensor-core products of the +-1 matrix are exact, accumulation
    fp32 -> the codec's fp32 matmul up to summation order. fp32 inputs (and the interpreter)
    take the exact fp32 dot (ROT 1)."""
    if ROT == 1:
        y = tl.dot(x, rt.to(tl.float32), input_precision="ieee")
    elif ROT == 2:
        # x came from fp16/bf16 (DT16): casting back is exact, and so is the +-1 matrix.
        y = tl.dot(x.to(DT16), rt.to(DT16), out_dtype=tl.float32)
    else:
        y = tl.dot(x, rt.to(tl.float32), input_precision="tf32")
    return y * rot_scale


@triton.jit
def _add2(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _nonfinite(y):
    """1 where y is nan or +-inf, else 0 (int32). |y| < inf is false exactly for nan and
    +-inf and involves no arithmetic. The former test, (y - y) != 0, broke on the GPU: y is
    dot * rot_scale, and with FMA contraction (Triton's default there) y - y became
    fma(dot, rot_scale, -y) = the rounding error of the product, nonzero whenever rot_scale
    is not a power of two (head 128: 1/sqrt(128)); every row read as non-finite and was stored
    as zeros (codes 0x77, scale 0). Heads 64/256 (1/8, 1/16) and the CPU interpreter, which
    never contracts, were unaffected."""
    return ((tl.abs(y) < float("inf")) == 0).to(tl.int32)


@triton.jit
def _levels(u, BOUNDS: tl.constexpr, CENTS: tl.constexpr, BITS: tl.constexpr,
            SYM: tl.constexpr):
    """u float32 -> (stored code int32, centroid value float32) of every element: the code is
    the sign-magnitude form (codec.packing) of the codebook index #(BOUNDS < u)
    (= torch.bucketize), the value C[index]. BOUNDS, CENTS: the codebook as constexpr tuples
    of floats, compiled into the kernel as immediates.

    SYM (the codebook is symmetric: C[2H - 1 - k] = -C[k], bound H - 1 is 0, H = 2**(BITS-1),
    checked by the launcher; true of every Lloyd-Max codebook here): the stored code is
    (u > 0) << (BITS - 1) | m, with m = #(positive bounds < |u|) for u > 0 and
    #(positive bounds <= |u|) for u <= 0 (the index of a negative u counts the bounds below
    it, = H - 1 - that count by symmetry), and the value is +-C[H + m]. Raising |u| of a
    u <= 0 by one ulp turns <= into <, so one loop of H - 1 compares serves both: half the
    compares and selects of the plain count."""
    if SYM:
        H: tl.constexpr = 1 << (BITS - 1)
        pos = u > 0.0
        a = tl.abs(u)
        a = tl.where(pos, a, (a.to(tl.int32, bitcast=True) + 1).to(tl.float32, bitcast=True))
        mag = tl.zeros(u.shape, dtype=tl.int32)
        c = tl.full(u.shape, CENTS[H], tl.float32)
        for j in tl.static_range(H - 1):
            above = a > BOUNDS[H + j]
            mag += above.to(tl.int32)
            c = tl.where(above, CENTS[H + j + 1], c)
        code = mag | (pos.to(tl.int32) << (BITS - 1))
        c = tl.where(pos, c, -c)
    else:
        idx = tl.zeros(u.shape, dtype=tl.int32)
        c = tl.full(u.shape, CENTS[0], tl.float32)
        for i in tl.static_range(len(BOUNDS)):
            above = u > BOUNDS[i]
            idx += above.to(tl.int32)
            c = tl.where(above, CENTS[i + 1], c)
        code = sign_magnitude(idx, BITS)
    return code, c


@triton.jit
def _finish_scale(dotp, csq, norm, finite, LSQ: tl.constexpr):
    if LSQ:
        scale = dotp / tl.maximum(csq, 1e-30)
    else:
        scale = norm / tl.maximum(tl.sqrt(csq), 1e-30)
    scale = tl.where(finite, scale, 0.0)
    return tl.minimum(tl.maximum(scale, -65504.0), 65504.0)


@triton.jit
def _quantize_halves(y_lo, y_hi, BOUNDS: tl.constexpr, CENTS: tl.constexpr, LSQ: tl.constexpr,
                     SYM: tl.constexpr):
    """4-bit quantization (TQLayerCodec.quantize_rotated) of vectors given as their halves
    [N, D/2] (coordinates [0, D/2) and [D/2, D)) -> (packed bytes int32 [N, D/2] = code_lo |
    code_hi << 4 in stored form, scale float32 [N], y_lo, y_hi with non-finite rows zeroed).
    Byte j of a 4-bit plane holds coordinates j and j + D/2: no reshape needed to pack. Each
    row statistic covers both halves in one reduction: two reductions in all, where a
    reduction per statistic and half took eight (each one a round trip through shared memory
    across the program's warps)."""
    nbad, nsq = tl.reduce((_nonfinite(y_lo) + _nonfinite(y_hi), y_lo * y_lo + y_hi * y_hi),
                          1, _add2)
    finite = nbad == 0
    y_lo = tl.where(finite[:, None], y_lo, 0.0)
    y_hi = tl.where(finite[:, None], y_hi, 0.0)
    norm = tl.sqrt(tl.where(finite, nsq, 0.0))
    nrm = tl.maximum(norm, 1e-30)[:, None]
    c_lo, v_lo = _levels(y_lo / nrm, BOUNDS, CENTS, 4, SYM)
    c_hi, v_hi = _levels(y_hi / nrm, BOUNDS, CENTS, 4, SYM)
    dotp, csq = tl.reduce((y_lo * v_lo + y_hi * v_hi, v_lo * v_lo + v_hi * v_hi), 1, _add2)
    scale = _finish_scale(dotp, csq, norm, finite, LSQ)
    return c_lo | (c_hi << 4), scale, y_lo, y_hi


@triton.jit
def _quantize(y, BOUNDS: tl.constexpr, CENTS: tl.constexpr, BITS: tl.constexpr,
              LSQ: tl.constexpr, SYM: tl.constexpr):
    """y [N, D] float32 rotated -> (stored codes int32 [N, D], scale float32 [N], y with
    non-finite rows zeroed). Same math as TQLayerCodec.quantize_rotated."""
    nbad, nsq = tl.reduce((_nonfinite(y), y * y), 1, _add2)
    finite = nbad == 0
    y = tl.where(finite[:, None], y, 0.0)
    norm = tl.sqrt(tl.where(finite, nsq, 0.0))
    codes, c = _levels(y / tl.maximum(norm, 1e-30)[:, None], BOUNDS, CENTS, BITS, SYM)
    dotp, csq = tl.reduce((y * c, c * c), 1, _add2)
    return codes, _finish_scale(dotp, csq, norm, finite, LSQ), y


@triton.jit
def _store_rows(base, cols, y, mask):
    """y [N, len(cols)] float32 -> base[n] + cols (per-row pointers) in their dtype, rows
    where mask."""
    tl.store(base[:, None] + cols[None, :], y.to(base.dtype.element_ty), mask=mask[:, None])


@triton.jit
def _pick(is_v, k_base, v_base):
    """Per row: v_base where the row is a value row, else k_base."""
    return tl.where(is_v, v_base, k_base)


@triton.jit
def _pick_row(is_v, k_ptr, v_ptr, off, ALIGN: tl.constexpr):
    """Per row: the output row k_ptr + off (v_ptr + off for value rows), with the alignment
    ALIGN (bytes) the launcher checked: a per-row choice of base loses what the compiler
    knew of either, and its stores would be one element wide."""
    return tl.multiple_of(tl.where(is_v, v_ptr, k_ptr) + off, ALIGN)


@triton.jit
def _encode_rows(x, rt_lo, rt_hi, rt, rot_ptr, rot_scale, is_v, dst, sdst, valid, in_range,
                 side_k_ptr, side_v_ptr, side_off, sel, side_check_ptr, check_off,
                 rot_k_ptr, rot_v_ptr, rot_off, deq_k_ptr, deq_v_ptr, deq_s_ptr, deq_s_off,
                 dkcent_ptr, dvcent_ptr, own_k_ptr, own_v_ptr, own_off, own_sel,
                 offs_d, offs_lo, offs_hi,
                 BOUNDS: tl.constexpr, CENTS: tl.constexpr, BITS: tl.constexpr,
                 D: tl.constexpr, LSQ: tl.constexpr, SYM: tl.constexpr, ROT: tl.constexpr,
                 DT16: tl.constexpr, PRELOAD: tl.constexpr, HALVES: tl.constexpr,
                 HAS_SIDE: tl.constexpr, ROT_OUT: tl.constexpr, DEQ_OUT: tl.constexpr,
                 OWN_OUT: tl.constexpr, OUT_ALIGN: tl.constexpr):
    """Encode N rows, each a key or a value (is_v [N]) of one token: x [N, D] float32 ->
    packed codes at dst [N], its fp16 scale into half is_v of the token's scale word at
    sdst [N] (int32 pointers). Per row, where selected: the rotated vector to the side copy
    (sel) and its check word (the same half of it), to rot_out (ROT_OUT, every row in_range;
    padding rows were loaded as zeros and write zeros: the buffer holds no uninitialized
    memory); the centroids C[code] (DEQ_OUT: what attention dequantizes the slot to, before
    its scale) to deq + rot_off, zeros for padding rows, looked up in the codebook already in
    deq's dtype, so they are bit for bit the values the attention kernels' lookups produce
    (the interpreter's fp32 -> bf16 cast does not round as CUDA's does), and the slot's scale
    half to deq_s; OWN_OUT (with DEQ_OUT): C[code] * the stored fp16 scale, in own's dtype,
    to own + own_off where own_sel: the operands of the chunk's own packed attention run by
    FlashAttention (tq_store's own_out)."""
    if BITS == 4 and HALVES:
        if not PRELOAD:
            rt_lo = _load_rt(rot_ptr, offs_lo, offs_d, D)
        y_lo = _rotate(x, rt_lo, rot_scale, ROT, DT16)
        if not PRELOAD:
            rt_hi = _load_rt(rot_ptr, offs_hi, offs_d, D)
        y_hi = _rotate(x, rt_hi, rot_scale, ROT, DT16)
        packed, scale, y_lo, y_hi = _quantize_halves(y_lo, y_hi, BOUNDS, CENTS, LSQ, SYM)
        tl.store(dst[:, None] + offs_lo[None, :], packed.to(tl.uint8), mask=valid[:, None])
        if HAS_SIDE:
            side = _pick_row(is_v, side_k_ptr, side_v_ptr, side_off, OUT_ALIGN)
            _store_rows(side, offs_lo, y_lo, sel)
            _store_rows(side, offs_hi, y_hi, sel)
        if ROT_OUT:
            ro = _pick_row(is_v, rot_k_ptr, rot_v_ptr, rot_off, OUT_ALIGN)
            _store_rows(ro, offs_lo, y_lo, in_range)
            _store_rows(ro, offs_hi, y_hi, in_range)
        if DEQ_OUT:
            dcent = _pick(is_v, dkcent_ptr, dvcent_ptr)
            c_lo = tl.load(dcent[:, None] + (packed & 15))
            c_hi = tl.load(dcent[:, None] + (packed >> 4))
            dq = _pick_row(is_v, deq_k_ptr, deq_v_ptr, rot_off, OUT_ALIGN)
            _store_rows(dq, offs_lo, tl.where(valid[:, None], c_lo, 0.0), in_range)
            _store_rows(dq, offs_hi, tl.where(valid[:, None], c_hi, 0.0), in_range)
            if OWN_OUT:
                s16 = scale.to(tl.float16).to(tl.float32)[:, None]
                own = _pick_row(is_v, own_k_ptr, own_v_ptr, own_off, OUT_ALIGN)
                _store_rows(own, offs_lo, c_lo.to(tl.float32) * s16, own_sel)
                _store_rows(own, offs_hi, c_hi.to(tl.float32) * s16, own_sel)
    else:
        if not PRELOAD:
            rt = _load_rt(rot_ptr, offs_d, offs_d, D)
        y = _rotate(x, rt, rot_scale, ROT, DT16)
        codes, scale, y = _quantize(y, BOUNDS, CENTS, BITS, LSQ, SYM)
        store_codes(codes, dst, valid, BITS, D, STORED=True)
        if HAS_SIDE:
            _store_rows(_pick_row(is_v, side_k_ptr, side_v_ptr, side_off, OUT_ALIGN), offs_d,
                        y, sel)
        if ROT_OUT:
            _store_rows(_pick_row(is_v, rot_k_ptr, rot_v_ptr, rot_off, OUT_ALIGN), offs_d, y,
                        in_range)
        if DEQ_OUT:
            dcent = _pick(is_v, dkcent_ptr, dvcent_ptr)
            c = tl.load(dcent[:, None] + codes)
            dq = _pick_row(is_v, deq_k_ptr, deq_v_ptr, rot_off, OUT_ALIGN)
            _store_rows(dq, offs_d, tl.where(valid[:, None], c, 0.0), in_range)
            if OWN_OUT:
                s16 = scale.to(tl.float16).to(tl.float32)[:, None]
                _store_rows(_pick_row(is_v, own_k_ptr, own_v_ptr, own_off, OUT_ALIGN), offs_d,
                            c.to(tl.float32) * s16, own_sel)
    # The scale word is K's fp16 scale | V's << 16 (little endian): each row writes its half.
    s16 = scale.to(tl.float16)
    half = is_v.to(tl.int32)
    tl.store(sdst.to(tl.pointer_type(tl.float16)) + half, s16, mask=valid)
    if HAS_SIDE:
        tl.store((side_check_ptr + check_off).to(tl.pointer_type(tl.float16)) + half, s16,
                 mask=sel)
    if DEQ_OUT:
        tl.store((deq_s_ptr + deq_s_off).to(tl.pointer_type(tl.float16)) + half,
                 tl.where(valid, s16, 0.0), mask=in_range)


@triton.jit
def _load_rows(key_ptr, value_ptr, is_v, src, h, stride_kt, stride_kh, stride_vt, stride_vh,
               offs_d, valid, load_mask):
    """x [N, D] float32: row n = the key (or, where is_v, the value) of K/V row src[n], head
    h; zeros where not valid. Loaded under load_mask (rows in range, not only valid ones) so
    the load need not wait for the slot mapping's. Two loads masked to the key rows and the
    value rows, not one through per-row picked pointers: a picked pointer loses the
    alignment the compiler needs for 16-byte loads (sm_90 SASS: one 2-byte load per element
    otherwise)."""
    kb = key_ptr + src * stride_kt + h * stride_kh
    vb = value_ptr + src * stride_vt + h * stride_vh
    xk = tl.load(kb[:, None] + offs_d[None, :], mask=(load_mask & (is_v == 0))[:, None],
                 other=0.0)
    xv = tl.load(vb[:, None] + offs_d[None, :], mask=(load_mask & is_v)[:, None], other=0.0)
    x = tl.where(is_v[:, None], xv, xk)
    return tl.where(valid[:, None], x.to(tl.float32), 0.0)


# T (the step's token count) changes every mixed step: left unspecialized, so T % 16 == 0 and
# T == 1 do not compile variants of their own in the middle of serving (docs/kernels-notes.md,
# "Compiles in the middle of serving").
@triton.jit(do_not_specialize=["T"])
def _tq_store_kernel(
    key_ptr,            # [T, Hkv, D] fp16/bf16/fp32
    value_ptr,          # [T, Hkv, D] same dtype
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8, head-major pages
    slot_ptr,           # [T] int64, < 0 = padding
    rot_ptr,            # [D, D] float32 (or the input's 16-bit dtype, ROT 2): R^T / rot_scale
    dkcent_ptr, dvcent_ptr,  # [2**BITS] codebooks in deq_k's dtype, by stored code (DEQ_OUT)
    side_k_ptr, side_v_ptr,  # [rows, W, Hkv, D] model dtype (contiguous)
    side_tag_ptr,       # [rows, W] int32 (contiguous)
    side_check_ptr,     # [rows, W, Hkv] int32 (contiguous)
    rows_ptr, pos_ptr, send_ptr,  # [T] int32/int64: batch row, position, request seq_len
    idx_ptr,            # [T] int32/int64: key/value row of each token (when IDX)
    rot_k_ptr, rot_v_ptr,    # [T, Hkv, D] contiguous: rotated K/V out (when ROT_OUT)
    deq_k_ptr, deq_v_ptr,    # [T, Hkv, D] contiguous: centroids C[code] out (when DEQ_OUT)
    deq_s_ptr,          # [T, Hkv] int32: the slot's scale word (K | V << 16) (when DEQ_OUT)
    own_k_ptr, own_v_ptr,    # [T_own, Hkv, D]: C[code] * scale out (when OWN_OUT)
    own_idx_ptr,        # [T] int32: each token's row there, < 0 = none (when OWN_OUT)
    T, rot_scale, W, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, LSQ: tl.constexpr,
    K_BOUNDS: tl.constexpr, K_CENTS: tl.constexpr, V_BOUNDS: tl.constexpr,
    V_CENTS: tl.constexpr, SYM: tl.constexpr,
    SLOT: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr, BS: tl.constexpr,
    ALIGN_B: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_SIDE: tl.constexpr, ROT: tl.constexpr, HALVES: tl.constexpr = True,
    STACK: tl.constexpr = True, PRELOAD: tl.constexpr = True, OUT_ALIGN: tl.constexpr = 1,
    IDX: tl.constexpr = False, ROT_OUT: tl.constexpr = False, DEQ_OUT: tl.constexpr = False,
    OWN_OUT: tl.constexpr = False,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    # The program's rows: STACK, 2 * BLOCK_T (its tokens' keys, then the same tokens'
    # values); else BLOCK_T, once as keys and once as values.
    if STACK:
        offs_r = tl.arange(0, 2 * BLOCK_T)
        offs_t = pid_t * BLOCK_T + offs_r % BLOCK_T
        is_v = offs_r >= BLOCK_T
    else:
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        is_v = offs_t < 0
    offs_d = tl.arange(0, D)
    HALF: tl.constexpr = D // 2
    offs_lo = tl.arange(0, HALF)
    offs_hi = HALF + offs_lo
    in_range = offs_t < T
    t64 = offs_t.to(tl.int64)

    # Every load first: the slot mapping, the window's per-token data, K and V, the rotation.
    # None waits for another (rows in range are read even if padding, then zeroed).
    slot = tl.load(slot_ptr + offs_t, mask=in_range, other=-1).to(tl.int64)
    if HAS_SIDE:
        row = tl.load(rows_ptr + offs_t, mask=in_range, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs_t, mask=in_range, other=0).to(tl.int64)
        send = tl.load(send_ptr + offs_t, mask=in_range, other=0).to(tl.int64)
    if OWN_OUT:
        own_row = tl.load(own_idx_ptr + offs_t, mask=in_range, other=-1).to(tl.int64)
    valid = slot >= 0
    # The K/V row each token reads: itself, or (IDX) the row idx_ptr names, so a second store
    # of a few tokens needs no gathered copy of their K/V (its entries are read only for
    # valid tokens: a padding token's may be anything).
    src = t64
    load_mask = in_range
    if IDX:
        src = tl.load(idx_ptr + offs_t, mask=valid, other=0).to(tl.int64)
        load_mask = valid
    if STACK:
        x = _load_rows(key_ptr, value_ptr, is_v, src, h, stride_kt, stride_kh, stride_vt,
                       stride_vh, offs_d, valid, load_mask)
    else:
        xk = _load_rows(key_ptr, value_ptr, is_v, src, h, stride_kt, stride_kh, stride_vt,
                        stride_vh, offs_d, valid, load_mask)
        xv = _load_rows(key_ptr, value_ptr, offs_t >= 0, src, h, stride_kt, stride_kh,
                        stride_vt, stride_vh, offs_d, valid, load_mask)
    rt_lo = rot_ptr
    rt_hi = rot_ptr
    rt = rot_ptr
    if PRELOAD:
        if HALVES and KBITS == 4:
            rt_lo = _load_rt(rot_ptr, offs_lo, offs_d, D)
            rt_hi = _load_rt(rot_ptr, offs_hi, offs_d, D)
        else:
            rt = _load_rt(rot_ptr, offs_d, offs_d, D)

    # Where the slot's three parts go in the head-major page (docs/layout.md); the alignment
    # hints let the compiler move packed bytes 4 (or 16) at a time instead of 1.
    kdst, vdst, sdst = slot_ptrs(cache_ptr, slot // BS, slot % BS, h, stride_cb, BS, SLOT,
                                 V_OFF, KS_OFF, ALIGN_B)
    if HAS_SIDE:
        sel = valid & (pos >= send - W)
        entry = row * W + pos % W                                 # [T] index into [rows, W]
        side_off = (entry * num_kv_heads + h) * D
        check_off = entry * num_kv_heads + h
        tl.store(side_tag_ptr + entry, slot.to(tl.int32), mask=sel & (is_v == 0))
    else:
        sel = valid
        side_off = t64
        check_off = t64
    rot_off = (t64 * num_kv_heads + h) * D
    own_sel = offs_t < 0
    own_off = t64
    if OWN_OUT:
        own_sel = valid & (own_row >= 0)
        own_off = (own_row * num_kv_heads + h) * D
    deq_s_off = t64 * num_kv_heads + h
    DT16: tl.constexpr = key_ptr.dtype.element_ty
    if STACK:
        dst = tl.multiple_of(_pick(is_v, kdst, vdst), ALIGN_B)
        _encode_rows(x, rt_lo, rt_hi, rt, rot_ptr, rot_scale, is_v, dst, sdst, valid, in_range,
                     side_k_ptr, side_v_ptr, side_off, sel, side_check_ptr, check_off,
                     rot_k_ptr, rot_v_ptr, rot_off, deq_k_ptr, deq_v_ptr, deq_s_ptr,
                     deq_s_off, dkcent_ptr, dvcent_ptr, own_k_ptr, own_v_ptr, own_off,
                     own_sel, offs_d, offs_lo, offs_hi, K_BOUNDS, K_CENTS, KBITS, D, LSQ,
                     SYM, ROT, DT16, PRELOAD, HALVES, HAS_SIDE, ROT_OUT, DEQ_OUT, OWN_OUT,
                     OUT_ALIGN)
    else:
        _encode_rows(xk, rt_lo, rt_hi, rt, rot_ptr, rot_scale, is_v, kdst, sdst, valid,
                     in_range, side_k_ptr, side_v_ptr, side_off, sel, side_check_ptr,
                     check_off, rot_k_ptr, rot_v_ptr, rot_off, deq_k_ptr, deq_v_ptr,
                     deq_s_ptr, deq_s_off, dkcent_ptr, dvcent_ptr, own_k_ptr, own_v_ptr,
                     own_off, own_sel, offs_d, offs_lo, offs_hi, K_BOUNDS, K_CENTS, KBITS, D,
                     LSQ, SYM, ROT, DT16, PRELOAD, HALVES, HAS_SIDE, ROT_OUT, DEQ_OUT,
                     OWN_OUT, OUT_ALIGN)
        _encode_rows(xv, rt_lo, rt_hi, rt, rot_ptr, rot_scale, offs_t >= 0, vdst, sdst, valid,
                     in_range, side_k_ptr, side_v_ptr, side_off, sel, side_check_ptr,
                     check_off, rot_k_ptr, rot_v_ptr, rot_off, deq_k_ptr, deq_v_ptr,
                     deq_s_ptr, deq_s_off, dkcent_ptr, dvcent_ptr, own_k_ptr, own_v_ptr,
                     own_off, own_sel, offs_d, offs_lo, offs_hi, V_BOUNDS, V_CENTS, VBITS, D,
                     LSQ, SYM, ROT, DT16, PRELOAD, HALVES, HAS_SIDE, ROT_OUT, DEQ_OUT,
                     OWN_OUT, OUT_ALIGN)


def store_config(tokens: int, num_kv_heads: int, head_size: int, device,
                 fixed: bool = False) -> tuple[int, int]:
    """(tokens per program, warps) of tq_store; a program's tile is twice as many rows (keys
    and values stacked, every preset). Large stores (prefill chunks): 32 tokens / 4 warps,
    64 rows (H200, CUDA graphs, 8K tokens x 8 heads x 128, bf16, the 16-bit rotation dot: 82.7
    us, vs 99.3 for 32 / 8, 89.3 for 16 / 4, 89.6 for 64 / 8; `benchmarks/kernels.py --only
    store`, benchmarks/results/h200-20261204a/).
    Stores whose large grid would not give every SM a program (decode steps: one token per
    request), 8 tokens / 4 warps: the 16-row minimum of a tensor-core dot, so a decode step's
    few programs finish sooner (SmolLM2's 3 KV heads x 64, 1 / 32 / 256 tokens: 6.8 / 7.0 /
    7.7 us; 16 / 4: 9.1 / 9.1 / 10.2; benchmarks/results/h200-20261203f/). Head 256 always
    8 / 4 (its operand tiles must fit shared memory). fixed: always the large-store config
    (vLLM's batch-invariant mode: a token's bytes then never depend on the batch it was stored
    with, since the tile shape picks the tensor-core instruction and so the order of the
    rotation's fp32 sums)."""
    if head_size > 128:
        return 8, 4
    if not fixed and -(-tokens // 32) * num_kv_heads < _num_sms(device):
        return 8, 4
    return 32, 4


def large_store_tokens(num_kv_heads: int, head_size: int, device) -> int | None:
    """The fewest tokens whose store takes another store_config than a one-token store (its
    large-store tiles), or None where every size takes one config (head 256; or so many KV
    heads that one token fills the GPU). The tile size is a constexpr: each config is a
    kernel variant of its own, which the backend's warm-up compiles before serving
    (backend/warmup.py). Found by bisection over store_config itself (its size rule stays in
    one place)."""
    small = store_config(1, num_kv_heads, head_size, device)
    lo, hi = 1, 1 << 24                 # more tokens than any step has
    if store_config(hi, num_kv_heads, head_size, device) == small:
        return None
    while hi - lo > 1:                  # store_config(lo) is small, store_config(hi) is not
        mid = (lo + hi) // 2
        if store_config(mid, num_kv_heads, head_size, device) == small:
            lo = mid
        else:
            hi = mid
    return hi


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, params, side: TQSide | None = None,
             token_rows: torch.Tensor | None = None, token_pos: torch.Tensor | None = None,
             token_seq_end: torch.Tensor | None = None, token_index: torch.Tensor | None = None,
             rot_out: tuple[torch.Tensor, torch.Tensor] | None = None,
             deq_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             own_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             block_t: int | None = None, num_warps: int | None = None, rot: str | None = None,
             halves: bool = True, prescaled: bool = False, fixed_tiles: bool = False,
             stack: bool | None = None, symmetric: bool | None = None,
             preload: bool | None = None) -> None:
    """Triton quantize-on-write; same contract as `reference.tq_store_ref`.

    key, value     [N, Hkv, D] fp16/bf16/fp32, last dim contiguous (any token/head strides).
    kv_cache       uint8 [num_blocks, block_size, Hkv, slot_bytes], head-major dense pages
                   (docs/layout.md; any block stride, any order of the last 3 dims).
    slot_mapping   int64 [T] (< 0 skipped); T = N, or len(token_index).
    side + token_rows/token_pos/token_seq_end: optional window copy (see TQSide), [T] each.
    token_index    optional int [T]: token i encodes key/value row token_index[i].
    rot_out        optional (rk, rv), each [T, Hkv, D] contiguous: receive the rotated K/V
                   (x @ R.T, in their dtype) of every written token.
    deq_out        optional (dk, dv, scales): dk, dv [T, Hkv, D] contiguous receive the
                   centroids C[code] of every token's K/V (in their dtype; zeros for padding),
                   scales int32 [T, Hkv] its slot's scale word (K fp16 | V fp16 << 16; 0 for
                   padding): the packed slot, dequantized once for tq_prefill's `deq`.
    own_out        optional (ok, ov, own_index), with deq_out: ok, ov [T_own, Hkv, D]
                   contiguous receive C[code] * scale (the stored fp16 scale; the deq copy's
                   dtype) of each valid token i with own_index[i] >= 0 (int32 [T]), at row
                   own_index[i]: the keys and values FlashAttention reads for the chunks' own
                   packed tokens (backend/own_attention.py). Rows nobody writes stay as they
                   were.
    rot: how the rotation's dot runs: "dot16" (the default: tensor cores in the input's
    16-bit dtype, exact +-1 products, fp32 sums), "tf32" (tensor cores on fp32 operand tiles:
    the same math, twice the registers and shared memory), "ieee" (exact fp32 FMA; fp32
    inputs and the interpreter always). H200, CUDA graphs, 2026-12-03: dot16 99.1 vs tf32
    141.9 us at 8K tokens x 8 heads x 128 (32 / 8); SmolLM2 decode-step stores (8 / 4) within
    0.4 us either way, 6.8 / 7.0 / 7.7 vs 7.1 / 7.4 / 7.5 us at 1 / 32 / 256 tokens
    (benchmarks/results/h200-20261203f/).
    block_t, num_warps: tokens per program and warps, default `store_config` (by the store's
    size; fixed_tiles: one config for every size, see there).
    stack, symmetric, preload (default: wherever possible; False for A/B runs and tests):
    keys and values in one tile of 2 * block_t rows (needs equal key and value bits); the
    symmetric codebooks' half-length centroid search (`_levels`); the rotation matrix loaded
    at the top of the program with K and V (stacked tiles whose matrix fits in registers:
    head 64, or head 128 with 8 warps).
    """
    p = as_params(params, kv_cache.device)
    t, hkv, d = key.shape
    if token_index is not None:
        t = token_index.shape[0]
    if t == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert kv_cache.dtype == torch.uint8 and kv_cache.shape[3] == p.layout.slot_bytes
    align_b = page_align(kv_cache, p.layout)     # also validates the cache
    lay = p.layout
    has_side = side is not None and side.window > 0
    if has_side:
        if token_rows is None or token_pos is None or token_seq_end is None:
            raise ValueError("the window side copy needs token_rows, token_pos, token_seq_end")
        assert all(x.is_contiguous() for x in side)
        sk, sv, stag, schk = side
        rows, pos, send, w = token_rows, token_pos, token_seq_end, side.window
    else:
        sk = sv = stag = schk = rows = pos = send = slot_mapping
        w = 1
    value = value.to(key.dtype)
    idx = token_index if token_index is not None else slot_mapping
    if rot_out is not None:
        rk, rv = rot_out
        assert token_index is None and rk.is_contiguous() and rv.is_contiguous()
        assert rk.shape == (t, hkv, d) and rv.shape == (t, hkv, d)
    else:
        rk = rv = slot_mapping
    if deq_out is not None:
        dk, dv, dsc = deq_out
        assert token_index is None and all(x.is_contiguous() for x in deq_out)
        assert dk.shape == (t, hkv, d) and dv.shape == (t, hkv, d) and dk.dtype == dv.dtype
        assert dsc.shape == (t, hkv) and dsc.dtype == torch.int32
        dkc = cached(p, ("cent", "k", dk.dtype),
                     lambda: stored_order(p.key_centroids).to(dk.dtype).contiguous())
        dvc = cached(p, ("cent", "v", dk.dtype),
                     lambda: stored_order(p.value_centroids).to(dk.dtype).contiguous())
    else:
        dk = dv = dsc = dkc = dvc = slot_mapping
    if own_out is not None:
        if deq_out is None:
            raise ValueError("tq_store: own_out needs deq_out (it reuses its centroid lookup)")
        ok, ov, own_idx = own_out
        assert ok.is_contiguous() and ov.is_contiguous() and ok.dtype == ov.dtype == dk.dtype
        assert ok.shape[1:] == (hkv, d) and ov.shape == ok.shape
        assert own_idx.shape == (t,) and own_idx.dtype == torch.int32
    else:
        ok = ov = own_idx = slot_mapping
    if block_t is None:
        block_t, dflt_warps = store_config(t, hkv, d, kv_cache.device, fixed_tiles)
        num_warps = num_warps or dflt_warps
    num_warps = num_warps or 4
    if key.dtype == torch.float32 or interpreting(_tq_store_kernel):
        rot = "ieee"
    rot_mat, rot_scale = p.rotation_pm1, p.rotation_scale
    if prescaled:                        # R itself (not exact in tf32/16-bit): fp32 FMA dot
        rot_mat, rot_scale, rot = p.rotation, 1.0, "ieee"
    rot_code = {"tf32": 0, "ieee": 1, "dot16": 2}[rot or "dot16"]
    # The kernel reads R^T row-major; the +-1 matrix in the input's dtype for "dot16" (exact,
    # half the bytes).
    rot_dtype = key.dtype if rot_code == 2 else torch.float32
    rot_mat = cached(p, ("rot^T", prescaled, rot_dtype),
                     lambda: rot_mat.t().to(rot_dtype).contiguous())
    if not p.codebooks:
        raise ValueError("tq_store: params without codebook constants (build them with "
                         "TQLayerParams.from_codec)")
    kb, kc, vb, vc = p.codebooks
    can_stack = p.key_bits == p.value_bits and kb == vb and kc == vc
    stack = can_stack if stack is None else stack and can_stack
    sym = p.symmetric if symmetric is None else symmetric and p.symmetric
    fits = d <= 64 or (d <= 128 and num_warps >= 8)
    preload = stack and fits if preload is None else preload and stack
    # 16-byte aligned rows in every written side / rot / deq / own tensor: vector stores
    outs = [x for x in (sk, sv, rk, rv, dk, dv, ok, ov) if x is not slot_mapping]
    out_align = 16 if all(x.data_ptr() % 16 == 0 and d * x.element_size() % 16 == 0
                          for x in outs) else 1
    grid = (cdiv(t, block_t), hkv)
    launch(_tq_store_kernel, grid,
        key, value, kv_cache, slot_mapping, rot_mat, dkc, dvc,
        sk, sv, stag, schk, rows, pos, send, idx, rk, rv, dk, dv, dsc,
        ok, ov, own_idx,
        t, rot_scale, w, hkv,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_cache.stride(0),
        D=d, KBITS=p.key_bits, VBITS=p.value_bits, LSQ=p.scale_mode == "lsq",
        K_BOUNDS=kb, K_CENTS=kc, V_BOUNDS=vb, V_CENTS=vc, SYM=sym,
        SLOT=lay.slot_bytes, V_OFF=lay.v_codes_offset, KS_OFF=lay.k_scale_offset,
        BS=kv_cache.shape[1], ALIGN_B=align_b, BLOCK_T=block_t,
        HAS_SIDE=has_side, ROT=rot_code, HALVES=halves, STACK=stack, PRELOAD=preload,
        OUT_ALIGN=out_align,
        IDX=token_index is not None, ROT_OUT=rot_out is not None,
        DEQ_OUT=deq_out is not None, OWN_OUT=own_out is not None, num_warps=num_warps)
