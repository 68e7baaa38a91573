"""Tensor parallel 1 vs 2 with TurboQuant: same greedy tokens, KV capacity per rank, and the
server's metrics consistent across tensor-parallel sizes.

    python benchmarks/make_tiny_llama.py /tmp/tiny-llama --tokenizer SMOLLM2_DIR
    python benchmarks/tp_compare.py --model /tmp/tiny-llama --json tp.json      # 2 GPUs
    python benchmarks/tp_compare.py --model /tmp/tiny-llama --tp-sizes 1        # dry run

The model is a checkpoint whose heads split over 2 ranks (make_tiny_llama.py: 8 query /
4 KV heads, head size 128). Every engine gets the same ``--kv-cache-memory-bytes`` (vLLM:
per GPU) and ``max_num_seqs``, so the capacity each rank should have is computable:

  per-rank KV heads      h_r = 4 / TP
  page bytes per layer   block_size x h_r x (2 x head_size x 2 for bf16 | our slot bytes)
  reserve (ours)         layers x window buffers of max_num_seqs rows (backend.state.side_bytes)
  capacity (tokens)      (kv_bytes - reserve) // page // layers x block_size

Each rank stores its h_r heads of every token, so the capacity is at once tokens per rank
and tokens of the whole model: at TP 2 the same bytes per GPU hold ~2x the tokens.

Part 1, offline (each engine in a fresh subprocess, eager): `auto` and `turboquant` at each
TP size; greedy tokens for 6 prompts, the top-2 logprob margin of every step (a divergence
at a near tie is bf16 reduction order, not the cache: the `auto` pair shows how much of that
TP alone causes), and the engine's capacity against the formula above.

Part 2, servers: ``vllm serve --kv-cache-dtype turboquant --tensor-parallel-size N`` for each
TP size; ``/metrics`` (``vllm_turboquant:*``) and ``/v1/turboquant/stats`` idle and once
under load (benchmarks/load.py). Our gauges describe the whole model, not a rank
(vllm_turboquant/metrics.py: bytes per token over all KV heads and layers; memory = per-GPU
bytes x workers; capacity = blocks x block_size), so "consistent" means, and the JSON
checks:

  - bytes_per_token, model_dtype_bytes_per_token, compression_ratio: equal at every TP;
  - kv_cache_memory_bytes / TP == --kv-cache-memory-bytes (per rank), at every TP;
  - capacity_tokens == the formula above, and == the offline engine's at the same TP;
  - capacity_ratio (capacity / model-dtype capacity of the same memory): equal within 2%
    (the window buffers' tags do not shrink with the heads per rank);
  - under load: saved_bytes == used_tokens x (model-dtype - served bytes per token),
    used_tokens <= capacity, generation gauge > 0;
  - per-rank bytes per token (bytes_per_token / TP) is reported, not a gauge.

Failures of one engine or server are recorded and the run goes on; the JSON is rewritten
after every step; ``--budget-s`` bounds the whole run (default 480 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

PROMPTS = [
    "The history of the city begins",
    "In the morning the train left the station and",
    "A list of prime numbers: 2, 3, 5,",
    "She opened the letter and read",
    "The recipe calls for flour, sugar and",
    "def fibonacci(n):",
]
# NVLink multicast must stay off on the shared multi-GPU machines (NCCL, PyTorch, NVSHMEM);
# vLLM's symmetric-memory all-reduce would try it, and the custom all-reduce is not needed.
CHILD_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                      "NVSHMEM_DISABLE_NVLS": "1"}
CHILD_ENV = {"VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
GPU_MEMORY_UTILIZATION = 0.5  # only the free memory vLLM wants at start (KV bytes are fixed)
SERVE_DTYPE = "turboquant"
CONSISTENCY = {
    "scope": "our gauges describe the whole model (all KV heads and layers), not a rank; "
             "every engine gets the same --kv-cache-memory-bytes per GPU",
    "bytes_per_token, model_dtype_bytes_per_token, compression_ratio": "equal at every TP",
    "kv_cache_memory_bytes": "per-GPU bytes x TP (so / TP == --kv-cache-memory-bytes)",
    "capacity_tokens": "blocks x block_size = tokens per rank = tokens of the whole model; "
                       "== the formula (expected) and the offline engine at the same TP; "
                       "~2x at TP 2",
    "capacity_ratio": "equal within 2% (window buffer tags do not shrink with heads per rank)",
    "under load": "saved_bytes == used_tokens x (model-dtype - served bytes per token), "
                  "used_tokens <= capacity_tokens, generation gauge > 0",
    "per-rank bytes per token": "bytes_per_token / TP (reported, not a gauge)",
}


def child_env() -> dict[str, str]:
    from serving_common import plugin_env
    env = {**CHILD_ENV_DEFAULTS, **os.environ, **CHILD_ENV, **plugin_env()}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override --kv-cache-memory-bytes on CPU
    return env


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


# -- the expected capacity ---------------------------------------------------------------------
def model_facts(model: str) -> dict:
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return {"layers": cfg["num_hidden_layers"], "kv_heads": cfg.get("num_key_value_heads", heads),
            "head_size": cfg.get("head_dim") or cfg["hidden_size"] // heads,
            "dtype_bytes": 4 if str(cfg.get("torch_dtype") or cfg.get("dtype")) == "float32"
            else 2}


def expected_capacity(dtype: str, tp: int, kv_bytes: int, max_num_seqs: int, block_size: int,
                      facts: dict) -> dict:
    """The capacity formula of the module docstring, with its terms."""
    import torch

    from vllm_turboquant import settings
    from vllm_turboquant.parallel import kv_heads_per_rank
    heads = kv_heads_per_rank(facts["kv_heads"], tp)
    d, layers = facts["head_size"], facts["layers"]
    full = 2 * d * facts["dtype_bytes"] * heads  # bytes per token and layer, model dtype
    if settings.is_turboquant_dtype(dtype):
        from vllm_turboquant.backend.state import side_bytes
        cfg = settings.resolve(dtype)
        per_token_layer = cfg.bytes_per_token(d, heads)
        dt = torch.float32 if facts["dtype_bytes"] == 4 else torch.bfloat16
        reserve = layers * side_bytes(max_num_seqs, cfg.window, heads, d, dt)
    elif dtype == "auto":
        per_token_layer, reserve = full, 0
    else:
        return {"note": f"no formula for {dtype}"}
    page = block_size * per_token_layer
    blocks = max(kv_bytes - reserve, 0) // page // layers
    return {"kv_heads_per_rank": heads, "bytes_per_token_per_rank": per_token_layer * layers,
            "bytes_per_token_whole_model": per_token_layer * layers * tp,
            "page_bytes_per_layer": page, "window_reserve_bytes": reserve,
            "capacity_tokens": blocks * block_size}


# -- part 1: one offline engine (runs in a subprocess) ---------------------------------------------
def run_one(model: str, dtype: str, tp: int, max_tokens: int, kv_bytes: int,
            max_num_seqs: int) -> dict:
    """Greedy token ids, top-2 logprob margins, and the engine's KV capacity."""
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model, kv_cache_dtype=dtype, tensor_parallel_size=tp,
                  max_model_len=1024, kv_cache_memory_bytes=kv_bytes,
                  max_num_seqs=max_num_seqs, enforce_eager=True, seed=0, dtype="bfloat16",
                  enable_prefix_caching=False, disable_custom_all_reduce=True)
    if gpu_count():
        kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"dtype": dtype, "tp": tp, "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "margins": [margins(o.outputs[0].logprobs) for o in outs],
            "num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_tokens_per_rank": cache.num_gpu_blocks * cache.block_size}


def margins(logprobs) -> list[float] | None:
    """Per generated token: top-1 minus top-2 logprob (None where vLLM gave fewer)."""
    if logprobs is None:
        return None
    out = []
    try:
        for step in logprobs:
            vals = sorted((lp.logprob for lp in step.values()), reverse=True)
            out.append(round(vals[0] - vals[1], 4) if len(vals) > 1 else None)
    except (AttributeError, TypeError, IndexError):
        return None
    return out


def agreement(a: dict, b: dict) -> dict:
    """Greedy tokens of run `a` vs run `b`, with `a`'s top-2 margin where they part."""
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    first_diff, margin_there = [], []
    for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])):
        j = next((k for k, (p, q) in enumerate(zip(x, y)) if p != q), None)
        first_diff.append(j)
        ma = (a.get("margins") or [None] * len(a["tokens"]))[i]
        margin_there.append(ma[j] if j is not None and ma and j < len(ma) else None)
    return {"identical_prompts": same, "prompts": len(a["tokens"]), "first_divergence": first_diff,
            "top2_margin_at_divergence": margin_there,
            "min_top2_margin": min((m for ms in (a.get("margins") or []) if ms for m in ms
                                    if m is not None), default=None)}


def run_child(args, dtype: str, tp: int, timeout_s: float, log_dir: Path) -> dict:
    from serving_common import run_in_group
    out = log_dir / f"offline_{dtype}_tp{tp}.json"
    log = log_dir / f"offline_{dtype}_tp{tp}.log"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--model", args.model, "--max-tokens", str(args.max_tokens),
           "--kv-bytes", str(args.kv_bytes), "--max-num-seqs", str(args.max_num_seqs),
           "--_child", f"{dtype}:{tp}", "--_child-out", str(out)]
    t0 = time.monotonic()
    returncode, error = run_in_group(cmd, log, child_env(), timeout_s)
    try:
        result = json.loads(out.read_text())
    except (OSError, ValueError):
        result = {"dtype": dtype, "tp": tp}
        tail = log.read_text(errors="replace").splitlines()[-6:]
        error = error or f"exit {returncode}: " + " | ".join(tail)
    if error:
        result["error"] = error
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


# -- part 2: servers -------------------------------------------------------------------------------
def get(url: str, as_json: bool):
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            body = r.read().decode()
        return json.loads(body) if as_json else body
    except (OSError, ValueError):
        return None


def serve_one(args, tp: int, left_s: float, log_dir: Path) -> dict:
    """`vllm serve` at TP `tp`: idle stats and metrics, a short load, the snapshot under it."""
    import load
    from serving_common import VllmServer
    serve_args = ["--kv-cache-dtype", SERVE_DTYPE, "--tensor-parallel-size", str(tp),
                  "--kv-cache-memory-bytes", str(args.kv_bytes),
                  "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", "1024",
                  "--dtype", "bfloat16", "--enforce-eager", "--disable-custom-all-reduce",
                  "--no-enable-prefix-caching"]
    if gpu_count():
        serve_args += ["--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION)]
    # VllmServer starts from os.environ: add the defaults it lacks, and ours.
    env = {**{k: v for k, v in CHILD_ENV_DEFAULTS.items() if k not in os.environ}, **CHILD_ENV,
           "VLLM_LOG_STATS_INTERVAL": "1"}
    res: dict = {"tp": tp, "dtype": SERVE_DTYPE}
    t0 = time.monotonic()
    with VllmServer(args.model, serve_args, log_dir / f"serve_tp{tp}.log", env=env,
                    startup_timeout_s=max(left_s - 40, 10), stop_timeout_s=15) as server:
        res["startup_s"] = round(time.monotonic() - t0, 1)
        res["idle_metrics"] = load.parse_our_metrics(get(f"{server.url}/metrics", False) or "")
        res["idle_stats"] = (get(f"{server.url}/v1/turboquant/stats", True)
                             or load.stats_from_metrics(res["idle_metrics"]))
        left = left_s - (time.monotonic() - t0)
        cfg = load.LoadConfig(base_url=server.url, num_requests=4 * args.max_num_seqs,
                              concurrency=args.max_num_seqs, input_len=256, output_len=96,
                              prompts="synthetic", time_limit_s=max(min(45.0, left - 25), 5),
                              label=f"{SERVE_DTYPE} tp{tp}", progress=False)
        report = asyncio.run(load.run_load(cfg))
        res["load"] = {k: report[k] for k in ("requests", "duration_s", "timed_out",
                                              "output_throughput_tok_s", "errors")}
        res["under_load"] = report["server"].get("turboquant_under_load")
        after = load.parse_our_metrics(get(f"{server.url}/metrics", False) or "")
        res["after_stats"] = (get(f"{server.url}/v1/turboquant/stats", True)
                              or load.stats_from_metrics(after))
    return res


def close(a, b, rel: float) -> bool:
    return a is not None and b is not None and abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def check_servers(servers: dict, offline: dict, expected: dict, kv_bytes: int) -> dict:
    """The consistency checks of the module docstring; each a {ok, values} entry."""
    ok = {tp: s for tp, s in servers.items() if (s.get("idle_stats") or {}).get("available")}
    checks: dict = {}
    if not ok:
        return {"error": "no server answered /v1/turboquant/stats with data"}
    base_tp = min(ok)
    for key in ("bytes_per_token", "model_dtype_bytes_per_token", "compression_ratio"):
        vals = {tp: s["idle_stats"].get(key) for tp, s in ok.items()}
        checks[f"{key}_equal"] = {"ok": all(close(v, vals[base_tp], 1e-9) for v in vals.values()),
                                  "values": vals}
    vals = {tp: s["idle_stats"].get("kv_cache_memory_bytes") for tp, s in ok.items()}
    checks["memory_per_rank_is_kv_bytes"] = {
        "ok": all(v is not None and v / tp == kv_bytes for tp, v in vals.items()),
        "values": vals, "kv_bytes_per_rank": kv_bytes}
    vals = {tp: s["idle_stats"].get("capacity_ratio") for tp, s in ok.items()}
    checks["capacity_ratio_within_2pct"] = {
        "ok": all(close(v, vals[base_tp], 0.02) for v in vals.values()), "values": vals}
    cap = {tp: s["idle_stats"].get("capacity_tokens") for tp, s in ok.items()}
    want = {tp: (expected.get(f"{SERVE_DTYPE}:{tp}") or {}).get("capacity_tokens")
            for tp in ok}
    eng = {tp: (offline.get(f"{SERVE_DTYPE}:{tp}") or {}).get("kv_tokens_per_rank") for tp in ok}
    checks["capacity_matches_formula"] = {"ok": all(cap[tp] == want[tp] for tp in ok),
                                          "values": cap, "formula": want}
    checks["capacity_matches_offline_engine"] = {
        "ok": all(eng[tp] is None or cap[tp] == eng[tp] for tp in ok), "values": cap,
        "offline": eng}
    checks["per_rank_bytes_per_token"] = {
        tp: s["idle_stats"]["bytes_per_token"] / tp for tp, s in ok.items()
        if s["idle_stats"].get("bytes_per_token")}
    loaded = {}
    for tp, s in ok.items():
        st = (s.get("under_load") or {}).get("stats") or {}
        if not st:
            loaded[tp] = {"ok": False, "why": "no snapshot under load"}
            continue
        saved_want = st.get("used_tokens", 0) * ((st.get("model_dtype_bytes_per_token") or 0)
                                                 - (st.get("bytes_per_token") or 0))
        loaded[tp] = {"ok": (st.get("saved_bytes") == saved_want and st.get("used_tokens", 0) > 0
                             and st["used_tokens"] <= st.get("capacity_tokens", 0)
                             and (st.get("generation_tokens_per_s") or 0) > 0),
                      "used_tokens": st.get("used_tokens"), "saved_bytes": st.get("saved_bytes"),
                      "saved_bytes_formula": saved_want,
                      "generation_tokens_per_s": st.get("generation_tokens_per_s")}
    checks["under_load_identities"] = {"ok": all(v["ok"] for v in loaded.values()), **{
        f"tp{tp}": v for tp, v in loaded.items()}}
    checks["all_ok"] = all(v.get("ok", True) for v in checks.values() if isinstance(v, dict))
    return checks


# -- the driver ----------------------------------------------------------------------------------
def _on_sigterm(signum, frame):
    raise SystemExit(f"signal {signum}")  # unwind: children killed, JSON written


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint from make_tiny_llama.py")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="turboquant,auto", help="offline dtypes, in order")
    ap.add_argument("--tp-sizes", default="1,2", help="comma-separated (default 1,2)")
    ap.add_argument("--kv-bytes", type=int, default=256 << 20,
                    help="--kv-cache-memory-bytes, per GPU (default 256 MiB)")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--no-serve", action="store_true", help="skip part 2 (servers)")
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument("--json", default=None, help="report path (default tp_compare.json here)")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        dtype, tp = args._child.split(":")
        result = run_one(args.model, dtype, int(tp), args.max_tokens, args.kv_bytes,
                         args.max_num_seqs)
        Path(args._child_out).write_text(json.dumps(result))
        return

    t_start = time.monotonic()
    json_path = Path(args.json or "tp_compare.json")
    log_dir = json_path.parent / (json_path.stem + "_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    from serving_common import machine_info
    dtypes, tps = args.dtypes.split(","), [int(t) for t in args.tp_sizes.split(",")]
    gpus = gpu_count()
    facts = model_facts(args.model)
    report: dict = {
        "machine": machine_info(), "model": args.model, "model_facts": facts,
        "setup": {"kv_cache_memory_bytes_per_gpu": args.kv_bytes,
                  "max_num_seqs": args.max_num_seqs, "max_tokens": args.max_tokens,
                  "prompts": PROMPTS, "tp_sizes": tps, "dtypes": dtypes,
                  "engine": "eager, prefix caching off, custom all-reduce off, bf16"},
        "consistency_definition": CONSISTENCY,
        "offline": {}, "expected": {}, "comparisons": {}, "servers": {}, "server_checks": {}}

    def left() -> float:
        return args.budget_s - (time.monotonic() - t_start)

    def save():
        json_path.write_text(json.dumps(report, indent=1, default=str))

    try:
        for dtype in dtypes:
            for tp in tps:
                key = f"{dtype}:{tp}"
                if gpus and tp > gpus or not gpus and tp > 1:
                    report["offline"][key] = {"dtype": dtype, "tp": tp,
                                              "error": f"skipped: needs {tp} GPUs, have {gpus}"}
                    continue
                # keep ~2 minutes for the servers
                reserve = 0 if args.no_serve else 120 * len(tps)
                if left() - reserve < 30:
                    report["offline"][key] = {"dtype": dtype, "tp": tp,
                                              "error": "skipped: budget spent"}
                    continue
                run = run_child(args, dtype, tp, min(240.0, left() - reserve), log_dir)
                report["offline"][key] = run
                if run.get("block_size"):
                    exp = expected_capacity(dtype, tp, args.kv_bytes, args.max_num_seqs,
                                            run["block_size"], facts)
                    report["expected"][key] = exp
                    if "capacity_tokens" in exp:
                        run["capacity_matches_formula"] = (run["kv_tokens_per_rank"]
                                                           == exp["capacity_tokens"])
                print(f"{dtype:>12} tp={tp}: kv tokens per rank "
                      f"{run.get('kv_tokens_per_rank')} (formula "
                      f"{(report['expected'].get(key) or {}).get('capacity_tokens')})"
                      + (f"  ERROR {run['error']}" if run.get("error") else ""), flush=True)
                save()
        runs = {k: r for k, r in report["offline"].items() if r.get("tokens")}
        for dtype in dtypes:
            for tp in tps[1:]:
                a, b = runs.get(f"{dtype}:{tps[0]}"), runs.get(f"{dtype}:{tp}")
                if not (a and b):
                    continue
                cmp = agreement(a, b)
                cmp["kv_tokens_ratio"] = b["kv_tokens_per_rank"] / a["kv_tokens_per_rank"]
                ea = report["expected"].get(f"{dtype}:{tps[0]}")
                eb = report["expected"].get(f"{dtype}:{tp}")
                if ea and eb and ea.get("capacity_tokens"):
                    cmp["kv_tokens_ratio_formula"] = eb["capacity_tokens"] / ea["capacity_tokens"]
                report["comparisons"][f"{dtype}: tp{tps[0]} vs tp{tp}"] = cmp
                print(f"{dtype:>12}: tp{tps[0]} vs tp{tp} identical on {cmp['identical_prompts']}/"
                      f"{cmp['prompts']} prompts, first divergence {cmp['first_divergence']} "
                      f"(top-2 margin there {cmp['top2_margin_at_divergence']}), kv tokens per "
                      f"rank x{cmp['kv_tokens_ratio']:.2f}", flush=True)
        for tp in tps:  # the cache's own effect, for scale
            a, b = runs.get(f"auto:{tp}"), runs.get(f"turboquant:{tp}")
            if a and b:
                report["comparisons"][f"auto vs turboquant at tp{tp}"] = agreement(a, b)
        save()

        if not args.no_serve:
            for tp in tps:
                if gpus and tp > gpus or not gpus and tp > 1:
                    report["servers"][tp] = {"tp": tp, "error": f"skipped: needs {tp} GPUs"}
                    continue
                if left() < 60:
                    report["servers"][tp] = {"tp": tp, "error": "skipped: budget spent"}
                    continue
                print(f"== vllm serve --kv-cache-dtype {SERVE_DTYPE} --tensor-parallel-size "
                      f"{tp} ({left():.0f} s of budget left)", flush=True)
                try:
                    report["servers"][tp] = serve_one(args, tp, left(), log_dir)
                except Exception as e:  # noqa: BLE001 - record, go on to the next TP size
                    traceback.print_exc()
                    first = (str(e).strip().splitlines() or [""])[0][:300]
                    report["servers"][tp] = {"tp": tp, "error": f"{type(e).__name__}: {first}"}
                s = report["servers"][tp]
                st = s.get("idle_stats") or {}
                print(f"   tp={tp}: {s.get('error') or ''} bytes/token {st.get('bytes_per_token')}"
                      f" compression {st.get('compression_ratio')} capacity "
                      f"{st.get('capacity_tokens')} (x{st.get('capacity_ratio')} model dtype) "
                      f"memory {st.get('kv_cache_memory_bytes')}", flush=True)
                save()
            report["server_checks"] = check_servers(
                {tp: s for tp, s in report["servers"].items() if not s.get("error")},
                report["offline"], report["expected"], args.kv_bytes)
            print("server checks: " + json.dumps(
                {k: (v.get("ok") if isinstance(v, dict) and "ok" in v else v)
                 for k, v in report["server_checks"].items()}), flush=True)
    finally:
        report["wall_s"] = round(time.monotonic() - t_start, 1)
        save()
    print(f"JSON: {json_path}")
    return report


if __name__ == "__main__":
    main()
