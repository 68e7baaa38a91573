"""The three kernel entry points the backend calls: Triton launchers on CUDA, torch references
elsewhere. Both take the same arguments (see kernels/reference.py), so the backend has one
code path and the CPU build of vLLM serves through the references.

decode / prefill write into `out` ([n, Hq, D], a view of vLLM's output buffer): the Triton
launchers in place, the references through one copy.
"""

from __future__ import annotations

import os

import torch

from vllm_turboquant.kernels import tq_decode_ref, tq_prefill_ref, tq_store_ref

# Tests only: route CPU tensors through the Triton launchers too (with TRITON_INTERPRET=1), so
# the backend's calls into them are checked without a GPU.
_FORCE_TRITON = os.environ.get("VLLM_TURBOQUANT_FORCE_TRITON") == "1"


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or _FORCE_TRITON


def uses_triton(device) -> bool:
    """Whether the ops run the Triton kernels on `device` (CUDA, or forced for tests)."""
    return _use_triton(torch.device(device))


def store(key, value, kv_cache, slot_mapping, params, side=None, token_rows=None,
          token_pos=None, token_seq_end=None, token_index=None, rot_out=None,
          deq_out=None, own_out=None, invariant: bool = False) -> None:
    """token_index: token i encodes key/value row token_index[i]; rot_out: (rk, rv) receive
    the rotated K/V; deq_out: (dk, dv, scales) the packed slots dequantized once, for
    prefill's `deq` (see kernels/reference.py); own_out: (ok, ov, own_index) the chunks' own
    packed keys dequantized for FlashAttention (backend/own_attention.py); invariant: one
    tile config for every store size (VLLM_BATCH_INVARIANT, kernels/store.store_config)."""
    if _use_triton(kv_cache.device):
        from vllm_turboquant.kernels import tq_store
        tq_store(key, value, kv_cache, slot_mapping, params, side, token_rows, token_pos,
                 token_seq_end, token_index=token_index, rot_out=rot_out, deq_out=deq_out,
                 own_out=own_out, fixed_tiles=invariant)
    else:
        tq_store_ref(key, value, kv_cache, slot_mapping, params, side, token_rows, token_pos,
                     token_seq_end, token_index=token_index, rot_out=rot_out, deq_out=deq_out,
                     own_out=own_out)


def wants_deq(device: torch.device) -> bool:
    """Whether prefill reads the chunk's packed tokens from the store's deq_out: the Triton
    kernel does (contiguous tiles instead of gathering and unpacking slots); the reference
    reads the packed slots (the same values), so the CPU path skips the copy."""
    return _use_triton(device)


def decode(out, query, kv_cache, block_table, seq_lens, params, scale, side=None,
           num_splits: int | None = None, fused: bool = True) -> None:
    """num_splits: a fixed KV split count, so the launch grid never depends on sequence
    lengths (CUDA graphs; the eager path uses the same count and gives the same tokens).
    fused: tq_decode's one-launch form (Triton only; the reference has no launches)."""
    if _use_triton(query.device):
        from vllm_turboquant.kernels import tq_decode
        tq_decode(query, kv_cache, block_table, seq_lens, params, scale, side,
                  num_splits=num_splits, out=out, fused=fused)
    else:
        out.copy_(tq_decode_ref(query, kv_cache, block_table, seq_lens, params, scale, side))


def prefill(out, query, key, value, cu_seqlens_q, seq_lens, kv_cache, block_table, params,
            scale, side=None, max_query_len: int | None = None, rotated: bool = False,
            deq=None, invariant: bool = False, own=None, q_rotated=None,
            own_prefix: bool = False) -> None:
    """max_query_len: an upper bound on the chunk lengths (sizes the Triton grid without a
    device->host sync). rotated: key/value are already rotated (the store's rot_out).
    deq: the store's deq_out for these tokens (Triton only, see wants_deq). invariant: the
    Triton kernel's batch-invariant order (VLLM_BATCH_INVARIANT; the reference, which serves
    the CPU build, has none: compat refuses that combination at startup). own, q_rotated:
    the chunks' own packed keys' attention and the rotated queries it used (Triton only, with
    deq; see backend/own_attention.py); own_prefix: it covers the cached prefixes too."""
    if _use_triton(query.device):
        from vllm_turboquant.kernels import tq_prefill
        tq_prefill(query, key, value, cu_seqlens_q, seq_lens, kv_cache, block_table, params,
                   scale, side, max_query_len=max_query_len, out=out, rotated=rotated, deq=deq,
                   invariant=invariant, own=own, q_rotated=q_rotated, own_prefix=own_prefix)
    else:
        out.copy_(tq_prefill_ref(query, key, value, cu_seqlens_q, seq_lens, kv_cache,
                                 block_table, params, scale, side, rotated=rotated))


def unpack(kv_cache, block_table, req, pos, dst, params, out_k, out_v) -> None:
    """Cached tokens dequantized into rows (kernels/unpack.py): the prefixes FlashAttention
    covers with own_prefix (backend/metadata.py)."""
    if _use_triton(kv_cache.device):
        from vllm_turboquant.kernels import tq_unpack_pages
        tq_unpack_pages(kv_cache, block_table, req, pos, dst, params, out_k, out_v)
    else:
        from vllm_turboquant.kernels import tq_unpack_pages_ref
        tq_unpack_pages_ref(kv_cache, block_table, req, pos, dst, params, out_k, out_v)
