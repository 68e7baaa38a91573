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
    """Per step kind: Triton launches and aten ops of one layer's forward, for the step's
    first layer ("<kind>_first_layer", which makes the step's workspace views) and for the
    others ("<kind>"). Kinds: decode-only, mixed (one prefill launch), mixed_split (decodes
    through the split-KV kernel), and both mixed kinds with the chunks' own keys through
    FlashAttention (_own; its torch stand-in counted as one launch, "flash_attn")."""
    sys.path.insert(0, tests_dir)
    import test_backend_forward as tb
    import triton.runtime.interpreter as it
    from torch.utils._python_dispatch import TorchDispatchMode

    from vllm_turboquant.backend import own_attention
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

    def uncounted(name, fn):               # a launch: its own torch work is not counted
        def wrapped(*a, **k):
            launches[name] += 1
            mode.paused += 1
            try:
                return fn(*a, **k)
            finally:
                mode.paused -= 1
        return wrapped

    run = it.InterpretedFunction.run
    it.InterpretedFunction.run = lambda self, *a, **k: uncounted(self.fn.__name__, run)(
        self, *a, **k)
    own_attention.attend = uncounted("flash_attn", own_attention.attend)
    result = {}
    for split, own in ((False, False), (True, False), (False, True), (True, True)):
        h = tb.Harness(4)
        if split:
            h.impl.split_decode_ctx = 0
        if own:
            h.builder.own_fa, h.builder.own_min_query = True, 2
        forward = h.impl.forward
        h.step([("A", 6), ("B", 5)])
        kinds = [("mixed", [("A", 1), ("B", 7)])]
        if not split and not own:
            kinds.append(("decode", [("A", 1), ("B", 1)]))
        for kind, batch in kinds:
            kind += "_split" * split + "_own" * own
            counts = []

            def fwd(*a, **k):
                # twice on the step's metadata: its first layer, then the others (which reuse
                # the first one's workspace views, backend/workspace.py)
                for _ in range(2):
                    mode.ops.clear()
                    launches.clear()
                    with mode:
                        res = forward(*a, **k)
                    compute = {k: v for k, v in mode.ops.items() if k not in VIEW_OPS}
                    counts.append({"launches": dict(launches), "aten_ops": dict(mode.ops),
                                   "compute_ops": compute})
                return res

            h.impl.forward = fwd
            h.step(batch)
            h.impl.forward = forward
            result[kind + "_first_layer"], result[kind] = counts
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
    # every mixed kind: no allocation, fill or plane select of its own buffers, in the step's
    # first layer (it only takes views of the device's workspace, backend/workspace.py) or
    # in the others (they reuse those views); before 2026-12-04 each layer allocated them and
    # zeroed FlashAttention's copy (2 allocations, a fill and 6-8 selects per layer)
    own = {"flash_attn": 1}
    for kind, launches, empties in (
            ("mixed", {}, 0), ("mixed_own", own, 0),
            # the split-KV decode kernel's partial results: its launcher's 2 allocations
            ("mixed_split", {"_tq_decode_split_kernel": 1}, 2),
            ("mixed_split_own", {"_tq_decode_split_kernel": 1, **own}, 2)):
        for layer in (kind + "_first_layer", kind):
            r = res[layer]
            assert r["launches"] == {"_tq_store_kernel": 2, "_tq_prefill_kernel": 1,
                                     **launches}, (layer, r)
            assert r["compute_ops"] == {"aten.addmm": 1}, (layer, r)
            assert r["aten_ops"].get("aten.empty", 0) == empties, (layer, r)
        # the other layers make no views of the workspace or the step's metadata either:
        # the 4 slices of q/k/v/output to the step's tokens, the split path's 4 of q and
        # output at the decodes' end, 1 in the decode launcher
        assert res[kind]["aten_ops"].get("aten.select", 0) == 0, (kind, res[kind])
        assert res[kind]["aten_ops"]["aten.slice"] == (9 if "split" in kind else 4), (
            kind, res[kind])


def test_host_forward_benchmark_times_every_kind(tmp_path):
    """benchmarks/host_forward.py (the CPU proxy of the forward's host time) runs on this
    tree and reports both layer figures for every step kind."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "hf.json"
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "host_forward.py"),
                           "--reps", "3", "--json", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())["forward_us_launches_stubbed"]
    build = res.pop("build_decode_16")
    assert set(res) == {"mixed", "mixed_split", "mixed_own", "mixed_split_own", "decode"}
    assert all(v["first_layer_us"] > 0 and v["other_layers_us"] > 0 for v in res.values())
    assert build["us"] > 0


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
