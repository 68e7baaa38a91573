"""One kernel launched a few times, for Nsight Compute (`ncu`) to profile one of the launches.

    ncu --clock-control none --kernel-name regex:decode_split --launch-skip 2 --launch-count 1 \\
        --section WarpStateStats ... python3 benchmarks/ncu_targets.py decode 96 8192 64 9 3
    ... python3 benchmarks/ncu_targets.py prefill 7700 0      # chunk tokens, cached prefix

decode B CTX D HQ HKV: tq_decode's default config over a packed cache of B x CTX tokens
(benchmarks/kernels.py's case, 16-token blocks unless --block-size); prefill CHUNK PREFIX: the
SmolLM2 shape's prefill kernel for one chunk as impl.forward runs it (rotated K/V and the deq
copy from the store; benchmarks/layer_step.py's step). No timing here: ncu measures.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "tests"))
import conftest  # noqa: E402,F401  (registers vllm_turboquant.kernels when not installed)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode", "prefill"])
    ap.add_argument("shape", nargs="+", type=int)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--config", default="{}", help="decode: tq_decode keywords as JSON")
    args = ap.parse_args()
    if args.what == "decode":
        import importlib.util
        import json

        # benchmarks/kernels.py by path: the name "kernels" is the kernel package here
        spec = importlib.util.spec_from_file_location("bench_kernels",
                                                      os.path.join(_HERE, "kernels.py"))
        kb = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(kb)
        from vllm_turboquant.kernels import tq_decode
        from vllm_turboquant.kernels._common import default_num_splits
        b, ctx, d, hq, hkv = args.shape
        params, q, sl, cache, bt, _ = kb._decode_case(b, ctx, d, hq, hkv, args.block_size)
        splits = default_num_splits(b, hkv, ctx, q.device, 64)
        out = torch.empty_like(q)
        kw = json.loads(args.config)
        fn = lambda: tq_decode(q, cache, bt, sl, params, 0.088, num_splits=splits,  # noqa
                               out=out, **kw)
    else:
        import layer_step as ls
        chunk, prefix = args.shape
        s = ls.build_step(0, 1, chunk, prefix)
        step_ops = ls.ops(s)
        step_ops["store"]()          # the chunk's slots, rotated K/V and deq copy
        fn = step_ops["prefill"]
    for _ in range(args.launches):
        fn()
    torch.cuda.synchronize()
    print("ok", args.what, args.shape, flush=True)


if __name__ == "__main__":
    main()
