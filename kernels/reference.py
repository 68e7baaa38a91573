"""Pure-torch references of the three kernels (store, decode, prefill). No Triton.

They are the specification the Triton kernels are tested against, and, being vectorized per
sequence, the CPU serving path of the vLLM backend (small batches, a few thousand tokens).

Shared conventions (see docs/design-notes.md):
  kv_cache      uint8 [num_blocks, block_size, num_kv_heads, slot_bytes] logically; in memory
                each block is one dense head-major page (docs/layout.md: per KV head, all
                key-code rows, then value-code rows, then scale words); read_slots /
                write_slots convert. Any block stride, any order of the last three dims.
  slot id s     block s // block_size, offset s % block_size; s < 0 = padding (skipped).
  block_table   int32 [B, max_blocks]; seq_lens int32 [B] (tokens in the cache incl. this step).
  params        TQLayerParams (or a TQLayerCodec, converted on the fly; build the params once).
  side          optional TQSide (window side copy), rows = batch rows of block_table.
Attention runs in the rotated space: scores (q R^T).(k R^T) = q.k, values summed rotated and
un-rotated once (acc @ R). GQA: query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

import math

import torch

from vllm_turboquant.codec import unpack_codes
from vllm_turboquant.codec.codec import quantize_rotated

from ._common import TQLayerParams, TQSide, as_params, read_slots, write_slots


__all__ = ["tq_store_ref", "tq_decode_ref", "tq_prefill_ref", "encode_slots", "decode_slots",
           "TQLayerParams", "TQSide"]


# -- slots ------------------------------------------------------------------------------------
def _quantize(y: torch.Tensor, centroids, bounds, scale_mode: str):
    """y [..., D] float32 rotated -> (codes [..., D] int64, scale [...] float16): the codec's
    own quantizer, so the bytes are identical."""
    return quantize_rotated(y, centroids, bounds, scale_mode)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    from vllm_turboquant.codec import pack_codes
    return pack_codes(codes, bits)


def encode_slots(params: TQLayerParams, key: torch.Tensor, value: torch.Tensor):
    """key, value [..., D] -> (slots uint8 [..., slot_bytes], ky, vy rotated float32 [..., D]).

    Byte-identical to TQLayerCodec.encode (non-QJL presets)."""
    lay = params.layout
    ky = key.float() @ params.rotation.T
    vy = value.float() @ params.rotation.T
    kc, ks = _quantize(ky, params.key_centroids, params.key_bounds, params.scale_mode)
    vc, vs = _quantize(vy, params.value_centroids, params.value_bounds, params.scale_mode)
    out = torch.zeros(*key.shape[:-1], lay.slot_bytes, dtype=torch.uint8, device=key.device)
    out[..., :lay.k_code_bytes] = _pack(kc, params.key_bits)
    out[..., lay.v_codes_offset:lay.k_scale_offset] = _pack(vc, params.value_bits)
    out[..., lay.k_scale_offset:lay.k_scale_offset + 2] = _half_bytes(ks)
    out[..., lay.v_scale_offset:lay.v_scale_offset + 2] = _half_bytes(vs)
    return out, ky, vy


def decode_slots(params: TQLayerParams, slots: torch.Tensor):
    """slots uint8 [..., slot_bytes] -> (key, value) float32 [..., D] in the rotated space."""
    lay, d = params.layout, params.head_size
    kc = unpack_codes(slots[..., :lay.k_code_bytes], params.key_bits, d)
    vc = unpack_codes(slots[..., lay.v_codes_offset:lay.k_scale_offset], params.value_bits, d)
    ks = slots[..., lay.k_scale_offset:lay.k_scale_offset + 2].contiguous().view(torch.float16)
    vs = slots[..., lay.v_scale_offset:lay.v_scale_offset + 2].contiguous().view(torch.float16)
    return (params.key_centroids[kc] * ks.float(), params.value_centroids[vc] * vs.float())


def scale_check(params: TQLayerParams, slots: torch.Tensor) -> torch.Tensor:
    """slots uint8 [..., slot_bytes] -> int32 [...]: the 4 scale bytes, K | V << 16."""
    k = params.layout.k_scale_offset
    return slots[..., k:k + 4].contiguous().view(torch.int32).squeeze(-1)


def _half_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


# -- store ------------------------------------------------------------------------------------
def tq_store_ref(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, params, side: TQSide | None = None,
                 token_rows: torch.Tensor | None = None, token_pos: torch.Tensor | None = None,
                 token_seq_end: torch.Tensor | None = None,
                 token_index: torch.Tensor | None = None,
                 rot_out: tuple[torch.Tensor, torch.Tensor] | None = None,
                 deq_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 own_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 ) -> None:
    """Quantize-on-write: encode each token's K/V and write its packed slot, in place.

    key, value     [N, Hkv, D] float16/bfloat16/float32 (any strides).
    kv_cache       uint8 [num_blocks, block_size, Hkv, slot_bytes] (written in place).
    slot_mapping   int64 [T]; < 0 = padding, not written. T = N, or len(token_index).
    side           optional TQSide; then token_rows / token_pos / token_seq_end (int32/int64 [T]:
                   the token's batch row, its position, and its request's seq_len) are required.
                   Token t writes the ring entry (row, pos % W) iff pos >= seq_end - W.
    token_index    optional int [T]: token i encodes key/value row token_index[i] (rows of
                   padding tokens, slot < 0, may hold anything in range).
    rot_out        optional (rk, rv) [T, Hkv, D]: receive the rotated K/V (x @ R.T, zero for a
                   non-finite vector, as the side copy, and for padding tokens) of every token.
    deq_out        optional (dk, dv [T, Hkv, D], scales int32 [T, Hkv]): the centroids C[code]
                   of each token's packed K/V (in dk's dtype) and its slot's scale word
                   (K fp16 | V fp16 << 16); zeros for padding tokens. tq_prefill's `deq`.
    own_out        optional (ok, ov [T_own, Hkv, D], own_index int32 [T]), with deq_out: token
                   i (valid, own_index[i] >= 0) writes C[code] * its fp16 scale (in ok's dtype)
                   at row own_index[i]; other rows are left alone. The chunks' own packed
                   keys/values for FlashAttention (backend/own_attention.py).
    """
    p = as_params(params, kv_cache.device)
    block_size = kv_cache.shape[1]
    if token_index is not None:
        take = token_index.long()
        key, value = key[take], value[take]
    slots, ky, vy = encode_slots(p, key, value)
    sm = slot_mapping.long()
    valid = sm >= 0
    idx = sm[valid]
    write_slots(kv_cache, p.layout, idx // block_size, idx % block_size, slots[valid])
    has_side = side is not None and side.window > 0
    if deq_out is not None:
        if token_index is not None:
            raise ValueError("deq_out and token_index are not used together")
        lay, d = p.layout, p.head_size
        keep = valid[:, None, None]
        kc = unpack_codes(slots[..., :lay.k_code_bytes], p.key_bits, d)
        vc = unpack_codes(slots[..., lay.v_codes_offset:lay.k_scale_offset], p.value_bits, d)
        deq_out[0].copy_(torch.where(keep, p.key_centroids[kc], 0))
        deq_out[1].copy_(torch.where(keep, p.value_centroids[vc], 0))
        deq_out[2].copy_(torch.where(valid[:, None], scale_check(p, slots), 0))
        if own_out is not None:
            ok, ov, own_idx = own_out
            rows = own_idx.long()
            take = valid & (rows >= 0)
            words = scale_check(p, slots)[take]
            k_s = (words & 0xFFFF).to(torch.int16).view(torch.float16).float()
            v_s = ((words >> 16) & 0xFFFF).to(torch.int16).view(torch.float16).float()
            ok[rows[take]] = (p.key_centroids[kc[take]].to(ok.dtype).float()
                              * k_s[..., None]).to(ok.dtype)
            ov[rows[take]] = (p.value_centroids[vc[take]].to(ov.dtype).float()
                              * v_s[..., None]).to(ov.dtype)
    elif own_out is not None:
        raise ValueError("own_out needs deq_out")
    if rot_out is None and not has_side:
        return
    # What attention sees of a non-finite vector: zeros, as the codec stores it.
    fin_k = torch.isfinite(ky).all(-1, keepdim=True)
    fin_v = torch.isfinite(vy).all(-1, keepdim=True)
    if rot_out is not None:
        if token_index is not None:
            raise ValueError("rot_out and token_index are not used together")
        keep = valid[:, None, None]      # padding rows get zeros (the kernel loads them as 0)
        rot_out[0].copy_(torch.where(keep & fin_k, ky, 0))
        rot_out[1].copy_(torch.where(keep & fin_v, vy, 0))
    if not has_side:
        return
    if token_rows is None or token_pos is None or token_seq_end is None:
        raise ValueError("the window side copy needs token_rows, token_pos and token_seq_end")
    w = side.window
    pos = token_pos.long()
    sel = valid & (pos >= token_seq_end.long() - w)
    rows, ring = token_rows.long()[sel], pos[sel] % w
    side.k[rows, ring] = torch.where(fin_k, ky, 0)[sel].to(side.k.dtype)
    side.v[rows, ring] = torch.where(fin_v, vy, 0)[sel].to(side.v.dtype)
    side.tag[rows, ring] = sm[sel].to(torch.int32)
    side.check[rows, ring] = scale_check(p, slots[sel])


# -- reading a sequence's cached K/V ------------------------------------------------------------
def window_start(t, w: int, align: int):
    """First position the query at position t reads exactly: t - w + 1, or the start of t's
    own align-token block if that is later (align 0 = no clip). Works on ints and tensors."""
    lo = t - w + 1
    if align:
        lo = torch.maximum(lo, t // align * align) if torch.is_tensor(t) else max(
            lo, t // align * align)
    return lo


def _gather_kv(p: TQLayerParams, kv_cache, block_table_row, start: int, end: int, row: int,
               seq_len: int, side: TQSide | None):
    """Rotated float32 K, V [end - start, Hkv, D] of positions [start, end) of one sequence,
    taking window side entries (tag- and scale-checked) for the positions the decode query at
    seq_len - 1 reads exactly (window_start on)."""
    block_size = kv_cache.shape[1]
    pos = torch.arange(start, end, device=kv_cache.device)
    blocks = block_table_row.long()[pos // block_size]
    slots = read_slots(kv_cache, p.layout, blocks, pos % block_size)  # [n, Hkv, slot_bytes]
    k, v = decode_slots(p, slots)
    if side is not None and side.window > 0 and end > start:
        w = side.window
        slot_id = blocks * block_size + pos % block_size
        ring = pos % w
        in_win = pos >= window_start(seq_len - 1, w, p.align)
        tag_ok = side.tag[row, ring].long() == slot_id
        check_ok = side.check[row, ring] == scale_check(p, slots)      # [n, Hkv]
        use = (in_win & tag_ok)[:, None] & check_ok                     # [n, Hkv]
        k = torch.where(use[..., None], side.k[row, ring].float(), k)
        v = torch.where(use[..., None], side.v[row, ring].float(), v)
    return k, v


def _attend(q_rot, k, v, scale, mask=None):
    """q_rot [Hkv, G, M, D], k/v [N, Hkv, D] -> rotated output [Hkv, G, M, D] (float32)."""
    s = torch.einsum("kgmd,nkd->kgmn", q_rot, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    prob = torch.softmax(s, dim=-1)
    return torch.einsum("kgmn,nkd->kgmd", prob, v)


# -- decode -----------------------------------------------------------------------------------
def tq_decode_ref(query: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, params, scale: float,
                  side: TQSide | None = None) -> torch.Tensor:
    """One new token per sequence attends to its whole cache (packed, + window side).

    query [B, Hq, D] float16/bfloat16/float32; block_table int32 [B, max_blocks];
    seq_lens int32 [B] (0 = padding row -> zeros). Returns [B, Hq, D] in query.dtype.
    """
    p = as_params(params, query.device)
    bsz, hq, d = query.shape
    hkv = kv_cache.shape[2]
    g = hq // hkv
    out = torch.zeros(bsz, hq, d, dtype=torch.float32, device=query.device)
    lens = seq_lens.tolist()
    for b in range(bsz):
        n = int(lens[b])
        if n <= 0:
            continue
        k, v = _gather_kv(p, kv_cache, block_table[b], 0, n, b, n, side)
        q_rot = (query[b].float() @ p.rotation.T).reshape(hkv, g, 1, d)
        o = _attend(q_rot, k, v, scale)                               # [Hkv, G, 1, D]
        out[b] = o.reshape(hq, d) @ p.rotation
    return out.to(query.dtype)


# -- prefill ----------------------------------------------------------------------------------
def _window_side(p: TQLayerParams, kv_cache, block_table_row, start: int, end: int, row: int,
                 side: TQSide):
    """Window side entries of positions [start, end) of one sequence: rotated float32 K, V
    [n, Hkv, D] and use [n, Hkv] (the ring holds that very slot: tag and scale bytes match)."""
    block_size = kv_cache.shape[1]
    pos = torch.arange(start, end, device=kv_cache.device)
    blocks = block_table_row.long()[pos // block_size]
    slots = read_slots(kv_cache, p.layout, blocks, pos % block_size)
    ring = pos % side.window
    tag_ok = side.tag[row, ring].long() == blocks * block_size + pos % block_size
    use = tag_ok[:, None] & (side.check[row, ring] == scale_check(p, slots))
    return side.k[row, ring].float(), side.v[row, ring].float(), use


def tq_prefill_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, kv_cache: torch.Tensor,
                   block_table: torch.Tensor, params, scale: float,
                   side: TQSide | None = None, rotated: bool = False) -> torch.Tensor:
    """Chunked prefill with the decode step's precision policy: the query at position t reads
    key/value j <= t exactly iff j >= window_start(t) (j > t - W, W = side.window, 0 without a
    side; and j // A == t // A with params.align A), else from its packed slot. So a prompt
    gives the same attention whether it arrives in one chunk, in many, or token by token
    (decode), and what the evaluator measures is what is served.

    Exact copies: the chunk's own K/V (key, value); for prefix positions, the window side
    entries (tag- and scale-checked; a missing one falls back to the packed slot). The chunk's
    tokens must already be stored in kv_cache (the backend stores before it attends) and the
    side must not yet hold them (the backend writes their side entries after attending, so the
    previous chunk's newest tokens are still there).

    query [T, Hq, D]; key, value [T, Hkv, D] (the chunk's own, unquantized; with rotated=True
    already rotated, x @ R.T, as the store's rot_out gives them);
    cu_seqlens_q int32 [B+1]; seq_lens int32 [B] = prefix + chunk length.
    Returns [T, Hq, D] in query.dtype. A fresh prefill is prefix = 0.
    """
    p = as_params(params, query.device)
    t, hq, d = query.shape
    hkv = key.shape[1]
    g = hq // hkv
    w = side.window if side is not None else 0
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=query.device)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s0, s1 = int(cu[b]), int(cu[b + 1])
        m = s1 - s0
        if m <= 0:
            continue
        n = int(lens[b])
        prefix = n - m
        kq, vq = _gather_kv(p, kv_cache, block_table[b], 0, n, b, n, None)   # packed [n, Hkv, D]
        ke, ve = kq.clone(), vq.clone()
        have = torch.zeros(n, hkv, dtype=torch.bool, device=query.device)
        ke[prefix:] = key[s0:s1].float() if rotated else key[s0:s1].float() @ p.rotation.T
        ve[prefix:] = value[s0:s1].float() if rotated else value[s0:s1].float() @ p.rotation.T
        have[prefix:] = True
        first = max(0, prefix - w + 1)
        if w > 0 and first < prefix:
            sk, sv, use = _window_side(p, kv_cache, block_table[b], first, prefix, b, side)
            ke[first:prefix] = torch.where(use[..., None], sk, ke[first:prefix])
            ve[first:prefix] = torch.where(use[..., None], sv, ve[first:prefix])
            have[first:prefix] = use
        qpos = torch.arange(prefix, n, device=query.device)
        kj = torch.arange(n, device=query.device)
        causal = kj[None, :] <= qpos[:, None]                               # [M, N]
        recent = kj[None, :] >= window_start(qpos, w, p.align)[:, None]     # [M, N]
        exact = recent[None] & have.T[:, None, :]                           # [Hkv, M, N]
        q_rot = (query[s0:s1].float() @ p.rotation.T)                       # [M, Hq, D]
        q_rot = q_rot.reshape(m, hkv, g, d).permute(1, 2, 0, 3)              # [Hkv, G, M, D]
        s_q = torch.einsum("kgmd,nkd->kgmn", q_rot, kq)
        s_e = torch.einsum("kgmd,nkd->kgmn", q_rot, ke)
        s = torch.where(exact[:, None], s_e, s_q) * scale
        s = s.masked_fill(~causal, float("-inf"))
        prob = torch.softmax(s, dim=-1)
        sel = exact[:, None].to(prob.dtype)
        o = (torch.einsum("kgmn,nkd->kgmd", prob * sel, ve)
             + torch.einsum("kgmn,nkd->kgmd", prob * (1 - sel), vq))         # [Hkv, G, M, D]
        out[s0:s1] = o.permute(2, 0, 1, 3).reshape(m, hq, d) @ p.rotation
    return out.to(query.dtype)


# -- the chunks' own packed keys, as FlashAttention runs them -------------------------------------
def own_attention_ref(q_rot: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What tq_prefill's `own` takes, computed in torch: the FlashAttention call of
    backend/own_attention.py (varlen, causal, bottom-right aligned, softmax scale ln 2).

    q_rot [T, Hq, D]: rotated, prescaled queries (decode.rotate_query); own_k, own_v
    [T_own, Hkv, D]: request b's first K_b = max(P_b + L_b - window, 0) positions
    dequantized (P_b cached prefix tokens from tq_unpack_pages, then the chunk's own from
    tq_store's own_out; P_b = 0 for the chunks' own keys alone), at rows
    cu_seqlens_k[b]..cu_seqlens_k[b + 1]; cu_seqlens_q int32 [B + 1]. Query i of chunk b
    (position P_b + i) attends key rows j <= i + K_b - L_b, i.e. positions <= its own minus
    window (window itself is implied by the key counts). Returns (out [T, Hq, D] in q_rot's
    dtype, lse [Hq, T] float32: natural log-sum-exp, +inf for a row without keys, as
    FlashAttention reports it; out 0 there)."""
    t, hq, d = q_rot.shape
    g = hq // own_k.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float32, device=q_rot.device)
    lse = torch.full((hq, t), float("inf"), dtype=torch.float32, device=q_rot.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = int(cq[b]), int(cq[b + 1]), int(ck[b]), int(ck[b + 1])
        if q1 <= q0 or k1 <= k0:
            continue
        q = q_rot[q0:q1].float()
        k = own_k[k0:k1].float().repeat_interleave(g, dim=1)
        v = own_v[k0:k1].float().repeat_interleave(g, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, k) * math.log(2.0)
        # causal, aligned bottom-right as FlashAttention's: query i sees key j <= i + K - L
        # (K = L - window for the own keys alone: j <= i - window)
        i = torch.arange(q1 - q0, device=q.device)[:, None]
        j = torch.arange(k1 - k0, device=q.device)[None, :]
        s = s.masked_fill(~(j <= i + (k1 - k0) - (q1 - q0)), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)                                   # [H, q]
        has = torch.isfinite(row_lse)
        p = torch.where(has[..., None], torch.exp(s - row_lse[..., None]), 0.0)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", p, v)
        lse[:, q0:q1] = torch.where(has, row_lse, float("inf"))
    return out.to(q_rot.dtype), lse


def tq_unpack_pages_ref(kv_cache: torch.Tensor, block_table: torch.Tensor, req: torch.Tensor,
                        pos: torch.Tensor, dst: torch.Tensor, params, out_k: torch.Tensor,
                        out_v: torch.Tensor) -> None:
    """What kernels/unpack.tq_unpack_pages writes: token r (position pos[r] of request req[r])
    dequantized into out_k / out_v [rows, Hkv, D] at row dst[r] (skipped where < 0), as C[code] * scale with the
    centroid first rounded to the output dtype and the product rounded once (tq_store's
    own_out values)."""
    p = as_params(params, kv_cache.device)
    if req.numel() == 0:
        return
    keep = dst >= 0
    req, pos, dst = req[keep], pos[keep], dst[keep]
    lay, d, bs = p.layout, p.head_size, kv_cache.shape[1]
    pos64 = pos.long()
    blocks = block_table.long()[req.long(), pos64 // bs]
    slots = read_slots(kv_cache, lay, blocks, pos64 % bs)           # [R, Hkv, slot_bytes]
    dt = out_k.dtype
    kc = unpack_codes(slots[..., :lay.k_code_bytes], p.key_bits, d)
    vc = unpack_codes(slots[..., lay.v_codes_offset:lay.k_scale_offset], p.value_bits, d)
    ks = slots[..., lay.k_scale_offset:lay.k_scale_offset + 2].contiguous().view(torch.float16)
    vs = slots[..., lay.v_scale_offset:lay.v_scale_offset + 2].contiguous().view(torch.float16)
    k = p.key_centroids.to(dt).float()[kc] * ks.float()
    v = p.value_centroids.to(dt).float()[vc] * vs.float()
    out_k[dst.long()] = k.to(dt)
    out_v[dst.long()] = v.to(dt)
