"""Host time of the backend's real layer forward (`TurboQuantImpl.forward`), launches stubbed.

    python benchmarks/host_forward.py [--tree DIR] [--json OUT.json]

The CUDA code path (VLLM_TURBOQUANT_FORCE_TRITON=1) on CPU tensors of the tests' one-layer
harness (tests/test_backend_forward.py: 8 query / 2 KV heads x 16, fp32), with every Triton
launch and FlashAttention's call stubbed out: what remains is the forward's own Python and
torch calls (allocations, fills, views, the query-rotation addmm, our launchers' argument
work), which mixed steps pay per layer on the host (vLLM runs attention eagerly there). Per
step kind (benchmarks/layer_step.py times the same kinds' whole launches on a GPU):
  mixed            2 decodes + a 7-token chunk, one prefill launch;
  mixed_split      the same batch, decodes through the split-KV kernel;
  *_own            the chunks' own keys through FlashAttention (backend/own_attention.py);
  decode           2 decodes (eager; CUDA graphs replay this kind);
  build_decode_16  the metadata builder for 16 decodes (once per step, eager under graphs);
"first layer" times a step's first layer (since 2026-12-04 it makes the step's workspace
views, backend/workspace.py), the plain figure every other layer. Medians in microseconds of
this machine's CPU: a relative measure (old vs new tree on one machine), not a GPU host's
absolute cost. --tree DIR times another checkout (e.g. a `git worktree` of an older commit;
its tests/ harness), so both trees run on the same machine in the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
KINDS = ("mixed", "mixed_split", "mixed_own", "mixed_split_own", "decode")

from host_python import machine, median_us, report  # noqa: E402


def measure(tree: str, reps: int) -> dict:
    """Per kind: median us of one layer's forward (the step's first layer and the others)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    if os.path.abspath(tree) != ROOT:
        import test_host_ops
        test_host_ops._use_tree(tree)
        sys.path.insert(0, os.path.join(tree, "tests"))
    import torch
    import test_backend_forward as tb

    import vllm_turboquant.kernels.decode as dc
    import vllm_turboquant.kernels.prefill as pf
    import vllm_turboquant.kernels.store as st
    from vllm_turboquant.backend import own_attention
    from vllm_turboquant.plugin import register

    register()
    for m in (st, pf, dc):
        m.launch = lambda kernel, grid, *a, **k: None
    try:
        import vllm_turboquant.kernels.unpack as up
        up.launch = lambda kernel, grid, *a, **k: None
    except ImportError:   # trees before kernels/unpack.py
        pass
    own_attention.attend = lambda q_rot, *a, **k: (
        torch.empty_like(q_rot), torch.empty(q_rot.shape[1], q_rot.shape[0]))
    result = {}
    for kind in KINDS:
        h = tb.Harness(4)
        if "split" in kind:
            h.impl.split_decode_ctx = 0
        if "own" in kind:
            h.builder.own_fa, h.builder.own_min_query = True, 2
        h.step([("A", 6), ("B", 5)])
        captured = []
        forward = h.impl.forward
        h.impl.forward = lambda *a, **k: captured.append((a, k)) or forward(*a, **k)
        h.step([("A", 1), ("B", 1)] if kind == "decode" else [("A", 1), ("B", 7)])
        h.impl.forward = forward
        a, k = captured[0]
        md = a[5]

        def first():
            if hasattr(md, "views"):
                md.views = None
            forward(*a, **k)

        result[kind] = {"first_layer_us": round(median_us(first, reps), 1),
                        "other_layers_us": round(median_us(lambda: forward(*a, **k), reps), 1)}
    # the metadata builder, once per step (eager even where CUDA graphs replay the layers)
    result["build_decode_16"] = {"us": round(median_us(_decode_build(tb, torch), reps), 1)}
    return result


def _decode_build(tb, torch):
    """A zero-argument build() of a 16-request decode-only step of the window preset."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    h = tb.Harness(4)
    seq = torch.arange(100, 116, dtype=torch.int32)
    qsl = torch.arange(17, dtype=torch.int32)
    cm = CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl.clone(), seq_lens=seq, num_reqs=16,
        num_actual_tokens=16, max_query_len=1, max_seq_len=115,
        block_table_tensor=torch.zeros(16, 40, dtype=torch.int32),
        slot_mapping=torch.arange(16, dtype=torch.int64))
    return lambda: h.builder.build(0, cm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", default=ROOT, help="the checkout to time (default: this one)")
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.tree, a.reps)))
        return
    # a fresh process per tree: its modules, and the launchers' import-time switch
    env = dict(os.environ, VLLM_TURBOQUANT_FORCE_TRITON="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, __file__, "--child", "--tree", a.tree,
                           "--reps", str(a.reps)], env=env, capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    import torch
    tree = os.path.abspath(a.tree)
    sha = subprocess.run(["git", "-C", tree, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    report({"machine": machine(), "torch": torch.__version__, "tree": tree, "git": sha,
            "forward_us_launches_stubbed": json.loads(proc.stdout.strip().splitlines()[-1])},
           a.json)


if __name__ == "__main__":
    main()
