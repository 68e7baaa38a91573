"""The chunks' own packed keys through vLLM's FlashAttention (backend/own_attention.py) on a
CUDA GPU: FlashAttention's (out, lse) against the torch stand-in, rows without keys included,
and the prefill kernel merging it with the rest against the deq-copy path and the reference.

Run on the device machine with the vLLM bundle: `pytest -m gpu tests/gpu/test_own_attention_gpu.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # collected in CI, never run there
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_kernels_gpu import DEV, _paged, _params, _rel_err  # noqa: E402

from vllm_turboquant import compat  # noqa: E402
from vllm_turboquant.backend import own_attention  # noqa: E402
from vllm_turboquant.kernels import TQSide  # noqa: E402
from vllm_turboquant.kernels.decode import rotate_query  # noqa: E402
from vllm_turboquant.kernels.prefill import tq_prefill  # noqa: E402
from vllm_turboquant.kernels.reference import own_attention_ref, tq_prefill_ref  # noqa: E402
from vllm_turboquant.kernels.store import tq_store  # noqa: E402


@pytest.fixture
def flash():
    """own_attention.attend through vLLM's FlashAttention (skips where there is none)."""
    if compat.flash_attn_varlen() is None:
        pytest.skip("vLLM's FlashAttention is not available here")
    return own_attention.attend


def _torch_attend(q_rot, own_k, own_v, cu_q, cu_k, max_query_len, window):
    """The same contract in torch (what own_attention.attend runs off CUDA)."""
    return own_attention_ref(q_rot, own_k, own_v, cu_q, cu_k, window)


def _cu(lens, window):
    q = torch.tensor([0] + lens, device=DEV).cumsum(0).int()
    k = torch.tensor([0] + [max(n - window, 0) for n in lens], device=DEV).cumsum(0).int()
    return q, k


@pytest.mark.parametrize("window", [0, 64])
def test_flash_matches_the_reference_rows_without_keys_included(window, flash):
    lens = [300, 1, 70, 1, 2000, 64]          # decodes (1 token) and chunks <= W have no keys
    cu_q, cu_k = _cu(lens, window)
    t, n_k = int(cu_q[-1]), int(cu_k[-1])
    q = (torch.randn(t, 9, 64, device=DEV) * 0.5).to(torch.bfloat16)
    k = torch.randn(max(n_k, 1), 3, 64, device=DEV).to(torch.bfloat16)
    v = torch.randn(max(n_k, 1), 3, 64, device=DEV).to(torch.bfloat16)
    out, lse = flash(q, k, v, cu_q, cu_k, max(lens), window)
    want, want_lse = own_attention_ref(q, k, v, cu_q, cu_k, window)
    assert out.shape == want.shape and lse.shape == want_lse.shape
    has = torch.isfinite(want_lse)
    assert bool(has.any()) and bool((~has).any()) == (window > 0)
    assert torch.equal(torch.isfinite(lse), has), "rows without keys must report a non-finite lse"
    torch.testing.assert_close(lse[has], want_lse[has], atol=2e-2, rtol=1e-3)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    empty = (~has).T                                                     # [T, Hq]
    assert bool((out[empty] == 0).all())


def mixed_step(preset, window, align, own_fill=0.0, lens=(2500, 1500, 130),
               qlens=(2000, 1500, 1), d=64, hq=9, hkv=3, bs=128, dtype=torch.bfloat16):
    """The backend's mixed step at a realistic size (a continuation chunk over a packed
    prefix, a fresh prompt, a decode), stored through tq_store with rot/deq/own outputs into
    one buffer: NaN-filled (nothing may read an unwritten row), its own-copy planes set to
    `own_fill` first (0.0 as the backend does: FlashAttention's last key tile reads past the
    written rows). Returns the prefill's arguments as a namespace."""
    lens, qlens = list(lens), list(qlens)
    _, params = _params(preset, d, window=window, align=align)
    side = TQSide.empty(len(lens), window, hkv, d, dtype, DEV) if window else None
    cache, bt, seqs = _paged(lens, hkv, d, bs, params, dtype, side=side)
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d, device=DEV).to(dtype)
    cu, cu_k = _cu(qlens, window)
    t = k.shape[0]
    own_idx = torch.full((t,), -1, dtype=torch.int32, device=DEV)
    slots = torch.empty(t, dtype=torch.long, device=DEV)
    for b, (n, m) in enumerate(zip(lens, qlens)):
        pos = torch.arange(n - m, n, device=DEV)
        slots[int(cu[b]):int(cu[b + 1])] = bt[b].long()[pos // bs] * bs + pos % bs
        keys = max(m - window, 0)
        own_idx[int(cu[b]):int(cu[b]) + keys] = torch.arange(keys, device=DEV,
                                                             dtype=torch.int32) + int(cu_k[b])
    buf = torch.full((6, t, hkv, d), float("nan"), dtype=dtype, device=DEV)
    buf[4:].fill_(own_fill)
    words = torch.empty(t, hkv, dtype=torch.int32, device=DEV)
    deq = (buf[2], buf[3], words)
    tq_store(k, v, cache, slots, params, rot_out=(buf[0], buf[1]), deq_out=deq,
             own_out=(buf[4], buf[5], own_idx))
    scale = d ** -0.5
    return SimpleNamespace(
        q=q, k_rot=buf[0], v_rot=buf[1], own_k=buf[4], own_v=buf[5], deq=deq, cu=cu,
        cu_k=cu_k, seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEV), cache=cache,
        bt=bt, params=params, scale=scale, side=side, window=window, max_query_len=max(qlens),
        q_rot=rotate_query(q, params, scale))


def prefill(st, own=None, **launch):
    """tq_prefill over a mixed_step, with the own part `own` (FlashAttention's (out, lse))."""
    return tq_prefill(st.q, st.k_rot, st.v_rot, st.cu, st.seq_lens, st.cache, st.bt,
                      st.params, st.scale, st.side, max_query_len=st.max_query_len,
                      rotated=True, deq=st.deq, own=own,
                      q_rotated=None if own is None else st.q_rot, **launch)


@pytest.mark.parametrize("attend", ["flash", "torch"])
@pytest.mark.parametrize("preset,window,align", [("turboquant", 64, 128), ("tq-k4v4", 0, 0)])
def test_prefill_with_flash_own_part_matches_the_deq_path(preset, window, align, attend,
                                                           request):
    """store (own_out) + FlashAttention + prefill on mixed_step against the deq-copy path and
    the reference (the own part merged after the loops). The first version returned NaN here
    with the aligned window on the H200 (2026-12-03): its copy was not zeroed past the written
    rows. "torch": the own part from the torch stand-in, so the kernels are checked on a GPU
    without vLLM too."""
    attend = request.getfixturevalue("flash") if attend == "flash" else _torch_attend
    st = mixed_step(preset, window, align)
    own = attend(st.q_rot, st.own_k, st.own_v, st.cu, st.cu_k, st.max_query_len, window)
    got = prefill(st, own)
    base = prefill(st)
    want = tq_prefill_ref(st.q, st.k_rot, st.v_rot, st.cu, st.seq_lens, st.cache, st.bt,
                          st.params, st.scale, st.side, rotated=True)
    assert bool(torch.isfinite(base).all()) and bool(torch.isfinite(got).all())
    assert _rel_err(got, base) < 1e-2, _rel_err(got, base)
    assert _rel_err(got, want) < 2e-2, _rel_err(got, want)


@pytest.mark.parametrize("attend", ["flash", "torch"])
@pytest.mark.parametrize("preset,window,align", [("turboquant", 64, 128), ("tq-k4v4", 0, 0)])
def test_prefill_with_the_prefix_through_flash_matches_the_reference(preset, window, align,
                                                                     attend, request):
    """own_prefix (backend/metadata.py): the continuation chunks' cached prefixes unpacked by
    tq_unpack_pages (bit for bit the reference's values) into the copy beside the chunks' own
    keys, FlashAttention over every key j <= t - W, the prefill kernel adds only the window's
    part. Against the reference and the kernel-only path; a chunk shorter than the window
    (its copy stops inside the prefix) included."""
    from vllm_turboquant.kernels.reference import tq_unpack_pages_ref
    from vllm_turboquant.kernels.unpack import tq_unpack_pages

    attend = request.getfixturevalue("flash") if attend == "flash" else _torch_attend
    d, hq, hkv, bs, dtype = 64, 9, 3, 128, torch.bfloat16
    lens, qlens = [2500, 1500, 3000, 900], [2000, 1500, 40, 300]
    _, params = _params(preset, d, window=window, align=align)
    side = TQSide.empty(len(lens), window, hkv, d, dtype, DEV) if window else None
    cache, bt, seqs = _paged(lens, hkv, d, bs, params, dtype, side=side)
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d, device=DEV).to(dtype)
    cu = torch.tensor([0] + qlens, device=DEV).cumsum(0).int()
    keys = [max(n - window, 0) for n in lens]                 # copy rows per request
    cu_k = torch.tensor([0] + keys, device=DEV).cumsum(0).int()
    t = k.shape[0]
    own_idx = torch.full((t,), -1, dtype=torch.int32, device=DEV)
    slots = torch.empty(t, dtype=torch.long, device=DEV)
    req, pos, dst = [], [], []
    for b, (n, m) in enumerate(zip(lens, qlens)):
        p = torch.arange(n - m, n, device=DEV)
        slots[int(cu[b]):int(cu[b + 1])] = bt[b].long()[p // bs] * bs + p % bs
        n_pre = min(n - m, keys[b])
        own_n = keys[b] - n_pre
        own_idx[int(cu[b]):int(cu[b]) + own_n] = (torch.arange(own_n, device=DEV) + n_pre
                                                  + int(cu_k[b])).int()
        req += [b] * n_pre
        pos += list(range(n_pre))
        dst += [int(cu_k[b]) + j for j in range(n_pre)]
    i32 = dict(dtype=torch.int32, device=DEV)
    req, pos, dst = (torch.tensor(x, **i32) for x in (req, pos, dst))
    buf = torch.full((4, t, hkv, d), float("nan"), dtype=dtype, device=DEV)
    words = torch.empty(t, hkv, dtype=torch.int32, device=DEV)
    deq = (buf[2], buf[3], words)
    copy = torch.zeros(2, int(cu_k[-1]), hkv, d, dtype=dtype, device=DEV)
    tq_store(k, v, cache, slots, params, rot_out=(buf[0], buf[1]), deq_out=deq,
             own_out=(copy[0], copy[1], own_idx))
    ref = torch.zeros_like(copy)
    tq_unpack_pages_ref(cache, bt, req, pos, dst, params, ref[0], ref[1])
    tq_unpack_pages(cache, bt, req, pos, dst, params, copy[0], copy[1])
    rows = dst.long()
    assert torch.equal(copy[:, rows], ref[:, rows]), "unpacked rows differ from the reference"
    scale = d ** -0.5
    q_rot = rotate_query(q, params, scale)
    seq_lens = torch.tensor(lens, **i32)
    own = attend(q_rot, copy[0], copy[1], cu, cu_k, max(qlens), window) if attend is \
        _torch_attend else own_attention.attend(q_rot, copy[0], copy[1], cu, cu_k, max(qlens),
                                                window, max(lens))
    got = tq_prefill(q, buf[0], buf[1], cu, seq_lens, cache, bt, params, scale, side,
                     max_query_len=max(qlens), rotated=True, deq=deq, own=own,
                     own_prefix=True, q_rotated=q_rot)
    base = tq_prefill(q, buf[0], buf[1], cu, seq_lens, cache, bt, params, scale, side,
                      max_query_len=max(qlens), rotated=True, deq=deq)
    want = tq_prefill_ref(q, buf[0], buf[1], cu, seq_lens, cache, bt, params, scale, side,
                          rotated=True)
    assert bool(torch.isfinite(got).all())
    assert _rel_err(got, base) < 1e-2, _rel_err(got, base)
    assert _rel_err(got, want) < 2e-2, _rel_err(got, want)
