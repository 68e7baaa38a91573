"""Bit-plane packing of codebook indices.

A `bits`-bit code is split into planes of width 4, 2 and 1 (see ``code_planes``): 3 bits =
a 2-bit plane (bits 0-1) + a 1-bit plane (bit 2). A plane of width w over a head of size D
takes D * w / 8 bytes; byte j holds the field of coordinate ``j + k * (D * w / 8)`` at bit
``k * w`` for k = 0 .. 8 / w - 1. So byte j of a 4-bit plane holds coordinates j and j + D/2:
a kernel that loads the plane once gets the two halves of the vector with one shift each.
"""

from __future__ import annotations

import torch

from .config import code_planes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., D] integer in [0, 2**bits) -> uint8 [..., D * bits / 8]."""
    d = codes.shape[-1]
    codes = codes.to(torch.int32)
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
    """uint8 [..., dim * bits / 8] -> codes [..., dim] int64."""
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
    return codes.long()
