"""Per-step attention metadata and its builder.

vLLM reorders every batch so decodes (query length 1) come first; the builder records the
split and, when the preset keeps a recent-token window, each token's batch row, position and
its request's sequence length (what the store needs to fill the window ring). Those go into
persistent buffers, so a decode CUDA graph replays with this step's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionMetadata,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_turboquant import compat, settings
from vllm_turboquant.backend import own_attention, warmup


@dataclass
class TurboQuantMetadata(AttentionMetadata):
    """One step's batch, decodes first. Device tensors unless noted.

    query_start_loc  int32 [B + 1]; seq_lens int32 [B] (cached tokens incl. this step's);
    block_table      int32 [B, max_blocks]; slot_mapping int64 [T] (< 0 = padding).
    token_rows / token_pos / token_seq_end  int32 [T]: batch row, position and the request's
        seq_len of every token (window presets only, else None).
    Window presets with prefill chunks in the batch (built once per step, shared by every
    layer, so a layer's forward does no index arithmetic of its own):
    store_seq_end  int32 [T]: token_seq_end for the step's first store, with the prefill tokens'
        entries raised past any position, so that store writes window entries for decodes only
        (a chunk's entries go after it attends: the previous chunk's newest must stay readable).
    side_tokens  int64 [P * W]: the tokens that get their window entry after attending, each
        chunk's last min(W, chunk) tokens (0 pads shorter chunks); side_slots int64 [P * W]
        (-1 for the pads), side_rows / side_pos / side_seq_end int32 [P * W]: theirs.
    Decode-only steps: store_seq_end is token_seq_end, side_* are None.
    prefill_qsl  int32 [P + 1]: the chunks' query starts rebased to 0 (steps with decodes and
        chunks; for impl.forward's split path, see SPLIT_DECODE_CTX there).
    Steps with prefill chunks where the chunks' own packed keys go through FlashAttention
    (backend/own_attention.py; None otherwise):
    own_index  int32 [T]: token i of request b (query-local index i) -> its row in the
        compact copy, own_cu_k[b] + i, if i < L_b - W, else -1 (decode tokens included: a
        decode has L = 1, so no row unless W = 0);
    own_cu_k  int32 [B + 1]: row starts per request (every row of the batch, decodes too);
    own_cu_k_p  int32 [P + 1]: the chunks' alone (the split path; a view of own_cu_k, so it
        starts past the decodes' rows, which exist when W = 0).
    """

    num_actual_tokens: int
    num_reqs: int
    num_decodes: int
    num_decode_tokens: int
    num_prefills: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    token_rows: torch.Tensor | None = None
    token_pos: torch.Tensor | None = None
    token_seq_end: torch.Tensor | None = None
    store_seq_end: torch.Tensor | None = None
    side_tokens: torch.Tensor | None = None
    side_slots: torch.Tensor | None = None
    side_rows: torch.Tensor | None = None
    side_pos: torch.Tensor | None = None
    side_seq_end: torch.Tensor | None = None
    prefill_qsl: torch.Tensor | None = None
    own_index: torch.Tensor | None = None
    own_cu_k: torch.Tensor | None = None
    own_cu_k_p: torch.Tensor | None = None

# store_seq_end of a prefill token in the step's first store: no position reaches
# NO_SIDE - W, so that store writes it no window entry.
NO_SIDE = 1 << 30


class TurboQuantMetadataBuilder(AttentionMetadataBuilder[TurboQuantMetadata]):
    # FULL CUDA graphs for pure decode batches; mixed batches run PIECEWISE (attention eager).
    _cudagraph_support: ClassVar[AttentionCGSupport] = (
        AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE)

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)
        self.config = settings.resolve(vllm_config.cache_config.cache_dtype,
                                       vllm_config.additional_config)
        # The final block size (vLLM may have picked it after startup validation).
        settings.check_block_size(self.config, kv_cache_spec.block_size)
        self.window = self.config.window
        sched = vllm_config.scheduler_config
        compile_cfg = vllm_config.compilation_config
        self.max_tokens = max(sched.max_num_batched_tokens,
                              getattr(compile_cfg, "max_cudagraph_capture_size", 0) or 0)
        if self.window > 0:
            self.max_tokens = max(self.max_tokens, self.window)
            self._arange = torch.arange(self.max_tokens, dtype=torch.int32, device=device)
            self._rows = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)
            self._pos = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)
            self._seq_end = torch.zeros(self.max_tokens, dtype=torch.int32, device=device)
        self._create_layer_states(vllm_config, device)
        # Mixed and prefill steps hand the chunks' own packed keys to FlashAttention (CUDA).
        self.own_fa = (own_attention.enabled(device) and not compat.batch_invariant())
        self.own_min_query = own_attention.min_query_len()
        # The kernels' serving variants compile at the first build (backend/warmup.py).
        self._warmed_up = False

    def _create_layer_states(self, vllm_config, device) -> None:
        """Allocate every layer's window buffers now (right after the KV cache, out of the
        budget compat reserved for them) rather than inside a CUDA graph capture."""
        from vllm_turboquant.backend.impl import TurboQuantImpl

        layers = vllm_config.compilation_config.static_forward_context
        for name in self.layer_names:
            impl = getattr(layers.get(name), "impl", None)
            if isinstance(impl, TurboQuantImpl):
                impl.layer_state(name, torch.device(device)).reset_window()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TurboQuantMetadata:
        if not self._warmed_up:
            # Before this step's metadata: the warm-up builds its own through _build_step
            # (the persistent buffers below are per step, so they are overwritten after it).
            self._warmed_up = warmup.maybe_warm_up(self, common_attn_metadata)
        return self._build_step(common_prefix_len, common_attn_metadata)

    def _build_step(self, common_prefix_len: int,
                    cm: CommonAttentionMetadata) -> TurboQuantMetadata:
        num_decodes, num_prefills, num_decode_tokens, _ = split_decodes_and_prefills(
            cm, decode_threshold=1)
        b, t = cm.num_reqs, cm.num_actual_tokens
        qsl = cm.query_start_loc[:b + 1]
        md = TurboQuantMetadata(
            num_actual_tokens=t, num_reqs=b, num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens, num_prefills=num_prefills,
            max_query_len=cm.max_query_len, max_seq_len=cm.max_seq_len,
            query_start_loc=qsl, seq_lens=cm.seq_lens[:b],
            block_table=cm.block_table_tensor[:b], slot_mapping=cm.slot_mapping[:t])
        if num_decodes and num_prefills:
            md.prefill_qsl = qsl[num_decodes:] - num_decode_tokens
        if self.own_fa and num_prefills and t > 0 and cm.max_query_len >= self.own_min_query:
            self._own_rows(md, qsl, num_decodes)
        if self.window > 0 and t > 0 and b > 0:
            md.token_rows, md.token_pos, md.token_seq_end = self._token_positions(
                qsl, cm.seq_lens[:b], t)
            md.store_seq_end = md.token_seq_end
            if num_prefills:
                self._deferred_side_store(md, qsl[num_decodes:])
        return md

    def _own_rows(self, md: TurboQuantMetadata, qsl: torch.Tensor, nd: int) -> None:
        """Fill md.own_index / own_cu_k / own_cu_k_p (see TurboQuantMetadata), on device."""
        t = md.num_actual_tokens
        self._ensure_arange(t)
        keys = (qsl[1:] - qsl[:-1] - self.window).clamp(min=0).to(torch.int32)
        cu_k = torch.zeros(len(keys) + 1, dtype=torch.int32, device=qsl.device)
        torch.cumsum(keys, 0, out=cu_k[1:])
        tok = self._arange[:t]
        ends = qsl[1:].to(torch.int32)
        rows = torch.searchsorted(ends, tok, right=True).clamp_(max=max(len(ends) - 1, 0))
        local = tok - qsl[:-1].to(torch.int32)[rows]
        md.own_index = torch.where(local < keys[rows], cu_k[rows] + local, -1).to(torch.int32)
        md.own_cu_k = cu_k
        md.own_cu_k_p = cu_k[nd:]   # the chunks' rows (not rebased: W = 0 gives decodes rows)

    def _ensure_arange(self, t: int) -> None:
        if getattr(self, "_arange", None) is None or self._arange.numel() < t:
            n = max(t, self.max_tokens)
            self._arange = torch.arange(n, dtype=torch.int32, device=self.device)

    def _deferred_side_store(self, md: TurboQuantMetadata, prefill_qsl: torch.Tensor) -> None:
        """Fill md.store_seq_end and md.side_* (see TurboQuantMetadata), on device."""
        t, ndt = md.num_actual_tokens, md.num_decode_tokens
        md.store_seq_end = torch.where(self._arange[:t] >= ndt, NO_SIDE, md.token_seq_end)
        idx = self._last_tokens(prefill_qsl)
        take = idx.clamp(min=0)
        md.side_tokens = take
        md.side_slots = torch.where(idx >= 0, md.slot_mapping[take], -1)
        md.side_rows = md.token_rows[take]
        md.side_pos = md.token_pos[take]
        md.side_seq_end = md.token_seq_end[take]

    def _last_tokens(self, qsl: torch.Tensor) -> torch.Tensor:
        """The last min(W, chunk) token indices of each chunk (qsl: [P + 1] chunk bounds),
        flattened, -1 where a chunk is shorter than W; on device, no host sync."""
        idx = qsl[1:, None].long() - self.window + self._arange[:self.window].long()
        return torch.where(idx >= qsl[:-1, None], idx, -1).flatten()

    def _token_positions(self, qsl: torch.Tensor, seq_lens: torch.Tensor, t: int):
        """Row, position and request seq_len of each of the t tokens, on device, no host sync.

        Padding tokens past the last request get the last row and positions past its end;
        their slot is < 0, so the store skips them."""
        if t > self.max_tokens:  # never under CUDA graphs (t <= the largest capture size)
            self.max_tokens = t
            self._arange = torch.arange(t, dtype=torch.int32, device=qsl.device)
            self._rows, self._pos, self._seq_end = (torch.zeros_like(self._arange)
                                                    for _ in range(3))
        tok = self._arange[:t]
        ends = qsl[1:].to(torch.int32)
        rows = torch.searchsorted(ends, tok, right=True).clamp_(max=max(len(ends) - 1, 0))
        starts = qsl[:-1].to(torch.int32)
        context = seq_lens.to(torch.int32) - (ends - starts)      # tokens cached before the chunk
        self._rows[:t].copy_(rows)
        self._pos[:t].copy_(context[rows] + tok - starts[rows])
        self._seq_end[:t].copy_(seq_lens[rows])
        return self._rows[:t], self._pos[:t], self._seq_end[:t]
