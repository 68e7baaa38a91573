"""Offline end-to-end benchmark: throughput at a fixed KV budget, TPOT, TTFT, KV capacity.

    python benchmarks/e2e.py --model /models/SmolLM2-135M-Instruct          # ~9 min, H100
    python benchmarks/e2e.py --model /models/SmolLM2-135M-Instruct --quick  # ~4 min
    python benchmarks/e2e.py --quick                                        # CPU smoke run

For each KV-cache dtype (ours ``turboquant``, ``auto``, ``fp8``, vLLM's ``turboquant_4bit_nc``
and ``turboquant_k3v4_nc``, in that order) one fresh subprocess (so GPU memory starts clean)
builds ``vllm.LLM`` twice with ``kv_cache_memory_bytes`` fixed, the same ``max_num_seqs`` for
every dtype, prefix caching off, and measures:

  short  400 x (1024 in, 256 out) tokens at 1 GiB: throughput; then on the same engine
         TTFT of a 7700-token prompt, and TPOT at 2K context with 1 and with 16 requests
         (all fit in 1 GiB for every dtype, so no request waits for KV)
  long   96 x (7700 in, 384 out) tokens at 4 GiB: throughput

``max_num_seqs`` is fixed (128) because our default preset's recent-token window buffers are
sized by it and come out of the KV budget (vLLM's default on an H100, 1024, would take 1.5 GB
of SmolLM2's 1 GiB); 128 is about the number of 1280-token requests 1 GiB holds with it.

``--dtypes turboquant,turboquant@VLLM_TURBOQUANT_OWN_FA=0,auto`` runs a dtype a second time
with an environment variable set for its worker: an A/B of one knob in the same call.

Outputs are fixed-length (``ignore_eos``); prompts are token ids (real English text from
``vllm_turboquant.textdata`` or ``--prompts synthetic``), the same for every dtype. KV capacity
(tokens) comes from each engine (``num_gpu_blocks x block_size``). TPOT comes from the
engine's own per-request token timestamps ((last - first token) / (n - 1)), TTFT is the wall
clock of a 1-token request.

Results: ``e2e.json``, ``e2e.md`` (a table stating machine and versions, printed at the
end), ``e2e.png`` (with matplotlib) and one log per dtype, in ``--out-dir``. JSON and table
are rewritten after every dtype and each worker saves its row after every measurement, so a
run cut short still leaves what it measured; a failure of one dtype or one measurement is
recorded in its row (``*_error``) and the run goes on.
``--budget-s`` (default 540 s on GPU) bounds the whole run: a dtype that would start after the
budget is reported as skipped, and each subprocess is killed at its share of the budget.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Appended, not prepended: imported from tests, benchmarks/kernels.py must not shadow the
# kernels package. (Run as a script, benchmarks/ is sys.path[0] anyway.)
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

from serving_common import (bar_plot, check_dtype_entries, file_label,  # noqa: E402
                            header_lines, machine_info, markdown_table, on_gpu, run_entry)

GiB, MiB = 1 << 30, 1 << 20
# Ours first, then the baseline, then fp8: when the budget runs out, vLLM's presets go first
# (their Triton kernels also compile on first use: 130 s once on the H100).
GPU_DTYPES = ("turboquant", "auto", "fp8", "turboquant_4bit_nc", "turboquant_k3v4_nc")
CPU_DTYPES = ("turboquant", "auto")
# With kv_cache_memory_bytes set, vLLM sizes the cache from it alone; this only sets the
# free memory vLLM insists on at engine start (0.9 would need the previous engine's memory
# back to the last GiB).
GPU_MEMORY_UTILIZATION = 0.5

PROFILES = {
    # workload: (requests, input tokens, output tokens, KV bytes)
    "full": dict(short=(400, 1024, 256, 1 * GiB), long=(96, 7700, 384, 4 * GiB),
                 tpot_ctx=2048, tpot_tokens=128, tpot_batch=16, ttft_reps=3,
                 max_model_len=8192, max_num_seqs=128),
    "quick": dict(short=(128, 1024, 128, 1 * GiB), long=(24, 7700, 128, 1 * GiB),
                  tpot_ctx=2048, tpot_tokens=64, tpot_batch=16, ttft_reps=2,
                  max_model_len=8192, max_num_seqs=128),
    # A smoke run of the code path: the CPU backend is a reference implementation, and a
    # 400-token prefill through it takes minutes on 2 cores.
    "cpu": dict(short=(4, 64, 8, 16 * MiB), long=(2, 192, 4, 32 * MiB),
                tpot_ctx=64, tpot_tokens=4, tpot_batch=2, ttft_reps=1, max_model_len=512,
                max_num_seqs=4),
}


def columns(tpot_batch: int) -> list[tuple[str, str, str]]:
    """The table's (key, header, format) columns."""
    return [
        ("dtype", "kv-cache dtype", ""),
        ("short_capacity_tokens", "KV tokens @short", "d"),
        ("long_capacity_tokens", "KV tokens @long", "d"),
        ("capacity_vs_auto", "capacity vs auto", ".2f"),
        ("short_out_tok_s", "short out tok/s", ".1f"),
        ("short_req_s", "short req/s", ".2f"),
        ("long_out_tok_s", "long out tok/s", ".1f"),
        ("long_req_s", "long req/s", ".3f"),
        ("tpot_c1_ms", "TPOT c=1 ms", ".2f"),
        ("tpot_cN_ms", f"TPOT c={tpot_batch} ms", ".2f"),
        ("ttft_long_ms", "TTFT long ms", ".0f"),
    ]


# -- the worker (one dtype, in its own process) ------------------------------------------------
def make_prompts(tokenizer, kind: str, n: int, length: int, seed: int) -> list[list[int]]:
    """n prompts of exactly `length` token ids: Austen text windows or random ids."""
    import random
    rng = random.Random(seed)
    if kind == "synthetic":
        vocab = min(len(tokenizer), 30000)
        return [[rng.randrange(1000, vocab) for _ in range(length)] for _ in range(n)]
    from vllm_turboquant.textdata import ensure_english_text
    text = ensure_english_text().read_text()
    need = min(len(text), (n + 1) * length * 5 + 10_000)
    ids = tokenizer(text[:need], add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"not enough text for {length}-token prompts")
    span = len(ids) - length + 1
    start, step = rng.randrange(span), max(1, span // max(n, 1))
    return [ids[(start + i * step) % span:][:length] for i in range(n)]


def timed_generate(llm, prompts, max_tokens: int) -> tuple[float, int, list]:
    """Seconds to generate `max_tokens` for every prompt (ignore_eos), output tokens, and
    vLLM's RequestOutputs."""
    from vllm import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]  # a TokensPrompt (0.25 and 0.32)
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs), outs


def engine_tpot(outs) -> float | None:
    """Mean per-request time per output token after the first, from the engine core's own
    timestamps (``RequestOutput.metrics``: first/last token, monotonic; needs stats on).
    None where this vLLM does not fill them."""
    tpots = []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = getattr(m, "num_generation_tokens", 0) or len(o.outputs[0].token_ids)
        first = getattr(m, "first_token_ts", None) or 0.0
        last = getattr(m, "last_token_ts", None) or 0.0
        if m is None or not first or last <= first or n < 2:
            return None
        tpots.append((last - first) / (n - 1))
    return sum(tpots) / len(tpots) if tpots else None


def build_llm(model: str, dtype: str, kv_bytes: int, p: dict, eager: bool):
    from vllm import LLM
    # Stats on: RequestOutput.metrics then carries the engine's token timestamps (TPOT).
    kwargs = dict(model=model, kv_cache_dtype=dtype, kv_cache_memory_bytes=kv_bytes,
                  max_model_len=p["max_model_len"], max_num_seqs=p["max_num_seqs"],
                  enable_prefix_caching=False, seed=0, enforce_eager=eager,
                  disable_log_stats=False)
    if on_gpu():
        kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    return LLM(**kwargs)


def capacity(llm) -> dict:
    cache = llm.llm_engine.vllm_config.cache_config
    return {"num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "capacity_tokens": cache.num_gpu_blocks * cache.block_size}


def _free_gpu_fraction() -> float | None:
    """Free / total memory of the first visible GPU through NVML (vLLM's own copy), without
    a CUDA context in this process; None without NVML or a GPU."""
    try:
        from vllm.third_party import pynvml
        pynvml.nvmlInit()
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
            handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                      else pynvml.nvmlDeviceGetHandleByUUID(visible))
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return mem.free / mem.total
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no NVML (CPU), or an odd device string
        return None


def shutdown(llm) -> None:
    """Stop the engine core process and wait until the device memory is back: vLLM refuses
    to start an engine when less memory is free than gpu_memory_utilization asks for."""
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    try:
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
    except Exception as e:  # noqa: BLE001 - the memory wait below tells if it mattered
        print(f"engine shutdown: {type(e).__name__}: {e}", flush=True)
    del llm, engine, core
    gc.collect()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        free = _free_gpu_fraction()
        if free is None or free > GPU_MEMORY_UTILIZATION + 0.1:
            return
        time.sleep(1.0)


def throughput(llm, prompts, output_len: int, repeats: int = 1) -> dict:
    """The workload `repeats` times on the same engine (prefix caching is off: every run does
    the same work); the figures are the median run's, ``out_tok_s_runs`` lists every run's.
    One run of the short workload takes seconds and moved several percent between calls on
    the H200 (benchmarks/results/h200-20261203e/): repeats separate that noise from a change."""
    runs = []
    for _ in range(repeats):
        elapsed, out_tokens, _ = timed_generate(llm, prompts, output_len)
        runs.append((elapsed, out_tokens))
    elapsed, out_tokens = sorted(runs)[len(runs) // 2]
    in_tokens = sum(len(p) for p in prompts)
    return {"elapsed_s": elapsed, "requests": len(prompts), "output_tokens": out_tokens,
            "req_s": len(prompts) / elapsed, "out_tok_s": out_tokens / elapsed,
            "total_tok_s": (in_tokens + out_tokens) / elapsed,
            "out_tok_s_runs": [o / e for e, o in runs]}


def _error(e: BaseException) -> str:
    """One line for the JSON: the exception and the innermost frame that raised it."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first}{where}"


def worker(spec: dict, out_path: str | None = None) -> dict:
    """All measurements for one dtype. Runs in a fresh process; rewrites `out_path` after
    every measurement, so a kill leaves what was measured."""
    p, dtype, model = spec["profile"], spec["dtype"], spec["model"]
    out: dict = {"dtype": dtype, "max_num_seqs": p["max_num_seqs"]}

    def save():
        if out_path:
            tmp = Path(out_path + ".tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(out_path)

    save()

    for phase in spec["phases"]:
        n, in_len, out_len, kv_bytes = p[phase]
        t0 = time.perf_counter()
        try:
            llm = build_llm(model, dtype, kv_bytes, p, spec["eager"])
        except Exception as e:  # noqa: BLE001 - a dtype the build cannot serve is a result
            traceback.print_exc()
            out[f"{phase}_error"] = "engine build: " + _error(e)
            save()
            continue
        try:
            out[f"{phase}_startup_s"] = time.perf_counter() - t0
            out[f"{phase}_kv_bytes"] = kv_bytes
            out.update({f"{phase}_{k}": v for k, v in capacity(llm).items()})
            save()
            tok = llm.get_tokenizer()
            prompts = make_prompts(tok, spec["prompts"], n, in_len,
                                   seed=1 + (phase == "short"))
            timed_generate(llm, prompts[:2], 4)  # warm-up: first-request costs stay out
            out.update({f"{phase}_{k}": v for k, v in
                        throughput(llm, prompts, out_len, spec.get("repeats", 1)).items()})
            save()
            if phase == "short":
                latency_probes(llm, tok, spec["prompts"], p, p["long"][1], out, save,
                               spec.get("repeats", 1))
        except Exception as e:  # noqa: BLE001 - keep what was measured, go on
            traceback.print_exc()
            out[f"{phase}_error"] = _error(e)
            save()
        finally:
            shutdown(llm)
            llm = None
    return out


def latency_probes(llm, tok, kind: str, p: dict, long_len: int, res: dict, save,
                   repeats: int = 1) -> None:
    """Into `res`: TTFT of a long prompt (wall clock of a 1-token request, median); TPOT at
    tpot_ctx context for 1 and for tpot_batch requests (engine timestamps; where vLLM gives
    none, ``(T(1 + n tokens) - T(1 token)) / n``), the median of `repeats` probes (each in
    ``tpot_*_runs_ms``). Each probe fails on its own."""
    res["tpot_batch"], res["tpot_ctx"] = p["tpot_batch"], p["tpot_ctx"]
    try:
        ttfts = [timed_generate(llm, [prompt], 1)[0]
                 for prompt in make_prompts(tok, kind, p["ttft_reps"], long_len, seed=11)]
        res["ttft_long_ms"] = sorted(ttfts)[len(ttfts) // 2] * 1000
        res["ttft_prompt_tokens"] = long_len
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res["ttft_error"] = _error(e)
    save()
    n = p["tpot_tokens"]
    for key, batch in (("c1", 1), ("cN", p["tpot_batch"])):
        try:
            prompts = make_prompts(tok, kind, batch, p["tpot_ctx"], seed=21 + batch)
            runs = []
            for _ in range(repeats):
                full, _, outs = timed_generate(llm, prompts, 1 + n)
                tpot = engine_tpot(outs)
                res[f"tpot_{key}_source"] = "engine timestamps"
                if tpot is None:
                    first = timed_generate(llm, prompts, 1)[0]
                    tpot = max(full - first, 0.0) / n
                    res[f"tpot_{key}_source"] = "wall-clock difference"
                runs.append(tpot * 1000)
            res[f"tpot_{key}_ms"] = sorted(runs)[len(runs) // 2]
            res[f"tpot_{key}_runs_ms"] = runs
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            res[f"tpot_{key}_error"] = _error(e)
        save()


# -- the driver ----------------------------------------------------------------------------------
def size(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def run_dtype(entry: str, spec: dict, out_dir: Path, timeout_s: float) -> dict:
    """Run `worker` for the --dtypes entry (a dtype, or a variant: parse_variant) in a fresh
    Python process (serving_common.run_entry); its log goes to a file. A worker that crashes
    or runs out of time gives what it had saved, plus an ``error``."""
    t0 = time.perf_counter()
    row = run_entry(__file__, "e2e", entry, spec, out_dir, timeout_s)
    if "timed out" in row.get("error", ""):
        row["error"] += " (its share of the budget)"
    row["wall_s"] = time.perf_counter() - t0
    return row


def _on_sigterm(signum, frame):
    # `timeout` sends SIGTERM: unwind, so the running worker's process group is killed and
    # the report is written (finally clauses), instead of leaving an engine on the GPU.
    raise SystemExit(f"signal {signum}")


def write_report(rows: list[dict], info: dict, profile: dict, name: str, eager: bool,
                 model: str, prompts: str, out_dir: Path, t_start: float,
                 plot: bool = False) -> str:
    """e2e.json and e2e.md from the rows so far (called after every dtype); the table."""
    auto = next((r for r in rows if r["dtype"] == "auto"), {})
    for r in rows:  # at the long budget, else the short one
        for phase in ("long", "short"):
            key = f"{phase}_capacity_tokens"
            if auto.get(key) and r.get(key):
                r["capacity_vs_auto"] = r[key] / auto[key]
                r["capacity_vs_auto_at"] = phase
                break
    s, lg = profile["short"], profile["long"]
    workload = {
        "model": model, "profile": name + (" (eager)" if eager else " (CUDA graphs)"),
        "short": f"{s[0]} x ({s[1]} in, {s[2]} out) at {size(s[3])} KV",
        "long": f"{lg[0]} x ({lg[1]} in, {lg[2]} out) at {size(lg[3])} KV",
        "TPOT": f"{profile['tpot_ctx']}-token context, 1 and {profile['tpot_batch']} requests"
                f" ({profile['tpot_tokens']} tokens); TTFT: one {lg[1]}-token prompt "
                "(median of " + str(profile["ttft_reps"]) + "); both on the short engine",
        "engine": f"max_num_seqs {profile['max_num_seqs']}, max_model_len "
                  f"{profile['max_model_len']}, prefix caching off",
        "prompts": prompts + " token ids, ignore_eos",
        "wall time": f"{time.perf_counter() - t_start:.0f} s",
    }
    table = "\n".join(["## e2e", header_lines(info, workload), "",
                       markdown_table(rows, columns(profile["tpot_batch"]))])
    errors = [f"{r['dtype']}: " + "; ".join(f"{k}: {r[k]}" for k in r if k.endswith("error"))
              for r in rows if any(k.endswith("error") for k in r)]
    if errors:
        table += "\n\nerrors / skipped:\n" + "\n".join(f"- {e}" for e in errors)
    result = {"machine": info, "workload": workload, "profile": profile, "rows": rows}
    (out_dir / "e2e.json").write_text(json.dumps(result, indent=1))
    (out_dir / "e2e.md").write_text(table + "\n")
    ok = [r for r in rows if r.get("long_capacity_tokens") or r.get("short_capacity_tokens")]
    if plot and ok and bar_plot(ok, "dtype", [
            ("long_capacity_tokens", "KV capacity @long (tokens)"),
            ("short_out_tok_s", "short: output tok/s"),
            ("long_out_tok_s", "long: output tok/s"),
            ("tpot_cN_ms", f"TPOT c={profile['tpot_batch']} (ms)"),
            ("ttft_long_ms", "TTFT long prompt (ms)")],
            f"e2e ({name}) {Path(model).name}", out_dir / "e2e.png"):
        print(f"plot: {out_dir / 'e2e.png'}")
    return table


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model folder (default: SmolLM2 via `python -m vllm_turboquant.models`)")
    ap.add_argument("--dtypes", default=None,
                    help="comma-separated kv-cache dtypes; NAME@VAR=VALUE runs NAME again with "
                         "an environment variable set (e.g. turboquant@VLLM_TURBOQUANT_OWN_FA=0)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="workload profile (default: full on GPU, quick with --quick, cpu "
                         "without a GPU)")
    ap.add_argument("--prompts", choices=("real", "synthetic"), default="real")
    ap.add_argument("--eager", action="store_true",
                    help="enforce_eager for every dtype (faster start, no CUDA graphs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock bound (default 540 s on GPU, 1500 s on CPU)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of each workload per engine (the median is reported)")
    ap.add_argument("--phases", default="short,long",
                    help="workloads to run, of short,long (the latency probes ride on short); "
                         "one phase per device call fits 4 dtypes in 10 minutes")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "e2e")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside the per-dtype subprocess
        return worker(json.loads(args.worker), args.worker_out)

    t_start = time.perf_counter()
    gpu = on_gpu()
    name = args.profile or (("quick" if args.quick else "full") if gpu else "cpu")
    profile = PROFILES[name]
    dtypes = args.dtypes.split(",") if args.dtypes else list(GPU_DTYPES if gpu else CPU_DTYPES)
    check_dtype_entries(ap, dtypes)  # malformed variants fail here, before a model is built
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.prompts == "real":  # fetch the text now: a worker that cannot is minutes in, past the model build
        from vllm_turboquant.textdata import ensure_english_text
        try:
            ensure_english_text()
        except RuntimeError as e:
            ap.error(str(e))
    eager = args.eager or not gpu  # CPU: torch.compile costs minutes
    budget = args.budget_s or (540.0 if gpu else 1500.0)
    from vllm_turboquant.models import resolve_model
    model = resolve_model(args.model)
    info = machine_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for d in dtypes:  # an earlier run's worker files must not pass for this run's
        (args.out_dir / f"e2e_{file_label(d)}.json").unlink(missing_ok=True)
    phases = tuple(x for x in args.phases.split(",") if x)
    if not phases or set(phases) - {"short", "long"}:
        ap.error(f"--phases takes short and/or long, got {args.phases!r}")
    spec = {"model": model, "profile": profile, "prompts": args.prompts, "eager": eager,
            "phases": phases, "repeats": args.repeats}
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)

    rows: list[dict] = []
    report = dict(info=info, profile=profile, name=name, eager=eager, model=model,
                  prompts=args.prompts, out_dir=args.out_dir, t_start=t_start)
    try:
        for i, dtype in enumerate(dtypes):
            left = budget - (time.perf_counter() - t_start)
            per = left / (len(dtypes) - i)  # an even share of what is left
            done = [r["wall_s"] for r in rows if "wall_s" in r]
            if left < 30 or (done and left < 0.8 * (sum(done) / len(done))):
                rows.append({"dtype": dtype, "error": "skipped: budget spent"})
                continue
            print(f"== {dtype} ({name} profile, {left:.0f} s of budget left)", flush=True)
            # Ours runs first and may take what the others leave (it also pays the first
            # compile); every later dtype keeps at least a minute per dtype still to come.
            remaining = len(dtypes) - i - 1
            row = run_dtype(dtype, spec, args.out_dir,
                            timeout_s=min(left, max(per, left - 60 * remaining)))
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items()}), flush=True)
            rows.append(row)
            write_report(rows, **report)
    finally:
        done_dtypes = {r["dtype"] for r in rows}
        for d in dtypes:  # stopped (SIGTERM): the running worker's saved measurements
            if d not in done_dtypes:
                row = {"dtype": d}
                try:  # deleted at the start: this run's, if any
                    row.update(json.loads((args.out_dir / f"e2e_{file_label(d)}.json")
                                          .read_text()))
                except (OSError, ValueError):
                    pass
                rows.append({**row, "error": "not run or not finished (stopped)"})
        table = write_report(rows, **report, plot=True)
    print("\n" + table)
    print(f"\nJSON: {args.out_dir / 'e2e.json'}")
    return json.loads((args.out_dir / "e2e.json").read_text())


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
