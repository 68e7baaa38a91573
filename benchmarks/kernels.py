"""Benchmark the TurboQuant kernels against FlashAttention bf16/fp8 and vLLM's built-in TurboQuant.

    python benchmarks/kernels.py [--quick] [--out benchmarks/results] [--only decode,store,prefill]

Decode: batch x context x head sizes, GQA 4 (head 128: 32 q / 8 kv heads; head 64: 16 q / 4 kv
heads, a Llama-3.2-1B-like group), plus SmolLM2-135M (9 q / 3 kv, head 64). Each baseline is
guarded: a missing one is reported as a row with "error", never fatal.
  fa2_bf16 / fa3_bf16   vllm.vllm_flash_attn.flash_attn_varlen_func on a paged bf16 cache
  fa3_fp8               the same with an fp8 (e4m3) cache, FA3 only
  vllm_tq               vllm.v1.attention.ops.triton_turboquant_decode (turboquant_4bit_nc)
  sdpa_bf16             torch SDPA on a dense bf16 cache (stand-in when vLLM is absent)
Times: p50 (p20 / p80) microseconds from triton.testing.do_bench, eager and CUDA graph.
GB/s: the bytes the kernel must read (packed slots for TurboQuant, K+V for bf16) over time,
against the 3350 GB/s HBM3 peak of an H100 SXM.
Store: 8K tokens x 8 KV heads x 128 (bytes read + written). Prefill: 32K cached + 2K chunk,
packed kernel vs dequantize-the-prefix-to-bf16-then-attend (time and peak memory).
Rows go to benchmarks/results/kernels-<gpu>-<time>.json and a png plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import traceback

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import triton  # noqa: E402

sys.path.insert(0, os.path.join(_ROOT, "tests"))
import conftest  # noqa: E402,F401  (registers vllm_turboquant.kernels when not installed)

from vllm_turboquant.codec import TQConfig, TQLayerCodec  # noqa: E402
from vllm_turboquant.kernels import (TQLayerParams, TQSide, page_planes,  # noqa: E402
                                     read_slots)
from vllm_turboquant.kernels.decode import (default_block_n, default_num_splits,  # noqa: E402
                                            tq_decode)
from vllm_turboquant.kernels.prefill import tq_prefill  # noqa: E402
from vllm_turboquant.kernels.reference import decode_slots  # noqa: E402
from vllm_turboquant.kernels.store import tq_store  # noqa: E402

# HBM peak of the GPU the run is on (GB/s, the vendors' data sheets): H100 SXM 3,350, H200
# 4,800. peak_frac in the JSON is relative to it; other GPUs get the H100's figure.
_PEAKS = {"H200": 4800.0, "H100": 3350.0}


def _peak_gbs() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in _PEAKS.items() if k in name), 3350.0)


PEAK_GBS = _peak_gbs()
DEV = "cuda"


# -- timing -----------------------------------------------------------------------------------
def bench(fn, graph: bool, rep_ms: int):
    """(p50, p20, p80) microseconds of fn(), eager or replayed from a CUDA graph."""
    fn()
    torch.cuda.synchronize()
    if graph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    q = triton.testing.do_bench(run, warmup=max(5, rep_ms // 4), rep=rep_ms,
                                quantiles=[0.5, 0.2, 0.8])
    return tuple(x * 1e3 for x in q)


def env_info():
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}
    try:
        import vllm
        info["vllm"] = vllm.__version__
    except Exception as e:  # noqa: BLE001
        info["vllm"] = f"absent ({type(e).__name__})"
    try:
        info["git_sha"] = subprocess.check_output(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, stderr=subprocess.DEVNULL).decode().strip()
        dirty = subprocess.call(["git", "diff", "--quiet"], cwd=_ROOT,
                                stderr=subprocess.DEVNULL)
        info["git_dirty"] = bool(dirty)
    except Exception:  # noqa: BLE001
        info["git_sha"] = "unknown"
    return info


# -- inputs -----------------------------------------------------------------------------------
def _params(d):
    codec = TQLayerCodec(TQConfig.from_name("turboquant"), d, layer=0)
    return codec, TQLayerParams.from_codec(codec, DEV)


def packed_cache(num_blocks, block_size, hkv, params):
    """Random codes with finite fp16 scales (timing on zeros would flatter the kernel)."""
    sb = params.layout.slot_bytes
    cache = torch.randint(0, 256, (num_blocks, block_size, hkv, sb), dtype=torch.uint8,
                          device=DEV)
    scale_plane = page_planes(cache, params.layout)[2]   # [blocks, Hkv, block_size, 4]
    scales = (torch.rand(num_blocks, hkv, block_size, 2, device=DEV) + 0.5).half()
    scale_plane.copy_(scales.view(torch.uint8).reshape(num_blocks, hkv, block_size, 4))
    return cache


def block_tables(b, ctx, block_size, num_blocks):
    per = math.ceil(ctx / block_size)
    return torch.randperm(num_blocks, device=DEV)[:b * per].reshape(b, per).int()


# -- decode baselines -------------------------------------------------------------------------
def _fa_fn(version, q, k_cache, v_cache, bt, sl, scale, fp8=False):
    """vLLM's FlashAttention (vllm.vllm_flash_attn.flash_attn_varlen_func, as vLLM's FA
    backend calls it for decode: one query token per sequence, paged KV via block_table)."""
    from vllm.vllm_flash_attn import flash_attn_varlen_func
    b = q.shape[0]
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=DEV)
    max_k = int(bt.shape[1] * k_cache.shape[1])
    kwargs = {}
    if fp8:
        one = torch.ones(b, k_cache.shape[2], dtype=torch.float32, device=DEV)
        kwargs = dict(q_descale=one, k_descale=one, v_descale=one)
        q = q.to(k_cache.dtype)      # FA3 fp8 takes an fp8 query too (vLLM quantizes it)
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=DEV)
    return lambda: flash_attn_varlen_func(q, k_cache, v_cache, max_seqlen_q=1, cu_seqlens_q=cu_q,
                                          max_seqlen_k=max_k, seqused_k=sl, softmax_scale=scale,
                                          causal=True, block_table=bt, out=out,
                                          fa_version=version, **kwargs)


def decode_baselines(b, ctx, hq, hkv, d, block_size, q, sl, scale):
    """{name: (callable, bytes read) or exception} of every baseline we can build."""
    out = {}
    nb = b * math.ceil(ctx / block_size) + 1
    bt = block_tables(b, ctx, block_size, nb)
    bf16_bytes = b * ctx * hkv * d * 2 * 2
    try:
        kc = torch.randn(nb, block_size, hkv, d, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
    except torch.OutOfMemoryError as e:
        return {"fa_bf16": e}
    for ver in (2, 3):
        try:
            fn = _fa_fn(ver, q, kc, vc, bt, sl, scale)
            fn()
            out[f"fa{ver}_bf16"] = (fn, bf16_bytes)
        except Exception as e:  # noqa: BLE001
            out[f"fa{ver}_bf16"] = e
    try:
        k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        fn = _fa_fn(3, q, k8, v8, bt, sl, scale, fp8=True)
        fn()
        out["fa3_fp8"] = (fn, bf16_bytes // 2)
    except Exception as e:  # noqa: BLE001
        out["fa3_fp8"] = e
    if not any(isinstance(v, tuple) for v in out.values()):
        # No vLLM FlashAttention: torch SDPA on a dense cache as the bf16 stand-in.
        try:
            del kc, vc
            kd = torch.randn(b, hkv, ctx, d, device=DEV, dtype=torch.bfloat16)
            vd = torch.randn_like(kd)
            qd = q.unsqueeze(2)
            f = torch.nn.functional.scaled_dot_product_attention
            fn = lambda: f(qd, kd, vd, scale=scale, enable_gqa=True)  # noqa: E731
            fn()
            out["sdpa_bf16"] = (fn, bf16_bytes)
        except Exception as e:  # noqa: BLE001
            out["sdpa_bf16"] = e
    else:
        del kc, vc
    try:
        out["vllm_tq"] = _vllm_tq(b, ctx, hq, hkv, d, block_size, q, sl, scale)
    except Exception as e:  # noqa: BLE001
        out["vllm_tq"] = e
    return out


def _vllm_tq(b, ctx, hq, hkv, d, block_size, q, sl, scale):
    from vllm.model_executor.layers.quantization.turboquant.config import TurboQuantConfig
    from vllm.v1.attention.ops.triton_turboquant_decode import (
        triton_turboquant_decode_attention)
    cfg = TurboQuantConfig(head_dim=d, key_quant_bits=4, value_quant_bits=4,
                           norm_correction=True)
    slot = getattr(cfg, "slot_size_aligned", cfg.slot_size)
    nb = b * math.ceil(ctx / block_size) + 1
    cache = torch.randint(0, 60, (nb, block_size, hkv, slot), dtype=torch.uint8, device=DEV)
    bt = block_tables(b, ctx, block_size, nb)
    pi = torch.linalg.qr(torch.randn(d, d, device=DEV))[0]
    cent = torch.linspace(-0.2, 0.2, 16, device=DEV)
    pit = pi.T.contiguous()
    splits = 32

    def fn():
        return triton_turboquant_decode_attention(
            q, cache, bt, sl, pi, cent, scale, cfg.mse_bits, cfg.key_packed_size,
            cfg.effective_value_quant_bits, key_fp8=False, norm_correction=True, PiT=pit,
            max_num_kv_splits=splits)
    fn()
    return fn, b * ctx * hkv * slot


def run_decode(args, info, rows):
    batches, ctxs = (1, 8, 32, 128), (1024, 4096, 16384, 32768)
    heads = [(128, 32, 8), (64, 16, 4)]
    if args.quick:
        batches, ctxs = (1, 32), (4096, 16384)
    shapes = [(b, c, d, hq, hkv, "gqa4") for d, hq, hkv in heads for b in batches for c in ctxs]
    shapes += [(b, c, 64, 9, 3, "smollm2") for b in (batches if not args.quick else (32,))
               for c in ctxs]
    if args.shapes:       # --shapes "BxCTXxDxHQxHKV,...": these instead
        shapes = [(b, c, d, hq, hkv, "smollm2" if (d, hq, hkv) == (64, 9, 3)
                   else f"gqa{hq // hkv}") for b, c, d, hq, hkv in _tuning_shapes(args)]
    for b, ctx, d, hq, hkv, tag in shapes:
        # 128 x 32K x 8 x 128 in bf16 is 17 GB per baseline cache: fits an 80 GB H100.
        torch.cuda.empty_cache()
        block_size = args.block_size
        codec, params = _params(d)
        scale = d ** -0.5
        q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
        sl = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
        nb = b * math.ceil(ctx / block_size) + 1
        cache = packed_cache(nb, block_size, hkv, params)
        bt = block_tables(b, ctx, block_size, nb)
        block_n = args.block_n or None      # None: tq_decode's default (decode_defaults)
        # the backend's split count (64-token tiles, backend/impl.decode_splits)
        splits = default_num_splits(b, hkv, bt.shape[1] * block_size, q.device,
                                    default_block_n(d))
        out = torch.empty_like(q)
        fns = {"turboquant": (lambda: tq_decode(q, cache, bt, sl, params, scale,
                                                num_splits=splits, out=out,
                                                block_n=block_n,
                                                num_warps=args.num_warps),
                              b * ctx * hkv * params.layout.slot_bytes)}
        # the same kernel as three launches (rotation GEMM, split, merge: the default until
        # 2026-12-03 evening), so the fused launch's gain is measured beside the baselines
        fns["turboquant_3launch"] = (
            lambda: tq_decode(q, cache, bt, sl, params, scale, num_splits=splits, out=out,
                              block_n=block_n, num_warps=args.num_warps, fused=False),
            b * ctx * hkv * params.layout.slot_bytes)
        # the fused launch with the rotated query kept in registers (rotate_q=1)
        fns["turboquant_rotq_regs"] = (
            lambda: tq_decode(q, cache, bt, sl, params, scale, num_splits=splits, out=out,
                              block_n=block_n, num_warps=args.num_warps, rotate_q=1),
            b * ctx * hkv * params.layout.slot_bytes)
        if args.ab_words:   # the byte tiles (the default until 2026-12-02) for comparison
            fns["turboquant_bytes"] = (
                lambda: tq_decode(q, cache, bt, sl, params, scale, num_splits=splits, out=out,
                                  block_n=64, num_stages=2, num_warps=args.num_warps,
                                  words=False, prefetch=False),
                b * ctx * hkv * params.layout.slot_bytes)
        fns.update(decode_baselines(b, ctx, hq, hkv, d, block_size, q, sl, scale))
        base = {"op": "decode", "batch": b, "context": ctx, "head_size": d, "q_heads": hq,
                "kv_heads": hkv, "model": tag, "block_size": block_size, "num_splits": splits}
        times, shape_rows = {}, []
        for name, val in fns.items():
            for graph in (False, True):
                row = dict(base, kernel=name, mode="graph" if graph else "eager", **info)
                if isinstance(val, Exception):
                    if graph:
                        continue
                    row["error"] = f"{type(val).__name__}: {str(val)[:200]}"
                else:
                    fn, nbytes = val
                    try:
                        p50, p20, p80 = bench(fn, graph, args.rep_ms)
                        row.update(p50_us=p50, p20_us=p20, p80_us=p80, bytes=nbytes,
                                   gbs=nbytes / p50 / 1e3, peak_frac=nbytes / p50 / 1e3 / PEAK_GBS)
                        times[(name, graph)] = p50
                    except Exception as e:  # noqa: BLE001
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                shape_rows.append(row)
        rows.extend(shape_rows)
        for row in shape_rows:
            if row.get("kernel") == "turboquant" and "p50_us" in row:
                g = row["mode"] == "graph"
                for other in fns:
                    if other != "turboquant" and (other, g) in times:
                        row[f"ratio_vs_{other}"] = row["p50_us"] / times[(other, g)]
        tq = times.get(("turboquant", True))
        best = {k[0]: v for k, v in times.items() if k[1]}
        print(f"decode {tag} b={b:4d} ctx={ctx:6d} d={d:3d} splits={splits:3d} graph p50 us: "
              + " ".join(f"{k}={v:8.1f}" for k, v in best.items())
              + (f"  tq GB/s={fns['turboquant'][1] / tq / 1e3:7.0f}" if tq else ""), flush=True)
        del cache, fns, q
    return rows


# -- store ------------------------------------------------------------------------------------
def _vllm_cache_write(k, v, slots, bs, fp8=False):
    """vLLM's own cache write for the bf16 (or fp8) paged cache, what its FlashAttention
    backend runs per layer and step: `reshape_and_cache_flash`. None without vLLM."""
    try:
        from vllm import _custom_ops as vops
    except Exception:  # noqa: BLE001
        return None
    t, hkv, d = k.shape
    nb = int(slots.max()) // bs + 1
    dt = torch.uint8 if fp8 else k.dtype
    kc = torch.zeros(nb, bs, hkv, d, dtype=dt, device=DEV)
    vc = torch.zeros(nb, bs, hkv, d, dtype=dt, device=DEV)
    one = torch.ones((), dtype=torch.float32, device=DEV)
    kind = "fp8" if fp8 else "auto"
    return lambda: vops.reshape_and_cache_flash(k, v, kc, vc, slots, kind, one, one)


# (label, tq_store keywords) of the store sweep: the default first, then its parts undone one
# at a time (the kernel of before 2026-12-03 was 16 tokens / 4 warps, no stacking, the full
# centroid search, the rotation read per dot, tf32 rotation dots and 2-byte stores of picked
# rows).
STORE_VARIANTS = [
    ("default", {}),
    ("8/2", dict(block_t=8, num_warps=2)),
    ("8/1", dict(block_t=8, num_warps=1)),
    ("16/4", dict(block_t=16, num_warps=4)),
    ("8/4 tf32", dict(block_t=8, num_warps=4, rot="tf32")),
    ("8/4 unstacked", dict(block_t=8, num_warps=4, stack=False)),
    ("8/4 full search", dict(block_t=8, num_warps=4, symmetric=False)),
    ("8/4 no preload", dict(block_t=8, num_warps=4, preload=False)),
]
LARGE_STORE_VARIANTS = [
    ("default", {}),
    ("32/8 tf32", dict(block_t=32, num_warps=8, rot="tf32")),
    ("64/8", dict(block_t=64, num_warps=8)),
    ("32/8", dict(block_t=32, num_warps=8)),
    ("16/4", dict(block_t=16, num_warps=4)),
    ("64/4", dict(block_t=64, num_warps=4)),
    ("32/8 full search", dict(block_t=32, num_warps=8, symmetric=False)),
    ("32/8 unstacked", dict(block_t=32, num_warps=8, stack=False)),
]


def run_store(args, info, rows):
    """The issue's store shape (8K tokens x 8 KV heads x 128, bytes read + written), our
    configs against vLLM's bf16 and fp8 cache writes for the same tokens; then the
    decode-step stores."""
    t, hkv, d, bs = 8192, 8, 128, 16
    codec, params = _params(d)
    k = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    nb = t // bs * 4
    cache = torch.zeros(nb, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8, device=DEV)
    slots = torch.randperm(nb * bs, device=DEV)[:t]
    nbytes = 2 * t * hkv * d * 2 + t * hkv * params.layout.slot_bytes + t * 8
    fns = [(f"turboquant {label}", (lambda kw=kw: tq_store(k, v, cache, slots, params, **kw)),
            nbytes) for label, kw in LARGE_STORE_VARIANTS]
    for name, fp8 in (("vllm_bf16", False), ("vllm_fp8", True)):
        fn = _vllm_cache_write(k, v, slots, bs, fp8)
        if fn is not None:
            fns.append((name, fn, 2 * t * hkv * d * (2 + (1 if fp8 else 2)) + t * 8))
    for name, fn, nb_ in fns:
        for graph in (False, True):
            row = dict(op="store", kernel=name, mode="graph" if graph else "eager", tokens=t,
                       kv_heads=hkv, head_size=d, bytes=nb_, **info)
            try:
                p50, p20, p80 = bench(fn, graph, args.rep_ms)
                row.update(p50_us=p50, p20_us=p20, p80_us=p80, gbs=nb_ / p50 / 1e3,
                           peak_frac=nb_ / p50 / 1e3 / PEAK_GBS)
                print(f"store T={t} hkv={hkv} d={d} {name} {'graph' if graph else 'eager'} "
                      f"p50={p50:.1f} us ({p20:.1f}/{p80:.1f}) {nb_ / p50 / 1e3:.0f} GB/s",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"store {name}: {row['error']}", flush=True)
            rows.append(row)
    run_small_stores(info, rows, args.rep_ms)
    return rows


def run_small_stores(info, rows, rep_ms):
    """Decode-step stores (one token per request; SmolLM2's 3 KV heads, head 64, 128-token
    blocks as the backend asks) under CUDA graphs, as vLLM replays them, with the default
    preset's window side copy as the backend writes it: every STORE_VARIANTS config, and
    vLLM's bf16 / fp8 cache writes of the same tokens. The latency of a handful of
    programs."""
    hkv, d, bs, w = 3, 64, 128, 64
    codec, params = _params(d)
    for t in (1, 32, 256):
        k = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
        nb = max(4, t // bs * 4)
        cache = torch.zeros(nb, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                            device=DEV)
        slots = torch.randperm(nb * bs, device=DEV)[:t]
        side = TQSide.empty(t, w, hkv, d, torch.bfloat16, DEV)
        rows_ = torch.arange(t, dtype=torch.int32, device=DEV)
        pos = torch.full((t,), 2047, dtype=torch.int32, device=DEV)
        end = pos + 1
        fns = [(f"turboquant {label}",
                (lambda kw=kw: tq_store(k, v, cache, slots, params, side, rows_, pos, end,
                                        **kw))) for label, kw in STORE_VARIANTS]
        fns.append(("turboquant default, no window side",
                    lambda: tq_store(k, v, cache, slots, params)))
        for name, fp8 in (("vllm_bf16", False), ("vllm_fp8", True)):
            fn = _vllm_cache_write(k, v, slots, 16, fp8)
            if fn is not None:
                fns.append((name, fn))
        for name, fn in fns:
            row = dict(op="store_small", kernel=name, mode="graph", tokens=t, kv_heads=hkv,
                       head_size=d, **info)
            try:
                p50, p20, p80 = bench(fn, True, rep_ms)
                row.update(p50_us=p50, p20_us=p20, p80_us=p80)
                print(f"store_small T={t} hkv={hkv} d={d} {name} graph p50={p50:.1f} us "
                      f"({p20:.1f}/{p80:.1f})", flush=True)
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"store_small {name}: {row['error']}", flush=True)
            rows.append(row)


# -- prefill ----------------------------------------------------------------------------------
def _dequant_then_attend(q, k, v, cache, bt, sl_prefix, params, scale, block_size):
    """The baseline: dequantize the whole prefix to bf16, then one causal attention."""
    prefix = int(sl_prefix)
    pos = torch.arange(prefix, device=DEV)
    slots = read_slots(cache, params.layout, bt[0].long()[pos // block_size],
                       pos % block_size)                                   # [P, Hkv, SB]
    kp, vp = decode_slots(params, slots)
    kp = (kp @ params.rotation).to(q.dtype)
    vp = (vp @ params.rotation).to(q.dtype)
    kk = torch.cat([kp, k], 0).transpose(0, 1).unsqueeze(0)              # [1, Hkv, N, D]
    vv = torch.cat([vp, v], 0).transpose(0, 1).unsqueeze(0)
    m = q.shape[0]
    mask = torch.ones(m, prefix + m, dtype=torch.bool, device=DEV).tril(prefix)
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), kk, vv, attn_mask=mask, scale=scale, enable_gqa=True)


def _backend_prefill_paths(q, k, v, cu, sl, cache, bt, params, scale, prefix, m, bs):
    """What the backend runs for a chunk over a packed prefix, and the strongest baseline:
    turboquant_deq   the store's rotated K/V and dequantized copy of the chunk (rot_out,
                     deq_out: written once here, as the store does in the same launch), prefill
                     reading the chunk's own packed keys from that copy (the default path);
    turboquant_own_fa  + the chunk's own keys through vLLM's FlashAttention
                     (backend/own_attention.py), its (out, lse) merged by the prefill kernel;
    dequant_fa       dequantize the whole prefix to bf16 (torch ops), then vLLM's
                     FlashAttention varlen, causal, over prefix + chunk: what the issue calls
                     dequantize-then-FlashAttention (vLLM's built-in TurboQuant does this);
    unpack_fa        the same with a fast dequantization: our Triton unpack
                     (kernels/unpack.py) of the prefix into a bf16 copy beside the chunk's
                     dequantized own keys (the store's own_out), FlashAttention over both
                     with the rotated query, the output rotated back: the strongest
                     dequantize-then-FlashAttention baseline here, and what the backend's
                     opt-in own_prefix does for prefixes up to its bound. Its output is
                     compared with turboquant_own_fa's (the same values, max |difference|).
    The FlashAttention rows need vLLM (compat.flash_attn_varlen); absent: only the first."""
    from vllm_turboquant import compat
    from vllm_turboquant.backend import own_attention
    from vllm_turboquant.kernels.decode import rotate_query
    hkv, d = k.shape[1], k.shape[2]
    pos = torch.arange(prefix, prefix + m, device=DEV)
    slots = bt[0].long()[pos // bs] * bs + pos % bs
    kr, vr, dk, dv, ok, ov = torch.empty(6, m, hkv, d, dtype=q.dtype, device=DEV)
    words = torch.empty(m, hkv, dtype=torch.int32, device=DEV)
    own_idx = torch.arange(m, dtype=torch.int32, device=DEV)
    deq = (dk, dv, words)
    tq_store(k, v, cache, slots, params, rot_out=(kr, vr), deq_out=deq,
             own_out=(ok, ov, own_idx))
    out = {"turboquant_deq": lambda: tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale,
                                                max_query_len=m, rotated=True, deq=deq)}
    fa = compat.flash_attn_varlen()
    if fa is None:
        print("prefill: no vLLM FlashAttention here, so no own_fa / dequant_fa rows")
        return out
    func, version = fa
    cu_own = torch.tensor([0, m], dtype=torch.int32, device=DEV)

    def own_fa():
        q_rot = rotate_query(q, params, scale)
        own = own_attention.attend(q_rot, ok, ov, cu, cu_own, m, 0)
        return tq_prefill(q, kr, vr, cu, sl, cache, bt, params, scale, max_query_len=m,
                          rotated=True, deq=deq, own=own, q_rotated=q_rot)

    def dequant_fa():
        ppos = torch.arange(prefix, device=DEV)
        packed = read_slots(cache, params.layout, bt[0].long()[ppos // bs], ppos % bs)
        kp, vp = decode_slots(params, packed)
        kk = torch.cat([(kp @ params.rotation).to(q.dtype), k])
        vv = torch.cat([(vp @ params.rotation).to(q.dtype), v])
        cu_k = torch.tensor([0, prefix + m], dtype=torch.int32, device=DEV)
        return func(q, kk, vv, max_seqlen_q=m, cu_seqlens_q=cu, max_seqlen_k=prefix + m,
                    cu_seqlens_k=cu_k, softmax_scale=scale, causal=True, fa_version=version)

    from vllm_turboquant.kernels import tq_unpack_pages
    zero = torch.zeros(prefix, dtype=torch.int32, device=DEV)
    ppos32 = torch.arange(prefix, dtype=torch.int32, device=DEV)
    cu_all = torch.tensor([0, prefix + m], dtype=torch.int32, device=DEV)

    def unpack_fa():
        kk = torch.empty(prefix + m, hkv, d, dtype=q.dtype, device=DEV)
        vv = torch.empty_like(kk)
        tq_unpack_pages(cache, bt, zero, ppos32, ppos32, params, kk, vv)
        kk[prefix:] = ok
        vv[prefix:] = ov
        q_rot = rotate_query(q, params, scale)
        o = own_attention.attend(q_rot, kk, vv, cu, cu_all, m, 0, max_seqlen_k=prefix + m)[0]
        return (o.view(-1, d).float() @ params.rotation).to(q.dtype).view(m, -1, d)

    out.update(turboquant_own_fa=own_fa, dequant_fa=dequant_fa, unpack_fa=unpack_fa)
    return out


def run_prefill(args, info, rows):
    prefix, m, hq, hkv, d, bs = 32768, 2048, 32, 8, 128, 16
    codec, params = _params(d)
    scale = d ** -0.5
    nb = (prefix + m) // bs + 2
    cache = packed_cache(nb, bs, hkv, params)
    bt = block_tables(1, prefix + m, bs, nb)
    q = torch.randn(m, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(m, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(m, hkv, d, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, m], dtype=torch.int32, device=DEV)
    sl = torch.tensor([prefix + m], dtype=torch.int32, device=DEV)
    cands = {
        "turboquant": lambda: tq_prefill(q, k, v, cu, sl, cache, bt, params, scale,
                                         max_query_len=m),
        "dequant_sdpa": lambda: _dequant_then_attend(q, k, v, cache, bt, prefix, params, scale,
                                                     bs),
    }
    cands.update(_backend_prefill_paths(q, k, v, cu, sl, cache, bt, params, scale, prefix, m,
                                        bs))
    times = {}
    for name, fn in cands.items():
        try:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
            p50, p20, p80 = bench(fn, False, args.rep_ms)
            times[name] = p50
            flops = 4 * m * (prefix + m / 2) * hq * d
            rows.append(dict(op="prefill", kernel=name, mode="eager", prefix=prefix, chunk=m,
                             q_heads=hq, kv_heads=hkv, head_size=d, p50_us=p50, p20_us=p20,
                             p80_us=p80, peak_extra_mib=peak / 2 ** 20,
                             tflops=flops / p50 / 1e6, **info))
            print(f"prefill {name}: p50={p50:.0f} us ({p20:.0f}/{p80:.0f}) "
                  f"extra peak memory {peak / 2**20:.0f} MiB, {flops / p50 / 1e6:.0f} TFLOP/s",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            rows.append(dict(op="prefill", kernel=name, error=f"{type(e).__name__}: {e}"[:300],
                             **info))
            traceback.print_exc()
    if "unpack_fa" in times and "turboquant_own_fa" in times:
        # the same attention two ways: the baseline's output must agree with ours
        diff = (cands["unpack_fa"]().float() - cands["turboquant_own_fa"]().float()).abs().max()
        print(f"prefill unpack_fa vs turboquant_own_fa: max |difference| {diff.item():.4g}")
        for row in rows:
            if row.get("op") == "prefill" and row.get("kernel") == "unpack_fa":
                row["max_abs_diff_vs_own_fa"] = diff.item()
    return rows


# -- explicit decode configs ------------------------------------------------------------------
# (batch, context, head size, query heads, KV heads) of the sweep and of decode_ab.
SWEEP_SHAPES = [(32, 16384, 128, 32, 8), (1, 32768, 128, 32, 8), (128, 4096, 128, 32, 8),
                (32, 16384, 64, 9, 3)]


def _decode_case(b, ctx, d, hq, hkv, block_size):
    """A packed cache of b sequences of ctx tokens, their block tables and a bf16 query ->
    (params, q, seq_lens, cache, block_table, packed bytes the decode reads)."""
    torch.cuda.empty_cache()
    codec, params = _params(d)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16)
    sl = torch.full((b,), ctx, dtype=torch.int32, device=DEV)
    nb = b * math.ceil(ctx / block_size) + 1
    cache = packed_cache(nb, block_size, hkv, params)
    bt = block_tables(b, ctx, block_size, nb)
    return params, q, sl, cache, bt, b * ctx * hkv * params.layout.slot_bytes


DECODE_AB = [  # tq_decode keyword arguments; the first is the default config (decode_defaults)
    {},
    {"fused": False},     # three launches: rotation GEMM, split, merge
    # The byte tiles, the default until 2026-12-02 (h200-20261202f: 560 vs 494 us at 32 x 16K).
    {"words": False, "prefetch": False, "block_n": 64, "num_stages": 2},
    {"prefetch": False},                                   # word loads, no register prefetch
    {"block_n": 64},
    {"block_n": 64, "num_warps": 8},
    # Fewer warps per program: the softmax's row max and sum then cross fewer warps (through
    # shared memory, with barriers). sm_90 SASS instructions per 64 tokens, all warps of a
    # program, head-major pages (benchmarks/results/kernel-sass-sm90-triton36.json): 2,244
    # for the default, ~2,800 for each of the prefetched rows with smaller tiles, 3,164 for
    # the 1-warp byte tile, 3,668 for the byte tile.
    {"block_n": 32, "num_warps": 2},
    {"block_n": 16, "num_warps": 1},
    {"words": False, "prefetch": False, "block_n": 16, "num_stages": 1, "num_warps": 1},
    # Twice the warps per program, to hide more latency per SM (sm_90 SASS, triton 3.6,
    # instructions per 64 tokens, registers: head 64 1,936 at 114 regs and 1,508 at 128 with
    # 256-token tiles vs the default's 1,426 at 128; head 128 2,788 at 128 regs (16 B of
    # stack) and 2,318 at 220 vs 2,244 at 247).
    {"num_warps": 8},
    {"block_n": 256, "num_warps": 8},
]


def _tuning_shapes(args):
    """(batch, context, head size, query heads, KV heads) of decode_ab and the decode sweep:
    --shapes "BxCTXxDxHQxHKV,..." or SWEEP_SHAPES."""
    if not args.shapes:
        return SWEEP_SHAPES
    return [tuple(int(x) for x in one.split("x")) for one in args.shapes.split(",")]


def run_decode_ab(args, info, rows):
    """The DECODE_AB configs on the sweep's shapes (CUDA graph p50), each checked against the
    default config's output (max |difference|): no vLLM needed."""
    for b, ctx, d, hq, hkv in _tuning_shapes(args):
        params, q, sl, cache, bt, nbytes = _decode_case(b, ctx, d, hq, hkv, args.block_size)
        splits = default_num_splits(b, hkv, ctx, q.device, 64)
        ref = None
        for i, kw in enumerate(DECODE_AB):
            out = torch.empty_like(q)
            fn = lambda: tq_decode(q, cache, bt, sl, params, 0.088, num_splits=splits,  # noqa
                                   out=out, **kw)
            try:
                p50, p20, p80 = bench(fn, True, args.rep_ms)
            except Exception as e:  # noqa: BLE001
                print(f"  decode_ab fail {kw}: {e}"[:300], flush=True)
                continue
            fn()
            torch.cuda.synchronize()
            if i == 0:
                ref = out.clone()
            # nan if the default config itself failed: nothing to compare against
            diff = (out.float() - ref.float()).abs().max().item() if ref is not None else math.nan
            rows.append(dict(op="decode_ab", batch=b, context=ctx, head_size=d, q_heads=hq,
                             kv_heads=hkv, config=kw, num_splits=splits, p50_us=p50,
                             p20_us=p20, p80_us=p80, gbs=nbytes / p50 / 1e3,
                             max_abs_diff_vs_default=diff, mode="graph", **info))
            print(f"decode_ab b={b} ctx={ctx} d={d} {kw or 'default'}: {p50:.1f} us "
                  f"{nbytes / p50 / 1e3:.0f} GB/s  max|diff| {diff:.2e}", flush=True)
        del cache
    return rows


# -- tuning sweep -----------------------------------------------------------------------------
def run_sweep(args, info, rows):
    """Decode/store/prefill launch parameters on a few shapes (CUDA graph p50)."""
    import itertools
    for b, ctx, d, hq, hkv in _tuning_shapes(args):
        params, q, sl, cache, bt, nbytes = _decode_case(b, ctx, d, hq, hkv, args.block_size)
        out = torch.empty_like(q)
        base_splits = default_num_splits(b, hkv, ctx, q.device, 64)
        results = []
        # words: code bytes loaded as int32 words with the register prefetch (the default
        # since 2026-12-02f), or a byte tile without it (the default before). lookup 3
        # (register prmt) only: the tables lost by 1.4x.
        # Split counts around the default config. The backend derives its count from
        # max_model_len, not the context (impl.decode_splits): x4 at a 2K context is what an
        # 8K max_model_len serves; fewer splits mean fewer empty programs for the merge.
        grid = itertools.product((True, False), (32, 64, 128), (4, 8), (1, 2, 3),
                                 (0.25, 0.5, 1, 2, 4))
        for words, bn, nw, ns, sf in grid:
            if sf != 1 and (words, bn, nw, ns) != (True, 128, 4, 1):
                continue   # the split count only around one config
            if not words and (bn, nw, ns) != (64, 4, 2):
                continue   # byte tiles: the default config only
            splits = max(1, int(base_splits * sf))
            fn = lambda: tq_decode(q, cache, bt, sl, params, 0.088, num_splits=splits,  # noqa
                                   out=out, block_n=bn, num_warps=nw, num_stages=ns,
                                   words=words, prefetch=words)
            try:
                p50, p20, p80 = bench(fn, True, args.rep_ms)
            except Exception as e:  # noqa: BLE001
                print(f"  sweep fail words={words} bn={bn} nw={nw} ns={ns}: {e}"[:300])
                continue
            results.append((p50, words, bn, nw, ns, splits))
            rows.append(dict(op="decode_sweep", batch=b, context=ctx, head_size=d, q_heads=hq,
                             kv_heads=hkv, words=words, block_n=bn, num_warps=nw,
                             num_stages=ns, num_splits=splits, p50_us=p50, p20_us=p20,
                             p80_us=p80, gbs=nbytes / p50 / 1e3, mode="graph", **info))
        results.sort()
        print(f"sweep decode b={b} ctx={ctx} d={d} hq={hq} hkv={hkv}: best 6 (p50 us, words, "
              f"block_n, warps, stages, splits):", flush=True)
        for r in results[:6]:
            print(f"   {r[0]:8.1f} us {nbytes / r[0] / 1e3:6.0f} GB/s  {r[1:]}", flush=True)
        wrd = [r for r in results if r[1:5] == (True, 128, 4, 1) and r[5] == base_splits]
        byt = [r for r in results if r[1:5] == (False, 64, 4, 2) and r[5] == base_splits]
        if wrd and byt:
            print(f"   prefetched word loads, block 128, 1 stage (4-bit default) "
                  f"{wrd[0][0]:.1f} us; byte tiles {byt[0][0]:.1f} us", flush=True)
        del cache
    if args.sweep_decode_only:
        return rows
    # store
    t, hkv, d, bs = 8192, 8, 128, 16
    codec, params = _params(d)
    k = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, hkv, d, device=DEV, dtype=torch.bfloat16)
    cache = torch.zeros(t // bs * 4, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                        device=DEV)
    slots = torch.randperm(cache.shape[0] * bs, device=DEV)[:t]
    nbytes = 2 * t * hkv * d * 2 + t * hkv * params.layout.slot_bytes
    for bt_, nw in itertools.product((16, 32, 64), (4, 8)):
        fn = lambda: tq_store(k, v, cache, slots, params, block_t=bt_, num_warps=nw)  # noqa
        try:
            p50, _, _ = bench(fn, True, args.rep_ms)
            print(f"sweep store block_t={bt_} warps={nw}: {p50:.1f} us "
                  f"{nbytes / p50 / 1e3:.0f} GB/s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sweep store block_t={bt_} warps={nw} failed: {e}"[:300])
    # prefill
    prefix, m, hq, hkv, d, bs = 32768, 2048, 32, 8, 128, 16
    codec, params = _params(d)
    nb = (prefix + m) // bs + 2
    cache = packed_cache(nb, bs, hkv, params)
    bt = block_tables(1, prefix + m, bs, nb)
    q = torch.randn(m, hq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(m, hkv, d, device=DEV, dtype=torch.bfloat16)
    cu = torch.tensor([0, m], dtype=torch.int32, device=DEV)
    sl = torch.tensor([prefix + m], dtype=torch.int32, device=DEV)
    for bm, bn, nw, ns in itertools.product((16, 32, 64), (32, 64), (4, 8), (1,)):
        fn = lambda: tq_prefill(q, k, k, cu, sl, cache, bt, params, 0.088,  # noqa: E731
                                max_query_len=m, block_m=bm, block_n=bn, num_warps=nw,
                                num_stages=ns)
        try:
            p50, _, _ = bench(fn, False, args.rep_ms)
            print(f"sweep prefill block_m={bm} (rows {bm * 4}) block_n={bn} warps={nw} "
                  f"stages={ns}: {p50:.0f} us", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"sweep prefill bm={bm} bn={bn} nw={nw} ns={ns} failed: {e}"[:300])
    return rows


# -- output -----------------------------------------------------------------------------------
def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    dec = [r for r in rows if r.get("op") == "decode" and r.get("mode") == "graph"
           and "p50_us" in r and r["model"] == "gqa4" and r["head_size"] == 128]
    if not dec:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for kernel in sorted({r["kernel"] for r in dec}):
        for b, ls in zip(sorted({r["batch"] for r in dec}), ("-", "--", ":", "-.")):
            pts = sorted((r["context"], r["p50_us"]) for r in dec
                         if r["kernel"] == kernel and r["batch"] == b)
            if pts:
                axes[0].plot(*zip(*pts), ls, marker="o", label=f"{kernel} b={b}")
    axes[0].set(xscale="log", yscale="log", xlabel="context", ylabel="p50 us (CUDA graph)",
                title="decode, head 128, 32 q / 8 kv heads")
    axes[0].legend(fontsize=6)
    tq = [r for r in dec if r["kernel"] == "turboquant"]
    for b in sorted({r["batch"] for r in tq}):
        pts = sorted((r["context"], r["peak_frac"]) for r in tq if r["batch"] == b)
        axes[1].plot(*zip(*pts), marker="o", label=f"b={b}")
    axes[1].set(xscale="log", xlabel="context", ylabel=f"fraction of {PEAK_GBS:.0f} GB/s",
                title="turboquant decode: packed bytes read / time")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few shapes, short repeats")
    ap.add_argument("--only", default="decode,store,prefill",
                    help="comma list of decode, store, prefill, sweep (launch-parameter sweep), "
                         "decode_ab (the DECODE_AB decode configs)")
    ap.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "results"))
    ap.add_argument("--rep-ms", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--block-n", type=int, default=None, help="decode tile (default per head)")
    ap.add_argument("--num-warps", type=int, default=4)
    ap.add_argument("--ab-words", action="store_true",
                    help="decode: also time the byte tiles (words=False, the default until "
                         "2026-12-02) as turboquant_bytes")
    ap.add_argument("--shapes", default=None,
                    help="decode_ab and sweep: comma list of BxCTXxDxHQxHKV (default: "
                         "SWEEP_SHAPES)")
    ap.add_argument("--sweep-decode-only", action="store_true",
                    help="sweep: decode configs only (no store/prefill sweep)")
    args = ap.parse_args()
    if args.rep_ms is None:
        args.rep_ms = 30 if args.quick else 60
    info = env_info()
    print(json.dumps(info), flush=True)
    rows = []
    for op in args.only.split(","):
        try:
            {"decode": run_decode, "store": run_store, "prefill": run_prefill,
             "sweep": run_sweep, "decode_ab": run_decode_ab}[op](
                args, info, rows)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    gpu = info["gpu"].replace(" ", "_").replace("/", "_")
    base = os.path.join(args.out, f"kernels-{gpu}-{stamp}{'-quick' if args.quick else ''}")
    with open(base + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, base + ".png")
    print(f"wrote {base}.json", flush=True)


if __name__ == "__main__":
    main()
