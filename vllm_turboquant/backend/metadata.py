"""Per-step attention metadata and its builder.

vLLM reorders every batch so decodes (query length 1) come first; the builder records the
split and, when the preset keeps a recent-token window, each token's batch row, position and
its request's sequence length (what the store needs to fill the window ring). Those go into
persistent buffers, so a decode CUDA graph replays with this step's values.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (AttentionCGSupport, AttentionMetadata,
                                       AttentionMetadataBuilder, CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills

from vllm_turboquant import compat, settings
from vllm_turboquant.backend import own_attention, warmup

logger = logging.getLogger("vllm.turboquant")


@dataclass
class TurboQuantMetadata(AttentionMetadata):
    """One step's batch, decodes first. Device tensors unless noted.

    query_start_loc  int32 [B + 1]; seq_lens int32 [B] (cached tokens incl. this step's);
    block_table      int32 [B, max_blocks]; slot_mapping int64 [T] (< 0 = padding).
    token_rows / token_pos / token_seq_end  int32 [T]: batch row, position and the request's
        seq_len of every token (window presets only, else None).
    Window presets with prefill chunks in the batch (built once per step, shared by every
    layer, so a layer's forward does no index arithmetic of its own):
    store_seq_end  int32 [T]: token_seq_end for the step's first store, with the entries of
        continuation chunks' tokens raised past any position, so that store writes window
        entries for decodes and fresh chunks only (a continuation chunk's entries go after it
        attends: the previous chunk's newest must stay readable).
    side_tokens  int64 [P * W]: the tokens that get their window entry after attending, each
        chunk's last min(W, chunk) tokens (0 pads shorter chunks); side_slots int64 [P * W]
        (-1 for the pads and for fresh chunks' tokens), side_rows / side_pos / side_seq_end
        int32 [P * W]: theirs.
    Decode-only steps, and steps whose chunks are all fresh (none has cached tokens before
    it): store_seq_end is token_seq_end, side_* are None.
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
    own_prefix  (host bool) the copy also holds the chunks' cached prefixes, for
        FlashAttention to cover every key j <= t - W (backend/own_attention.py): request b's
        rows are its first K_b = max(seq_len_b - W, 0) positions (decodes: none), the first
        n_b = min(prefix_b, K_b) unpacked from the cache (unpack_req / unpack_pos /
        unpack_dst, int32 [R]: request, position, row; row -1 = a spare entry of the upper
        bound R), the chunk's own tokens after them (own_index). own_rows (host int): an
        upper bound of the copy's rows (of the workspace's prefix copy, backend/workspace.py).
    views  (host) the step's workspace views, made by its first layer's forward and shared by
        the others (workspace.StepViews; None until then).
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
    own_prefix: bool = False
    own_rows: int = 0
    unpack_req: torch.Tensor | None = None
    unpack_pos: torch.Tensor | None = None
    unpack_dst: torch.Tensor | None = None
    views: object | None = None

# store_seq_end of a prefill token in the step's first store: no position reaches
# NO_SIDE - W, so that store writes it no window entry.
NO_SIDE = 1 << 30


def own_copy_rows(qsl: torch.Tensor, seq_lens: torch.Tensor, t: int, nd: int, window: int,
                  arange: torch.Tensor, prefix_rows: tuple[int, int] | None = None) -> dict:
    """The rows of FlashAttention's compact copy (backend/own_attention.py) for a step of
    t tokens, decodes first (the first nd of the B requests), on qsl's device, no host sync:
    {"own_index", "own_cu_k", "own_cu_k_p"} and, with prefix_rows (R, K) = upper bounds of
    the prefix rows to unpack and of the copy's rows (the builder's _prefix_rows), also
    {"unpack_req", "unpack_pos", "unpack_dst", "own_prefix", "own_rows"}; each as
    TurboQuantMetadata documents it. qsl int32 [B + 1], seq_lens int32 [B]; arange int32
    [>= max(t, R)] (0, 1, 2, ...). benchmarks/layer_step.py builds its steps' rows with it."""
    b = len(seq_lens)
    lens = (qsl[1:] - qsl[:-1]).to(torch.int32)
    if prefix_rows is None:
        keys = (lens - window).clamp(min=0).to(torch.int32)
        n_pre = torch.zeros_like(keys)
    else:
        seq = seq_lens.to(torch.int32)
        keys = (seq - window).clamp(min=0).to(torch.int32)
        keys = torch.where(arange[:b] >= nd, keys, 0)     # decodes: no rows
        n_pre = torch.minimum(seq - lens, keys)
    cu_k = torch.zeros(len(keys) + 1, dtype=torch.int32, device=qsl.device)
    torch.cumsum(keys, 0, out=cu_k[1:])
    tok = arange[:t]
    ends = qsl[1:].to(torch.int32)
    rows = torch.searchsorted(ends, tok, right=True).clamp_(max=max(len(ends) - 1, 0))
    local = tok - qsl[:-1].to(torch.int32)[rows] + n_pre[rows]   # position in the copy
    out = {"own_index": torch.where(local < keys[rows], cu_k[rows] + local, -1).to(torch.int32),
           "own_cu_k": cu_k,
           # the chunks' rows (not rebased: W = 0 gives decodes rows)
           "own_cu_k_p": cu_k[nd:]}
    if prefix_rows is not None:
        r_max, k_max = prefix_rows
        cu_p = torch.zeros(b + 1, dtype=torch.int32, device=qsl.device)
        torch.cumsum(n_pre, 0, out=cu_p[1:])
        r = arange[:r_max]
        req = torch.searchsorted(cu_p[1:], r, right=True).clamp_(max=max(b - 1, 0))
        pos = r - cu_p[req]
        out.update(unpack_req=req.to(torch.int32), unpack_pos=pos.to(torch.int32),
                   unpack_dst=torch.where(r < cu_p[-1], cu_k[req] + pos, -1).to(torch.int32),
                   own_prefix=True, own_rows=max(k_max, 1))
    return out


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
        self.own_prefix_max = own_attention.prefix_max()
        from vllm_turboquant.backend.impl import split_decode_ctx
        # the step kinds whose decodes do not ride in the prefill kernel (impl.forward): only
        # there can FlashAttention cover the chunks' prefixes (a decode's context is no chunk)
        self.split_ctx = split_decode_ctx()
        logger.info("vllm-turboquant: chunks' own packed keys through FlashAttention: %s",
                    self._own_fa_summary())
        # The kernels' serving variants compile at the first build (backend/warmup.py).
        self._warmed_up = False

    def _own_fa_summary(self) -> str:
        """The startup log's word on the own-keys path, its threshold and the prefix bound."""
        if not self.own_fa:
            return "off"
        prefix = (f"cached prefixes too, up to {self.own_prefix_max} tokens a step"
                  if self.own_prefix_max > 0 else "cached prefixes read packed")
        return f"on (chunks from {self.own_min_query} tokens; {prefix})"

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
            self._own_rows(md, qsl, num_decodes, self._prefix_rows(cm, num_decodes))
        if self.window > 0 and t > 0 and b > 0:
            md.token_rows, md.token_pos, md.token_seq_end = self._token_positions(
                qsl, cm.seq_lens[:b], t, decodes_only=not num_prefills and t == b)
            md.store_seq_end = md.token_seq_end
            if num_prefills and not self._all_fresh(cm, num_decodes):
                self._deferred_side_store(md, qsl, num_decodes)
        return md

    @staticmethod
    def _all_fresh(cm: CommonAttentionMetadata, nd: int) -> bool:
        """Whether every chunk of the step starts its request (nothing cached before it), from
        vLLM's host-side lengths (exact for prefill rows; no device->host sync). Such chunks
        take their window entries in the step's first store, like decodes, and the step needs
        no deferred store (see _deferred_side_store). False where vLLM gives no host lengths."""
        seq_cpu = getattr(cm, "seq_lens_cpu_upper_bound", None)
        qsl_cpu = getattr(cm, "query_start_loc_cpu", None)
        if seq_cpu is None or qsl_cpu is None:
            return False
        b = cm.num_reqs
        lens = qsl_cpu[nd + 1:b + 1] - qsl_cpu[nd:b]
        return torch.equal(seq_cpu[nd:b].to(lens.dtype), lens)

    def _prefix_rows(self, cm: CommonAttentionMetadata, nd: int) -> tuple[int, int] | None:
        """(R, K): upper bounds of the prefix rows to unpack and of the copy's rows, when this
        step's chunks' cached prefixes go to FlashAttention too (md.own_prefix), else None.
        From vLLM's host-side sequence lengths (an upper bound of the device ones, so no
        device->host sync): only where the decodes take the split kernel (or there are none),
        the prefixes are within own_prefix_max and there is one at all."""
        b = cm.num_reqs
        seq_cpu = getattr(cm, "seq_lens_cpu_upper_bound", None)
        qsl_cpu = getattr(cm, "query_start_loc_cpu", None)
        if (self.own_prefix_max <= 0 or seq_cpu is None or qsl_cpu is None
                or (nd and cm.max_seq_len < self.split_ctx)):
            return None
        seq = seq_cpu[:b].long()
        lens = (qsl_cpu[1:b + 1] - qsl_cpu[:b]).long()
        keys = (seq - self.window).clamp(min=0)
        keys[:nd] = 0
        n_pre = torch.minimum((seq - lens).clamp(min=0), keys)
        r = int(n_pre.sum())
        if r == 0 or r > self.own_prefix_max:
            return None
        return r, int(keys.sum())

    def _own_rows(self, md: TurboQuantMetadata, qsl: torch.Tensor, nd: int,
                  prefix_rows: tuple[int, int] | None = None) -> None:
        """Fill md.own_index / own_cu_k / own_cu_k_p and, with prefix_rows (_prefix_rows),
        md.own_prefix / own_rows / unpack_* (see TurboQuantMetadata), on device."""
        t = md.num_actual_tokens
        self._ensure_arange(max(t, prefix_rows[0] if prefix_rows else 0))
        for name, value in own_copy_rows(qsl, md.seq_lens, t, nd, self.window, self._arange,
                                         prefix_rows).items():
            setattr(md, name, value)

    def _ensure_arange(self, t: int) -> None:
        if getattr(self, "_arange", None) is None or self._arange.numel() < t:
            n = max(t, self.max_tokens)
            self._arange = torch.arange(n, dtype=torch.int32, device=self.device)

    def _deferred_side_store(self, md: TurboQuantMetadata, qsl: torch.Tensor, nd: int) -> None:
        """Fill md.store_seq_end and md.side_* (see TurboQuantMetadata), on device.

        Only continuation chunks (tokens cached before the chunk) defer their window entries:
        the prefill kernel reads their prefix's newest keys from the ring while they attend,
        so the ring must hold the previous chunk's until then. A fresh chunk has no prefix, and
        nothing else reads its request's ring row in this step (a decode reads its own row), so
        its tokens get their entries in the first store, like decodes, and its entries in the
        side lists are padding (slot -1). Steps of fresh chunks only skip the deferred store
        altogether (_all_fresh): one launch fewer per layer in the short e2e workload's mixed
        steps (a new prompt beside decodes)."""
        t, ndt = md.num_actual_tokens, md.num_decode_tokens
        rows = md.token_rows
        context = md.seq_lens - (qsl[1:] - qsl[:-1])      # tokens cached before each chunk
        deferred = (self._arange[:t] >= ndt) & (context[rows] > 0)
        md.store_seq_end = torch.where(deferred, NO_SIDE, md.token_seq_end)
        idx = self._last_tokens(qsl[nd:])
        take = idx.clamp(min=0)
        md.side_tokens = take
        md.side_slots = torch.where((idx >= 0) & deferred[take], md.slot_mapping[take], -1)
        md.side_rows = md.token_rows[take]
        md.side_pos = md.token_pos[take]
        md.side_seq_end = md.token_seq_end[take]

    def _last_tokens(self, qsl: torch.Tensor) -> torch.Tensor:
        """The last min(W, chunk) token indices of each chunk (qsl: [P + 1] chunk bounds),
        flattened, -1 where a chunk is shorter than W; on device, no host sync."""
        idx = qsl[1:, None].long() - self.window + self._arange[:self.window].long()
        return torch.where(idx >= qsl[:-1, None], idx, -1).flatten()

    def _token_positions(self, qsl: torch.Tensor, seq_lens: torch.Tensor, t: int,
                         decodes_only: bool = False):
        """Row, position and request seq_len of each of the t tokens, on device, no host sync.

        Padding tokens past the last request get the last row and positions past its end;
        their slot is < 0, so the store skips them. decodes_only (t requests of one token
        each): token i is row i at position seq_lens[i] - 1, in 3 small launches instead of
        12 (host time of every decode step, graphs or not: the builder runs eagerly)."""
        if t > self.max_tokens:  # never under CUDA graphs (t <= the largest capture size)
            self.max_tokens = t
            self._arange = torch.arange(t, dtype=torch.int32, device=qsl.device)
            self._rows, self._pos, self._seq_end = (torch.zeros_like(self._arange)
                                                    for _ in range(3))
        rows_out, pos_out, end_out = self._rows[:t], self._pos[:t], self._seq_end[:t]
        if decodes_only:
            rows_out.copy_(self._arange[:t])
            torch.sub(seq_lens.to(torch.int32), 1, out=pos_out)
            end_out.copy_(seq_lens)
            return rows_out, pos_out, end_out
        tok = self._arange[:t]
        ends = qsl[1:].to(torch.int32)
        rows = torch.searchsorted(ends, tok, right=True).clamp_(max=max(len(ends) - 1, 0))
        starts = qsl[:-1].to(torch.int32)
        context = seq_lens.to(torch.int32) - (ends - starts)      # tokens cached before the chunk
        rows_out.copy_(rows)
        pos_out.copy_(context[rows] + tok - starts[rows])
        end_out.copy_(seq_lens[rows])
        return rows_out, pos_out, end_out
