"""The attention forward over the packed cache.

Per layer and step (batch reordered: decodes first, then prefill chunks):
  1. store: quantize this step's K/V into their packed slots (+ the window ring for decodes);
  2. decodes: each query reads its whole sequence from the packed cache (and the window);
  3. prefill chunks: the same precision policy as a decode step, token by token: the query at
     position t reads key j exactly iff j > t - W (the chunk's own K/V, or the previous
     chunk's newest tokens from the window ring), every older key from its packed slot
     (continuation chunks, prefix-cache hits, and the chunk's own older tokens alike). So
     chunked, unchunked and token-by-token prefill agree, and the evaluator's numbers are
     what is served;
  4. prefill chunks write their window ring entries (after 3, so 3 still saw the previous
     chunk's): only each chunk's last W tokens are stored a second time, not the whole chunk.
CUDA runs the Triton launchers, anything else the torch references (backend/ops.py).
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backend import AttentionImpl, AttentionType

from vllm_turboquant import compat, settings
from vllm_turboquant.backend import ops
from vllm_turboquant.backend.state import LayerState, get_layer_state, side_bytes
from vllm_turboquant.kernels import TQSide
from vllm_turboquant.settings import TurboQuantConfigError

# Decode splits every sequence's KV into this many parts (fewer for short max_model_len: at
# least 4 tiles of 64 tokens per split). One count for the whole run, whatever the batch:
# a captured CUDA graph replays for any sequence lengths, and eager steps (mixed batches,
# --enforce-eager) reduce in the same order, so graphs and eager give the same tokens.
MAX_DECODE_SPLITS = 16


def decode_splits(max_model_len: int) -> int:
    return max(1, min(MAX_DECODE_SPLITS, -(-max_model_len // 256)))


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
        model_config = getattr(vllm_config, "model_config", None)
        self.num_splits = decode_splits(getattr(model_config, "max_model_len", None) or 8192)
        # The model dtype: vLLM sets it as the default dtype while it builds the model.
        self.model_dtype = torch.get_default_dtype()
        self._state: LayerState | None = None

    # -- memory ---------------------------------------------------------------------------------
    def window_bytes(self) -> int:
        return side_bytes(self.rows, self.config.window, self.num_kv_heads, self.head_size,
                          self.model_dtype)

    def layer_state(self, layer_name: str, device: torch.device) -> LayerState:
        state = self._state
        if state is None or state.params.rotation.device != device:
            state = self._state = get_layer_state(
                layer_name, self.config, self.head_size, self.num_kv_heads, self.rows,
                self.model_dtype, device)
        return state

    # -- forward --------------------------------------------------------------------------------
    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata, output: torch.Tensor | None = None,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        assert output is not None, "the TurboQuant backend writes into vLLM's output buffer"
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by TurboQuant")
        if attn_metadata is None:  # profiling run: no cache yet
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
        nd, ndt = md.num_decodes, md.num_decode_tokens
        # Prefill chunks write their window side entries only after attending: the previous
        # chunk's newest tokens must still be there for this chunk's queries to read them
        # exactly (the precision policy below). Decode rows are other requests: theirs go now.
        defer = side is not None and md.num_prefills > 0
        if defer:
            if ndt:
                ops.store(k[:ndt], v[:ndt], cache, md.slot_mapping[:ndt], params, side,
                          md.token_rows[:ndt], md.token_pos[:ndt], md.token_seq_end[:ndt])
            ops.store(k[ndt:], v[ndt:], cache, md.slot_mapping[ndt:t], params)
        else:
            ops.store(k, v, cache, md.slot_mapping, params, side, md.token_rows,
                      md.token_pos, md.token_seq_end)
        # Decodes first, one token each (FULL CUDA graphs pad requests and tokens alike).
        if nd:
            ops.decode(out[:nd], q[:nd], cache, md.block_table[:nd], md.seq_lens[:nd],
                       params, self.scale, side, num_splits=self.num_splits)
        if md.num_prefills:
            ops.prefill(out[ndt:], q[ndt:], k[ndt:], v[ndt:], md.prefill_query_start_loc,
                        md.seq_lens[nd:], cache, md.block_table[nd:], params,
                        self.scale, _rows_from(side, nd), max_query_len=md.max_query_len)
        if defer:   # the chunks' last W tokens again (same packed bytes), now with side entries
            idx = md.prefill_side_tokens
            take = idx.clamp(min=0)
            slots = torch.where(idx >= 0, md.slot_mapping[take], -1)
            ops.store(k[take], v[take], cache, slots, params, side, md.token_rows[take],
                      md.token_pos[take], md.token_seq_end[take])
        return output


def _rows_from(side: TQSide | None, first: int) -> TQSide | None:
    """The window rows of the batch rows first.. (a view: rows stay contiguous)."""
    if side is None or first == 0:
        return side
    return TQSide(side.k[first:], side.v[first:], side.tag[first:], side.check[first:])


def _refuse(cond: bool, what: str) -> None:
    if cond:
        raise TurboQuantConfigError(
            f"the TurboQuant KV cache does not serve {what}; use another --kv-cache-dtype "
            "(auto, fp8) for this model")
