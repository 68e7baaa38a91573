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
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from vllm_turboquant.kernels.prefill import _tq_prefill_kernel

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16",
            "cu_q_ptr": "*i32", "seq_lens_ptr": "*i32", "cache_ptr": "*u8",
            "block_table_ptr": "*i32", "kcent_ptr": "*fp32", "vcent_ptr": "*fp32",
            "ktab_ptr": "*bf16", "vtab_ptr": "*bf16", "rot_ptr": "*fp32",
            "side_k_ptr": "*bf16", "side_v_ptr": "*bf16", "side_tag_ptr": "*i32",
            "side_check_ptr": "*i32", "rot_scale": "fp32"}

# (head size, query heads per KV head padded to a power of two, window) as the launcher
# builds them: BLOCK_M = 128 // G_PAD rows of chunk tokens, 32-token key tiles, lookup mode 2.
CONFIGS = [(64, 4, 0), (64, 4, 64), (128, 4, 0), (128, 2, 64), (128, 4, 64)]


def resources(d: int, g_pad: int, window: int, num_warps: int) -> dict:
    fn = _tq_prefill_kernel
    consts = dict(D=d, KBITS=4, VBITS=4, V_OFF=d // 2, KS_OFF=d, BLOCK_M=128 // g_pad,
                  G_PAD=g_pad, BLOCK_N=32, HAS_SIDE=window > 0, F32=False, COLS=min(d, 64),
                  WIN=window, KMODE=2, VMODE=2, KASM="", VASM="")
    sig = {n: "i32" for n in fn.arg_names}
    sig.update(POINTERS)
    sig.update({k: "constexpr" for k in consts})
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v
                                         for k, v in consts.items()})
    ck = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps, num_stages=1))
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(x for x in text.splitlines() if "REG:" in x)
    fields = dict(tok.split(":") for tok in line.split() if ":" in tok)
    return {"head_size": d, "g_pad": g_pad, "window": window, "num_warps": num_warps,
            "registers": int(fields["REG"]), "stack_bytes_per_thread": int(fields["STACK"]),
            "shared_bytes": ck.metadata.shared}


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
