"""The per-layer randomized Hadamard rotation.

R = H_b (x) diag(s) / sqrt(b): random signs s (seeded by preset seed and layer index) followed
by a normalized Walsh-Hadamard transform on blocks of b coordinates, where b is the largest
power of two (<= 256) dividing the head size. For head sizes 64, 128 and 256 this is one full
Hadamard transform. R is orthogonal, so attention scores are unchanged: q.k = (Rq).(Rk).
"""

from __future__ import annotations

import functools

import torch


def hadamard_block_size(head_size: int) -> int:
    if head_size % 16:
        raise ValueError(f"head size {head_size} is not supported: TurboQuant needs a multiple "
                         "of 16 (64, 128 and 256 are served by the kernels)")
    b = 1
    while head_size % (b * 2) == 0 and b * 2 <= 256:
        b *= 2
    return b


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def layer_signs(head_size: int, seed: int, layer: int) -> torch.Tensor:
    """Random +-1 signs [head_size] float32 for one layer; identical on every machine."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    return (torch.randint(0, 2, (head_size,), generator=gen) * 2 - 1).float()


@functools.lru_cache(maxsize=256)
def rotation_matrix(head_size: int, seed: int, layer: int) -> torch.Tensor:
    """R [head_size, head_size] float32 (CPU), orthogonal. Rotate with y = x @ R.T."""
    b = hadamard_block_size(head_size)
    h = _hadamard(b) / b ** 0.5
    full = torch.block_diag(*([h] * (head_size // b)))
    signs = layer_signs(head_size, seed, layer).double()
    return (full * signs[None, :]).float()
