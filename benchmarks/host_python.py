"""Host cost of our launchers' own Python, and of the direct launch's key, on any machine.

    python benchmarks/host_python.py [--json OUT.json]

1. The ops of one SmolLM2 mixed layer step (benchmarks/layer_step.py's, CPU tensors, small
   shapes) with every kernel launch stubbed out: what remains is our launchers' Python and
   their torch calls (on a CPU the query rotation GEMM really computes, so `unified_prefill`
   includes a small CPU matmul); also the own-keys path's ops (CUDA-only in the backend) with
   the FlashAttention call stubbed as well.
2. kernels/_launch.py's cache key over 37 arguments (24 tensors, 13 scalars, the size of a
   launch) vs Triton's native per-argument specialization over the same arguments, which
   `JITFunction.run` calls on every launch.
Medians in microseconds. This does not measure Triton's C launcher or the CUDA driver (no GPU
needed); benchmarks/layer_step.py --ab-launch measures whole launches on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def report(result: dict, path: str | None) -> None:
    """Print the result as JSON and write it to path (if given)."""
    print(json.dumps(result, indent=1))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


def median_us(fn, reps: int) -> float:
    for _ in range(20):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--reps", type=int, default=300)
    a = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)   # compiled kernel objects, launches stubbed

    import layer_step as ls
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    import vllm_turboquant.kernels.decode as dc
    import vllm_turboquant.kernels.prefill as pf
    import vllm_turboquant.kernels.store as st
    from vllm_turboquant.kernels import _launch

    def stub(kernel, grid, *args, **kw):
        return None
    for m in (st, pf, dc):
        m.launch = stub
    s = ls.build_step(4, 40, 20, 16, device="cpu")
    fns = ls.ops(s)
    launchers = {name: round(median_us(fns[name], a.reps), 1)
                 for name in ("store", "decode", "unified_prefill", "side_store", "forward",
                              "forward_split")}
    # The own-keys path (backend/own_attention.py, CUDA only): its ops with FlashAttention
    # stubbed too (a call that only allocates its (out, lse)), so what remains is ours.
    from vllm_turboquant.backend import own_attention
    own_attention.attend = lambda q_rot, *args, **kw: (
        torch.empty_like(q_rot), torch.empty(q_rot.shape[1], q_rot.shape[0]))
    rot, deq = ls.new_rot(s)
    splits = ls.default_num_splits(ls.next_pow2(s["nd"]), s["hkv"], s["max_model_len"], "cpu")
    side_p = ls.TQSide(*(x[s["nd"]:] for x in s["side"]))
    own = ls._own_ops(s, rot, deq, splits, side_p, fns["store"], fns["decode"],
                      fns["side_store"])
    launchers.update({name + " (FlashAttention stubbed)": round(median_us(own[name], a.reps), 1)
                      for name in ("store_own", "prefill_own", "forward_own",
                                   "forward_split_own")})

    args = [torch.zeros(10) for _ in range(24)] + [5, 16, 1, 3, 64, 128, 99, 7, 1.5, 12, 16,
                                                   32, 48]
    key = median_us(lambda: tuple(map(_launch._spec, args)), 20 * a.reps)
    native = median_us(lambda: [native_specialize_impl(BaseBackend, x, False, True, True)
                                for x in args], 20 * a.reps)
    result = {"machine": machine(),
              "torch": torch.__version__, "triton": triton.__version__,
              "launcher_python_us_launches_stubbed": launchers,
              "direct_launch_key_us_37_args": round(key, 1),
              "triton_native_specialize_us_37_args": round(native, 1)}
    report(result, a.json)


if __name__ == "__main__":
    main()
