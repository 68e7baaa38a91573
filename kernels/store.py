"""Fused quantize-on-write: rotate, quantize, bit-pack and write K/V slots into paged blocks.

One program encodes BLOCK_T tokens of one KV head, keys and values: y = x @ R^T on tensor
cores (R = +-1 matrix times 1/sqrt(b); tf32 products of fp16/bf16 inputs are exact, fp32
accumulation), nearest
centroid by counting the boundaries below u = y / |y| (= torch.bucketize), the least-squares
(or norm) scale, bit-plane packing and the two fp16 scales; optionally the window side copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TQSide, _num_sms, as_params, cached, page_align
from ._launch import launch
from ._tl import interpreting, sign_magnitude, slot_ptrs, store_codes

_FP16_MAX = 65504.0


@triton.jit
def _rotate(x, rot_ptr, cols, offs_d, rot_scale, D: tl.constexpr, ROT: tl.constexpr,
            DT16: tl.constexpr):
    """(x @ R^T)[:, cols]: x [N, D] float32 (from fp16/bf16: <= 11 significant bits, exact in
    tf32) times the +-1 matrix: tf32 tensor-core products are exact, accumulation fp32 -> the
    codec's fp32 matmul up to summation order. fp32 inputs (and the interpreter) take the exact
    fp32 dot. R^T[i, j] = R[j, i]; loaded here so its shared-memory copy lives only for this
    dot (two [256, 128] fp32 halves at once would not fit in 227 KB)."""
    rt = tl.load(rot_ptr + cols[None, :] * D + offs_d[:, None])
    if ROT == 1:
        y = tl.dot(x, rt, input_precision="ieee")
    elif ROT == 2:
        # x came from fp16/bf16 (DT16): casting back is exact, and so is the +-1 matrix.
        y = tl.dot(x.to(DT16), rt.to(DT16), out_dtype=tl.float32)
    else:
        y = tl.dot(x, rt, input_precision="tf32")
    return y * rot_scale


@triton.jit
def _finite_rows(y):
    """True for rows [N, D] -> [N] without nan/inf. |y| < inf is false exactly for nan and
    +-inf, and involves no arithmetic. The former test, (y - y) != 0, broke on the GPU: y is
    dot * rot_scale, and with FMA contraction (Triton's default there) y - y became
    fma(dot, rot_scale, -y) = the rounding error of the product, nonzero whenever rot_scale
    is not a power of two (head 128: 1/sqrt(128)); every row read as non-finite and was stored
    as zeros (codes 0x77, scale 0). Heads 64/256 (1/8, 1/16) and the CPU interpreter, which
    never contracts, were unaffected."""
    bad = (tl.abs(y) < float("inf")) == 0
    return tl.sum(bad.to(tl.int32), axis=1) == 0


@triton.jit
def _bucketize(u, bound_ptr, LEVELS: tl.constexpr):
    """code = number of boundaries strictly below u (= torch.bucketize). 15 compares for
    4 bits are cheap next to the memory traffic."""
    codes = tl.zeros(u.shape, dtype=tl.int32)
    for i in tl.static_range(LEVELS - 1):
        codes += (u > tl.load(bound_ptr + i)).to(tl.int32)
    return codes


@triton.jit
def _finish_scale(dotp, csq, norm, finite, LSQ: tl.constexpr):
    if LSQ:
        scale = dotp / tl.maximum(csq, 1e-30)
    else:
        scale = norm / tl.maximum(tl.sqrt(csq), 1e-30)
    scale = tl.where(finite, scale, 0.0)
    return tl.minimum(tl.maximum(scale, -65504.0), 65504.0)


@triton.jit
def _quantize(y, cent_ptr, bound_ptr, LEVELS: tl.constexpr, LSQ: tl.constexpr):
    """y [N, D] float32 rotated -> (codes int32 [N, D], scale float32 [N], y with non-finite
    rows zeroed). Same math as TQLayerCodec.quantize_rotated."""
    finite = _finite_rows(y)
    y = tl.where(finite[:, None], y, 0.0)
    norm = tl.sqrt(tl.sum(y * y, axis=1))
    codes = _bucketize(y / tl.maximum(norm, 1e-30)[:, None], bound_ptr, LEVELS)
    c = tl.load(cent_ptr + codes)
    scale = _finish_scale(tl.sum(y * c, axis=1), tl.sum(c * c, axis=1), norm, finite, LSQ)
    return codes, scale, y


@triton.jit
def _quantize_halves(y_lo, y_hi, cent_ptr, bound_ptr, LSQ: tl.constexpr):
    """4-bit _quantize of a vector given as its halves [N, D/2] (coordinates [0, D/2) and
    [D/2, D)) -> (packed bytes int32 [N, D/2] = code_lo | code_hi << 4, scale, y_lo, y_hi),
    codes in their stored sign-magnitude form. Byte j of a 4-bit plane holds coordinates j
    and j + D/2: no reshape needed to pack."""
    finite = _finite_rows(y_lo) & _finite_rows(y_hi)
    y_lo = tl.where(finite[:, None], y_lo, 0.0)
    y_hi = tl.where(finite[:, None], y_hi, 0.0)
    norm = tl.sqrt(tl.sum(y_lo * y_lo, axis=1) + tl.sum(y_hi * y_hi, axis=1))
    nrm = tl.maximum(norm, 1e-30)[:, None]
    c_lo = _bucketize(y_lo / nrm, bound_ptr, 16)
    c_hi = _bucketize(y_hi / nrm, bound_ptr, 16)
    v_lo = tl.load(cent_ptr + c_lo)
    v_hi = tl.load(cent_ptr + c_hi)
    dotp = tl.sum(y_lo * v_lo, axis=1) + tl.sum(y_hi * v_hi, axis=1)
    csq = tl.sum(v_lo * v_lo, axis=1) + tl.sum(v_hi * v_hi, axis=1)
    scale = _finish_scale(dotp, csq, norm, finite, LSQ)
    return sign_magnitude(c_lo, 4) | (sign_magnitude(c_hi, 4) << 4), scale, y_lo, y_hi


@triton.jit
def _store_rows(ptr, row_off, cols, y, mask):
    """y [N, len(cols)] float32 -> ptr + row_off[n] + cols in ptr's dtype, rows where mask."""
    tl.store(ptr + row_off[:, None] + cols[None, :], y.to(ptr.dtype.element_ty),
             mask=mask[:, None])


@triton.jit
def _encode_half(src, dst, valid, rot_ptr, rot_scale, cent_ptr, bound_ptr,
                 side_ptr, side_off, sel, offs_d, offs_lo, offs_hi, rot_out_ptr, rot_off,
                 in_range, deq_ptr, dcent_ptr, own_ptr, own_off, own_sel,
                 BITS: tl.constexpr, D: tl.constexpr, LSQ: tl.constexpr,
                 ROT: tl.constexpr, DT16: tl.constexpr, HAS_SIDE: tl.constexpr,
                 HALVES: tl.constexpr, ROT_OUT: tl.constexpr, DEQ_OUT: tl.constexpr,
                 OWN_OUT: tl.constexpr):
    """Encode one of K/V for N tokens: src [N, D] float32 rows -> packed codes at dst [N];
    returns the fp16 scale [N]. Writes the rotated vector to the side copy where sel, and to
    rot_out_ptr + rot_off [N] (in its dtype) for every row in_range when ROT_OUT (padding
    rows, loaded as zeros, write zeros: the buffer holds no uninitialized memory); when
    DEQ_OUT, the centroids C[code] (what attention dequantizes the packed slot to, before its
    scale) to deq_ptr + rot_off, zeros for padding rows: looked up in dcent_ptr, the codebook
    already in deq_ptr's dtype, so they are bit for bit the values the attention kernels'
    lookups produce (the interpreter's fp32 -> bf16 cast does not round as CUDA's does).
    OWN_OUT (with DEQ_OUT): also the dequantized vector C[code] * scale (the fp16 scale the
    slot stores), in own_ptr's dtype, to own_ptr + own_off where own_sel: the operands of the
    chunk's own packed attention run by FlashAttention (tq_store's own_out)."""
    if BITS == 4 and HALVES:
        y_lo = _rotate(src, rot_ptr, offs_lo, offs_d, rot_scale, D, ROT, DT16)
        y_hi = _rotate(src, rot_ptr, offs_hi, offs_d, rot_scale, D, ROT, DT16)
        packed, scale, y_lo, y_hi = _quantize_halves(y_lo, y_hi, cent_ptr, bound_ptr, LSQ)
        tl.store(dst[:, None] + offs_lo[None, :], packed.to(tl.uint8), mask=valid[:, None])
        if HAS_SIDE:
            _store_rows(side_ptr, side_off, offs_lo, y_lo, sel)
            _store_rows(side_ptr, side_off, offs_hi, y_hi, sel)
        if ROT_OUT:
            _store_rows(rot_out_ptr, rot_off, offs_lo, y_lo, in_range)
            _store_rows(rot_out_ptr, rot_off, offs_hi, y_hi, in_range)
        if DEQ_OUT:
            c_lo = tl.load(dcent_ptr + sign_magnitude(packed & 15, 4))
            c_hi = tl.load(dcent_ptr + sign_magnitude(packed >> 4, 4))
            _store_rows(deq_ptr, rot_off, offs_lo, tl.where(valid[:, None], c_lo, 0.0),
                        in_range)
            _store_rows(deq_ptr, rot_off, offs_hi, tl.where(valid[:, None], c_hi, 0.0),
                        in_range)
            if OWN_OUT:
                s16 = scale.to(tl.float16).to(tl.float32)[:, None]
                _store_rows(own_ptr, own_off, offs_lo, c_lo.to(tl.float32) * s16, own_sel)
                _store_rows(own_ptr, own_off, offs_hi, c_hi.to(tl.float32) * s16, own_sel)
    else:
        y = _rotate(src, rot_ptr, offs_d, offs_d, rot_scale, D, ROT, DT16)
        codes, scale, y = _quantize(y, cent_ptr, bound_ptr, 1 << BITS, LSQ)
        store_codes(codes, dst, valid, BITS, D)
        if HAS_SIDE:
            _store_rows(side_ptr, side_off, offs_d, y, sel)
        if ROT_OUT:
            _store_rows(rot_out_ptr, rot_off, offs_d, y, in_range)
        if DEQ_OUT:
            c = tl.load(dcent_ptr + codes)
            _store_rows(deq_ptr, rot_off, offs_d, tl.where(valid[:, None], c, 0.0), in_range)
            if OWN_OUT:
                s16 = scale.to(tl.float16).to(tl.float32)[:, None]
                _store_rows(own_ptr, own_off, offs_d, c.to(tl.float32) * s16, own_sel)
    return scale.to(tl.float16)


# T (the step's token count) changes every mixed step: left unspecialized, so T % 16 == 0 and
# T == 1 do not compile variants of their own in the middle of serving (docs/kernels-notes.md,
# "Compiles in the middle of serving").
@triton.jit(do_not_specialize=["T"])
def _tq_store_kernel(
    key_ptr,            # [T, Hkv, D] fp16/bf16/fp32
    value_ptr,          # [T, Hkv, D] same dtype
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8, head-major pages
    slot_ptr,           # [T] int64, < 0 = padding
    rot_ptr,            # [D, D] float32, R / rotation_scale (+-1)
    kcent_ptr, kbound_ptr,   # [2**KBITS], [2**KBITS - 1] float32
    vcent_ptr, vbound_ptr,   # [2**VBITS], [2**VBITS - 1] float32
    side_k_ptr, side_v_ptr,  # [rows, W, Hkv, D] model dtype (contiguous)
    side_tag_ptr,       # [rows, W] int32 (contiguous)
    side_check_ptr,     # [rows, W, Hkv] int32 (contiguous)
    rows_ptr, pos_ptr, send_ptr,  # [T] int32/int64: batch row, position, request seq_len
    idx_ptr,            # [T] int32/int64: key/value row of each token (when IDX)
    rot_k_ptr, rot_v_ptr,    # [T, Hkv, D] contiguous: rotated K/V out (when ROT_OUT)
    deq_k_ptr, deq_v_ptr,    # [T, Hkv, D] contiguous: centroids C[code] out (when DEQ_OUT)
    deq_s_ptr,          # [T, Hkv] int32: the slot's scale word (K | V << 16) (when DEQ_OUT)
    dkcent_ptr, dvcent_ptr,  # codebooks in deq_k's dtype (when DEQ_OUT)
    own_k_ptr, own_v_ptr,    # [T_own, Hkv, D]: C[code] * scale out (when OWN_OUT)
    own_idx_ptr,        # [T] int32: each token's row there, < 0 = none (when OWN_OUT)
    T, rot_scale, W, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, LSQ: tl.constexpr,
    SLOT: tl.constexpr, V_OFF: tl.constexpr, KS_OFF: tl.constexpr, BS: tl.constexpr,
    ALIGN_B: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_SIDE: tl.constexpr, ROT: tl.constexpr, HALVES: tl.constexpr = True,
    IDX: tl.constexpr = False, ROT_OUT: tl.constexpr = False, DEQ_OUT: tl.constexpr = False,
    OWN_OUT: tl.constexpr = False,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    HALF: tl.constexpr = D // 2
    offs_lo = tl.arange(0, HALF)
    offs_hi = HALF + offs_lo
    slot = tl.load(slot_ptr + offs_t, mask=offs_t < T, other=-1).to(tl.int64)
    valid = slot >= 0
    t64 = offs_t.to(tl.int64)

    # Where the slot's three parts go in the head-major page (docs/layout.md); the alignment
    # hints let the compiler move packed bytes 4 (or 16) at a time instead of 1.
    kdst, vdst, sdst = slot_ptrs(cache_ptr, slot // BS, slot % BS, h, stride_cb, BS, SLOT,
                                 V_OFF, KS_OFF, ALIGN_B)

    if HAS_SIDE:
        row = tl.load(rows_ptr + offs_t, mask=valid, other=0).to(tl.int64)
        pos = tl.load(pos_ptr + offs_t, mask=valid, other=0).to(tl.int64)
        send = tl.load(send_ptr + offs_t, mask=valid, other=0).to(tl.int64)
        sel = valid & (pos >= send - W)
        entry = row * W + pos % W                                 # [T] index into [rows, W]
        side_off = (entry * num_kv_heads + h) * D
    else:
        sel = valid
        entry = t64
        side_off = t64

    # The K/V row each token reads: itself, or (IDX) the row idx_ptr names, so a second store
    # of a few tokens needs no gathered copy of their K/V.
    src = t64
    if IDX:
        src = tl.load(idx_ptr + offs_t, mask=valid, other=0).to(tl.int64)
    rot_off = (t64 * num_kv_heads + h) * D
    own_sel = offs_t < 0
    own_off = t64
    if OWN_OUT:
        own_row = tl.load(own_idx_ptr + offs_t, mask=offs_t < T, other=-1).to(tl.int64)
        own_sel = valid & (own_row >= 0)
        own_off = (own_row * num_kv_heads + h) * D
    x = tl.load(key_ptr + src[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    ks16 = _encode_half(x, kdst, valid, rot_ptr, rot_scale, kcent_ptr, kbound_ptr,
                        side_k_ptr, side_off, sel, offs_d, offs_lo, offs_hi, rot_k_ptr, rot_off,
                        offs_t < T, deq_k_ptr, dkcent_ptr, own_k_ptr, own_off, own_sel, KBITS,
                        D, LSQ, ROT, key_ptr.dtype.element_ty, HAS_SIDE, HALVES, ROT_OUT,
                        DEQ_OUT, OWN_OUT)
    x = tl.load(value_ptr + src[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    vs16 = _encode_half(x, vdst, valid, rot_ptr, rot_scale, vcent_ptr,
                        vbound_ptr, side_v_ptr, side_off, sel, offs_d, offs_lo, offs_hi,
                        rot_v_ptr, rot_off, offs_t < T, deq_v_ptr, dvcent_ptr, own_v_ptr,
                        own_off, own_sel, VBITS, D, LSQ, ROT, key_ptr.dtype.element_ty,
                        HAS_SIDE, HALVES, ROT_OUT, DEQ_OUT, OWN_OUT)
    kbits = ks16.to(tl.uint16, bitcast=True).to(tl.int32)
    vbits = vs16.to(tl.uint16, bitcast=True).to(tl.int32)
    both = kbits | (vbits << 16)                   # K scale | V scale, little endian
    tl.store(sdst.to(tl.pointer_type(tl.int32)), both, mask=valid)
    if DEQ_OUT:
        tl.store(deq_s_ptr + t64 * num_kv_heads + h, tl.where(valid, both, 0), mask=offs_t < T)

    if HAS_SIDE:
        tl.store(side_tag_ptr + entry, slot.to(tl.int32), mask=sel)
        tl.store(side_check_ptr + entry * num_kv_heads + h, both, mask=sel)


def store_config(tokens: int, num_kv_heads: int, head_size: int, device,
                 fixed: bool = False) -> tuple[int, int]:
    """(tokens per program, warps) of tq_store. Large stores (prefill chunks): 64 tokens / 8
    warps, the best throughput (H100, 8K tokens x 8 heads x 128, bf16: 153 us, vs 162 for
    32 / 4 and 219 for 16 / 4). Stores whose 64-token grid would not give every SM a program
    (decode steps: one token per request), 16 / 4: a quarter of the rows per program, so a
    decode step's few programs finish sooner: H200, CUDA graphs, SmolLM2's 3 KV heads x 64,
    1 / 32 / 256 tokens: 12.0 / 12.2 / 12.6 us vs 19.8 / 20.0 / 20.5 for 64 / 8 (16 / 2: 14.3,
    32 / 4: 16.4; `benchmarks/kernels.py --only store`, benchmarks/results/h200-20261203e/).
    Head 256 always 16 / 4 (its fp32 operand tiles must fit shared
    memory). fixed: always the large-store config (vLLM's batch-invariant mode: a token's
    bytes then never depend on the batch it was stored with, since the tile shape picks the
    tensor-core instruction and so the order of the rotation's fp32 sums)."""
    if head_size > 128:
        return 16, 4
    if not fixed and -(-tokens // 64) * num_kv_heads < _num_sms(device):
        return 16, 4
    return 64, 8


def tq_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor, params, side: TQSide | None = None,
             token_rows: torch.Tensor | None = None, token_pos: torch.Tensor | None = None,
             token_seq_end: torch.Tensor | None = None, token_index: torch.Tensor | None = None,
             rot_out: tuple[torch.Tensor, torch.Tensor] | None = None,
             deq_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             own_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
             block_t: int | None = None, num_warps: int | None = None, rot: str | None = None,
             halves: bool = True, prescaled: bool = False, fixed_tiles: bool = False) -> None:
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
    rot: how the rotation's dot runs: "ieee" (exact fp32 FMA), "tf32" (tensor cores, exact
    products of fp16/bf16 inputs), "dot16" (tensor cores in the input dtype); default below.
    block_t, num_warps: tokens per program and warps, default `store_config` (by the store's
    size; fixed_tiles: one config for every size, see there).
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
        dkc = cached(p, ("cent", "k", dk.dtype), lambda: p.key_centroids.to(dk.dtype))
        dvc = cached(p, ("cent", "v", dk.dtype), lambda: p.value_centroids.to(dk.dtype))
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
    rot_code = {"tf32": 0, "ieee": 1, "dot16": 2}[rot or "tf32"]
    grid = (triton.cdiv(t, block_t), hkv)
    launch(_tq_store_kernel, grid,
        key, value, kv_cache, slot_mapping, rot_mat,
        p.key_centroids, p.key_bounds, p.value_centroids, p.value_bounds,
        sk, sv, stag, schk, rows, pos, send, idx, rk, rv, dk, dv, dsc, dkc, dvc,
        ok, ov, own_idx,
        t, rot_scale, w, hkv,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), kv_cache.stride(0),
        D=d, KBITS=p.key_bits, VBITS=p.value_bits, LSQ=p.scale_mode == "lsq",
        SLOT=lay.slot_bytes, V_OFF=lay.v_codes_offset, KS_OFF=lay.k_scale_offset,
        BS=kv_cache.shape[1], ALIGN_B=align_b, BLOCK_T=block_t,
        HAS_SIDE=has_side,
        ROT=rot_code, HALVES=halves, IDX=token_index is not None, ROT_OUT=rot_out is not None,
        DEQ_OUT=deq_out is not None, OWN_OUT=own_out is not None, num_warps=num_warps)
