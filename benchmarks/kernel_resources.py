"""Registers, spill stack and shared memory of the prefill kernel, compiled for sm_90 on a CPU.

No GPU or driver needed: `triton.compile` for target cuda:90 and the bundled cuobjdump give
what the H100 would run (with this machine's triton, 3.9 here; the device machine has 3.6,
whose code differs somewhat). Used to choose num_warps where no GPU was at hand:

    python benchmarks/kernel_resources.py [--json benchmarks/results/prefill-resources.json]

Must run without TRITON_INTERPRET (the interpreter does not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_sass import PREFILL_PTRS, compile_sm90, loop_stats  # noqa: E402

from vllm_turboquant.kernels.prefill import _tq_prefill_kernel  # noqa: E402

# Lookup mode 2 keeps its 16-entry codebook in the dot dtype.
POINTERS = dict(PREFILL_PTRS, ktab_ptr="*bf16", vtab_ptr="*bf16")

# (head size, query heads per KV head padded to a power of two, window) as the launcher
# builds them: BLOCK_M = 128 // G_PAD rows of chunk tokens, 32-token key tiles, lookup mode 2.
CONFIGS = [(64, 4, 0), (64, 4, 64), (128, 4, 0), (128, 2, 64), (128, 4, 64)]


def resources(d: int, g_pad: int, window: int, num_warps: int) -> dict:
    consts = dict(D=d, KBITS=4, VBITS=4, V_OFF=d // 2, KS_OFF=d, BLOCK_SIZE=16,
                  BLOCK_M=128 // g_pad, G_PAD=g_pad, ROW_G=g_pad, BLOCK_N=32,
                  HAS_SIDE=window > 0,
                  F32=False, COLS=min(d, 64), WIN=window, KMODE=2, VMODE=2, KASM="", VASM="",
                  DEQ=False, DEQ_STAGES=1, INVARIANT=False)
    st = loop_stats(compile_sm90(_tq_prefill_kernel, POINTERS, consts, num_warps, 1))
    return {"head_size": d, "g_pad": g_pad, "window": window, "num_warps": num_warps,
            "registers": st["registers"], "stack_bytes_per_thread": st["stack_bytes"],
            "shared_bytes": st["shared_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = [resources(d, g, w, nw) for d, g, w in CONFIGS for nw in (4, 8)]
    print("| head | G pad | window | warps | registers | stack B/thread | shared B |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['head_size']} | {r['g_pad']} | {r['window']} | {r['num_warps']} | "
              f"{r['registers']} | {r['stack_bytes_per_thread']} | {r['shared_bytes']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "cuda:90",
                       "host": platform.node(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
