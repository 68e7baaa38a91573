"""Triton device helpers shared by the kernels: bit-plane unpacking of one tile of slots.

A `bits`-bit code is split into planes of width 4, 2, 1 (8 = one plane), lowest bits first
(vllm_turboquant/codec/packing.py). The plane of width w sits at byte START = SHIFT * D / 8 of
the code bytes, where SHIFT = the code bits below it (bits & 4 for the 2-bit plane, bits & 6
for the 1-bit plane); coordinate d lives in byte d % PB (PB = D * w / 8) at bit (d // PB) * w.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _unpack_plane(base, offs_d, mask, W: tl.constexpr, SHIFT: tl.constexpr,
                  START: tl.constexpr, D: tl.constexpr):
    """base [N] uint8 pointers to the slots' code bytes -> int32 [N, D] bits of this plane.

    The byte index d % PB repeats every PB coordinates: the compiler sees runs of PB
    contiguous bytes and vectorizes the load; the repeats hit L1."""
    PB: tl.constexpr = D * W // 8
    byte = tl.load(base[:, None] + START + (offs_d % PB)[None, :], mask=mask[:, None], other=0)
    field = (byte.to(tl.int32) >> ((offs_d // PB) * W)[None, :]) & ((1 << W) - 1)
    return field << SHIFT


@triton.jit
def sign_magnitude(codes, BITS: tl.constexpr):
    """Codebook index <-> stored code, its own inverse (codec.packing.sign_magnitude):
    v >= H stays, v < H becomes H - 1 - v (H = 2**(BITS-1))."""
    HALF: tl.constexpr = 1 << (BITS - 1)
    return tl.where(codes >= HALF, codes, (HALF - 1) - codes)


@triton.jit
def load_codes(base, offs_d, mask, BITS: tl.constexpr, D: tl.constexpr):
    """base [N] pointers to the first code byte of N slots -> codebook indices int32
    [N, len(offs_d)] of the coordinates offs_d (any subset of [0, D))."""
    if BITS == 8:
        codes = tl.load(base[:, None] + offs_d[None, :], mask=mask[:, None], other=0)
        codes = codes.to(tl.int32)
    else:
        codes = tl.zeros([base.shape[0], offs_d.shape[0]], dtype=tl.int32)
        if BITS & 4:
            codes = codes | _unpack_plane(base, offs_d, mask, 4, 0, 0, D)
        if BITS & 2:
            codes = codes | _unpack_plane(base, offs_d, mask, 2, BITS & 4,
                                          (BITS & 4) * D // 8, D)
        if BITS & 1:
            codes = codes | _unpack_plane(base, offs_d, mask, 1, BITS & 6,
                                          (BITS & 6) * D // 8, D)
    return sign_magnitude(codes, BITS)


@triton.jit
def _pack_plane(codes, dst, mask, W: tl.constexpr, SHIFT: tl.constexpr, START: tl.constexpr,
                D: tl.constexpr):
    """codes int32 [N, D] -> writes the plane's D * W / 8 bytes at dst [N] + START."""
    PB: tl.constexpr = D * W // 8
    PER: tl.constexpr = 8 // W
    n: tl.constexpr = codes.shape[0]
    field = (codes >> SHIFT) & ((1 << W) - 1)
    field = tl.reshape(field, [n, PER, PB])
    weights = tl.arange(0, PER) * W
    byte = tl.sum(field << weights[None, :, None], axis=1)      # disjoint bits: sum == or
    offs_b = tl.arange(0, PB)
    tl.store(dst[:, None] + START + offs_b[None, :], byte.to(tl.uint8), mask=mask[:, None])


@triton.jit
def store_codes(codes, dst, mask, BITS: tl.constexpr, D: tl.constexpr,
                STORED: tl.constexpr = False):
    """codebook indices int32 [N, D] -> their sign-magnitude codes, bit-plane packed, at
    dst [N] (uint8 pointers). STORED: codes are already in the stored (sign-magnitude) form."""
    if not STORED:
        codes = sign_magnitude(codes, BITS)
    if BITS == 8:
        offs_d = tl.arange(0, D)
        tl.store(dst[:, None] + offs_d[None, :], codes.to(tl.uint8), mask=mask[:, None])
    else:
        if BITS & 4:
            _pack_plane(codes, dst, mask, 4, 0, 0, D)
        if BITS & 2:
            _pack_plane(codes, dst, mask, 2, BITS & 4, (BITS & 4) * D // 8, D)
        if BITS & 1:
            _pack_plane(codes, dst, mask, 1, BITS & 6, (BITS & 6) * D // 8, D)


@triton.jit
def slot_ptrs(cache_ptr, blk, in_blk, h, stride_cb, BS: tl.constexpr, SLOT: tl.constexpr,
              V_OFF: tl.constexpr, KS_OFF: tl.constexpr, ALIGN_B: tl.constexpr):
    """Tokens (block id blk int64, row in block in_blk) of KV head h -> uint8 pointers to their
    key codes, value codes and scale word in the head-major page (docs/layout.md): head h of a
    block is BS * SLOT bytes, BS key-code rows of V_OFF bytes, then BS value-code rows, then BS
    scale words. ALIGN_B (16 or 4, the launcher's `page_align`): the code rows' alignment, so
    a row of 4-bit codes loads as 16-byte vectors."""
    head = cache_ptr + blk * stride_cb + h.to(tl.int64) * (BS * SLOT)
    kp = tl.multiple_of(head + in_blk * V_OFF, ALIGN_B)
    vp = tl.multiple_of(head + BS * V_OFF + in_blk * (KS_OFF - V_OFF), ALIGN_B)
    sp = tl.multiple_of(head + BS * KS_OFF + in_blk * (SLOT - KS_OFF), 4)
    return kp, vp, sp


@triton.jit
def mma(a, b, F32: tl.constexpr):
    """tl.dot, or an exact fp32 dot when F32 (fp32 inputs; and the CPU interpreter, whose
    bf16 dot is wrong in triton 3.9)."""
    if F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


def interpreting(kernel) -> bool:
    """True if `kernel` was built for the CPU interpreter (TRITON_INTERPRET=1 when its module
    was imported): decided per kernel object, not by the environment at launch time."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return False
    return isinstance(kernel, InterpretedFunction)


@triton.jit
def _prmt_lookup(byte, DT: tl.constexpr, ASM: tl.constexpr):
    """4 bytes per asm instance -> 4 values of each half, two bf16x2/f16x2 registers each.
    The output dtypes are spelled out: triton 3.6's inline_asm_elementwise does not unwrap a
    constexpr dtype."""
    if DT == tl.bfloat16:
        lo, hi = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [byte],
                                           dtype=(tl.bfloat16, tl.bfloat16), is_pure=True,
                                           pack=4)
    else:
        lo, hi = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [byte],
                                           dtype=(tl.float16, tl.float16), is_pure=True,
                                           pack=4)
    return lo, hi


@triton.jit
def decode_bytes(byte, table_ptr, DT: tl.constexpr, MODE: tl.constexpr, ASM: tl.constexpr):
    """A 4-bit byte tile [N, D/2] (uint8, byte j = code j | code j + D/2 << 4) -> the two
    halves [N, D/2] in DT; MODE 1, 2 or 3 as in `dequant_halves` (the bytes already loaded:
    lets a kernel issue the loads of the next tile before decoding this one)."""
    if MODE == 3:
        lo, hi = _prmt_lookup(byte, DT, ASM)
    elif MODE == 1:
        t = tl.load(table_ptr + byte.to(tl.int32))
        lo = (t & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        hi = ((t >> 16) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    else:
        b32 = byte.to(tl.int32)
        lo = tl.load(table_ptr + (b32 & 15))
        hi = tl.load(table_ptr + (b32 >> 4))
    return lo, hi


@triton.jit
def load_code_bytes(base, mask, OFF: tl.constexpr, NB: tl.constexpr):
    """base [N] uint8 pointers (4-byte aligned) -> the NB bytes at base + OFF as a uint8 tile
    [N, NB], loaded as NB / 4 int32 words per row.

    A byte tile loaded directly gets a one-byte-per-thread layout from Triton's layout passes
    (the sm_90 SASS of triton 3.6 and 3.9: 64 one-byte loads per thread per decode tile, then
    byte-wise shuffles through shared memory); words keep the loads 4 bytes wide and the bytes
    are split out in registers (little endian: byte 4w + i is bits 8i..8i+7 of word w). Fewer
    instructions, but not faster on the H200 (see dequant_halves, WORDS)."""
    NW: tl.constexpr = NB // 4
    offs_w = tl.arange(0, NW)
    w = tl.load((base + OFF).to(tl.pointer_type(tl.int32))[:, None] + offs_w[None, :],
                mask=mask[:, None], other=0)
    b0 = (w & 0xFF).to(tl.uint8)
    b1 = ((w >> 8) & 0xFF).to(tl.uint8)
    b2 = ((w >> 16) & 0xFF).to(tl.uint8)
    b3 = ((w >> 24) & 0xFF).to(tl.uint8)
    # join(join(b0, b2), join(b1, b3))[n, w, k, m] = b_{2k + m}, at flat index 4w + 2k + m.
    x = tl.join(tl.join(b0, b2), tl.join(b1, b3))
    return tl.reshape(x, [base.shape[0], NB])


@triton.jit
def dequant_halves(base, mask, offs_lo, offs_hi, cent_ptr, table_ptr, BITS: tl.constexpr,
                   D: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr,
                   ASM: tl.constexpr = "", WORDS: tl.constexpr = False):
    """Centroids C[code] of N slots as two [N, D/2] tiles in DT: coordinates [0, D/2) and
    [D/2, D). base [N] points at the first code byte; masked rows read code 0.

    MODE 0: any bits, per-code lookup in the float32 codebook cent_ptr.
    MODE 1 (4 bits): byte j holds the codes of coordinates j and j + D/2; one gather from a
      256-entry int32 table (C[lo], C[hi] as two 16-bit floats) dequantizes both.
    MODE 2 (4 bits): the byte tile is read once, two gathers of its nibbles from the
      16-entry codebook in DT, indexed by stored code (`_common.stored_order`; 32 bytes: one
      L1 sector per warp-wide gather).
    MODE 3 (4 bits, symmetric codebook, CUDA only): no memory lookup at all; ASM (from
      `_common.prmt_dequant_asm`) turns 4 code bytes into 8 values with `prmt` byte
      permutes over the 8 centroid magnitudes held as immediates. Not run by the CPU
      interpreter: launchers pick another mode there.
    WORDS (modes 1-3): load the code bytes as int32 words (`load_code_bytes`) instead of as a
      byte tile. Off by default: it halves the decode kernel's instructions but was slower on
      the H200 in 3 of 4 shapes (docs/kernels-notes.md, "2026-12-02 late")."""
    if MODE != 0:
        if WORDS:
            byte = load_code_bytes(base, mask, 0, D // 2)
        else:
            byte = tl.load(base[:, None] + offs_lo[None, :], mask=mask[:, None], other=0)
    if MODE == 1:
        t = tl.load(table_ptr + byte.to(tl.int32))
        lo = (t & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
        hi = ((t >> 16) & 0xFFFF).to(tl.uint16).to(DT, bitcast=True)
    elif MODE == 3:
        lo, hi = _prmt_lookup(byte, DT, ASM)
    elif MODE == 2:
        byte = byte.to(tl.int32)
        lo = tl.load(table_ptr + (byte & 15))
        hi = tl.load(table_ptr + (byte >> 4))
    else:
        lo = tl.load(cent_ptr + load_codes(base, offs_lo, mask, BITS, D)).to(DT)
        hi = tl.load(cent_ptr + load_codes(base, offs_hi, mask, BITS, D)).to(DT)
    return lo, hi
