"""Which prefill/store/decode launches fault on the GPU: each case in a fresh process.

A CUDA "illegal memory access" kills the process's context, so one pytest run cannot say
which of several cases faults. This runs every case of CASES in its own subprocess (with
CUDA_LAUNCH_BLOCKING=1) and prints one line per case: ok (and the error vs the reference),
MISMATCH, or FAULT with the first error line. Diagnostic, not a test (pytest does not
collect it). Device machine:

    python3 tests/gpu/crash_matrix.py [--json out.json] [--jobs 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# name: (kernel, d, hq, hkv, window, extra launcher kwargs, case options)
# H200, triton 3.6, 2026-12-02 (lookup 2 was the prefill default then): every lookup-2 case at
# head 128 with a window faulted or (block_m 32) gave wrong output, except block_m 16 and
# block_n 16/64; lookup 3 (register prmt, no table gathers) and side=None were right. The
# default became lookup 3; the cases below without "lookup2" run the new defaults.
CASES = {
    "prefill d128 g2 w64 lookup2 (old default)": ("prefill", 128, 8, 4, 64, {"lookup": 2}, {}),
    "prefill d128 g2 w64": ("prefill", 128, 8, 4, 64, {}, {}),
    "prefill d128 g2 w16": ("prefill", 128, 8, 4, 16, {}, {}),
    "prefill d128 g4 w64": ("prefill", 128, 16, 4, 64, {}, {}),
    "prefill d128 g8 w64": ("prefill", 128, 32, 4, 64, {}, {}),
    "prefill d64 g3 w64": ("prefill", 64, 9, 3, 64, {}, {}),
    "prefill d64 g2 w64": ("prefill", 64, 8, 4, 64, {}, {}),
    "prefill d256 g2 w64": ("prefill", 256, 4, 2, 64, {}, {}),
    "prefill d128 g2 w64 block_m32": ("prefill", 128, 8, 4, 64, {"block_m": 32}, {}),
    "prefill d128 g2 w64 block_m16": ("prefill", 128, 8, 4, 64, {"block_m": 16}, {}),
    "prefill d128 g2 w64 warps4": ("prefill", 128, 8, 4, 64, {"num_warps": 4}, {}),
    "prefill d128 g2 w64 block_n16": ("prefill", 128, 8, 4, 64, {"block_n": 16}, {}),
    "prefill d128 g2 w64 block_n64": ("prefill", 128, 8, 4, 64, {"block_n": 64}, {}),
    "prefill d64 g3 w64 block_n64": ("prefill", 64, 9, 3, 64, {"block_n": 64}, {}),
    "prefill d64 g3 w64 block_m16": ("prefill", 64, 9, 3, 64, {"block_m": 16}, {}),
    "prefill d128 g2 w64 fp16": ("prefill", 128, 8, 4, 64, {}, {"dtype": "float16"}),
    "prefill d128 g2 w64 no prefix": ("prefill", 128, 8, 4, 64, {}, {"no_prefix": True}),
    "prefill d128 g2 w64 empty side": ("prefill", 128, 8, 4, 64, {}, {"empty_side": True}),
    "prefill d128 g2 w64 k3v3": ("prefill", 128, 8, 4, 64, {}, {"preset": "tq-k3v3"}),
    "prefill d64 g3 w64 k3v3": ("prefill", 64, 9, 3, 64, {}, {"preset": "tq-k3v3"}),
    "prefill d128 g4 w0 k4v4": ("prefill", 128, 16, 4, 0, {}, {"preset": "tq-k4v4"}),
    "store d128 hkv4 w64 side": ("store", 128, 8, 4, 64, {}, {}),
    "store d64 hkv3 w64 side": ("store", 64, 9, 3, 64, {}, {}),
    "decode d128 g2 w64": ("decode", 128, 8, 4, 64, {}, {}),
    "decode d128 g2 w64 k3v3": ("decode", 128, 8, 4, 64, {}, {"preset": "tq-k3v3"}),
    "decode d64 g3 w64": ("decode", 64, 9, 3, 64, {}, {}),
}
# Batch-invariant prefill (invariant=True). H200, triton 3.6, 2026-12-02 evening, first version
# (query rotated inside the kernel by a tl.dot whose result fed the score dots): head 64 gave
# wrong output at the default config (rel. error 7.6; 0.92 without a window) and at block_m 16,
# fp16, lookup 2; block_n 64 faulted; block_n 16, 8 warps and head 128 were right. The rotation
# went back to the launcher's GEMM (as the default order has it); these cases check that.
# (That run also had cases of text-edited kernels, to localize the fault; they told nothing the
# launch variants did not, and were removed.)
INV = {"invariant": True}
CASES.update({
    "inv d64 g3 w64": ("prefill", 64, 9, 3, 64, INV, {}),
    "inv d64 g3 w64 no prefix": ("prefill", 64, 9, 3, 64, INV, {"no_prefix": True}),
    "inv d64 g3 w0": ("prefill", 64, 9, 3, 0, INV, {}),
    "inv d64 g3 w64 empty side": ("prefill", 64, 9, 3, 64, INV, {"empty_side": True}),
    "inv d64 g3 w64 lookup2": ("prefill", 64, 9, 3, 64, dict(INV, lookup=2), {}),
    "inv d64 g3 w64 warps8": ("prefill", 64, 9, 3, 64, dict(INV, num_warps=8), {}),
    "inv d64 g3 w64 block_m16": ("prefill", 64, 9, 3, 64, dict(INV, block_m=16), {}),
    "inv d64 g3 w64 block_n16": ("prefill", 64, 9, 3, 64, dict(INV, block_n=16), {}),
    "inv d64 g3 w64 block_n64": ("prefill", 64, 9, 3, 64, dict(INV, block_n=64), {}),
    "inv d128 g4 w64": ("prefill", 128, 32, 8, 64, INV, {}),
    "inv d64 g3 w64 fp16": ("prefill", 64, 9, 3, 64, INV, {"dtype": "float16"}),
})


def run_case(kernel, d, hq, hkv, window, kwargs, opts) -> dict:
    import torch

    sys.path.insert(0, os.path.dirname(__file__))
    from test_kernels_gpu import DEV, _paged, _params, _rel_err

    from vllm_turboquant.kernels import TQSide
    from vllm_turboquant.kernels.decode import tq_decode
    from vllm_turboquant.kernels.prefill import tq_prefill
    from vllm_turboquant.kernels.reference import tq_decode_ref, tq_prefill_ref, tq_store_ref
    from vllm_turboquant.kernels.store import tq_store

    torch.manual_seed(0)
    dtype = getattr(torch, opts.get("dtype", "bfloat16"))
    codec, params = _params(opts.get("preset", "turboquant"), d, window)
    if kernel == "store":
        n, bs = 256, 16
        k = torch.randn(n, hkv, d, device=DEV).to(dtype)
        v = torch.randn(n, hkv, d, device=DEV).to(dtype)
        nb = n // bs + 4
        slots = (torch.randperm(nb, device=DEV)[:n // bs, None] * bs
                 + torch.arange(bs, device=DEV)).flatten()
        rows = torch.zeros(n, dtype=torch.int32, device=DEV)
        pos = torch.arange(n, dtype=torch.int32, device=DEV)
        end = torch.full((n,), n, dtype=torch.int32, device=DEV)
        out = []
        for fn in (tq_store, tq_store_ref):
            c = torch.zeros(nb, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                            device=DEV)
            sd = TQSide.empty(4, window, hkv, d, dtype, DEV)
            fn(k, v, c, slots, params, sd, rows, pos, end)
            torch.cuda.synchronize()
            out.append(sd.k.float())
        return {"rel_err": _rel_err(out[0], out[1])}
    lens, qlens = [700, 129, 2000, 64], [300, 129, 17, 1]
    if opts.get("no_prefix"):
        lens = qlens
    side = (None if opts.get("no_side") or not window
            else TQSide.empty(len(lens), window, hkv, d, dtype, DEV))
    cache, bt, chunks = _paged(lens, hkv, d, 16, params, dtype, side=side)
    if opts.get("empty_side") and side is not None:
        side.tag.fill_(-1)
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    if kernel == "decode":
        q = torch.randn(len(lens), hq, d, device=DEV).to(dtype)
        got = tq_decode(q, cache, bt, sl, params, d ** -0.5, side, **kwargs)
        torch.cuda.synchronize()
        want = tq_decode_ref(q, cache, bt, sl, params, d ** -0.5, side)
        return {"rel_err": _rel_err(got, want)}
    k = torch.cat([c[0][n - m:] for c, n, m in zip(chunks, lens, qlens)])
    v = torch.cat([c[1][n - m:] for c, n, m in zip(chunks, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d, device=DEV).to(dtype)
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    got = tq_prefill(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side, **kwargs)
    torch.cuda.synchronize()
    want = tq_prefill_ref(q, k, v, cu, sl, cache, bt, params, d ** -0.5, side)
    return {"rel_err": _rel_err(got, want)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--case", help=argparse.SUPPRESS)   # child mode
    ap.add_argument("--jobs", type=int, default=4, help="cases run at once")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(*CASES[args.case])))
        return
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")

    def one(name):
        p = subprocess.run([sys.executable, __file__, "--case", name], env=env,
                           capture_output=True, text=True, timeout=300)
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode == 0 and line:
            res = json.loads(line[0][7:])
            res["status"] = "ok" if res["rel_err"] < 1e-2 else "MISMATCH"
        else:
            err = [x for x in p.stderr.splitlines() if "Error" in x or "error" in x]
            msg = (err[-1] if err else p.stderr[-300:])[:300]
            # the launcher's own refusal of a known-miscompiled variant is not a fault
            res = {"status": "REFUSED" if "miscompiled" in msg else "FAULT", "error": msg}
        print(f"{name:45s} {res['status']:9s} {res.get('rel_err', res.get('error'))}",
              flush=True)
        return name, res

    # Each case has its own process and CUDA context, so a fault stays in its case; --jobs
    # of them share the GPU at once (correctness only, nothing here is timed).
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(one, [c for c in CASES if args.only in c]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
