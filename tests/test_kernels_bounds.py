"""Every Triton kernel's loads and stores stay inside its tensor arguments (interpreter).

The 2026-11-23 H100 runs faulted ("illegal memory access") in the prefill kernel at head 128
with a 64-token window (benchmarks/results/gpu-tests-H100-20261123c.log). These tests replay
that case, and the other kernels' window paths, with tests/interp_sanitizer.check_bounds: every
unmasked lane of every load and store must fall inside one of the launch's tensor arguments.
They pass, so the fault is not in the kernels' address arithmetic as written; see
docs/kernels-notes.md ("Head-128 window fault").
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from interp_sanitizer import check_bounds  # noqa: E402
from test_kernels_triton import _chunk_deq, make_params, paged  # noqa: E402

from vllm_turboquant.kernels import TQSide  # noqa: E402
from vllm_turboquant.kernels.decode import tq_decode  # noqa: E402
from vllm_turboquant.kernels.prefill import tq_prefill  # noqa: E402
from vllm_turboquant.kernels.store import tq_store  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _setup(d, hq, hkv, w, lens, qlens, dtype=torch.bfloat16):
    codec, params = make_params("turboquant", d=d, window=w)
    side = TQSide.empty(len(lens), w, hkv, d, dtype)
    cache, bt, seqs = paged(lens, hkv, d, 16, params, dtype, side=side)
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d).to(dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    return params, side, cache, bt, k, v, q, cu, sl


@pytest.mark.parametrize("d,hq,hkv,w", [(128, 8, 4, 64), (128, 8, 2, 64), (64, 9, 3, 16)])
def test_prefill_and_decode_in_bounds(d, hq, hkv, w):
    lens, qlens = [200, 129, 70, 64], [100, 129, 17, 1]
    params, side, cache, bt, k, v, q, cu, sl = _setup(d, hq, hkv, w, lens, qlens)
    deq = _chunk_deq(k, v, cu, sl, bt, 16, params, torch.bfloat16, cache)
    with check_bounds():
        tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side)
        tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, deq=deq, deq_stages=2)
        tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, invariant=True)
        tq_decode(q[:4], cache, bt, sl, params, d ** -0.5, side, num_splits=3)


def test_store_paths_in_bounds():
    d, hkv, w, t = 128, 2, 64, 40
    codec, params = make_params("turboquant", d=d, window=w)
    k = torch.randn(t, hkv, d).to(torch.bfloat16)
    v = torch.randn(t, hkv, d).to(torch.bfloat16)
    cache = torch.zeros(4, 16, hkv, params.layout.slot_bytes, dtype=torch.uint8)
    side = TQSide.empty(2, w, hkv, d, torch.bfloat16)
    slots = torch.arange(t)
    rows = torch.zeros(t, dtype=torch.int32)
    pos = torch.arange(t, dtype=torch.int32)
    end = torch.full((t,), t, dtype=torch.int32)
    rot = torch.empty(2, t, hkv, d, dtype=torch.bfloat16)
    idx = torch.tensor([39, 38, 0])
    with check_bounds():
        tq_store(k, v, cache, slots, params, side, rows, pos, end, rot_out=(rot[0], rot[1]))
        tq_store(k, v, cache, slots, params, rot_out=(rot[0], rot[1]),
                 deq_out=(torch.empty_like(rot[0]), torch.empty_like(rot[1]),
                          torch.empty(t, hkv, dtype=torch.int32)))
        tq_store(k, v, cache, torch.tensor([39, 38, -1]), params, side, rows[:3], pos[:3],
                 end[:3], token_index=idx)


def test_the_checker_catches_an_out_of_bounds_read():
    """A side copy with one row while four sequences attend: row 3's ring is out of range."""
    lens, qlens = [40, 20, 30, 9], [10, 20, 5, 1]
    params, side, cache, bt, k, v, q, cu, sl = _setup(64, 4, 2, 8, lens, qlens)
    short = TQSide(*(x[:1].clone() for x in side))
    with pytest.raises(Exception, match="out-of-bounds"):
        with check_bounds():
            tq_prefill(q, k, v, cu, sl, cache, bt, params, 0.125, short)
