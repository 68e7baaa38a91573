"""Attention that sees the KV cache the way a TurboQuant preset would serve it.

The evaluator (``vllm_turboquant.eval``) runs a Hugging Face model twice: once with its own
keys and values, once with this attention, which gives every query the *decode view* of a
quantized cache (docs/design-notes.md, "Semantics the evaluator emulates"):

    query t reads key/value j <= t exactly        iff  j > t - window  or  j < sink_tokens,
                              dequantized otherwise  (its packed slot, decoded);
    with align A > 0, the window part also needs  j // A == t // A  (the query's own block).

So a whole sequence is scored in one forward pass, yet every token is predicted from exactly
what token-by-token decoding with that preset would read, the token itself included (vLLM
writes a token's slot before attending to it).

How it is computed, per layer: the keys a query reads split into two disjoint sets, the
quantized ones (j <= t - window, j >= sink_tokens) and the exact ones (the window band and the
sinks). Each set gets its own softmax (PyTorch's flash kernel with a mask for the big quantized
set; a small gather for the <= window + sinks exact keys), and the two are merged with their
log-sum-exp weights, which is exactly the softmax over the union. QJL presets add the QJL
score correction to the quantized keys' scores.

A *view* (``TQView``, ``Fp8View``, ``VllmLikeView``) turns one layer's keys and values into
what the cache would return; ``active_view(view)`` selects it for the attention function
``ATTENTION_NAME``, which ``install(model)`` makes the model use. With no active view the
function is plain exact causal attention (the reference pass goes through the same code).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .codec import TQConfig, TQLayerCodec
from .codec.codebook import _GRID_POINTS

ATTENTION_NAME = "turboquant_eval"

# ---------------------------------------------------------------------------------------------
# Views: what the cache returns for one layer's keys and values.
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedKV:
    """One layer's cache as a query would read it from packed slots.

    key, value: [B, Hkv, T, D] float, the dequantized form of every token.
    score_bias: None, or a function query [B, Hkv, G*T, D] -> [B, Hkv, G*T, T] added to the
        raw scores q.k^ of the quantized keys (the QJL residual estimate).
    exact_key: None, or the keys the exact (window, sink) reads use instead of the model's,
        when the view shifted every key by a per-head vector before quantizing.
    """

    key: torch.Tensor
    value: torch.Tensor
    score_bias: Callable[[torch.Tensor], torch.Tensor] | None = None
    exact_key: torch.Tensor | None = None


class TQView:
    """A TurboQuant recipe (``TQConfig``), through the real codec: encode to packed slots,
    decode them back (float16 scales, bit-plane packing and all)."""

    def __init__(self, config: TQConfig, key_mean_tokens: int = 0):
        self.config = config
        self.window = config.window
        self.sink_tokens = config.sink_tokens
        self.align = config.align
        # Eval-only experiment: subtract a per-(sequence, layer, head) key mean taken over the
        # first `key_mean_tokens` tokens before quantizing. A shift of every key by the same
        # vector changes each query's scores by a constant, so softmax is unchanged and the
        # mean never has to be added back. Not served by the backend (README, "Presets").
        self.key_mean_tokens = key_mean_tokens
        self._codecs: dict[tuple[int, int, str], TQLayerCodec] = {}

    def codec(self, layer: int, head_size: int, device) -> TQLayerCodec:
        k = (layer, head_size, str(device))
        if k not in self._codecs:
            self._codecs[k] = TQLayerCodec(self.config, head_size, layer, device=device)
        return self._codecs[k]

    def quantize(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> QuantizedKV:
        codec = self.codec(layer, key.shape[-1], key.device)
        exact_key = None
        if self.key_mean_tokens:
            key = exact_key = key - key[:, :, :self.key_mean_tokens].mean(2, keepdim=True)
        slots = codec.encode(key, value)
        k_hat, v_hat = codec.decode(slots)
        bias = None
        if self.config.key_qjl:
            def bias(query, slots=slots, codec=codec):
                return codec.qjl_score_correction(query, slots)
        return QuantizedKV(k_hat.to(key.dtype), v_hat.to(value.dtype), bias, exact_key)


class Fp8View:
    """vLLM's fp8 KV cache with scale 1: cast to float8_e4m3fn (saturating) and back."""

    window = 0
    sink_tokens = 0
    align = 0

    def quantize(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> QuantizedKV:
        return QuantizedKV(_fp8_round_trip(key), _fp8_round_trip(value))


def _fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    fmax = torch.finfo(torch.float8_e4m3fn).max  # 448; vLLM's CUDA cast saturates
    return x.float().clamp(-fmax, fmax).to(torch.float8_e4m3fn).float().to(x.dtype)


class VllmLikeView:
    """vLLM's built-in ``turboquant_4bit_nc`` recipe, re-implemented from its store/decode
    kernels (vLLM 0.32 ``triton_turboquant_store.py``):

    keys: n = |k|; y = (k / (n + 1e-8)) @ H with H the plain Sylvester Hadamard matrix
    (no random signs, the same for every layer); each coordinate -> nearest Lloyd-Max
    centroid for N(0, 1/d); stored: codes + n (fp16). Decoded with norm correction:
    k^ = n * (c / |c|) @ H.
    values: not rotated; uniform min-max per vector, scale = (max - min) / (2^b - 1),
    q = clamp(floor((v - min) / scale + 0.5)); stored: codes + scale, min (fp16).
    Everything is read from the cache (no window). vLLM additionally keeps the first 2 and
    last 2 layers unquantized ("boundary protection"); ``skip_layers`` emulates that.
    """

    window = 0
    sink_tokens = 0
    align = 0

    def __init__(self, key_bits: int = 4, value_bits: int = 4, norm_correction: bool = True,
                 skip_layers: frozenset[int] = frozenset()):
        self.key_bits, self.value_bits = key_bits, value_bits
        self.norm_correction = norm_correction
        self.skip_layers = skip_layers

    def quantize(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> QuantizedKV:
        if layer in self.skip_layers:
            return QuantizedKV(key, value)
        d = key.shape[-1]
        h = sylvester_hadamard(d).to(key.device)
        centroids, bounds = gaussian_lloyd_max(d, self.key_bits)
        centroids, bounds = centroids.to(key.device), bounds.to(key.device)
        k = key.float()
        n = k.norm(dim=-1, keepdim=True)
        y = (k / (n + 1e-8)) @ h
        c = centroids[torch.bucketize(y, bounds, right=True)]
        if self.norm_correction:
            c = c / torch.sqrt(c.square().sum(-1, keepdim=True) + 1e-16)
        k_hat = (c @ h) * n.half().float()
        v = value.float()
        levels = (1 << self.value_bits) - 1
        vmin, vmax = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
        scale = ((vmax - vmin) / levels).clamp(min=1e-8)
        q = ((v - vmin) / scale + 0.5).floor().clamp(0, levels)
        v_hat = q * scale.half().float() + vmin.half().float()
        return QuantizedKV(k_hat.to(key.dtype), v_hat.to(value.dtype))


def sylvester_hadamard(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix [d, d] float32 (d a power of two); symmetric."""
    if d & (d - 1):
        raise ValueError(f"the vLLM-like recipe needs a power-of-two head size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(d)).float()


_GAUSS_CACHE: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def gaussian_lloyd_max(dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd-Max (centroids, boundaries) for N(0, 1/dim), as vLLM's ``solve_lloyd_max``
    computes them (its Gaussian approximation of the rotated-coordinate density)."""
    key = (dim, bits)
    if key not in _GAUSS_CACHE:
        sigma = dim ** -0.5
        t = torch.linspace(-10.5 * sigma, 10.5 * sigma, _GRID_POINTS, dtype=torch.float64)
        w = torch.exp(-0.5 * (t / sigma) ** 2)
        levels = 1 << bits
        lo, hi = -3.5 * sigma, 3.5 * sigma
        c = lo + (hi - lo) * (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
        for _ in range(500):
            cell = torch.bucketize(t, (c[1:] + c[:-1]) / 2)
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, w)
            mom = torch.zeros(levels, dtype=torch.float64).index_add_(0, cell, w * t)
            new = torch.where(mass > 0, mom / mass.clamp(min=1e-300), c)
            if torch.allclose(new, c, rtol=0, atol=1e-12):
                c = new
                break
            c = new
        _GAUSS_CACHE[key] = (c.float(), ((c[1:] + c[:-1]) / 2).float())
    return _GAUSS_CACHE[key]


# ---------------------------------------------------------------------------------------------
# The attention function.
# ---------------------------------------------------------------------------------------------

_ACTIVE: list = [None]  # the view used by tq_eval_attention; None = exact reference


@contextlib.contextmanager
def active_view(view):
    """Run the model's attention through `view` (None = exact) inside the block."""
    prev, _ACTIVE[0] = _ACTIVE[0], view
    try:
        yield
    finally:
        _ACTIVE[0] = prev


def install(model) -> None:
    """Register ``ATTENTION_NAME`` with transformers and make `model` use it (idempotent)."""
    from transformers import AttentionInterface
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        # The function ignores the mask it is given (sequences are unpadded and causal);
        # sdpa's mask builder may skip building one at all, which keeps the pass cheap.
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    except ImportError:  # older transformers: masks are built regardless
        pass
    AttentionInterface.register(ATTENTION_NAME, tq_eval_attention)
    model.set_attn_implementation(ATTENTION_NAME)


def tq_eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """transformers attention function (AttentionInterface signature).

    query [B, Hq, T, D], key/value [B, Hkv, T, D] (after RoPE) -> ([B, T, Hq, D], None).
    Assumes unpadded causal self-attention over the whole sequence (no KV cache), which is
    how the evaluator calls the model.
    """
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise NotImplementedError("the evaluator does not emulate sliding-window or "
                                  "soft-capped attention")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError("the evaluator scores whole sequences: no KV cache")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    view = _ACTIVE[0]
    if view is None:
        out = attend(query, key, value, None, scale)
    else:
        out = attend(query, key, value, view.quantize(module.layer_idx, key, value), scale,
                     window=view.window, sink_tokens=view.sink_tokens, align=view.align)
    return out.transpose(1, 2).contiguous(), None


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           quant: QuantizedKV | None, scale: float, window: int = 0,
           sink_tokens: int = 0, align: int = 0) -> torch.Tensor:
    """Causal attention with the decode-view policy. Returns [B, Hq, T, D].

    quant None: exact attention. Otherwise query t reads quant.key/value[j] for
    sink_tokens <= j <= t - window and key/value[j] (quant.exact_key if set) for the
    others j <= t. align A > 0 (no sinks): exact iff j > t - window and j // A == t // A,
    quantized for every other j <= t.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    if quant is None or (window >= t and not align):
        return _sdpa_with_lse(query, _rep(key, hq), _rep(value, hq), None, scale, causal=True)[0]
    if align:
        if sink_tokens:
            raise ValueError("align with sink tokens is not a policy this evaluator emulates")
        return _attend_aligned(query, key, value, quant, scale, window, align)
    # -- quantized part: sink_tokens <= j <= t - window ------------------------------------
    pos = torch.arange(t, device=query.device)
    allowed = (pos[None, :] <= pos[:, None] - window) & (pos[None, :] >= sink_tokens)
    bias = None
    if quant.score_bias is not None:
        g = hq // hkv
        qg = query.reshape(b, hkv, g * t, d)
        bias = quant.score_bias(qg).reshape(b, hq, t, t) * scale
    kq, vq = _rep(quant.key, hq), _rep(quant.value, hq)
    if sink_tokens == 0 and bias is None:
        # j <= t - window is causal attention of queries window.. over keys ..T-1-window:
        # the flash kernel's causal path, cheaper than a mask.
        out_q = torch.zeros_like(query)
        lse_q = torch.full((b, hq, t), float("-inf"), device=query.device)
        o, l = _sdpa_with_lse(query[:, :, window:], kq[:, :, :t - window],
                              vq[:, :, :t - window], None, scale, causal=True)
        out_q[:, :, window:], lse_q[:, :, window:] = o, l
    else:
        mask = torch.zeros(t, t, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed, float("-inf"))
        mask = mask if bias is None else bias + mask
        out_q, lse_q = _sdpa_with_lse(query, kq, vq, mask, scale, causal=False)
    # Rows with no quantized key (t < window + sinks) must weigh nothing in the merge.
    lse_q = lse_q.masked_fill(~allowed.any(-1), float("-inf"))
    if window == 0 and sink_tokens == 0:
        return out_q
    # -- exact part: the window band t - window < j <= t, and the sinks j < sink_tokens ----
    exact_key = key if quant.exact_key is None else quant.exact_key
    exact = _exact_band_and_sinks(query, exact_key, value, scale, window, sink_tokens)
    return _merge([(out_q, lse_q), exact])[0]


def _attend_aligned(query, key, value, quant, scale, window, align):
    """`attend` with an aligned window: two masked softmaxes (the quantized keys, the exact
    keys: inside the window and the query's own align-token block), merged. Rows without a
    quantized key get weight 0 in that part (and output 0, not the kernel's nan)."""
    hq, t = query.shape[1], query.shape[2]
    pos = torch.arange(t, device=query.device)
    causal = pos[None, :] <= pos[:, None]
    same = ((pos // align)[None, :] == (pos // align)[:, None]) & (
        pos[None, :] > pos[:, None] - window)
    parts = []
    for allowed, k, v in ((causal & ~same, quant.key, quant.value),
                          (causal & same, key if quant.exact_key is None else quant.exact_key,
                           value)):
        mask = torch.zeros(t, t, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed, float("-inf"))
        out, lse = _sdpa_with_lse(query, _rep(k, hq), _rep(v, hq), mask, scale, causal=False)
        has = allowed.any(-1)
        parts.append((torch.where(has[:, None], out, 0.0), lse.masked_fill(~has, float("-inf"))))
    return _merge(parts)[0]


def _rep(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, T, D] -> [B, heads, T, D] (grouped-query attention)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], 1)


def _sdpa_with_lse(q, k, v, mask, scale, causal):
    """(out [B, H, T, D], lse [B, H, T]) of softmax(q k^T * scale + mask) v.

    On CPU this is PyTorch's flash kernel, which returns the log-sum-exp (it wants a float
    mask: 0 / -inf, or a bias). Elsewhere a plain matmul softmax."""
    if q.device.type == "cpu":
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        return out, lse.float()
    s = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        t = q.shape[2]
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1),
                          float("-inf"))
    if mask is not None:
        s = s + mask.float()
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    return (p.to(v.dtype) @ v), lse


def _exact_band_and_sinks(query, key, value, scale, window, sink_tokens):
    """Softmax over the exact keys only. query [B, Hq, T, D], key/value [B, Hkv, T, D]
    -> (out [B, Hq, T, D], lse [B, Hq, T]); rows with no exact key get lse = -inf."""
    parts = []
    if window:
        parts.append(_band(query, key, value, scale, window))
    if sink_tokens:
        parts.append(_sinks(query, key, value, scale, window, sink_tokens))
    return _merge(parts)


_BAND_BLOCK = 32  # queries per block: the band becomes a few hundred plain GEMMs of
# G*32 x D x (31 + window); 32 beat 16 and 64 at window 16-64 on 2 CPU cores (4 x 1024 tokens).


def _band(query, key, value, scale, window):
    """Softmax over the window band t - window < j <= t.

    Query block i (positions i*C .. i*C+C-1) sees keys i*C-window+1 .. i*C+C-1: a strided
    window of a padded key tensor, so each block is one GEMM (about 10x faster on CPU than a
    per-position gather). Every row sees at least its own token, so no row is empty."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g, c = hq // hkv, _BAND_BLOCK
    nb = -(-t // c)
    tp, m = nb * c, c + window - 1
    q = F.pad(query * scale, (0, 0, 0, tp - t)).reshape(b, hkv, g, nb, c, d)
    q = q.permute(0, 1, 3, 2, 4, 5).reshape(b, hkv, nb, g * c, d)
    kb = F.pad(key, (0, 0, window - 1, tp - t)).unfold(2, m, c)  # [B, Hkv, nb, D, M]
    vb = F.pad(value, (0, 0, window - 1, tp - t)).unfold(2, m, c).transpose(-1, -2)
    s = (q @ kb).float()  # [B, Hkv, nb, G*C, M]
    s += _band_bias(nb, g, c, window, query.device)
    mx = s.amax(-1, keepdim=True)
    s -= mx
    s.exp_()
    total = s.sum(-1)
    out = (s.to(vb.dtype) @ vb) / total[..., None].to(vb.dtype)
    out = out.reshape(b, hkv, nb, g, c, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hq, tp, d)
    lse = (mx.squeeze(-1) + total.log()).reshape(b, hkv, nb, g, c).permute(0, 1, 3, 2, 4)
    return out[:, :, :t].to(query.dtype), lse.reshape(b, hq, tp)[..., :t]


def _band_bias(nb: int, g: int, c: int, window: int, device) -> torch.Tensor:
    """[nb, G*C, M] float: 0 where block row a may read block column m, -inf elsewhere."""
    m = c + window - 1
    a = torch.arange(c, device=device)[:, None]
    col = torch.arange(m, device=device)[None, :]
    rel = col - (window - 1) - a  # j - t
    j = (torch.arange(nb, device=device) * c)[:, None, None] + col - (window - 1)
    ok = ((rel > -window) & (rel <= 0))[None] & (j >= 0)  # [nb, C, M]
    ok = ok[:, None].expand(nb, g, c, m).reshape(nb, g * c, m)
    return torch.zeros(ok.shape, device=device).masked_fill_(~ok, float("-inf"))


def _sinks(query, key, value, scale, window, sink_tokens):
    """Softmax over the sinks j < sink_tokens that are visible (j <= t) and not already in
    the window band (j <= t - window)."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    g, ns = hq // hkv, min(sink_tokens, t)
    q = query.reshape(b, hkv, g * t, d)
    s = (q @ key[:, :, :ns].transpose(-1, -2)).float() * scale  # [B, Hkv, G*T, S]
    pos = torch.arange(t, device=query.device)
    j = torch.arange(ns, device=query.device)[None, :]
    hidden = (j > pos[:, None] - window) if window else (j > pos[:, None])
    s = s.masked_fill(hidden.repeat(g, 1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0)[..., None])
    out = p.to(value.dtype) @ value[:, :, :ns]
    return out.reshape(b, hq, t, d).to(query.dtype), lse.reshape(b, hq, t)


def _merge(parts):
    """Combine softmaxes over disjoint key sets: [(out, lse), ...] -> (out, lse)."""
    out, lse = parts[0]
    for o2, l2 in parts[1:]:
        m = torch.maximum(lse, l2)
        m = m.masked_fill(torch.isinf(m), 0)
        w1, w2 = torch.exp(lse - m), torch.exp(l2 - m)
        tot = w1 + w2
        out = (out * w1[..., None] + o2 * w2[..., None]) / tot.clamp(min=1e-30)[..., None]
        lse = m + torch.log(tot)
    return out, lse
