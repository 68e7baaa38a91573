"""The mixed steps' workspace (backend/workspace.py): one zeroed set per device, grown when a
step needs more, its views made once per step and shared by the step's layers, allocated in
vLLM's profiling run so the memory profile counts it."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

pytest.importorskip("vllm")

from vllm_turboquant.backend import workspace as ws  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh():
    ws.clear_workspaces()
    yield
    ws.clear_workspaces()


def test_one_zeroed_set_per_device_grown_on_demand():
    a = ws.workspace("cpu", torch.bfloat16, 3, 64, planes=4, tokens=32)
    assert a.planes.shape == (4, 32, 3, 64) and a.words.shape == (32, 3) and a.own is None
    assert not a.planes.any() and not a.words.any()
    a.planes.fill_(1.0)
    # a smaller request is served by the same buffers (no allocation per step)
    assert ws.workspace("cpu", torch.bfloat16, 3, 64, planes=2, tokens=8) is a
    # more tokens, planes or prefix rows: a new zeroed set covering the old one too
    b = ws.workspace("cpu", torch.bfloat16, 3, 64, planes=2, tokens=40, own_rows=16)
    assert b is not a and b.planes.shape == (4, 40, 3, 64) and b.own.shape == (2, 16, 3, 64)
    assert not b.planes.any()
    c = ws.workspace("cpu", torch.bfloat16, 3, 64, planes=6, tokens=8)
    assert c.planes.shape == (6, 40, 3, 64) and c.own.shape == (2, 16, 3, 64)
    # another dtype or head shape is another workspace
    assert ws.workspace("cpu", torch.float16, 3, 64, planes=2, tokens=8) is not c
    assert ws.workspace("cpu", torch.bfloat16, 2, 64, planes=2, tokens=8) is not c


def _md(t, nd, own_index=None, own_prefix=False, own_rows=0, b=3):
    return types.SimpleNamespace(
        num_actual_tokens=t, num_decodes=nd, own_index=own_index, own_prefix=own_prefix,
        own_rows=own_rows, views=None, block_table=torch.zeros(b, 5, dtype=torch.int32),
        seq_lens=torch.arange(b, dtype=torch.int32))


def test_step_views_are_made_once_per_step_and_point_into_the_workspace():
    md = _md(t=10, nd=2, own_index=torch.zeros(10, dtype=torch.int32))
    sv = ws.step_views(md, torch.bfloat16, 3, 64, "cpu", with_deq=True, split=True)
    assert ws.step_views(md, torch.bfloat16, 3, 64, "cpu", with_deq=True, split=True) is sv
    planes = ws.workspace("cpu", torch.bfloat16, 3, 64, planes=6, tokens=10).planes
    assert planes.shape[0] == 6                 # rot, deq and FlashAttention's copy
    for i, x in enumerate((*sv.rot, *sv.deq[:2], *sv.own_kv)):
        assert x.shape == (10, 3, 64) and x.data_ptr() == planes[i].data_ptr()
    # the split path's rows: decodes [:2], chunks [2:]
    assert sv.dec_block_table.shape[0] == 2 and sv.pre_seq_lens.tolist() == [2]
    assert sv.pre_rot[0].data_ptr() == sv.rot[0][2:].data_ptr()
    assert len(sv.pre_deq) == 3 and sv.pre_deq[2].shape == (8, 3)
    # another kind of step (no deq, one launch): other views of the same workspace
    other = ws.step_views(md, torch.bfloat16, 3, 64, "cpu", with_deq=False, split=False)
    assert other is not sv and other.deq is None and other.own_kv is None
    assert other.pre_rot is None and other.dec_block_table is None
    # own_prefix: FlashAttention's copy is the prefix buffer, md.own_rows rows
    md2 = _md(t=10, nd=0, own_index=torch.zeros(10, dtype=torch.int32), own_prefix=True,
              own_rows=25)
    sv2 = ws.step_views(md2, torch.bfloat16, 3, 64, "cpu", with_deq=True, split=False)
    assert sv2.own_kv[0].shape == (25, 3, 64)
    assert not sv2.own_kv[0].any() and not sv2.own_kv[1].any()


def test_profiling_run_allocates_the_workspace_for_the_largest_step():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_backend_forward as tb
    from vllm_turboquant.plugin import register

    register()
    h = tb.Harness(4)
    tokens = h.vc.scheduler_config.max_num_batched_tokens
    assert not ws._WORKSPACES
    n = 5
    out = torch.full((n, tb.HQ * tb.D), float("nan"))
    h.impl.forward(h.layer, torch.randn(n, tb.HQ * tb.D), torch.randn(n, tb.HKV * tb.D),
                   torch.randn(n, tb.HKV * tb.D), h.kv_cache, None, output=out)
    assert not out.any()                        # profiling: zeros out, no attention
    (w,) = ws._WORKSPACES.values()
    # the CPU build: the rotated K/V planes only (no deq copy, no FlashAttention)
    assert w.planes.shape == (2, tokens, tb.HKV, tb.D) and w.planes.dtype == torch.float32
    # a step then uses it without allocating
    h.step([("A", 6), ("B", 5)])
    assert len(ws._WORKSPACES) == 1 and next(iter(ws._WORKSPACES.values())) is w
