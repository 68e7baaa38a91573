"""Host work of one TurboQuant layer forward: kernel launches and torch ops, counted on CPU.

Mixed prefill+decode steps run attention eagerly (vLLM captures only pure-decode batches in
FULL CUDA graphs), so every launch and torch op there is paid on the host, per layer, per
step. The H100 profile of 2026-11-23 (benchmarks/results/profile-H100-20261123/) measured
2.6 ms of host time per layer call in such steps (6 Triton launches and 20 small torch
kernels: casts, four rotation matmuls, six index gathers, ...). This pins the
leaner forward (3 launches and 1 GEMM per mixed layer step since 2026-12-02): counts are
taken through the Triton launchers under the interpreter
(VLLM_TURBOQUANT_FORCE_TRITON=1, the CUDA code path) in a subprocess. To print them, for
this checkout or another one (e.g. a `git worktree` of an older commit, with this file's
harness):

    VLLM_TURBOQUANT_FORCE_TRITON=1 TRITON_INTERPRET=1 python tests/test_host_ops.py [--tree DIR]
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("triton")

# aten ops that only make views (no kernel launch on a GPU)
VIEW_OPS = {"aten.slice", "aten.view", "aten.select", "aten.transpose", "aten.permute",
            "aten._unsafe_view", "aten.as_strided", "aten.reshape", "aten.alias",
            "aten.expand", "aten.empty"}


def _use_tree(tree: str) -> None:
    """Import vllm_turboquant (and its kernels/) from another checkout."""
    import importlib.util

    for name, path in (("vllm_turboquant", "vllm_turboquant"),
                       ("vllm_turboquant.kernels", "kernels")):
        folder = os.path.join(tree, path)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def count(tests_dir: str = os.path.dirname(os.path.abspath(__file__))) -> dict:
    """Per step kind: Triton launches and aten ops of one layer's forward."""
    sys.path.insert(0, tests_dir)
    import test_backend_forward as tb
    import triton.runtime.interpreter as it
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_turboquant.plugin import register

    register()

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.paused = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self.paused:
                self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    mode, launches = Ops(), collections.Counter()
    run = it.InterpretedFunction.run

    def counted_run(self, *a, **k):       # the interpreter's own torch work is not counted
        launches[self.fn.__name__] += 1
        mode.paused += 1
        try:
            return run(self, *a, **k)
        finally:
            mode.paused -= 1

    it.InterpretedFunction.run = counted_run
    h = tb.Harness(4)
    forward = h.impl.forward
    h.step([("A", 6), ("B", 5)])
    result = {}
    for kind, batch in (("mixed", [("A", 1), ("B", 7)]), ("decode", [("A", 1), ("B", 1)])):
        mode.ops.clear()
        launches.clear()

        def fwd(*a, **k):
            with mode:
                return forward(*a, **k)

        h.impl.forward = fwd
        h.step(batch)
        h.impl.forward = forward
        compute = {k: v for k, v in mode.ops.items() if k not in VIEW_OPS}
        result[kind] = {"launches": dict(launches), "aten_ops": dict(mode.ops),
                        "compute_ops": compute}
    return result


def _run_counter() -> dict:
    env = dict(os.environ, VLLM_TURBOQUANT_FORCE_TRITON="1", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_layer_forward_launches_and_torch_ops():
    res = _run_counter()
    mixed, decode = res["mixed"], res["decode"]
    # mixed: one store, one prefill-kernel launch for decodes and chunks alike, the chunks'
    # window entries (was 5 launches and 2 rotations: decodes took the split + merge kernels)
    assert sum(mixed["launches"].values()) == 3, mixed
    assert mixed["launches"]["_tq_store_kernel"] == 2, mixed
    assert mixed["launches"]["_tq_prefill_kernel"] == 1, mixed
    # torch compute: only the query rotation (one addmm)
    assert mixed["compute_ops"] == {"aten.addmm": 1}, mixed
    # decode-only (what a FULL CUDA graph captures): the store and one decode launch that
    # rotates the query and merges its splits itself (was: + merge kernel + rotation addmm);
    # nothing else computes (the split counters were allocated when the layer state was)
    assert decode["launches"] == {"_tq_store_kernel": 1, "_tq_decode_split_kernel": 1}, decode
    assert decode["compute_ops"] == {}, decode

if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--tree", help="count another checkout's forward (its tests/ harness)")
    args = ap.parse_args()
    if args.tree:
        _use_tree(args.tree)
        print(json.dumps(count(os.path.join(args.tree, "tests"))))
    else:
        print(json.dumps(count()))
