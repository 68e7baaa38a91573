"""One attention layer's step, as the backend runs it, timed on the host and on the GPU.

The e2e runs are dominated by mixed prefill+decode steps, which vLLM runs with attention
outside CUDA graphs: every launch's host time is paid per layer and step. This script builds
the step of `backend/impl.py` (store with rotated output, decode, prefill over packed pages,
deferred window store) for the SmolLM2 shape (9 query / 3 KV heads, head 64, bf16, the
preset's block size: 128 for the aligned default)
and times, per call:

  host_us  wall time of the launch on the host (median; the queue is drained between calls,
           outside the timed region);
  gpu_us   back-to-back execution of the same calls, bracketed by CUDA events while a sleep
           kernel holds the stream (so launches are not in it);

for each op alone, the whole forward, and vLLM's FlashAttention (varlen, paged bf16) plus
its cache write for the same batch. A cProfile of the forward shows where host time goes.

Device machine (vLLM 0.25 bundle):  python3 benchmarks/layer_step.py [--sweep] --json OUT.json
(--sweep: the prefill kernel's launch configs; --best OUT.json prints the fastest correct one)
CPU (interpreter, a smoke check of the script only):
  TRITON_INTERPRET=1 python benchmarks/layer_step.py --smoke
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch

from vllm_turboquant import settings
from vllm_turboquant.backend.metadata import own_copy_rows
from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.kernels import (TQLayerParams, TQSide, _launch, tq_decode, tq_prefill,
                                     tq_store)
from vllm_turboquant.kernels.decode import rotate_query
from vllm_turboquant.kernels._common import default_num_splits, next_pow2


def build_step(nd: int, dec_ctx: int, chunk: int, prefix: int, hq=9, hkv=3, d=64, bs=None,
               window=64, dtype=torch.bfloat16, device="cuda", preset="turboquant",
               max_model_len=None):
    """Tensors of one mixed step: nd decodes (context dec_ctx) then one prefill chunk of
    `chunk` tokens after `prefix` cached ones (chunk 0: a decode-only step). Returns a dict of
    everything the ops take. bs: the KV block size, default what the backend asks vLLM for
    (settings.preferred_block_size: 128 for the aligned default preset). max_model_len: what
    the decode split count comes from, as in the backend (impl.decode_splits); default the
    step's longest sequence."""
    g = torch.Generator(device="cpu").manual_seed(0)
    cfg = TQConfig.from_name(preset, window=window)
    bs = settings.preferred_block_size(cfg, 16) if bs is None else bs
    params = TQLayerParams.from_codec(TQLayerCodec(cfg, d, layer=3), device)
    lens = [dec_ctx] * nd + ([prefix + chunk] if chunk else [])
    qlens = [1] * nd + ([chunk] if chunk else [])
    b, t = len(lens), sum(qlens)
    max_blocks = -(-max(lens) // bs)
    num_blocks = b * max_blocks + 8
    cache = torch.zeros(num_blocks, bs, hkv, params.layout.slot_bytes, dtype=torch.uint8,
                        device=device)
    bt = torch.randperm(num_blocks - 8, generator=g)[:b * max_blocks].view(b, max_blocks)
    bt = bt.to(torch.int32).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32,
                       device=device)
    pos = torch.cat([torch.arange(n - q, n) for n, q in zip(lens, qlens)])
    rows = torch.cat([torch.full((q,), r) for r, q in enumerate(qlens)])
    bt_cpu = bt.cpu().long()
    slots = bt_cpu[rows, pos // bs] * bs + pos % bs
    send = torch.tensor(lens)[rows]
    # the first store's window entries: decodes, and a fresh chunk's (no prefix); a
    # continuation chunk's wait for the side store (backend/metadata.py, since 2026-12-08)
    store_end = torch.where((torch.arange(t) >= nd) & (prefix > 0), 1 << 30, send)
    side_tok = torch.arange(max(nd, t - window), t)   # the chunk's last min(W, chunk) tokens
    q = torch.randn(t, hq, d, generator=g).to(dtype).to(device)
    k = torch.randn(t, hkv, d, generator=g).to(dtype).to(device)
    v = torch.randn(t, hkv, d, generator=g).to(dtype).to(device)
    if chunk and prefix:   # the chunk's cached prefix: real packed tokens (the paths' outputs
        # are compared in main(); the kernels' time does not depend on the values)
        ppos = torch.arange(prefix)
        pslots = bt_cpu[nd, ppos // bs] * bs + ppos % bs
        tq_store(torch.randn(prefix, hkv, d, generator=g).to(dtype).to(device),
                 torch.randn(prefix, hkv, d, generator=g).to(dtype).to(device), cache,
                 pslots.to(device), params)
    i32 = dict(dtype=torch.int32, device=device)
    # qsl: the whole batch's query starts (decodes as one-token chunks, what impl.forward hands
    # the prefill kernel); prefill_qsl: the chunk's alone, rebased to 0
    return dict(
        params=params, q=q, k=k, v=v, cache=cache, bt=bt, seq_lens=seq_lens,
        nd=nd, t=t, chunk=chunk, prefix=prefix, hkv=hkv, block_size=bs,
        max_model_len=max_model_len or max_blocks * bs,
        slots=slots.to(device), rows=rows.to(**i32), pos=pos.to(**i32),
        store_end=store_end.to(**i32), qsl=qsl, prefill_qsl=(qsl[nd:] - qsl[nd]).contiguous(),
        side=TQSide.empty(128, window, hkv, d, dtype, device) if window else None,
        side_tok=side_tok.to(device), side_slots=slots[side_tok].to(device),
        side_rows=rows[side_tok].to(**i32), side_pos=pos[side_tok].to(**i32),
        side_end=send[side_tok].to(**i32), out=torch.empty_like(q), scale=d ** -0.5,
        window=window, qlens=qlens, lens=lens,
        # what the metadata builder gives a step whose chunks' own packed keys go through
        # FlashAttention (backend/own_attention.py): own_index, own_cu_k, own_cu_k_p
        **own_copy_rows(qsl, seq_lens, t, nd, window,
                        torch.arange(t, dtype=torch.int32, device=device)))


def new_rot(s) -> tuple[torch.Tensor, tuple]:
    """The buffers impl.forward allocated per layer and mixed step on CUDA until 2026-12-04
    (now views of backend/workspace.py's buffers): [4, T, Hkv, D] for the
    rotated K/V (0, 1) and the dequantized slots (2, 3), and the [T, Hkv] scale words.
    Returns (rot, deq) with deq = (rot[2], rot[3], words), the store's deq_out."""
    rot = torch.empty((4, s["t"]) + s["k"].shape[1:], dtype=s["q"].dtype, device=s["q"].device)
    words = torch.empty((s["t"], s["k"].shape[1]), dtype=torch.int32, device=s["q"].device)
    return rot, (rot[2], rot[3], words)


def ops(s):
    """name -> zero-argument callable, one per launch group of impl.forward, plus 'forward'."""
    nd = s["nd"]
    splits = default_num_splits(next_pow2(nd), s["hkv"], s["max_model_len"], s["q"].device)
    rot, deq = new_rot(s)
    side = s["side"]
    side_p = None if side is None else TQSide(*(x[nd:] for x in side))

    def store():
        tq_store(s["k"], s["v"], s["cache"], s["slots"], s["params"], side, s["rows"],
                 s["pos"], s["store_end"], rot_out=(rot[0], rot[1]), deq_out=deq)

    def decode():
        if nd:
            tq_decode(s["q"][:nd], s["cache"], s["bt"][:nd], s["seq_lens"][:nd], s["params"],
                      s["scale"], side, num_splits=splits, out=s["out"][:nd])

    def decode_rotation():   # the query rotation inside decode (one addmm) alone
        if nd:
            rotate_query(s["q"][:nd], s["params"], s["scale"])

    def prefill():
        tq_prefill(s["q"][nd:], rot[0, nd:], rot[1, nd:], s["prefill_qsl"], s["seq_lens"][nd:],
                   s["cache"], s["bt"][nd:], s["params"], s["scale"], side_p,
                   max_query_len=s["chunk"], out=s["out"][nd:], rotated=True,
                   deq=tuple(x[nd:] for x in deq))

    def side_store():    # a fresh chunk's step has none (its entries came with the store)
        if side is not None and s["prefix"] > 0:
            tq_store(s["k"], s["v"], s["cache"], s["side_slots"], s["params"], side,
                     s["side_rows"], s["side_pos"], s["side_end"], token_index=s["side_tok"])

    def unified():
        tq_prefill(s["q"], rot[0], rot[1], s["qsl"], s["seq_lens"], s["cache"], s["bt"],
                   s["params"], s["scale"], side, max_query_len=s["chunk"], out=s["out"],
                   rotated=True, deq=deq)

    def forward_split():     # impl.forward's split path (sequences >= SPLIT_DECODE_CTX tokens)
        new_rot(s)
        store()
        decode()
        prefill()
        side_store()

    def forward():           # impl.forward before 2026-12-04: buffers allocated per layer
        new_rot(s)
        store()
        unified()
        side_store()

    # impl.forward since 2026-12-04 (backend/workspace.py): the buffers are views of the
    # device's workspace, made once per step, so a layer allocates nothing ("_ws")
    def forward_split_ws():
        store()
        decode()
        prefill()
        side_store()

    def forward_ws():
        store()
        unified()
        side_store()

    res = {"store": store, "decode": decode, "decode_rotation": decode_rotation,
           "prefill": prefill, "side_store": side_store,
           "unified_prefill": unified, "forward_split": forward_split, "forward": forward,
           "forward_split_ws": forward_split_ws, "forward_ws": forward_ws}
    from vllm_turboquant.backend import own_attention
    if own_attention.enabled(s["q"].device):
        res.update(_own_ops(s, rot, deq, splits, side_p, store, decode, side_store))
    return res


def _own_ops(s, rot, deq, splits, side_p, store, decode, side_store):
    """The same steps with the chunks' own packed keys through FlashAttention (what
    impl.forward does when backend/own_attention.py is enabled): the store also writes the
    compact copy, FlashAttention runs over it, the prefill kernel merges its result in."""
    from vllm_turboquant.backend import own_attention
    nd, w, mq = s["nd"], s["window"], max(s["chunk"], 1)
    # zeroed (FlashAttention's last key tile reads past the written rows)
    buf = torch.zeros((2,) + tuple(s["k"].shape), dtype=s["q"].dtype, device=s["q"].device)

    def new_rot_own():       # impl.forward's per-layer buffers with the own copy, zeroed,
                             # until 2026-12-04
        rot6 = torch.empty((6, s["t"]) + s["k"].shape[1:], dtype=s["q"].dtype,
                           device=s["q"].device)
        rot6[4:].zero_()
        return rot6, torch.empty((s["t"], s["k"].shape[1]), dtype=torch.int32,
                                 device=s["q"].device)

    store_own, own_fa, prefill_own = _own_path(s, rot, deq, side_p, buf, s["own_index"],
                                               s["own_cu_k_p"])

    def unified_own():
        q_rot = rotate_query(s["q"], s["params"], s["scale"])
        own = own_attention.attend(q_rot, buf[0], buf[1], s["qsl"], s["own_cu_k"], mq, w)
        tq_prefill(s["q"], rot[0], rot[1], s["qsl"], s["seq_lens"], s["cache"], s["bt"],
                   s["params"], s["scale"], s["side"], max_query_len=s["chunk"], out=s["out"],
                   rotated=True, deq=deq, own=own, q_rotated=q_rot)

    def forward_split_own():
        new_rot_own()
        store_own()
        decode()
        prefill_own()
        side_store()

    def forward_own():
        new_rot_own()
        store_own()
        unified_own()
        side_store()

    def forward_split_own_ws():   # the workspace's forward: no allocation, no zero fill
        store_own()
        decode()
        prefill_own()
        side_store()

    def forward_own_ws():
        store_own()
        unified_own()
        side_store()

    res = {"store_own": store_own, "own_fa": own_fa, "prefill_own": prefill_own,
           "unified_prefill_own": unified_own, "forward_split_own": forward_split_own,
           "forward_own": forward_own, "forward_split_own_ws": forward_split_own_ws,
           "forward_own_ws": forward_own_ws}
    if s["chunk"] and max(s["lens"][nd:]) > s["chunk"]:
        res.update(_own_prefix_ops(s, rot, deq, side_p, decode, side_store))
    return res


def _own_path(s, rot, deq, side_p, buf, own_index, cu_k_p, max_k=None,
              own_prefix: bool = False):
    """(store, FlashAttention, prefill) of the split path with FlashAttention's copy `buf`
    ([2, rows, Hkv, D]): the store writes the chunk's rows of it (own_index),
    FlashAttention covers each chunk's keys in it (cu_k_p; max_k: the longest key run when
    the copy holds the prefixes too), the prefill kernel the rest (own_prefix: all but the
    window's part of the prefix)."""
    from vllm_turboquant.backend import own_attention
    nd, mq = s["nd"], max(s["chunk"], 1)

    def store():
        tq_store(s["k"], s["v"], s["cache"], s["slots"], s["params"], s["side"], s["rows"],
                 s["pos"], s["store_end"], rot_out=(rot[0], rot[1]), deq_out=deq,
                 own_out=(buf[0], buf[1], own_index))

    def fa():                # the FlashAttention call alone (split path: the chunk's rows)
        q_rot = rotate_query(s["q"][nd:], s["params"], s["scale"])
        return q_rot, own_attention.attend(q_rot, buf[0], buf[1], s["prefill_qsl"], cu_k_p,
                                           mq, s["window"], max_seqlen_k=max_k)

    def prefill():
        q_rot, own = fa()
        tq_prefill(s["q"][nd:], rot[0, nd:], rot[1, nd:], s["prefill_qsl"], s["seq_lens"][nd:],
                   s["cache"], s["bt"][nd:], s["params"], s["scale"], side_p,
                   max_query_len=s["chunk"], out=s["out"][nd:], rotated=True,
                   deq=tuple(x[nd:] for x in deq), own=own, q_rotated=q_rot,
                   own_prefix=own_prefix)

    return store, fa, prefill


def _own_prefix_ops(s, rot, deq, side_p, decode, side_store):
    """The split path with the cached prefix through FlashAttention too
    ($VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX > 0; off by default since it lost the e2e long
    workload by 10%, benchmarks/results/h200-20261207/): the store writes the chunk's rows of
    the copy, kernels/unpack.py the prefix's, FlashAttention covers every key j <= t - W, the
    prefill kernel only the window's part of the prefix and the chunk's window band. The rows
    are the metadata builder's (own_copy_rows with prefix rows)."""
    from vllm_turboquant.kernels import tq_unpack_pages
    nd, w, dev = s["nd"], s["window"], s["q"].device
    keys = [0 if b < nd else max(n - w, 0) for b, n in enumerate(s["lens"])]
    n_pre = sum(min(n - q, k) for n, q, k in zip(s["lens"], s["qlens"], keys))
    r = own_copy_rows(s["qsl"], s["seq_lens"], s["t"], nd, w,
                      torch.arange(max(s["t"], n_pre), dtype=torch.int32, device=dev),
                      (n_pre, sum(keys)))
    buf = torch.zeros((2, r["own_rows"]) + tuple(s["k"].shape[1:]), dtype=s["q"].dtype,
                      device=dev)
    store, fa, prefill = _own_path(s, rot, deq, side_p, buf, r["own_index"], r["own_cu_k_p"],
                                   max(s["lens"]), own_prefix=True)

    def unpack_prefix():
        tq_unpack_pages(s["cache"], s["bt"], r["unpack_req"], r["unpack_pos"],
                        r["unpack_dst"], s["params"], buf[0], buf[1])

    def forward_split_own_prefix_ws():
        store()
        unpack_prefix()
        decode()
        prefill()
        side_store()

    return {"store_own_prefix": store, "unpack_prefix": unpack_prefix,
            "own_fa_prefix": fa, "prefill_own_prefix": prefill,
            "forward_split_own_prefix_ws": forward_split_own_prefix_ws}


def fa_ops(s):
    """vLLM's FlashAttention for the same batch on a paged bf16 cache, and its cache write."""
    from vllm import _custom_ops as vops
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    q, k, v = s["q"], s["k"], s["v"]
    nb, bs = s["cache"].shape[:2]
    kc = torch.zeros(nb, bs, k.shape[1], k.shape[2], dtype=q.dtype, device=q.device)
    vc = torch.zeros_like(kc)
    one = torch.ones((), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)

    def cache_write():
        vops.reshape_and_cache_flash(k, v, kc, vc, s["slots"], "auto", one, one)

    def attend(version):
        return lambda: flash_attn_varlen_func(
            q, kc, vc, max_seqlen_q=max(s["chunk"], 1), cu_seqlens_q=s["qsl"],
            max_seqlen_k=int(s["seq_lens"].max()), seqused_k=s["seq_lens"],
            softmax_scale=s["scale"], causal=True, block_table=s["bt"], out=out,
            fa_version=version)

    res = {"fa_cache_write": cache_write}
    for ver in (3, 2):
        res[f"fa{ver}"] = attend(ver)

    def fa_forward():
        cache_write()
        res["fa3"]()
    res["fa_forward"] = fa_forward
    return res


def sweep_prefill(s, configs, reps: int, sync) -> list[dict]:
    """The whole batch through the prefill kernel (as impl.forward does since 2026-12-02)
    under each launch config: GPU/host time and the error against the torch reference."""
    from vllm_turboquant.kernels.reference import tq_prefill_ref

    qsl, (rot, deq) = s["qsl"], new_rot(s)
    tq_store(s["k"], s["v"], s["cache"], s["slots"], s["params"], s["side"], s["rows"],
             s["pos"], s["store_end"], rot_out=(rot[0], rot[1]), deq_out=deq)
    want = tq_prefill_ref(s["q"], s["k"], s["v"], qsl, s["seq_lens"], s["cache"], s["bt"],
                          s["params"], s["scale"], s["side"]).float()
    rows = []
    for cfg in configs:
        out = torch.empty_like(s["q"])
        kw = {k: v for k, v in cfg.items() if k != "deq"}

        def fn():
            tq_prefill(s["q"], rot[0], rot[1], qsl, s["seq_lens"], s["cache"], s["bt"],
                       s["params"], s["scale"], s["side"], max_query_len=max(s["chunk"], 1),
                       out=out, rotated=True, deq=deq if cfg.get("deq", True) else None, **kw)
        row = dict(cfg)
        try:
            row.update(timeit(fn, reps, sync))
            row["rel_err"] = ((out.float() - want).norm() / want.norm().clamp(min=1e-30)).item()
        except Exception as e:  # noqa: BLE001 - a config that fails is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print("  sweep", row, flush=True)
    return rows


def best_config(result: dict, max_err: float = 1e-2) -> dict:
    """The fastest sweep row (GPU time) of the first sweep case with rel_err < max_err, among
    the rows that read the deq copy as impl.forward does."""
    rows = next(iter(result["sweep"].values()))
    ok = [r for r in rows if r.get("gpu_us") and r.get("rel_err", 1.0) < max_err
          and r.get("deq", True)]
    best = min(ok, key=lambda r: r["gpu_us"])
    return {k: best[k] for k in ("block_m", "block_n", "num_warps", "deq_stages") if k in best}


def timeit(fn, reps: int, sync) -> dict:
    """Median host microseconds per call (no sync inside a call) and GPU microseconds."""
    for _ in range(3):
        fn()
    sync()
    host = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        sync()          # keep the launch queue empty, so host time is the launch alone
    gpu = None
    if torch.cuda.is_available():
        # GPU time alone: a sleep kernel holds the stream while the host queues every call,
        # so the events bracket back-to-back execution, not the launches.
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(statistics.median(host) * reps * 1.5e-6 * 2e9) + 1_000_000)
        e0.record()
        for _ in range(reps):
            fn()
        e1.record()
        torch.cuda.synchronize()
        gpu = e0.elapsed_time(e1) * 1000 / reps
    return {"host_us": statistics.median(host), "host_p20_us": sorted(host)[len(host) // 5],
            "gpu_us": gpu}


def profile(fn, n: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def host_table(fn, n: int) -> str:
    """torch.profiler's CPU-side table of n calls of fn (self CPU time per op, what each
    torch op, Triton launch and cuda* runtime call costs on this host), sorted by self CPU."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)     # adds the runtime/driver calls (cuLaunch*)
    for _ in range(3):
        fn()
    with tprofile(activities=acts) as prof:
        for _ in range(n):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter)")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--max-model-len", type=int, default=8192,
                    help="what the decode split count comes from (the backend takes vLLM's "
                         "max_model_len; e2e.py's engines use 8192)")
    ap.add_argument("--sweep", action="store_true", help="prefill launch configs (GPU)")
    ap.add_argument("--cases", default=None,
                    help="comma list of substrings: run only the cases whose name has one")
    ap.add_argument("--ab-launch", action="store_true",
                    help="time every op also with Triton's plain launch (kernels/_launch.py off)")
    ap.add_argument("--host-table", default=None, metavar="OP",
                    help="also record torch.profiler's CPU table of this op (e.g. "
                         "forward_split_own) per case: which calls its host time is made of")
    ap.add_argument("--best", metavar="JSON", help="print the fastest correct SmolLM2 prefill "
                    "config of a --sweep run, as $VLLM_TURBOQUANT_PREFILL_CONFIG takes it")
    args = ap.parse_args()
    if args.best:
        print(json.dumps(best_config(json.load(open(args.best)))))
        return
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cases = ([("smoke", 2, 40, 20, 16), ("smoke decode only", 2, 40, 0, 0)] if args.smoke else
             [("mixed 64 dec x 1K + 1984 chunk @ 2K prefix", 64, 1024, 1984, 2048),
              ("mixed 16 dec x 1K + 2032 chunk fresh", 16, 1024, 2032, 0),
              # the short e2e workload's mixed steps (400 x (1,024 in, 256 out), ~112 running
              # at 1 GiB): a fresh prompt beside decodes at ~1.2K context
              ("short mixed 112 dec x 1.2K + 1024 chunk fresh", 112, 1200, 1024, 0),
              ("mixed 96 dec x 8K + 2048 chunk @ 4K prefix", 96, 8084, 2048, 4096),
              ("fresh 7700-token prompt", 0, 1, 7700, 0),
              # the long e2e workload's mixed steps (96 x 7,700-token prompts, 16,384 tokens
              # per step): a fresh prompt beside the running decodes, and a prompt's second
              # chunk over its packed first one
              ("long mixed 47 dec x 8K + 7700 chunk fresh", 47, 8084, 7700, 0),
              ("continuation 7700 chunk @ 7700 prefix", 0, 1, 7700, 7700),
              ("decode only 128 x 1K (eager)", 128, 1024, 0, 0),
              # e2e.py's TPOT shapes: 1 and 16 requests at 2K context
              ("decode only 1 x 2K (TPOT c=1)", 1, 2048, 0, 0),
              ("decode only 16 x 2K (TPOT c=16)", 16, 2048, 0, 0)])
    if args.cases:
        cases = [c for c in cases if any(w in c[0] for w in args.cases.split(","))]
    reps = 2 if args.smoke else args.reps
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu",
              "torch": torch.__version__, "triton": __import__("triton").__version__,
              "shape": "SmolLM2: 9 q / 3 kv heads, head 64, bf16, preset turboquant",
              "max_model_len": args.max_model_len, "cases": []}
    for name, nd, ctx, chunk, prefix in cases:
        s = build_step(nd, ctx, chunk, prefix, device=dev, max_model_len=args.max_model_len)
        result.setdefault("block_size", s["block_size"])
        fns = ops(s)
        if chunk == 0:       # decode-only: store + decode (and the decode's query rotation)
            fns = {k: fns[k] for k in ("store", "decode", "decode_rotation")}
        row = {"case": name, "ops": {}}
        for op, fn in fns.items():
            # --ab-launch: each op also through Triton's plain launch path ("<op>_plain"),
            # to measure what kernels/_launch.py's direct launch saves on the host
            for plain in (False, True) if args.ab_launch else (False,):
                _launch._PLAIN = plain
                label = op + ("_plain" if plain else "")
                try:
                    row["ops"][label] = timeit(fn, reps, sync)
                except Exception as e:  # noqa: BLE001 - a failing op is a result, go on
                    row["ops"][label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                finally:
                    _launch._PLAIN = False
        if cuda:
            try:
                for op, fn in fa_ops(s).items():
                    row["ops"][op] = timeit(fn, reps, sync)
            except Exception as e:  # noqa: BLE001
                row["fa_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if "prefill_own_prefix" in fns:
            # the two FlashAttention paths must give the same output (bf16 rounding apart)
            fns["store_own"]()
            fns["prefill_own"]()
            ref = s["out"][nd:].float().clone()
            fns["store_own_prefix"]()
            fns["unpack_prefix"]()
            fns["prefill_own_prefix"]()
            row["own_prefix_max_abs_diff"] = (s["out"][nd:].float() - ref).abs().max().item()
            print(f"  own vs own_prefix output: max abs diff {row['own_prefix_max_abs_diff']:.4g}")
        if chunk:
            row["profile_forward"] = profile(fns["forward"], 3 if args.smoke else 40)
        if args.host_table and args.host_table in fns:
            row["host_table"] = host_table(fns[args.host_table], 2 if args.smoke else 20)
            print(f"== host table {args.host_table}, {name} (20 calls)\n{row['host_table']}")
        result["cases"].append(row)
        print(f"== {name}")
        for op, r in row["ops"].items():
            print(f"  {op:16s} " + "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else
                                             f"{k}={v}" for k, v in r.items()))
    if args.sweep and cuda:
        # block_m x the padded group (4 for both shapes) = rows per program (with the dense
        # rows of 2026-12-07, the default, rows / G tokens: 42-43 at SmolLM2's G = 3).
        # First the 2026-12-02 default without the deq copy (the chunk's own older tokens
        # gathered and unpacked from their slots), then configs reading it, deq_stages =
        # software-pipeline depth of its loads.
        grid = [dict(block_m=32, block_n=32, num_warps=4, deq=False)]
        grid += [dict(block_m=m, block_n=n, num_warps=w, deq_stages=st)
                 for m, n, w, st in ((32, 32, 4, 1), (32, 32, 4, 2), (32, 32, 4, 3),
                                     (32, 64, 4, 2), (32, 64, 8, 2), (64, 32, 4, 2),
                                     (64, 32, 8, 2), (64, 64, 8, 2), (16, 32, 4, 2))]
        result["sweep"] = {}
        for name, kw in (("smollm2 mixed 64 dec x 1K + 1984 @ 2K", dict(nd=64, dec_ctx=1024,
                                                                        chunk=1984, prefix=2048)),
                         ("smollm2 fresh 7700-token prompt (TTFT)",
                          dict(nd=0, dec_ctx=1, chunk=7700, prefix=0)),
                         ("smollm2 mixed 96 dec x 8K + 2048 chunk @ 4K",
                          dict(nd=96, dec_ctx=8084, chunk=2048, prefix=4096)),
                         ("d128 32/8 heads, 2048 chunk @ 8K prefix",
                          dict(nd=0, dec_ctx=1, chunk=2048, prefix=8192, hq=32, hkv=8, d=128))):
            print(f"== sweep {name}", flush=True)
            try:   # a fault kills the CUDA context: keep what the earlier cases measured
                result["sweep"][name] = sweep_prefill(build_step(**kw, device=dev), grid, 20,
                                                      sync)
            except Exception as e:  # noqa: BLE001
                result["sweep"][name] = [{"error": f"{type(e).__name__}: {str(e)[:200]}"}]
    if result["cases"] and "profile_forward" in result["cases"][0]:
        print(result["cases"][0]["profile_forward"][:4000])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
