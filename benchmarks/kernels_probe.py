"""One-shot GPU probe for the kernel work of issue 3 (a budget of two device calls).

    python benchmarks/kernels_probe.py store      # store correctness matrix + timing
    python benchmarks/kernels_probe.py sweep      # decode variants at b32 x 16K x h128
    python benchmarks/kernels_probe.py shapes [--variants JSON]  # variants vs SDPA-bf16
    python benchmarks/kernels_probe.py ncu VARIANT_JSON            # one launch for ncu

Prints one line per measurement (the logs are the record; docs/kernels-notes.md has the
reading) and appends JSON rows to --json if given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as kb  # noqa: E402  (benchmarks/kernels.py: timing, inputs, baselines)

from vllm_turboquant.codec import TQConfig, TQLayerCodec  # noqa: E402
from vllm_turboquant.kernels import TQLayerParams  # noqa: E402
from vllm_turboquant.kernels.decode import default_num_splits, tq_decode  # noqa: E402
from vllm_turboquant.kernels.reference import decode_slots, tq_store_ref  # noqa: E402
from vllm_turboquant.kernels.store import tq_store  # noqa: E402

DEV = "cuda"
ROWS = []


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


# -- store ------------------------------------------------------------------------------------
def store_case(d, name, dtype, block_t, warps, rot):
    cfg = TQConfig.from_name(name)
    codec = TQLayerCodec(cfg, d, layer=5)
    params = TQLayerParams.from_codec(codec, DEV)
    torch.manual_seed(0)
    t, hkv, bs = 4096, 8, 16
    k = (torch.randn(t, hkv, d, device=DEV) * 4).to(dtype)
    v = torch.randn(t, 2 * hkv, d, device=DEV).to(dtype)[:, ::2]
    nb = t // bs + 4
    slots = torch.randperm(nb * bs, device=DEV)[:t]
    slots[::97] = -1
    sb = params.layout.slot_bytes
    c1 = torch.full((nb, bs, hkv, sb), 7, dtype=torch.uint8, device=DEV)
    c2 = c1.clone()
    err = None
    try:
        tq_store(k, v, c1, slots, params, block_t=block_t, num_warps=warps, rot=rot)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e)[:300]}"
    tq_store_ref(k, v, c2, slots, params)
    valid = slots >= 0
    r1 = c1.reshape(-1, hkv, sb)[slots[valid]]
    r2 = c2.reshape(-1, hkv, sb)[slots[valid]]
    diff = (r1 != r2).float().mean().item()
    untouched = (r1 == 7).all(-1).float().mean().item()
    # Are the kernel's bytes a valid encoding of the right vector? rel. error of decode.
    ky, _ = decode_slots(params, r1)
    want = k[valid].float() @ params.rotation.T
    fin = torch.isfinite(want).all(-1)
    rel = ((ky - want)[fin].norm() / want[fin].norm()).item()
    per_off = (r1 != r2).float().mean((0, 1))
    emit(op="store_check", d=d, name=name, dtype=str(dtype), block_t=block_t, warps=warps,
         rot=rot, byte_diff=diff, untouched=untouched, decode_rel_err=rel, error=err,
         worst_offsets=[round(x, 3) for x in per_off.topk(4).values.tolist()],
         worst_at=per_off.topk(4).indices.tolist())
    return diff


def run_store(args):
    cases = [(128, "turboquant", torch.bfloat16), (128, "turboquant", torch.float16),
             (64, "turboquant", torch.bfloat16), (256, "turboquant", torch.bfloat16),
             (128, "tq-k3v3", torch.bfloat16)]
    cfgs = [(None, None, None), (None, None, "ieee"), (None, None, "dot16"),
            (16, 4, "tf32"), (32, 4, "tf32"), (64, 4, "tf32"), (64, 8, "dot16"),
            (32, 4, "dot16")]
    for d, name, dtype in cases:
        for bt, nw, rot in cfgs:
            if d == 256 and bt == 64:
                continue
            store_case(d, name, dtype, bt, nw, rot)
    # timing, 8K tokens x 8 heads x 128 bf16
    t, hkv, d, bs = 8192, 8, 128, 16
    codec, params = kb._params(d)
    k = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    cache = torch.zeros(t // bs * 4, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                        device=DEV)
    slots = torch.randperm(cache.shape[0] * bs, device=DEV)[:t]
    nbytes = 2 * t * hkv * d * 2 + t * hkv * params.layout.slot_bytes
    for bt, nw, rot in [(64, 8, "tf32"), (64, 8, "dot16"), (32, 4, "dot16"), (16, 4, "dot16"),
                        (64, 4, "dot16"), (32, 4, "tf32"), (16, 4, "tf32"), (32, 4, "ieee")]:
        fn = lambda: tq_store(k, v, cache, slots, params, block_t=bt, num_warps=nw,  # noqa
                              rot=rot)
        try:
            p50, p20, p80 = kb.bench(fn, True, 100)
            emit(op="store_time", block_t=bt, warps=nw, rot=rot, p50_us=p50,
                 gbs=nbytes / p50 / 1e3)
        except Exception as e:  # noqa: BLE001
            emit(op="store_time", block_t=bt, warps=nw, rot=rot, error=str(e)[:300])


# -- decode -----------------------------------------------------------------------------------
def decode_setup(b, ctx, d, hq, hkv, bs=16):
    codec, params = kb._params(d)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    nb = b * math.ceil(ctx / bs) + 1
    cache = kb.packed_cache(nb, bs, hkv, params)
    bt = kb.block_tables(b, ctx, bs, nb)
    return params, q, sl, cache, bt


def variant_fn(v, params, q, sl, cache, bt, out):
    v = dict(v)
    sf = v.pop("split_factor", 1.0)
    bn = v.get("block_n", 128 if q.shape[-1] == 128 else 64)
    splits = max(1, int(default_num_splits(q.shape[0], cache.shape[2],
                                           bt.shape[1] * cache.shape[1], q.device, bn) * sf))
    return (lambda: tq_decode(q, cache, bt, sl, params, 0.088, num_splits=splits, out=out,
                              **v)), splits


# Most informative first: the sweep stops at its time budget.
SWEEP = [dict(lookup=1, block_n=128), dict(lookup=3, block_n=128),
         dict(lookup=3, block_n=128, kt=True), dict(lookup=3, block_n=128, prefetch=True),
         dict(lookup=3, block_n=128, kt=True, prefetch=True),
         dict(lookup=1, block_n=128, kt=True, prefetch=True),
         dict(lookup=3, block_n=64, kt=True, prefetch=True),
         dict(lookup=3, block_n=64), dict(lookup=3, block_n=64, kt=True),
         dict(lookup=3, block_n=128, num_warps=8, kt=True, prefetch=True),
         dict(lookup=3, block_n=128, num_warps=8),
         dict(lookup=3, block_n=128, num_stages=2), dict(lookup=3, block_n=128, num_stages=2,
                                                         kt=True),
         dict(lookup=3, block_n=64, num_stages=2, kt=True),
         dict(lookup=3, block_n=64, num_stages=3, kt=True),
         dict(lookup=3, block_n=128, kt=True, prefetch=True, split_factor=2.0),
         dict(lookup=3, block_n=128, kt=True, prefetch=True, split_factor=0.5),
         dict(lookup=3, block_n=64, kt=True, prefetch=True, split_factor=2.0),
         dict(lookup=3, block_n=64, num_warps=8, kt=True, prefetch=True),
         dict(lookup=3, block_n=256, kt=True, prefetch=True),
         dict(lookup=3, block_n=256, num_warps=8, kt=True, prefetch=True),
         dict(lookup=3, block_n=32, kt=True, prefetch=True),
         dict(lookup=2, block_n=128, kt=True, prefetch=True),
         dict(lookup=1, block_n=128, prefetch=True), dict(lookup=1, block_n=128, kt=True)]


def run_sweep(args):
    b, ctx, d, hq, hkv = 32, 16384, 128, 32, 8
    params, q, sl, cache, bt = decode_setup(b, ctx, d, hq, hkv)
    nbytes = b * ctx * hkv * params.layout.slot_bytes
    out = torch.empty_like(q)
    ref = tq_decode(q, cache, bt, sl, params, 0.088, lookup=1, block_n=64).clone()
    res = []
    t0 = time.time()
    for v in SWEEP:
        if time.time() - t0 > args.budget_s:
            print("sweep: time budget reached", flush=True)
            break
        try:
            fn, splits = variant_fn(v, params, q, sl, cache, bt, out)
            fn()
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            p50, p20, p80 = kb.bench(fn, True, 60)
            res.append((p50, v))
            emit(op="decode_sweep", shape="b32x16K h128 32/8", variant=v, splits=splits,
                 p50_us=p50, gbs=nbytes / p50 / 1e3, max_abs_diff_vs_pair=err)
        except Exception as e:  # noqa: BLE001
            emit(op="decode_sweep", variant=v, error=f"{type(e).__name__}: {str(e)[:400]}")
    res.sort(key=lambda r: r[0])
    print("BEST:", json.dumps([r[1] for r in res[:4]]), flush=True)
    with open(args.best_out, "w") as f:
        json.dump([r[1] for r in res[:3]], f)


SHAPES = [(1, 4096, 128, 32, 8), (1, 16384, 128, 32, 8), (1, 32768, 128, 32, 8),
          (32, 4096, 128, 32, 8), (32, 16384, 128, 32, 8), (128, 4096, 128, 32, 8),
          (1, 16384, 64, 16, 4), (32, 16384, 64, 16, 4),
          (32, 4096, 64, 9, 3), (32, 16384, 64, 9, 3)]


def run_shapes(args):
    variants = [dict(lookup=1, block_n=None)]
    if args.variants and os.path.exists(args.variants):
        variants += json.load(open(args.variants))[:2]
    for b, ctx, d, hq, hkv in SHAPES:
        torch.cuda.empty_cache()
        params, q, sl, cache, bt = decode_setup(b, ctx, d, hq, hkv)
        nbytes = b * ctx * hkv * params.layout.slot_bytes
        out = torch.empty_like(q)
        ref = tq_decode(q, cache, bt, sl, params, 0.088, lookup=1).clone()
        base = kb.decode_baselines(b, ctx, hq, hkv, d, 16, q, sl, 0.088)
        sd = base.get("sdpa_bf16")
        t_sdpa = kb.bench(sd[0], True, 60)[0] if isinstance(sd, tuple) else None
        for v in variants:
            v = {k: x for k, x in v.items() if x is not None}
            if d != 128:
                v.pop("block_n", None)       # per-head default
            try:
                fn, splits = variant_fn(v, params, q, sl, cache, bt, out)
                fn()
                torch.cuda.synchronize()
                err = (out.float() - ref.float()).abs().max().item()
                p50 = kb.bench(fn, True, 60)[0]
                emit(op="decode_shape", b=b, ctx=ctx, d=d, hq=hq, hkv=hkv, variant=v,
                     splits=splits, p50_us=p50, gbs=nbytes / p50 / 1e3, sdpa_us=t_sdpa,
                     ratio_vs_sdpa=p50 / t_sdpa if t_sdpa else None, max_abs_diff=err)
            except Exception as e:  # noqa: BLE001
                emit(op="decode_shape", b=b, ctx=ctx, d=d, variant=v,
                     error=f"{type(e).__name__}: {str(e)[:300]}")
        del cache, base


def run_ncu(args):
    v = json.loads(args.variant)
    params, q, sl, cache, bt = decode_setup(32, 16384, 128, 32, 8)
    out = torch.empty_like(q)
    fn, _ = variant_fn(v, params, q, sl, cache, bt, out)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["store", "sweep", "shapes", "ncu"])
    ap.add_argument("variant", nargs="?")
    ap.add_argument("--json")
    ap.add_argument("--variants")
    ap.add_argument("--best-out", default="/tmp/best.json")
    ap.add_argument("--budget-s", type=float, default=110)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, kb.triton.__version__, flush=True)
    {"store": run_store, "sweep": run_sweep, "shapes": run_shapes, "ncu": run_ncu}[
        args.what](args)
    if args.json:
        with open(args.json, "a") as f:
            for r in ROWS:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
