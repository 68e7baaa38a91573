"""The attention forward over the packed cache.

Per layer and step (batch reordered: decodes first, then prefill chunks):

Decode-only steps (vLLM replays them as FULL CUDA graphs): one store (each token's packed slot
and window ring entry), then the split-KV decode kernel over the packed cache and the ring.

Mixed and prefill-only steps (vLLM runs attention eagerly there, so every launch is host time
paid per layer and step: up to 3 Triton launches and one small GEMM, the query rotation):
  1. store: quantize every token's K/V into its packed slot, in one launch; decodes and fresh
     chunks also write their window ring entries; every token's rotated K/V comes back
     (rot_out) for step 2, and on CUDA its packed slot dequantized once (deq_out: centroids
     and scale words);
  2. one prefill-kernel launch for the whole batch, a decode being a one-token chunk. The
     precision policy is the decode step's, token by token: the query at position t reads key
     j exactly iff j > t - W (the chunk's own K/V, or the previous chunk's newest tokens from
     the window ring), every older key from its packed slot (continuation chunks, prefix-cache
     hits, and the chunk's own older tokens alike; the latter read from deq_out as contiguous
     tiles, the same values). So chunked, unchunked and token-by-token
     prefill agree, and the evaluator's numbers are what is served. A step whose longest
     sequence has >= split_decode_ctx() tokens (default 4096) sends its decodes to the
     split-KV decode kernel instead (2 launches and a query rotation more, but a decode's
     context spread over many programs), the chunks alone to the prefill kernel;
  3. continuation chunks write their window ring entries (after 2, so 2 still saw the
     previous chunk's): each such chunk's last W tokens are stored a second time through an
     index list the metadata builder made once for the step (md.side_*), no gathered copies.
     Fresh chunks (nothing cached before them) write theirs in 1, like decodes; a step of
     fresh chunks only skips 3.
Before 2026-12-02 mixed steps ran decodes through the split kernel too (5 launches, 2 GEMMs):
on the H200, benchmarks/layer_step.py measured that forward at 440 us of host time per layer.
CUDA runs the Triton launchers, anything else the torch references (backend/ops.py).
The buffers of steps 1-2 are views of one per-device workspace, made once per step by its
first layer (backend/workspace.py): no allocation or fill per layer.

Under vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1, CUDA only) mixed steps always take
the split path, every decode uses one fixed split count, and the prefill kernel runs its
invariant tile order without the dequantized copy (docs/serving-vllm.md).
"""

from __future__ import annotations

import os

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_turboquant import compat, settings
from vllm_turboquant.backend import ops, own_attention, workspace
from vllm_turboquant.backend.state import LayerState, get_layer_state, side_bytes
from vllm_turboquant.kernels._common import default_num_splits, next_pow2
from vllm_turboquant.kernels.decode import rotate_query, split_counters
from vllm_turboquant.settings import TurboQuantConfigError

_SPLIT_ENV = "VLLM_TURBOQUANT_SPLIT_DECODE_CTX"


def split_decode_ctx(environ=os.environ) -> int:
    """Mixed steps whose longest sequence has at least this many tokens run their decodes
    through the split-KV decode kernel (2 more launches and a query rotation: host time)
    instead of as one-token chunks of the prefill kernel, which reads a decode's whole context
    in one program, one tile after another (GPU time grows with the context).
    $VLLM_TURBOQUANT_SPLIT_DECODE_CTX overrides the default (0: always split)."""
    return settings.env_token_count(_SPLIT_ENV, SPLIT_DECODE_CTX, environ)


_FUSED_ENV = "VLLM_TURBOQUANT_DECODE_FUSED"


def decode_fused(environ=os.environ) -> bool:
    """Whether decodes run as one launch per layer (kernels/decode.py: the query rotation and
    the merge of the splits inside the split kernel) or as three (rotation GEMM, split,
    merge). $VLLM_TURBOQUANT_DECODE_FUSED: 1 or unset = one (the default), 0 = three (the A/B
    switch of benchmarks/e2e.py); anything else is a startup error."""
    return settings.env_switch(_FUSED_ENV, True, environ)


# Default of split_decode_ctx. benchmarks/layer_step.py on the H200 (2026-12-02,
# benchmarks/results/h200-20261202b/), SmolLM2, one layer, GPU / host us, one launch
# ("forward") vs split ("forward_split"): 64 decodes x 1K + a 1,984-token chunk: 335 / 473 vs
# 314 / 783 (one launch wins: mixed steps are host-bound); 96 decodes x 8K + a 2,048-token
# chunk: 1,379 / 275 vs 752 / 456 (split wins, FlashAttention-3 takes 408 GPU us). 4096 lies
# between the two measured contexts; not swept finer.
SPLIT_DECODE_CTX = 4096


def decode_splits(num_decodes: int, num_kv_heads: int, max_model_len: int, device) -> int:
    """KV splits of the decode kernel for a batch of num_decodes requests.

    The kernels' shape heuristic (kernels/_common.default_num_splits: ~4 programs per SM, no
    split under 4 tiles of 64 tokens of max_model_len), applied to the batch rounded up to a
    power of two. It never depends on sequence lengths, so a CUDA graph can capture it; and a
    batch of n requests gets the same count eagerly (mixed steps, --enforce-eager) as from the
    graph vLLM replays for it (captured at the smallest capture size >= n: with vLLM's
    default sizes, 1, 2, 4, then multiples of 8, both round up to the same power of two), so
    graphs and eager reduce in the same order. Before, every batch used 16 splits: at batch
    128 x 1K context (profile_step, H100) most of the 6,144 programs had one tile or none and
    decode attention took 2.2x FlashAttention's time; benchmarks/kernels.py, which always
    used this heuristic, measured 0.9-1.0x FlashAttention at batch 128 (head 64).
    """
    return default_num_splits(next_pow2(max(1, num_decodes)), num_kv_heads, max_model_len,
                              device)


# Batch-invariant mode (VLLM_BATCH_INVARIANT=1): every decode batch uses the split count of a
# batch of this many requests, so a request's decode reduces in the same order whatever it
# shares a step with (the count above changes with the batch size). 16: between the counts
# of small batches (more splits, more merge work at large batches) and large ones (fewer
# programs for one long request); a fixed choice, not a measured optimum.
INVARIANT_SPLIT_BATCH = 16


class TurboQuantImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float,
                 num_kv_heads: int | None = None, alibi_slopes=None,
                 sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        _refuse(alibi_slopes is not None, "ALiBi position biases")
        _refuse(sliding_window is not None, "sliding-window attention")
        _refuse(bool(logits_soft_cap), "attention logit soft-capping")
        _refuse(attn_type != AttentionType.DECODER, f"{attn_type} attention")
        _refuse(kv_sharing_target_layer_name is not None, "cross-layer KV sharing")
        unknown = sorted(k for k, v in extra.items() if v is not None and v is not False)
        _refuse(bool(unknown), f"attention options {unknown}")
        settings.check_head_size(head_size)
        compat.apply_worker_patches()
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        self.config = settings.activate(settings.resolve(
            kv_cache_dtype, getattr(vllm_config, "additional_config", None)))
        settings.check_servable(self.config)
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.num_queries_per_kv = self.num_heads // self.num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.sliding_window = None
        self.attn_type = attn_type
        self.rows = vllm_config.scheduler_config.max_num_seqs
        self.max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        model_config = getattr(vllm_config, "model_config", None)
        self.max_model_len = getattr(model_config, "max_model_len", None) or 8192
        # The model dtype: vLLM sets it as the default dtype while it builds the model.
        self.model_dtype = torch.get_default_dtype()
        self.split_decode_ctx = split_decode_ctx()
        self.decode_fused = decode_fused()
        # vLLM's batch-invariant mode: decodes always through the split-KV kernel with one
        # fixed split count, prefill chunks in the prefill kernel's invariant order
        # (kernels/prefill.py, _invariant_tiles); CUDA only (checked at startup, compat).
        self.batch_invariant = compat.batch_invariant()
        self._state: LayerState | None = None

    # -- memory ---------------------------------------------------------------------------------
    def window_bytes(self) -> int:
        return side_bytes(self.rows, self.config.window, self.num_kv_heads, self.head_size,
                          self.model_dtype)

    def _reserve_workspace(self, device, dtype) -> None:
        """Allocate the device's step workspace (backend/workspace.py) for the largest step
        this engine schedules, with the planes this configuration's mixed steps use."""
        deq = ops.wants_deq(device) and not self.batch_invariant
        own = deq and own_attention.enabled(device)
        prefix = own_attention.prefix_max() if own else 0
        workspace.workspace(device, dtype, self.num_kv_heads, self.head_size,
                            planes=6 if own else 4 if deq else 2, tokens=self.max_tokens,
                            own_rows=self.max_tokens + prefix if prefix > 0 else 0)

    def layer_state(self, layer_name: str, device: torch.device) -> LayerState:
        state = self._state
        if state is None or state.params.rotation.device != device:
            state = self._state = get_layer_state(
                layer_name, self.config, self.head_size, self.num_kv_heads, self.rows,
                self.model_dtype, device)
            if ops.uses_triton(device):
                # the fused decode's split counters, sized for the largest batch now: they
                # cannot grow inside a CUDA-graph capture (kernels/decode.split_counters)
                split_counters(self.rows * self.num_kv_heads, device)
        return state

    def splits(self, num_decodes: int, device) -> int:
        """KV splits of the decode kernel for this step (see decode_splits)."""
        batch = INVARIANT_SPLIT_BATCH if self.batch_invariant else num_decodes
        return decode_splits(batch, self.num_kv_heads, self.max_model_len, device)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        assert output is not None, "the TurboQuant backend writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by TurboQuant")
        if attn_metadata is None:  # profiling run: no cache yet
            # the step workspace now, so that vLLM's memory profile counts it
            self._reserve_workspace(query.device, query.dtype)
            return output.fill_(0)
        md = attn_metadata
        t = md.num_actual_tokens
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_size
        state = self.layer_state(layer.layer_name, kv_cache.device)
        cache = compat.cache_view(kv_cache)
        q = query[:t].view(t, hq, d)
        k = key[:t].view(t, hkv, d)
        v = value[:t].view(t, hkv, d)
        out = output[:t].view(t, hq, d)

        params, side = state.params, state.side
        nd = md.num_decodes
        if not md.num_prefills:
            # Decode-only step (what vLLM captures in FULL CUDA graphs): the store writes each
            # token's packed slot and window entry, the split-KV decode kernel reads them.
            # Every request is a decode here (nd = B, block_table and seq_lens have B rows);
            # the query rows too, unless vLLM pads the tokens (then the first nd).
            ops.store(k, v, cache, md.slot_mapping, params, side, md.token_rows, md.token_pos,
                      md.store_seq_end, invariant=self.batch_invariant)
            if t != nd:
                q, out = q[:nd], out[:nd]
            ops.decode(out, q, cache, md.block_table, md.seq_lens, params, self.scale, side,
                       num_splits=self.splits(nd, query.device), fused=self.decode_fused)
            return output
        # Mixed or prefill-only step (eager: every launch is host time per layer and step).
        # 1. One store for every token, handing back the rotated K/V for step 2; tokens of
        # continuation chunks get no window entry yet (md.store_seq_end): the previous chunk's
        # newest tokens must still be in the ring when this chunk attends. Decodes and fresh
        # chunks get theirs.
        # On CUDA the store also hands back the packed slots dequantized (centroids + scale
        # words), so step 2 reads the chunk's own older tokens as contiguous tiles instead of
        # gathering and unpacking their slots.
        invariant = self.batch_invariant
        split = bool(nd) and (invariant or md.max_seq_len >= self.split_decode_ctx)
        # The step's buffers (rotated K/V; on CUDA the deq copy and, when the chunks' own
        # packed keys go through FlashAttention, md.own_index, its copy): views of the
        # device's workspace, made by the step's first layer (backend/workspace.py).
        sv = workspace.step_views(md, query.dtype, hkv, d, query.device,
                                  ops.wants_deq(query.device) and not invariant, split)
        deq, own_kv = sv.deq, sv.own_kv
        ops.store(k, v, cache, md.slot_mapping, params, side, md.token_rows, md.token_pos,
                  md.store_seq_end, rot_out=sv.rot, deq_out=deq,
                  own_out=None if own_kv is None else (*own_kv, md.own_index),
                  invariant=invariant)
        if own_kv is not None and md.own_prefix:
            # the chunks' cached prefixes into the copy's first rows (the chunk's own came with
            # the store), for FlashAttention to cover every key j <= t - W
            ops.unpack(cache, md.block_table, md.unpack_req, md.unpack_pos, md.unpack_dst,
                       params, *own_kv)
        max_k = md.max_seq_len if md.own_prefix else None
        # 2. One attention launch for the whole batch: a decode is a one-token chunk, and the
        # prefill kernel applies the same per-query precision policy to it (its own token
        # exact from rot, its window from the ring, the rest packed): 2 launches and a second
        # query rotation fewer per layer than the split path below, which long contexts take.
        if split:
            # Long contexts (and batch-invariant mode, where a decode must take the kernel of
            # decode-only steps): the decodes through the split-KV kernel, the chunks alone
            # through the prefill kernel (their batch rows from nd on, also in the ring).
            ops.decode(out[:nd], q[:nd], cache, sv.dec_block_table, sv.dec_seq_lens,
                       params, self.scale, side, num_splits=self.splits(nd, query.device),
                       fused=self.decode_fused)
            q_rot, own = self._own_attention(q[nd:], own_kv, md.prefill_qsl, md.own_cu_k_p,
                                             md.max_query_len, params, max_k)
            ops.prefill(out[nd:], q[nd:], *sv.pre_rot, md.prefill_qsl, sv.pre_seq_lens,
                        cache, sv.pre_block_table, params, self.scale, state.side_from(nd),
                        max_query_len=md.max_query_len, rotated=True, deq=sv.pre_deq,
                        invariant=invariant, own=own, q_rotated=q_rot,
                        own_prefix=md.own_prefix)
        else:
            q_rot, own = self._own_attention(q, own_kv, md.query_start_loc, md.own_cu_k,
                                             md.max_query_len, params, max_k)
            ops.prefill(out, q, *sv.rot, md.query_start_loc, md.seq_lens, cache,
                        md.block_table, params, self.scale, side,
                        max_query_len=md.max_query_len, rotated=True, deq=deq,
                        invariant=invariant, own=own, q_rotated=q_rot,
                        own_prefix=md.own_prefix)
        # 3. The continuation chunks' window entries: their last W tokens again (the same
        # packed bytes up to the rotation's fp32 summation order: this smaller store may take
        # smaller tiles, kernels/store.store_config; it rewrites the slots and their window
        # check together). Fresh chunks got theirs in step 1; a step of fresh chunks only has
        # no side lists (metadata._all_fresh).
        if side is not None and md.side_slots is not None:
            ops.store(k, v, cache, md.side_slots, params, side, md.side_rows,
                      md.side_pos, md.side_seq_end, token_index=md.side_tokens,
                      invariant=self.batch_invariant)
        return output


    def _own_attention(self, q, own_kv, cu_q, cu_k, max_query_len, params, max_seqlen_k=None):
        """(rotated query, own) for ops.prefill: FlashAttention over the chunks' own packed
        keys (backend/own_attention.py) when this step wrote their copy, else (None, None).
        max_seqlen_k: the longest key run (the step's longest sequence with own_prefix)."""
        if own_kv is None:
            return None, None
        q_rot = rotate_query(q, params, self.scale)
        return q_rot, own_attention.attend(q_rot, *own_kv, cu_q, cu_k, max_query_len,
                                           self.config.window, max_seqlen_k)


def _refuse(cond: bool, what: str) -> None:
    if cond:
        raise TurboQuantConfigError(
            f"the TurboQuant KV cache does not serve {what}; use another --kv-cache-dtype "
            "(auto, fp8) for this model")
