"""The chunks' own packed keys through FlashAttention (CUDA; vLLM's vllm_flash_attn).

Why: by the precision policy a prefill chunk's query at position t reads its chunk's own keys
j <= t - W (W the window) packed, i.e. as their dequantized values C[code] * scale: an
ordinary causal attention over a dequantized copy. The prefill kernel ran it itself from the
store's deq copy: a fresh 7,700-token SmolLM2 prompt took 560 us per layer against
FlashAttention-3's 226 over bf16 (H200, benchmarks/results/h200-20261202b/), most of the long
e2e workload's mixed-step time.

How: the metadata builder gives each chunk token i < L - W a row of a compact copy
(md.own_index; chunk b's rows start at md.own_cu_k[b]), the store writes C[code] * scale
there (tq_store's own_out, next to the deq copy, in the same launch), and FlashAttention runs
varlen causal attention of the chunk's rotated, prescaled queries over it with the keys one
chunk b has, L_b - W (causal masks align bottom-right: query i sees j <= i - W), softmax
scale ln 2 (the queries carry scale * log2(e)). The prefill kernel (tq_prefill's `own`)
covers the cached prefix, the aligned window's packed band (t - W, block start) and the exact
window, and merges FlashAttention's (out, lse) into its result by log-sum-exp. Memory: one
more [T, Hkv, D] K and V per layer step, transient. Off the GPU (the CPU build, the
interpreter tests) the same computation runs in torch (kernels.reference.own_attention_ref).
Status: ON by default on CUDA with vLLM's FlashAttention ($VLLM_TURBOQUANT_OWN_FA=0 turns it
off; off the GPU and in batch-invariant mode it is never used). The NaN its first GPU run
returned with the aligned window (2026-12-03) came from FlashAttention's last key tile reading
rows of the copy the store does not write (stale NaN bits; P = 0 times NaN is NaN): the copy
lives in the step workspace now, zeroed once and only ever written with finite values
(backend/workspace.py). On the H200 (benchmarks/results/h200-20261203d/) the GPU tests pass
(FlashAttention and the torch stand-in, windowed and plain presets), and one layer of SmolLM2
takes 301 us of GPU time for a fresh 7,700-token prompt instead of 660 (FlashAttention-3 over
bf16: 219) and 397 instead of 751 for 47 decodes x 8K + that prompt; its host time is higher
(one more FlashAttention call and query rotation per layer).
"""

from __future__ import annotations

import math
import os

import torch

from vllm_turboquant import compat, settings
from vllm_turboquant.kernels.reference import own_attention_ref

_ENV = "VLLM_TURBOQUANT_OWN_FA"
_MIN_ENV = "VLLM_TURBOQUANT_OWN_FA_MIN_QUERY"
_LN2 = math.log(2.0)

# Steps whose longest chunk is shorter run the prefill kernel alone (FlashAttention's launch
# and the compact copy cost host and GPU time that short chunks do not earn back).
MIN_QUERY = 256


def min_query_len(environ=os.environ) -> int:
    """The shortest longest-chunk of a step that takes FlashAttention for the chunks' own
    keys (MIN_QUERY; $VLLM_TURBOQUANT_OWN_FA_MIN_QUERY overrides it)."""
    return settings.env_token_count(_MIN_ENV, MIN_QUERY, environ)


# The cached prefix through FlashAttention too (metadata.py's own_prefix; OFF by default: in
# the same-call A/B on the e2e long workload it was 10% slower than the kernel-only path in
# both runs, 5,483 / 5,878 vs 6,125 / 6,521 out tok/s, H200, 2026-12-07,
# benchmarks/results/h200-20261207/; again on the H100, 2026-12-08, 7,368 / 7,592 vs 8,191 /
# 8,649, -11%, although there its layers took 0.34-0.62x the GPU time of the committed
# path in benchmarks/layer_step.py, benchmarks/results/h100-20261208/; opt in with
# $VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX=16384):
# a step whose continuation chunks have at most this many cached prefix tokens in all unpacks them
# (kernels/unpack.py) into the copy FlashAttention reads, instead of the prefill kernel
# re-reading the packed pages in every 128-row program. Why: on the H200 that loop took 14.9
# of 33 ms of kernel time per mixed step of the e2e long workload (SmolLM2,
# benchmarks/results/h200-20261204b/). The bound keeps the copy's memory fixed: 16,384 tokens
# are 2 x 16,384 x Hkv x D x 2 bytes (12.6 MB for SmolLM2, 67 MB at 8 KV heads x 128) beside
# the chunk's own; a step with more prefix (long prefix-cache hits) reads it packed, in the
# kernel, with no bf16 copy of it. Why it loses is not profiled yet: not its layers' GPU time
# (above); per-step host work or something outside the attention layers remains.
PREFIX_MAX = 0
_PREFIX_ENV = "VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX"


def prefix_max(environ=os.environ) -> int:
    """The most cached prefix tokens a step unpacks for FlashAttention (PREFIX_MAX = 0: never,
    the kernel reads them; $VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX overrides it, e.g. 16384)."""
    return settings.env_token_count(_PREFIX_ENV, PREFIX_MAX, environ)


def requested(environ=os.environ) -> bool:
    """$VLLM_TURBOQUANT_OWN_FA: unset, empty or 1 = on (the default), 0 = off; any other value
    is a TurboQuantConfigError naming the variable (raised when the backend starts)."""
    return settings.env_switch(_ENV, True, environ)


def enabled(device, environ=os.environ) -> bool:
    """Whether mixed and prefill steps on `device` run the chunks' own keys through
    FlashAttention: on CUDA with vLLM's FlashAttention unless $VLLM_TURBOQUANT_OWN_FA=0."""
    if not requested(environ):
        return False
    return torch.device(device).type == "cuda" and compat.flash_attn_varlen() is not None


def attend(q_rot: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_query_len: int,
           window: int, max_seqlen_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, Hq, D] in q_rot's dtype, lse [Hq, T] float32) of each query over its chunk's
    own keys j <= i - window: q_rot [T, Hq, D] rotated, prescaled (decode.rotate_query);
    own_k/own_v [>= cu_seqlens_k[-1], Hkv, D] the store's own_out; cu_seqlens_q, cu_seqlens_k
    int32 [B + 1] (chunk b has L_b queries and max(L_b - window, 0) keys). Every row of
    own_k/own_v must be finite, the ones past cu_seqlens_k[-1] too: FlashAttention's last key
    tile loads them (masked scores, but P = 0 times a NaN value is NaN). max_seqlen_k: an
    upper bound of the key counts (default max_query_len: the chunks' own keys alone; the
    step's longest sequence when the copy holds the prefixes too)."""
    fa = compat.flash_attn_varlen() if q_rot.is_cuda else None
    if fa is None:
        return own_attention_ref(q_rot, own_k, own_v, cu_seqlens_q, cu_seqlens_k, window)
    func, version = fa
    out, lse = func(q_rot, own_k, own_v, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q,
                    max_seqlen_k=max_query_len if max_seqlen_k is None else max_seqlen_k,
                    cu_seqlens_k=cu_seqlens_k,
                    softmax_scale=_LN2, causal=True, return_softmax_lse=True,
                    fa_version=version)
    return out, lse
