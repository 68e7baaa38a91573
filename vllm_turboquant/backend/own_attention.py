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
scale ln 2 (the queries carry scale * log2(e)). Its (out, lse) seed the prefill kernel's
online softmax (tq_prefill's `own`), which adds the cached prefix, the aligned window's
packed band (t - W, block start) and the exact window. Memory: one more [T, Hkv, D] K and V
per layer step, transient. Off the GPU (the CPU build, the interpreter tests) the same
computation runs in torch (kernels.reference.own_attention_ref).
Status: OFF by default, opt in with `VLLM_TURBOQUANT_OWN_FA=1`. On the H200 (2026-12-03,
benchmarks/results/h200-20261203c/call8-e2e/own-attention-gpu-tests.log) FlashAttention's
(out, lse) matched the torch stand-in, rows without keys included, and the whole path matched
the deq-copy path for the unwindowed preset, but with the default preset's aligned window
(W 64, align 128, 128-token blocks) the seeded prefill kernel returned NaN
(tests/gpu/test_own_attention_gpu.py, an expected failure until fixed); the CPU interpreter
tests of the same path pass. Not yet timed on the GPU either. Off, the prefill kernel reads
the deq copy itself, as before.
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


def enabled(device) -> bool:
    """Whether mixed and prefill steps on `device` run the chunks' own keys through
    FlashAttention: only with $VLLM_TURBOQUANT_OWN_FA=1 (see the module's status), on CUDA
    with vLLM's FlashAttention."""
    if os.environ.get(_ENV, "0").strip() != "1":
        return False
    return torch.device(device).type == "cuda" and compat.flash_attn_varlen() is not None


def attend(q_rot: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_query_len: int,
           window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [T, Hq, D] in q_rot's dtype, lse [Hq, T] float32) of each query over its chunk's
    own keys j <= i - window: q_rot [T, Hq, D] rotated, prescaled (decode.rotate_query);
    own_k/own_v [>= cu_seqlens_k[-1], Hkv, D] the store's own_out; cu_seqlens_q, cu_seqlens_k
    int32 [B + 1] (chunk b has L_b queries and max(L_b - window, 0) keys)."""
    fa = compat.flash_attn_varlen() if q_rot.is_cuda else None
    if fa is None:
        return own_attention_ref(q_rot, own_k, own_v, cu_seqlens_q, cu_seqlens_k, window)
    func, version = fa
    out, lse = func(q_rot, own_k, own_v, max_seqlen_q=max_query_len, cu_seqlens_q=cu_seqlens_q,
                    max_seqlen_k=max_query_len, cu_seqlens_k=cu_seqlens_k,
                    softmax_scale=_LN2, causal=True, return_softmax_lse=True,
                    fa_version=version)
    return out, lse
