"""One-shot GPU probe for the kernel work of issue 3 (a budget of two device calls).

    python benchmarks/kernels_probe.py store      # store: which stage breaks, variants
    python benchmarks/kernels_probe.py store-matrix   # store correctness per config + timing
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

from vllm_turboquant.codec import TQConfig, TQLayerCodec, pack_codes  # noqa: E402
from vllm_turboquant.kernels import TQLayerParams, read_slots  # noqa: E402
from vllm_turboquant.kernels.decode import default_num_splits, tq_decode  # noqa: E402
from vllm_turboquant.kernels.reference import decode_slots, tq_store_ref  # noqa: E402
from vllm_turboquant.kernels.store import tq_store  # noqa: E402

DEV = "cuda"
ROWS = []


def emit(**row):
    ROWS.append(row)
    print(json.dumps(row), flush=True)


# -- store ------------------------------------------------------------------------------------
def store_case(d, name, dtype, block_t, warps, rot, **kw):
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
        kw.setdefault("rot", rot)
        tq_store(k, v, c1, slots, params, block_t=block_t, num_warps=warps, **kw)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        err = f"{type(e).__name__}: {str(e)[:300]}"
    tq_store_ref(k, v, c2, slots, params)
    valid = slots >= 0
    bs = c1.shape[1]
    ids = slots[valid].long()
    r1 = read_slots(c1, params.layout, ids // bs, ids % bs)
    r2 = read_slots(c2, params.layout, ids // bs, ids % bs)
    diff = (r1 != r2).float().mean().item()
    untouched = (r1 == 7).all(-1).float().mean().item()
    # Are the kernel's bytes a valid encoding of the right vector? rel. error of decode.
    ky, _ = decode_slots(params, r1)
    want = k[valid].float() @ params.rotation.T
    fin = torch.isfinite(want).all(-1)
    rel = ((ky - want)[fin].norm() / want[fin].norm()).item()
    per_off = (r1 != r2).float().mean((0, 1))
    ks = r1[:3, 0, params.layout.k_scale_offset:params.layout.k_scale_offset + 2]
    emit(op="store_check", d=d, name=name, dtype=str(dtype), block_t=block_t, warps=warps,
         rot=rot, kw={k_: str(v_) for k_, v_ in kw.items()},
         k_scales=ks.contiguous().view(torch.float16).flatten().tolist(),
         first_bytes=r1[0, 0, :6].tolist(), want_first=r2[0, 0, :6].tolist(),
         byte_diff=diff, untouched=untouched, decode_rel_err=rel, error=err,
         worst_offsets=[round(x, 3) for x in per_off.topk(4).values.tolist()],
         worst_at=per_off.topk(4).indices.tolist())
    return diff


def store_stages(d, dtype):
    """Which stage of the store breaks: rotation, quantize, or the write (GPU only)."""
    import triton
    import triton.language as tl
    from vllm_turboquant.kernels import store as st

    @triton.jit
    def _dbg(x_ptr, rot_ptr, cent_ptr, bound_ptr, y_ptr, packed_ptr, scale_ptr, rot_scale,
             D: tl.constexpr, BT: tl.constexpr, ROT: tl.constexpr):
        offs_t = tl.program_id(0) * BT + tl.arange(0, BT)
        offs_d = tl.arange(0, D)
        HALF: tl.constexpr = D // 2
        offs_lo = tl.arange(0, HALF)
        offs_hi = HALF + offs_lo
        x = tl.load(x_ptr + offs_t[:, None] * D + offs_d[None, :]).to(tl.float32)
        y_lo = st._rotate(x, rot_ptr, offs_lo, offs_d, rot_scale, D, ROT, x_ptr.dtype.element_ty)
        y_hi = st._rotate(x, rot_ptr, offs_hi, offs_d, rot_scale, D, ROT, x_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_t[:, None] * D + offs_lo[None, :], y_lo)
        tl.store(y_ptr + offs_t[:, None] * D + offs_hi[None, :], y_hi)
        packed, scale, y_lo, y_hi = st._quantize_halves(y_lo, y_hi, cent_ptr, bound_ptr, True)
        tl.store(packed_ptr + offs_t[:, None] * HALF + offs_lo[None, :], packed)
        tl.store(scale_ptr + offs_t, scale)

    codec = TQLayerCodec(TQConfig.from_name("turboquant"), d, layer=5)
    params = TQLayerParams.from_codec(codec, DEV)
    t = 64
    x = (torch.randn(t, d, device=DEV) * 4).to(dtype)
    for rot in (0, 1):
        y = torch.empty(t, d, device=DEV)
        packed = torch.empty(t, d // 2, device=DEV, dtype=torch.int32)
        scale = torch.empty(t, device=DEV)
        try:
            _dbg[(t // 16,)](x, params.rotation_pm1, params.key_centroids, params.key_bounds,
                             y, packed, scale, params.rotation_scale, D=d, BT=16, ROT=rot)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            emit(op="store_stage", d=d, error=f"{type(e).__name__}: {str(e)[:500]}")
            continue
        want_y = x.float() @ params.rotation.T
        yrel = ((y - want_y).norm() / want_y.norm()).item()
        u = want_y / want_y.norm(dim=-1, keepdim=True)
        codes = torch.bucketize(u, params.key_bounds)
        want_p = pack_codes(codes, 4).int()          # stored (sign-magnitude) nibbles
        c = params.key_centroids[codes]
        want_s = (want_y * c).sum(-1) / c.square().sum(-1)
        emit(op="store_stage", d=d, dtype=str(dtype), rot=rot, y_rel_err=yrel,
             y_sample=y[0, :4].tolist(), want_y_sample=want_y[0, :4].tolist(),
             packed_diff=(packed != want_p).float().mean().item(),
             scale_sample=scale[:3].tolist(), want_scale=want_s[:3].tolist(),
             rot_scale=params.rotation_scale)


def run_store(args):
    for d in (128, 64):
        store_stages(d, torch.bfloat16)
    # the full kernel: halves vs generic path, R prescaled (rot_scale 1.0)
    for d, dtype in ((128, torch.bfloat16), (128, torch.float16), (256, torch.bfloat16)):
        for kw in (dict(halves=False), dict(prescaled=True), dict(halves=False, prescaled=True),
                   dict(rot="dot16", halves=False)):
            kw = dict(kw)
            store_case(d, "turboquant", dtype, None, None, kw.pop("rot", None), **kw)
    store_case(128, "tq-k3v3", torch.bfloat16, None, None, None)
    store_case(64, "turboquant", torch.float16, None, None, None)


def run_store_matrix(args):
    """Store correctness over launch configs and rotation modes, then store timing."""
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
SWEEP = [dict(lookup=1, block_n=128, prefetch=True), dict(lookup=3, block_n=128),
         dict(lookup=3, block_n=128, prefetch=True), dict(lookup=3, block_n=64, prefetch=True),
         dict(lookup=3, block_n=128, kt=True, prefetch=True),
         dict(lookup=3, block_n=128, kt=True), dict(lookup=3, block_n=64),
         dict(lookup=3, block_n=64, kt=True, prefetch=True),
         dict(lookup=3, block_n=128, num_warps=8, prefetch=True),
         dict(lookup=3, block_n=64, num_warps=8, prefetch=True),
         dict(lookup=3, block_n=128, num_stages=2),
         dict(lookup=3, block_n=64, num_stages=2),
         dict(lookup=3, block_n=128, prefetch=True, split_factor=2.0),
         dict(lookup=3, block_n=64, prefetch=True, split_factor=2.0),
         dict(lookup=3, block_n=128, prefetch=True, split_factor=0.5),
         dict(lookup=3, block_n=32, prefetch=True),
         dict(lookup=3, block_n=256, num_warps=8, prefetch=True),
         dict(lookup=1, block_n=64, prefetch=True),
         dict(lookup=1, block_n=128, num_warps=8, prefetch=True)]


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
    variants = [dict(lookup=1, block_n=128, num_stages=1)]      # the v2 defaults
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
    ap.add_argument("what", choices=["store", "store-matrix", "sweep", "shapes", "ncu"])
    ap.add_argument("variant", nargs="?")
    ap.add_argument("--json")
    ap.add_argument("--variants")
    ap.add_argument("--best-out", default="/tmp/best.json")
    ap.add_argument("--budget-s", type=float, default=110)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, kb.triton.__version__, flush=True)
    {"store": run_store, "store-matrix": run_store_matrix, "sweep": run_sweep,
     "shapes": run_shapes, "ncu": run_ncu}[
        args.what](args)
    if args.json:
        with open(args.json, "a") as f:
            for r in ROWS:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
