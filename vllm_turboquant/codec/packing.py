"""Bit-plane packing of codebook indices.

A `bits`-bit code is split into planes of width 4, 2 and 1 (see ``code_planes``): 3 bits =
a 2-bit plane (bits 0-1) + a 1-bit plane (bit 2). A plane of width w over a head of size D
takes D * w / 8 bytes; byte j holds the field of coordinate ``j + k * (D * w / 8)`` at bit
``k * w`` for k = 0 .. 8 / w - 1. So byte j of a 4-bit plane holds coordinates j and j + D/2:
a kernel that loads the plane once gets the two halves of the vector with one shift each.
What is packed is not the codebook index itself but its sign-magnitude form
(``sign_magnitude``).
"""

from __future__ import annotations

import torch

from .config import code_planes


def sign_magnitude(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codebook index v (ascending levels) <-> the stored code (its own inverse).

    Lloyd-Max codebooks are symmetric, C[2**bits - 1 - v] = -C[v], so the stored code is a
    sign bit (the top bit: 1 = the positive half) over a magnitude index m counted from zero
    outwards: v >= H (H = 2**(bits-1)) is stored as v (m = v - H), v < H as H - 1 - v
    (m = H - 1 - v). A decoder then reads |C| = M[m] (M[i] = C[H + i]) from the low bits as
    they are; the 4-bit register lookup of the kernels (kernels/_common.prmt_dequant_asm)
    saves the five instructions per 8 codes it took to fold the negative half."""
    half = 1 << (bits - 1)
    return torch.where(codes >= half, codes, (half - 1) - codes)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codebook indices [..., D] integer in [0, 2**bits) -> uint8 [..., D * bits / 8]: the
    sign-magnitude codes (``sign_magnitude``) in bit planes."""
    d = codes.shape[-1]
    codes = sign_magnitude(codes.to(torch.int32), bits)
    out, shift = [], 0
    for w in code_planes(bits):
        per_byte, plane_bytes = 8 // w, d * w // 8
        field = (codes >> shift) & ((1 << w) - 1)
        field = field.reshape(*codes.shape[:-1], per_byte, plane_bytes)
        weights = (torch.arange(per_byte, device=codes.device, dtype=torch.int32) * w)
        out.append((field << weights[:, None]).sum(-2).to(torch.uint8))
        shift += w
    return torch.cat(out, -1)


def unpack_codes(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """uint8 [..., dim * bits / 8] -> codebook indices [..., dim] int64 (pack_codes'
    inverse)."""
    packed = packed.to(torch.int32)
    codes = torch.zeros(*packed.shape[:-1], dim, dtype=torch.int32, device=packed.device)
    start, shift = 0, 0
    for w in code_planes(bits):
        per_byte, plane_bytes = 8 // w, dim * w // 8
        plane = packed[..., start:start + plane_bytes]
        k = torch.arange(per_byte, device=packed.device, dtype=torch.int32) * w
        field = (plane[..., None, :] >> k[:, None]) & ((1 << w) - 1)
        codes |= field.reshape(*packed.shape[:-1], dim) << shift
        start += plane_bytes
        shift += w
    return sign_magnitude(codes, bits).long()
