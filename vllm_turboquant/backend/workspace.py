"""The scratch buffers of mixed and prefill steps: one set per device, shared by every layer.

What a mixed (or prefill-only) step's forward needs besides vLLM's tensors, per layer
(backend/impl.py, steps 1-2):
    planes  [P, rows, Hkv, D]  model dtype: 0, 1 the store's rotated K/V of the step's tokens
            (rot_out); on CUDA 2, 3 their packed slots dequantized (deq_out); with the chunks'
            own keys through FlashAttention (backend/own_attention.py) 4, 5 its copy.
    words   [rows, Hkv] int32: the deq copy's scale words (CUDA).
    own     [2, own_rows, Hkv, D] model dtype: FlashAttention's copy when it also holds the
            chunks' cached prefixes (metadata.py's own_prefix; then planes 4, 5 are unused).
rows: vLLM's max_num_batched_tokens (a step never has more tokens); own_rows: that plus the
prefix bound ($VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX).

Why one set: mixed steps run attention eagerly (vLLM's CUDA graphs cover decode-only batches),
so every allocation, fill and view there is host time paid per layer and step. Allocated per
layer, these were 2 allocations, a zero fill (one more launch) and ~10 views per layer (of ~600
us of host time per mixed layer step on the H200, benchmarks/results/h200-20261204b/). The
layers run one after another on one stream, so layer l + 1's store cannot overwrite what layer
l's kernels still read: one set serves them all, and its views are made once per step (the
first layer's forward, StepViews) and reused by the others.

Why it is zeroed once, not per step: FlashAttention's last key tile reads rows of the copy past
the ones the step writes (its masked P = 0 times a NaN would be NaN; torch.empty's stale bits
were the NaN of 2026-12-03). Every value ever written to the copy (planes 4, 5 and `own`) is
C[code] * scale with the store's scale clamped to fp16's range and |C| < 1 (kernels/store.py
own_out, kernels/unpack.py): finite. So rows a step does not write hold zeros or an earlier
step's finite values, and P = 0 times them is 0.

Memory: allocated in vLLM's profiling run (impl.forward with no metadata), so vLLM's memory
profile counts it with the activations; with --kv-cache-memory-bytes it lies outside the KV
budget, as the per-step allocations it replaces did. SmolLM2 (3 KV heads x 64, bf16) at 16,384
tokens: 6 planes = 37.7 MB. A step with more tokens (never under vLLM's scheduler) grows it.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging

import torch

logger = logging.getLogger("vllm.turboquant")


@dataclass
class StepWorkspace:
    planes: torch.Tensor
    words: torch.Tensor
    own: torch.Tensor | None

    def fits(self, planes: int, tokens: int, own_rows: int) -> bool:
        own = 0 if self.own is None else self.own.shape[1]
        return (self.planes.shape[0] >= planes and self.planes.shape[1] >= tokens
                and own >= own_rows)


_WORKSPACES: dict[tuple, StepWorkspace] = {}


def workspace(device, dtype: torch.dtype, num_kv_heads: int, head_size: int, planes: int,
              tokens: int, own_rows: int = 0) -> StepWorkspace:
    """The device's workspace for (dtype, Hkv, D) with at least `planes` planes of `tokens`
    rows and `own_rows` rows of the prefix copy; created, or grown, zeroed (module doc)."""
    device = torch.device(device)
    key = (str(device), dtype, num_kv_heads, head_size)
    ws = _WORKSPACES.get(key)
    if ws is not None and ws.fits(planes, tokens, own_rows):
        return ws
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"vllm-turboquant: the step workspace must grow to {tokens} tokens while a CUDA "
            "graph is captured (mixed steps are never captured: a bug)")
    if ws is not None:   # grow to cover both the old and the new request
        planes = max(planes, ws.planes.shape[0])
        tokens = max(tokens, ws.planes.shape[1])
        own_rows = max(own_rows, 0 if ws.own is None else ws.own.shape[1])
        logger.info("vllm-turboquant: step workspace grows to %d planes x %d tokens",
                    planes, tokens)
    shape = (num_kv_heads, head_size)
    ws = StepWorkspace(
        planes=torch.zeros((planes, tokens) + shape, dtype=dtype, device=device),
        words=torch.zeros((tokens, num_kv_heads), dtype=torch.int32, device=device),
        own=(torch.zeros((2, own_rows) + shape, dtype=dtype, device=device)
             if own_rows > 0 else None))
    _WORKSPACES[key] = ws
    return ws


def clear_workspaces() -> None:
    """Drop every workspace (tests; a new engine in the same process)."""
    _WORKSPACES.clear()


@dataclass
class StepViews:
    """One step's views of the workspace and of the step's metadata, shared by its layers.

    rot      (rk, rv) [T, Hkv, D]: the store's rot_out.
    deq      (dk, dv, words) [T, ...]: its deq_out, or None (CPU, batch-invariant mode).
    own_kv   (ok, ov): FlashAttention's copy (planes 4, 5 [T], or `own` [md.own_rows] with
             own_prefix), or None when the step does not use it.
    The split path's (backend/impl.py) rows, None on the other path: decodes [:nd] and chunks
    [nd:] of the block table and sequence lengths, the chunks' rot and deq rows.
    """

    key: tuple
    rot: tuple
    deq: tuple | None
    own_kv: tuple | None
    dec_block_table: torch.Tensor | None = None
    dec_seq_lens: torch.Tensor | None = None
    pre_block_table: torch.Tensor | None = None
    pre_seq_lens: torch.Tensor | None = None
    pre_rot: tuple | None = None
    pre_deq: tuple | None = None


def step_views(md, dtype: torch.dtype, num_kv_heads: int, head_size: int, device,
               with_deq: bool, split: bool) -> StepViews:
    """md.views, made by the first layer of the step that asks (impl.forward). with_deq: the
    step wants the deq copy (ops.wants_deq and not batch-invariant mode); split: the step
    takes impl.forward's split path (the chunks' rows are sliced off)."""
    key = (dtype, num_kv_heads, head_size, with_deq, split)
    sv = md.views
    if sv is not None and sv.key == key:
        return sv
    t, nd = md.num_actual_tokens, md.num_decodes
    own = with_deq and md.own_index is not None
    in_planes = own and not md.own_prefix
    ws = workspace(device, dtype, num_kv_heads, head_size,
                   planes=6 if in_planes else 4 if with_deq else 2, tokens=t,
                   own_rows=md.own_rows if own and md.own_prefix else 0)
    p = ws.planes
    rot = (p[0, :t], p[1, :t])
    deq = (p[2, :t], p[3, :t], ws.words[:t]) if with_deq else None
    own_kv = None
    if in_planes:
        own_kv = (p[4, :t], p[5, :t])
    elif own:
        own_kv = (ws.own[0, :md.own_rows], ws.own[1, :md.own_rows])
    sv = StepViews(key, rot, deq, own_kv)
    if split:
        sv.dec_block_table = md.block_table[:nd]
        sv.dec_seq_lens = md.seq_lens[:nd]
        sv.pre_block_table = md.block_table[nd:]
        sv.pre_seq_lens = md.seq_lens[nd:]
        sv.pre_rot = tuple(x[nd:] for x in rot)
        sv.pre_deq = None if deq is None else tuple(x[nd:] for x in deq)
    md.views = sv
    return sv
