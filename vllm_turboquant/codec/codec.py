"""Encode keys and values of one layer into packed slots, and decode them back.

This is the reference every kernel is tested against. It runs on CPU or CUDA tensors.

Encoding one vector x (one token, one KV head, head size D):
  1. rotate: y = R x (randomized Hadamard, per layer);
  2. u = y / |y|, and each coordinate of u goes to the nearest Lloyd-Max centroid: codes c;
  3. the scale a minimises |y - a C[c]| ("lsq") or is |y| / |C[c]| ("norm");
  4. codes are bit-plane packed, a is stored as float16.
Decoding is x^ = R^T (a C[c]). Attention can also work in the rotated space: q.x^ = (R q).(a C[c]).

Non-finite input: a vector holding NaN or Inf is stored as the zero vector (scale 0), so one
bad token never poisons the scale, codes or neighbours of any other token.
"""

from __future__ import annotations

import math

import torch

from .codebook import lloyd_max_codebook
from .config import TQConfig
from .packing import pack_codes, unpack_codes
from .rotation import rotation_matrix

_FP16_MAX = 65504.0


def quantize_rotated(y: torch.Tensor, centroids: torch.Tensor, bounds: torch.Tensor,
                     scale_mode: str = "lsq") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize rotated vectors: y [..., D] float32 -> (codes [..., D] int64, scale [...] f16).

    codes index the nearest centroid of each coordinate of y / |y|; the scale is the
    least-squares fit ("lsq") or |y| / |C[codes]| ("norm"). Non-finite vectors get scale 0."""
    finite = torch.isfinite(y).all(-1)
    y = torch.where(finite[..., None], y, torch.zeros_like(y))
    norm = y.norm(dim=-1)
    u = y / norm.clamp(min=1e-30)[..., None]
    codes = torch.bucketize(u, bounds)
    c = centroids[codes]
    if scale_mode == "lsq":
        scale = (y * c).sum(-1) / c.square().sum(-1).clamp(min=1e-30)
    else:
        scale = norm / c.norm(dim=-1).clamp(min=1e-30)
    scale = torch.where(finite, scale, torch.zeros_like(scale))
    return codes, scale.clamp(-_FP16_MAX, _FP16_MAX).half()


class TQLayerCodec:
    """The codec of one attention layer: its rotation and the key/value codebooks."""

    def __init__(self, config: TQConfig, head_size: int, layer: int, device=None):
        self.config = config
        self.head_size = head_size
        self.layer = layer
        self.layout = config.layout(head_size)
        self.rotation = rotation_matrix(head_size, config.seed, layer).to(device)
        self.key_centroids, self.key_bounds = (
            t.to(device) for t in lloyd_max_codebook(head_size, config.key_bits))
        self.value_centroids, self.value_bounds = (
            t.to(device) for t in lloyd_max_codebook(head_size, config.value_bits))
        if config.key_qjl:
            gen = torch.Generator().manual_seed(config.seed * 7_919 + layer)
            self.qjl_matrix = torch.randn(head_size, head_size, generator=gen).to(device)

    # -- rotation -------------------------------------------------------------------------
    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D] float32 in the rotated space."""
        return x.float() @ self.rotation.T

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        return y.float() @ self.rotation

    # -- one half (keys or values) in the rotated space -----------------------------------
    def quantize_rotated(self, y: torch.Tensor, centroids: torch.Tensor,
                         bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y [..., D] float32 -> (codes [..., D] int64, scale [...] float16)."""
        return quantize_rotated(y, centroids, bounds, self.config.scale)

    @staticmethod
    def dequantize_rotated(codes: torch.Tensor, scale: torch.Tensor,
                           centroids: torch.Tensor) -> torch.Tensor:
        return centroids[codes] * scale.float()[..., None]

    # -- slots ----------------------------------------------------------------------------
    def encode(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """key, value [..., D] (any float dtype) -> slots uint8 [..., slot_bytes]."""
        lay = self.layout
        ky, vy = self.rotate(key), self.rotate(value)
        kc, ks = self.quantize_rotated(ky, self.key_centroids, self.key_bounds)
        vc, vs = self.quantize_rotated(vy, self.value_centroids, self.value_bounds)
        out = torch.zeros(*key.shape[:-1], lay.slot_bytes, dtype=torch.uint8, device=key.device)
        out[..., :lay.k_code_bytes] = pack_codes(kc, self.config.key_bits)
        if self.config.key_qjl:
            resid = torch.where(torch.isfinite(ky), ky, 0) - self.dequantize_rotated(
                kc, ks, self.key_centroids)
            signs = (resid @ self.qjl_matrix.T >= 0).to(torch.int32)
            out[..., lay.k_qjl_offset:lay.k_qjl_offset + self.head_size // 8] = pack_codes(signs, 1)
            rn = resid.norm(dim=-1).clamp(max=_FP16_MAX).half()
            out[..., lay.v_codes_offset - 2:lay.v_codes_offset] = _half_bytes(rn)
        out[..., lay.v_codes_offset:lay.k_scale_offset] = pack_codes(vc, self.config.value_bits)
        out[..., lay.k_scale_offset:lay.k_scale_offset + 2] = _half_bytes(ks)
        out[..., lay.v_scale_offset:lay.v_scale_offset + 2] = _half_bytes(vs)
        return out

    def decode_rotated(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots uint8 [..., slot_bytes] -> (key, value) [..., D] float32, rotated space."""
        lay, d = self.layout, self.head_size
        kc = unpack_codes(slots[..., :lay.k_code_bytes], self.config.key_bits, d)
        vc = unpack_codes(slots[..., lay.v_codes_offset:lay.k_scale_offset],
                          self.config.value_bits, d)
        ks = _bytes_half(slots[..., lay.k_scale_offset:lay.k_scale_offset + 2])
        vs = _bytes_half(slots[..., lay.v_scale_offset:lay.v_scale_offset + 2])
        return (self.dequantize_rotated(kc, ks, self.key_centroids),
                self.dequantize_rotated(vc, vs, self.value_centroids))

    def decode(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots uint8 [..., slot_bytes] -> (key, value) [..., D] float32."""
        k, v = self.decode_rotated(slots)
        return self.unrotate(k), self.unrotate(v)

    def qjl_score_correction(self, query: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """QJL estimate of q . (k - k^) for every (query, key) pair.

        query [..., Tq, D] (original space), slots [..., Tk, slot_bytes] -> [..., Tq, Tk].
        Estimator: sqrt(pi/2) / m * |r| * (S q) . sign(S r), unbiased for q . r.
        """
        lay, d = self.layout, self.head_size
        signs = unpack_codes(slots[..., lay.k_qjl_offset:lay.k_qjl_offset + d // 8], 1, d)
        signs = signs.float() * 2 - 1
        rn = _bytes_half(slots[..., lay.v_codes_offset - 2:lay.v_codes_offset]).float()
        sq = self.rotate(query) @ self.qjl_matrix.T
        return math.sqrt(math.pi / 2) / d * (sq @ signs.transpose(-1, -2)) * rn[..., None, :]


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _bytes_half(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).squeeze(-1)
