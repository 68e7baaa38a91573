"""Packed slots of cached tokens -> their dequantized keys and values, as contiguous rows.

Why: a continuation chunk (or a prefix-cache hit) attends its cached prefix. The prefill
kernel reads the prefix from the packed pages itself (kernels/prefill.py), but its 128-row
programs unpack every prefix tile again per program: on the H200 that loop was half of the
e2e long workload's mixed-step GPU time (14.9 of 33 ms per step, SmolLM2,
benchmarks/results/h200-20261204b/). For a bounded number of prefix tokens per step the
backend instead unpacks them once, with this kernel, into the compact copy that
FlashAttention already reads for the chunks' own packed keys (backend/own_attention.py):
row dst[r] gets C[code] * scale of token r, the same values the store's own_out writes for
new tokens (the centroid in the output dtype times the fp16 scale, rounded once), so a key
reads the same whether it came with this step's chunk or an earlier one.

One program per (BLOCK_T rows, KV head): per row the request's block-table row and the
token position give the block and the row in it (docs/layout.md: head-major pages); the code
bytes are dequantized in registers as the attention kernels do (`_tl.dequant_halves`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_params, cdiv, page_align
from ._launch import launch
from ._tl import dequant_halves, interpreting, slot_ptrs
from .decode import lookup_tables


# The row count changes every step: unspecialized, so no step compiles a variant of its own.
@triton.jit(do_not_specialize=["n_rows"],
            do_not_specialize_on_alignment=["req_ptr", "pos_ptr", "dst_ptr"])
def _tq_unpack_kernel(
    cache_ptr,          # [num_blocks, block_size, Hkv, slot_bytes] uint8, head-major pages
    block_table_ptr,    # [B, max_blocks] int32
    req_ptr,            # [R] int32: each row's request (block-table row)
    pos_ptr,            # [R] int32: its token position in that request
    dst_ptr,            # [R] int32: its row in out_k / out_v, < 0 = skip the row
    kcent_ptr, vcent_ptr,    # float32 codebooks (MODE 0)
    ktab_ptr, vtab_ptr,      # lookup tables for KMODE / VMODE (see dequant_halves)
    out_k_ptr, out_v_ptr,    # [>= max(dst) + 1, Hkv, D] output dtype, contiguous
    n_rows, num_kv_heads, stride_bt, stride_cb,
    D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, SLOT: tl.constexpr,
    V_OFF: tl.constexpr, KS_OFF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, KMODE: tl.constexpr, VMODE: tl.constexpr,
    KASM: tl.constexpr = "", VASM: tl.constexpr = "", ALIGN_B: tl.constexpr = 4,
):
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dst = tl.load(dst_ptr + offs_t, mask=offs_t < n_rows, other=-1).to(tl.int64)
    tmask = dst >= 0                                  # dst < 0: a spare row, skipped
    req = tl.load(req_ptr + offs_t, mask=tmask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + offs_t, mask=tmask, other=0)
    blk = tl.load(block_table_ptr + req * stride_bt + pos // BLOCK_SIZE, mask=tmask,
                  other=0).to(tl.int64)
    in_blk = (pos % BLOCK_SIZE).to(tl.int64)
    kp, vp, sp = slot_ptrs(cache_ptr, blk, in_blk, h, stride_cb, BLOCK_SIZE, SLOT, V_OFF,
                           KS_OFF, ALIGN_B)
    dt = out_k_ptr.dtype.element_ty
    HALF: tl.constexpr = D // 2
    offs_lo = tl.arange(0, HALF)
    offs_hi = HALF + offs_lo
    k_lo, k_hi = dequant_halves(kp, tmask, offs_lo, offs_hi, kcent_ptr, ktab_ptr, KBITS, D, dt,
                                KMODE, KASM)
    v_lo, v_hi = dequant_halves(vp, tmask, offs_lo, offs_hi, vcent_ptr, vtab_ptr, VBITS, D, dt,
                                VMODE, VASM)
    ks = tl.load(sp.to(tl.pointer_type(tl.float16)), mask=tmask, other=0.0).to(tl.float32)
    vs = tl.load((sp + 2).to(tl.pointer_type(tl.float16)), mask=tmask, other=0.0)
    vs = vs.to(tl.float32)
    row = (dst * num_kv_heads + h) * D
    m2 = tmask[:, None]
    tl.store(out_k_ptr + row[:, None] + offs_lo[None, :],
             (k_lo.to(tl.float32) * ks[:, None]).to(dt), mask=m2)
    tl.store(out_k_ptr + row[:, None] + offs_hi[None, :],
             (k_hi.to(tl.float32) * ks[:, None]).to(dt), mask=m2)
    tl.store(out_v_ptr + row[:, None] + offs_lo[None, :],
             (v_lo.to(tl.float32) * vs[:, None]).to(dt), mask=m2)
    tl.store(out_v_ptr + row[:, None] + offs_hi[None, :],
             (v_hi.to(tl.float32) * vs[:, None]).to(dt), mask=m2)


def tq_unpack_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, req: torch.Tensor,
                    pos: torch.Tensor, dst: torch.Tensor, params, out_k: torch.Tensor,
                    out_v: torch.Tensor, block_t: int = 32, num_warps: int = 4,
                    lookup: int = 3) -> None:
    """Dequantize R cached tokens into rows of out_k / out_v; same contract as
    `reference.tq_unpack_pages_ref`.

    kv_cache uint8 [num_blocks, block_size, Hkv, slot_bytes] (head-major dense pages);
    block_table int32 [B, max_blocks]; req, pos, dst int32 [R]: token r is position pos[r] of
    request req[r] and goes to row dst[r] (dst[r] < 0: skipped, so a caller may size R by an
    upper bound); out_k, out_v [rows, Hkv, D] fp16/bf16 (fp32: generic lookup), contiguous:
    out[dst[r], h] = C[code] * scale (in the rotated space, as tq_store's own_out).
    Launch: block_t rows per program, num_warps (32 / 4: not swept; the kernel moves ~0.3 of the
    bytes the attention it replaces re-read). lookup as tq_decode's."""
    p = as_params(params, kv_cache.device)
    n = req.shape[0]
    hkv, d = kv_cache.shape[2], p.head_size
    assert pos.shape == dst.shape == (n,) and req.dtype == pos.dtype == dst.dtype == torch.int32
    assert out_k.shape == out_v.shape and out_k.shape[1:] == (hkv, d)
    assert out_k.is_contiguous() and out_v.is_contiguous() and out_k.dtype == out_v.dtype
    assert out_k.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if n == 0:
        return
    align_b = page_align(kv_cache, p.layout)
    kmode, vmode, kt, vt, kasm, vasm = lookup_tables(
        p, out_k.dtype, lookup, allow_asm=not interpreting(_tq_unpack_kernel))
    lay = p.layout
    launch(_tq_unpack_kernel, (cdiv(n, block_t), hkv),
           kv_cache, block_table, req, pos, dst, p.key_centroids, p.value_centroids, kt, vt,
           out_k, out_v, n, hkv, block_table.stride(0), kv_cache.stride(0),
           D=d, KBITS=p.key_bits, VBITS=p.value_bits, SLOT=lay.slot_bytes,
           V_OFF=lay.v_codes_offset, KS_OFF=lay.k_scale_offset, BLOCK_SIZE=kv_cache.shape[1],
           BLOCK_T=block_t, KMODE=kmode, VMODE=vmode, KASM=kasm, VASM=vasm, ALIGN_B=align_b,
           num_warps=num_warps)
