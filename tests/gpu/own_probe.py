"""The prefill kernel with the own part (tq_prefill's `own`) against the deq-copy path,
at the GPU test's shapes, over launch configs, with NaN-filled spare buffers and rows without
keys reported as +inf, -inf or NaN. (The run of 2026-12-03, benchmarks/results/h200-20261203d/
call1-probe/, also had a second order, the own part seeding the loops: as right, since removed.) Diagnostic, not a test (pytest does not
collect it): it found that the NaN of 2026-12-03 was not the kernel's (every case here is
finite with the torch stand-in) but FlashAttention's last key tile reading unwritten rows.

    python3 tests/gpu/own_probe.py [--fa]     # --fa: the own part through vLLM's FlashAttention
On a CPU (TRITON_INTERPRET=1) it runs smaller shapes and the two default variants only.
"""
import itertools
import sys

import torch

sys.path.insert(0, "tests")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.kernels import TQLayerParams, TQSide
from vllm_turboquant.kernels.decode import rotate_query
from vllm_turboquant.kernels.prefill import tq_prefill
from vllm_turboquant.kernels.reference import own_attention_ref, tq_prefill_ref, tq_store_ref
from vllm_turboquant.kernels.store import tq_store

USE_FA = "--fa" in sys.argv


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(preset, window, align, lens, qlens, bs, d=64, hq=9, hkv=3, dtype=torch.bfloat16,
        variants=({},), init="empty"):
    """One mixed step (a continuation chunk, a fresh prompt, a decode) stored through
    tq_store (rot/deq/own copies in one buffer filled per `init`: empty, zeros or nan), then
    the prefill with and without the own part, per launch-config variant."""
    torch.manual_seed(0)
    cfg = TQConfig.from_name(preset, window=window, align=align)
    params = TQLayerParams.from_codec(TQLayerCodec(cfg, d, layer=5), DEV)
    side = TQSide.empty(len(lens), window, hkv, d, dtype, DEV) if window else None
    mb = max((n + bs - 1) // bs for n in lens)
    nb = len(lens) * mb + 1
    cache = torch.zeros(nb, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8, device=DEV)
    bt = (torch.randperm(len(lens) * mb, device=DEV) + 1).reshape(len(lens), mb).int()
    seqs = []
    for b, n in enumerate(lens):
        k = (torch.randn(n, hkv, d, device=DEV) * 2 + 0.3).to(dtype)
        v = torch.randn(n, hkv, d, device=DEV).to(dtype)
        pos = torch.arange(n, device=DEV)
        slots = bt[b].long()[pos // bs] * bs + pos % bs
        tq_store_ref(k, v, cache, slots, params, side, torch.full_like(pos, b), pos,
                     torch.full_like(pos, n))
        seqs.append((k, v))
    k = torch.cat([s[0][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    v = torch.cat([s[1][n - m:] for s, n, m in zip(seqs, lens, qlens)])
    q = torch.randn(sum(qlens), hq, d, device=DEV).to(dtype)
    cu = torch.tensor([0] + qlens, device=DEV).cumsum(0).int()
    cu_k = torch.tensor([0] + [max(m - window, 0) for m in qlens], device=DEV).cumsum(0).int()
    sl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    t = k.shape[0]
    own_idx = torch.full((t,), -1, dtype=torch.int32, device=DEV)
    slots = torch.empty(t, dtype=torch.long, device=DEV)
    for b, (n, m) in enumerate(zip(lens, qlens)):
        pos = torch.arange(n - m, n, device=DEV)
        slots[int(cu[b]):int(cu[b + 1])] = bt[b].long()[pos // bs] * bs + pos % bs
        keys = max(m - window, 0)
        own_idx[int(cu[b]):int(cu[b]) + keys] = torch.arange(keys, device=DEV, dtype=torch.int32) + int(cu_k[b])
    buf = (torch.empty if init == "empty" else torch.zeros)(6, t, hkv, d, dtype=dtype, device=DEV)
    if init == "nan":
        buf.fill_(float("nan"))
    words = torch.empty(t, hkv, dtype=torch.int32, device=DEV)
    deq = (buf[2], buf[3], words)
    tq_store(k, v, cache, slots, params, rot_out=(buf[0], buf[1]), deq_out=deq,
             own_out=(buf[4], buf[5], own_idx))
    n_k = int(cu_k[-1])
    print(f"  own_k rows {n_k}: nonfinite {int((~torch.isfinite(buf[4][:n_k])).sum())}, "
          f"own_v {int((~torch.isfinite(buf[5][:n_k])).sum())}, deq_k {int((~torch.isfinite(buf[2])).sum())}")
    scale = d ** -0.5
    q_rot = rotate_query(q, params, scale)
    own = own_attention_ref(q_rot, buf[4], buf[5], cu, cu_k, window)
    if USE_FA:
        from vllm_turboquant.backend import own_attention
        fa = own_attention.attend(q_rot, buf[4], buf[5], cu, cu_k, max(qlens), window)
        fin_r, fin_f = torch.isfinite(own[1]), torch.isfinite(fa[1])
        print(f"  FA: out nonfinite {int((~torch.isfinite(fa[0])).sum())}, lse finite {int(fin_f.sum())} "
              f"(ref {int(fin_r.sum())}, same mask {bool(torch.equal(fin_r, fin_f))}), "
              f"lse values where not finite: {fa[1][~fin_f].unique()[:4].tolist()}, "
              f"max |lse diff| {float((fa[1][fin_r & fin_f] - own[1][fin_r & fin_f]).abs().max()):.3e}, "
              f"out rel {rel(fa[0], own[0]):.2e}")
        own = fa
    print(f"  own lse finite rows {int(torch.isfinite(own[1]).sum())}/{own[1].numel()}, "
          f"own_o nonfinite {int((~torch.isfinite(own[0])).sum())}")
    want = tq_prefill_ref(q, buf[0], buf[1], cu, sl, cache, bt, params, scale, side, rotated=True)
    fin = torch.isfinite(own[1])
    seeds = {"ref": own}
    if DEV == "cuda":
        for name, val in (("+inf", float("inf")), ("-inf", float("-inf")), ("nan", float("nan"))):
            seeds[name] = (own[0], torch.where(fin, own[1], torch.full_like(own[1], val)))
    for (sname, seed), var in itertools.product(seeds.items(), variants):
        if sname != "ref" and var != variants[0]:
            continue
        base = tq_prefill(q, buf[0], buf[1], cu, sl, cache, bt, params, scale, side,
                          max_query_len=max(qlens), rotated=True, deq=deq, **var)
        got = tq_prefill(q, buf[0], buf[1], cu, sl, cache, bt, params, scale, side,
                         max_query_len=max(qlens), rotated=True, deq=deq, own=seed,
                         q_rotated=q_rot, **var)
        bad = ~torch.isfinite(got)
        rows = bad.any(-1).nonzero()[:6].tolist()
        bnan = int((~torch.isfinite(base)).sum())
        print(f"  seed {sname} {var}: nan {int(bad.sum())} rows(tok,head) {rows} base nan {bnan} "
              f"base-vs-ref {rel(torch.nan_to_num(base), want):.2e} own-vs-base {rel(torch.nan_to_num(got), torch.nan_to_num(base)):.2e}")


if __name__ == "__main__":
    big = DEV == "cuda"
    lens, qlens = ([2500, 1500, 130], [2000, 1500, 1]) if big else ([300, 200, 130], [260, 200, 1])
    variants = [{}]
    more = [dict(deq_stages=st, block_m=32, block_n=n) for st in (1, 3) for n in (32, 64)]
    for i, (preset, w, a, bs) in enumerate([("turboquant", 64, 128, 128),
                                            ("turboquant", 64, 0, 128),
                                            ("turboquant", 64, 128, 16), ("tq-k4v4", 0, 0, 128)]):
        for init in (["empty", "nan"] if big and i == 0 else ["empty"]):
            print(preset, w, a, bs, init, flush=True)
            run(preset, w, a, lens, qlens, bs, init=init,
                variants=variants + (more if big and i == 0 and init == "empty" else []))
