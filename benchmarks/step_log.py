"""Every engine step of e2e.py's long offline workload: its composition and its wall time.

e2e.py's long workload (96 x (7700 in, 384 out) tokens at 4 GiB of KV, CUDA graphs) ran at
0.68x bf16's output tok/s for ``turboquant`` on an H200. This script runs the same workload
once per kv-cache dtype and logs each engine step: how many requests, tokens, prompt
(prefill) tokens and decode requests it carried, and how long it took, so the time can be
split into steps with prompt tokens ("mixed") and pure decode steps by batch size.

GPU, one device call after the vLLM bundle bootstrap (../shared/device/README.md); about
3 minutes on an H200 (per dtype: imports, an engine start with CUDA graphs of 35-70 s as in
e2e.py's H200 runs, the warm-up and the workload, ~10-20 s in-process):

    source /opt/tqb/env.sh
    export VLLM_TURBOQUANT_CACHE=$PWD/.data VLLM_USE_V2_MODEL_RUNNER=0 PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pip.log 2>&1
    timeout 580 python3 benchmarks/step_log.py --model $TQ_MODEL --budget-s 540 \
        --out-dir $OUT --json $OUT/step_log.json --md $OUT/step_log.md

(the prompts are e2e.py's English text, .data/text/austen.txt: carry that folder to the
device, as gpu_suite.sh does, or pass --prompts synthetic)

CPU smoke run (e2e.py's cpu sizes: 2 x (192 in, 4 out) at 32 MiB, eager; ~25 s per dtype):

    python benchmarks/step_log.py --sizes cpu --json /tmp/step_log.json

Build: each dtype runs in a fresh subprocess that calls ``e2e.build_llm`` with e2e's long
phase settings (``kv_cache_memory_bytes``, ``max_model_len``, ``max_num_seqs``, prefix
caching off, seed 0, stats on, CUDA graphs unless ``--eager``; ``max_num_batched_tokens``
is vLLM's default, as in e2e.py, and the JSON records the value vLLM chose), warms up as
e2e.py does (the first 2 prompts, 4 output tokens), then runs the workload once with
``e2e.timed_generate`` (the same prompts, seed and SamplingParams as e2e.py).

Engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): vLLM 0.25 and 0.32 then give
``llm.llm_engine.engine_core`` = ``InprocClient``, whose ``.engine_core`` is the
``EngineCore`` with the ``.scheduler``. Four wrappers, on instances only:

  ``llm.llm_engine.step``        (profile_step.StepHook) t_start and wall of each step call:
                                 the engine core step plus the frontend's output processing
  ``EngineCore.step_fn``         core_ms: schedule, execute, update_from_output
  ``scheduler.schedule``         each SchedulerOutput becomes a numbered *batch*; its
                                 composition (batch_composition) is taken at once
  ``scheduler.update_from_output``  marks the batch whose model output was processed

Pairing. Each step record lists the batches scheduled inside it (``sched``) and the batches
whose output was processed inside it (``done``), with their summed composition. Without
async scheduling both are the same batch. With async scheduling (vLLM 0.25's default on GPU:
a batch queue of 2), step k schedules and launches batch k, then blocks until batch k-1
finishes on the GPU and processes its output: step k's wall is batch k-1's GPU time
overlapped with batch k's host work. The summary therefore attributes a step's wall to its
``done`` batches (``summary``; ``summary_by_scheduled`` uses ``sched``). A step that only
filled the queue (async: the first one) has no ``done`` batch and counts as "none"; at a
switch between mixed and decode batches the two pairings differ by one step.

A request is a decode in a batch when it is scheduled 1 token and its prompt is already
computed (num_computed_tokens before the step >= prompt length); every other scheduled
token is a prompt token (a chunk of prefill, or recompute after preemption). The prompt
length comes from the request's first ``NewRequestData``, else the scheduler's Request.

Caveats: in-process, each step also does the frontend's output processing (e2e.py's
multiprocess engine overlaps it with the next step), so tok/s here is lower than e2e.py's
for every dtype; wall_ms - core_ms per step (the table's "frontend s") shows how much. The
Python wrappers add a few microseconds per step.

Output: ``--json`` (machine, versions, engine settings as vLLM resolved them, capacity, per
dtype: wall, output tok/s, every step, the summaries), a markdown table of the summaries
(printed, and written to ``--md``), and one log per dtype in ``--out-dir``. ``--budget-s``
bounds the run: each dtype's subprocess gets an even share of what is left and is killed
past it (its error is recorded, the next dtype runs).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Appended, not prepended: imported from tests, benchmarks/kernels.py must not shadow the
# kernels package. (Run as a script, benchmarks/ is sys.path[0] anyway.)
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

from serving_common import (check_dtype_entries, file_label, header_lines,  # noqa: E402
                            machine_info, markdown_table, on_gpu)

GiB, MiB = 1 << 30, 1 << 20
DEFAULT_DTYPES = "turboquant,auto"
# Decode batch-size buckets: upper edges (max_num_seqs is 128 in every e2e profile).
DECODE_EDGES = (8, 32, 64, 128)
KINDS = ("mixed", "decode", "none")


# -- pure helpers (tested in tests/test_step_log.py) -------------------------------------------
def classify(num_scheduled: dict, computed_before: dict, prompt_lens: dict) -> tuple[int, int]:
    """(prompt tokens, decode requests) of one batch.

    num_scheduled: req_id -> tokens scheduled this step; computed_before: req_id ->
    num_computed_tokens before it; prompt_lens: req_id -> prompt length. A request is a
    decode when it has 1 token and its prompt is computed; all other tokens are prompt
    tokens. A request whose computed count or prompt length is unknown is a decode when it
    has 1 token (a 1-token prefill chunk is rare), else prompt tokens.
    """
    prompt_tokens = decode_reqs = 0
    for rid, n in num_scheduled.items():
        before, plen = computed_before.get(rid), prompt_lens.get(rid)
        known = before is not None and plen is not None
        if n == 1 and (not known or before >= plen):
            decode_reqs += 1
        else:
            prompt_tokens += n
    return prompt_tokens, decode_reqs


def batch_composition(so, prompt_lens: dict, lookup=None) -> dict:
    """Composition of one vLLM V1 SchedulerOutput (0.25 and 0.32 alike): scheduled requests,
    tokens, prompt tokens, decode requests, new requests.

    Reads ``num_scheduled_tokens`` (req_id -> n), ``scheduled_new_reqs`` (``req_id``,
    ``prompt_token_ids``, ``num_computed_tokens``) and ``scheduled_cached_reqs``
    (``req_ids`` and ``num_computed_tokens``, parallel lists); both computed counts are
    taken before the step. `prompt_lens` (req_id -> prompt length) is updated from the new
    requests; `lookup(req_id)` gives the prompt length of a request seen nowhere else
    (None if unknown).
    """
    computed = {}
    for r in so.scheduled_new_reqs:
        computed[r.req_id] = r.num_computed_tokens
        if r.prompt_token_ids is not None:
            prompt_lens[r.req_id] = len(r.prompt_token_ids)
    cached = so.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    n = dict(so.num_scheduled_tokens)
    if lookup is not None:
        for rid in n:
            if rid not in prompt_lens and (plen := lookup(rid)) is not None:
                prompt_lens[rid] = plen
    prompt_tokens, decode_reqs = classify(n, computed, prompt_lens)
    return {"reqs": len(n), "tokens": sum(n.values()), "prompt_tokens": prompt_tokens,
            "decode_reqs": decode_reqs, "new_reqs": len(so.scheduled_new_reqs)}


COMP_KEYS = ("reqs", "tokens", "prompt_tokens", "decode_reqs")


def combine(batches: list[tuple[int, dict]]) -> dict:
    """One step's side (sched or done): batch ids and the summed composition of (id, comp)."""
    out = {"batches": [i for i, _ in batches]}
    out.update({k: sum(c[k] for _, c in batches) for k in COMP_KEYS})
    return out


def step_kind(comp: dict) -> str:
    """mixed: has prompt tokens; decode: decode requests only; none: no tokens."""
    if comp.get("prompt_tokens", 0) > 0:
        return "mixed"
    return "decode" if comp.get("decode_reqs", 0) > 0 else "none"


def bucket_label(n: int, edges=DECODE_EDGES) -> str:
    """Decode batch size -> its bucket: '1-8', '9-32', ... and '>last edge'."""
    lo = 1
    for e in edges:
        if n <= e:
            return f"{lo}-{e}"
        lo = e + 1
    return f">{edges[-1]}"


def _pct(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1] of a sorted, non-empty list."""
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def stats_ms(walls_ms: list[float]) -> dict:
    """steps, time_s, mean / p20 / median / p80 ms of a list of step walls (ms)."""
    if not walls_ms:
        return {"steps": 0, "time_s": 0.0}
    v = sorted(walls_ms)
    return {"steps": len(v), "time_s": sum(v) / 1000, "mean_ms": sum(v) / len(v),
            "p20_ms": _pct(v, 0.2), "median_ms": _pct(v, 0.5), "p80_ms": _pct(v, 0.8)}


def summarize(steps: list[dict], pairing: str = "done", edges=DECODE_EDGES) -> dict:
    """Where the step time goes, from step records ({"wall_ms", pairing: composition}).

    mixed: steps with prompt tokens, with their prompt tokens, mean decode requests and ms per
    prompt token (mixed time / mixed prompt tokens); decode: pure decode steps, overall and
    per decode batch-size bucket (mean batch); none: steps with no tokens in `pairing`.
    `share` is a kind's fraction of all step time.
    """
    groups: dict[str, list[dict]] = {k: [] for k in KINDS}
    for s in steps:
        groups[step_kind(s[pairing])].append(s)
    total_ms = sum(s["wall_ms"] for s in steps)
    out = {"pairing": pairing, "steps": len(steps), "step_time_s": total_ms / 1000}
    for kind, ss in groups.items():
        g = stats_ms([s["wall_ms"] for s in ss])
        g["share"] = g["time_s"] * 1000 / total_ms if total_ms else None
        out[kind] = g
    mixed = groups["mixed"]
    ptok = sum(s[pairing]["prompt_tokens"] for s in mixed)
    out["mixed"]["prompt_tokens"] = ptok
    out["mixed"]["ms_per_prompt_token"] = out["mixed"]["time_s"] * 1000 / ptok if ptok else None
    out["mixed"]["mean_decode_reqs"] = (sum(s[pairing]["decode_reqs"] for s in mixed)
                                        / len(mixed) if mixed else None)
    buckets: dict[str, list[dict]] = {}
    for s in groups["decode"]:
        buckets.setdefault(bucket_label(s[pairing]["decode_reqs"], edges), []).append(s)
    order = [bucket_label(e, edges) for e in edges] + [f">{edges[-1]}"]
    out["decode"]["buckets"] = {}
    for label in order:
        if label in buckets:
            ss = buckets[label]
            b = stats_ms([s["wall_ms"] for s in ss])
            b["share"] = b["time_s"] * 1000 / total_ms if total_ms else None
            b["mean_batch"] = sum(s[pairing]["decode_reqs"] for s in ss) / len(ss)
            out["decode"]["buckets"][label] = b
    return out


def summary_rows(results: list[dict], key: str = "summary") -> list[dict]:
    """Table rows (dtype x kind / decode bucket) from the workers' results; `vs_auto` is the
    mean step ms over auto's in the same row kind."""
    rows = []
    for res in results:
        s = res.get(key)
        if not s:
            rows.append({"dtype": res["dtype"], "kind": "-",
                         "note": str(res.get("error", "no steps"))[:120]})
            continue
        m = s["mixed"]
        rows.append({"dtype": res["dtype"], "kind": "mixed", **_row(m),
                     "per_step": m.get("prompt_tokens", 0) / m["steps"] if m["steps"] else None,
                     "ms_per_prompt_token": m.get("ms_per_prompt_token"),
                     "mean_decode_reqs": m.get("mean_decode_reqs")})
        d = s["decode"]
        rows.append({"dtype": res["dtype"], "kind": "decode (all)", **_row(d)})
        for label, b in d.get("buckets", {}).items():
            rows.append({"dtype": res["dtype"], "kind": f"decode {label}", **_row(b),
                         "per_step": b["mean_batch"]})
        if s["none"]["steps"]:
            rows.append({"dtype": res["dtype"], "kind": "none", **_row(s["none"])})
    auto = {r["kind"]: r.get("mean_ms") for r in rows if r["dtype"] == "auto"}
    for r in rows:
        if r["dtype"] != "auto" and auto.get(r["kind"]) and r.get("mean_ms"):
            r["vs_auto"] = r["mean_ms"] / auto[r["kind"]]
    return rows


def _row(g: dict) -> dict:
    share = g.get("share")
    return {"steps": g["steps"], "time_s": g["time_s"],
            "share_pct": 100 * share if share is not None else None,
            "mean_ms": g.get("mean_ms"), "median_ms": g.get("median_ms"),
            "p20_p80": (f"{g['p20_ms']:.2f}-{g['p80_ms']:.2f}" if g.get("steps") else None)}


SUMMARY_COLUMNS = [
    ("dtype", "kv-cache dtype", ""), ("kind", "steps", ""), ("steps", "count", "d"),
    ("time_s", "time s", ".2f"), ("share_pct", "% of step time", ".1f"),
    ("mean_ms", "mean ms", ".2f"), ("median_ms", "p50 ms", ".2f"),
    ("p20_p80", "p20-p80 ms", ""), ("vs_auto", "mean vs auto", ".2f"),
    ("per_step", "prompt tok (mixed) / batch (decode) per step", ".1f"),
    ("mean_decode_reqs", "decodes per mixed step", ".1f"),
    ("ms_per_prompt_token", "mixed ms per prompt tok", ".4f"), ("note", "note", ""),
]

TOTAL_COLUMNS = [
    ("dtype", "kv-cache dtype", ""), ("capacity_tokens", "KV tokens", "d"),
    ("max_num_batched_tokens", "max_num_batched_tokens", "d"),
    ("async_scheduling", "async sched", ""), ("wall_s", "generate s", ".2f"),
    ("out_tok_s", "out tok/s", ".1f"), ("tok_s_vs_auto", "tok/s vs auto", ".2f"),
    ("tpot_ms", "TPOT ms", ".2f"), ("steps", "steps", "d"),
    ("step_time_s", "step wall s", ".2f"), ("core_s", "engine core s", ".2f"),
    ("frontend_s", "frontend s", ".2f"), ("error", "error", ""),
]


def total_rows(results: list[dict]) -> list[dict]:
    rows = []
    for res in results:
        eng = res.get("engine") or {}
        steps = res.get("steps") or []
        row = {"dtype": res["dtype"], "capacity_tokens": res.get("capacity_tokens"),
               "max_num_batched_tokens": eng.get("max_num_batched_tokens"),
               "async_scheduling": eng.get("async_scheduling"),
               "wall_s": res.get("wall_s"), "out_tok_s": res.get("out_tok_s"),
               "tpot_ms": res.get("tpot_ms"), "steps": len(steps) if steps else None,
               "error": (str(res["error"])[:120] if res.get("error") else None)}
        if steps:
            row["step_time_s"] = sum(s["wall_ms"] for s in steps) / 1000
            core = [s["core_ms"] for s in steps if s.get("core_ms") is not None]
            if len(core) == len(steps):
                row["core_s"] = sum(core) / 1000
                row["frontend_s"] = row["step_time_s"] - row["core_s"]
        rows.append(row)
    auto = next((r.get("out_tok_s") for r in rows if r["dtype"] == "auto"), None)
    for r in rows:
        if auto and r.get("out_tok_s"):
            r["tok_s_vs_auto"] = r["out_tok_s"] / auto
    return rows


def report_md(results: list[dict], info: dict, workload: dict) -> str:
    return "\n".join([
        "## step_log", header_lines(info, workload), "",
        markdown_table(total_rows(results), TOTAL_COLUMNS), "",
        "Step wall time by kind (a step's wall goes to the batch whose output it processed):",
        "", markdown_table(summary_rows(results), SUMMARY_COLUMNS)])


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '1.5GiB' or a plain byte count -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(GiB|MiB|KiB|B)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1048576)")
    scale = {"GiB": GiB, "MiB": MiB, "KiB": 1 << 10, "B": 1, None: 1}[m.group(2)]
    return int(float(m.group(1)) * scale)


# -- the engine's hooks (vLLM V1, engine in-process) -------------------------------------------
def find_scheduler(llm):
    """The in-process EngineCore and its scheduler: ``llm.llm_engine.engine_core`` (an
    InprocClient with VLLM_ENABLE_V1_MULTIPROCESSING=0, vLLM 0.25 and 0.32) ``.engine_core``
    ``.scheduler``. Raises RuntimeError naming what it found instead."""
    engine = llm.llm_engine
    client = getattr(engine, "engine_core", None)
    core = getattr(client, "engine_core", None)
    sched = getattr(core, "scheduler", None)
    if (sched is None or not callable(getattr(sched, "schedule", None))
            or not callable(getattr(sched, "update_from_output", None))
            or not callable(getattr(core, "step_fn", None))):
        raise RuntimeError(
            "cannot reach vLLM's scheduler: expected llm.llm_engine.engine_core.engine_core"
            f".scheduler, found engine_core={type(client).__name__}, its engine_core="
            f"{type(core).__name__}, scheduler={type(sched).__name__}. The engine must run "
            "in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0 gives an InprocClient); vLLM "
            f"{_vllm_version()} may have moved it")
    return core, sched


def _vllm_version() -> str:
    try:
        import vllm
        return vllm.__version__
    except Exception:  # noqa: BLE001
        return "?"


class StepRecorder:
    """Per engine step: t_start, wall, core time, and the batches scheduled / completed in
    it (see the module docstring). `steps` fills only while `active`."""

    def __init__(self, llm):
        from profile_step import StepHook
        self.core, self.sched = find_scheduler(llm)
        self.active = False
        self.steps: list[dict] = []
        self.prompt_lens: dict[str, int] = {}
        self._batch_of: dict[int, tuple[int, dict]] = {}  # id(SchedulerOutput) -> batch
        self._n_batches = 0
        self._cur: dict | None = None
        self.outside = 0  # schedule calls outside a recorded step (should stay 0)
        hook = StepHook(llm.llm_engine)  # replaces llm_engine.step; we wrap it once more
        inner = hook.step_fn
        requests = getattr(self.sched, "requests", {})

        def lookup(rid):
            req = requests.get(rid)
            return getattr(req, "num_prompt_tokens", None) if req is not None else None

        schedule, update, step_fn = (self.sched.schedule, self.sched.update_from_output,
                                     self.core.step_fn)

        def schedule_hook(*a, **kw):
            so = schedule(*a, **kw)
            if self.active:
                comp = batch_composition(so, self.prompt_lens, lookup)
                batch = (self._n_batches, comp)
                self._n_batches += 1
                self._batch_of[id(so)] = batch
                if self._cur is not None:
                    self._cur["sched"].append(batch)
                else:
                    self.outside += 1
            return so

        def update_hook(*a, **kw):
            so = a[0] if a else kw.get("scheduler_output")
            batch = self._batch_of.pop(id(so), None)
            if batch is not None and self._cur is not None:
                self._cur["done"].append(batch)
            return update(*a, **kw)

        def step_fn_hook(*a, **kw):
            t = time.perf_counter()
            try:
                return step_fn(*a, **kw)
            finally:
                if self._cur is not None:
                    self._cur["core_s"] += time.perf_counter() - t

        def engine_step(*a, **kw):
            if not self.active:
                return inner(*a, **kw)
            self._cur = cur = {"sched": [], "done": [], "core_s": 0.0}
            t = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                wall = time.perf_counter() - t
                self._cur = None
                self.steps.append({
                    "i": len(self.steps), "t_start": t, "wall_ms": wall * 1000,
                    "core_ms": cur["core_s"] * 1000,
                    "sched": combine(cur["sched"]), "done": combine(cur["done"])})

        self.sched.schedule = schedule_hook
        self.sched.update_from_output = update_hook
        self.core.step_fn = step_fn_hook
        hook.step_fn = engine_step

    def start(self) -> None:
        self.steps, self._batch_of, self.active = [], {}, True

    def stop(self) -> None:
        self.active = False


# -- the worker (one dtype, in its own process) ------------------------------------------------
def engine_settings(llm) -> dict:
    """The engine settings as vLLM resolved them."""
    cfg = llm.llm_engine.vllm_config
    model, cache, sched = cfg.model_config, cfg.cache_config, cfg.scheduler_config
    comp = getattr(cfg, "compilation_config", None)
    par = getattr(cfg, "parallel_config", None)
    return {
        "model": model.model, "dtype": str(model.dtype), "max_model_len": model.max_model_len,
        "enforce_eager": getattr(model, "enforce_eager", None),
        "kv_cache_dtype": cache.cache_dtype,
        "kv_cache_memory_bytes": getattr(cache, "kv_cache_memory_bytes", None),
        "gpu_memory_utilization": getattr(cache, "gpu_memory_utilization", None),
        "block_size": cache.block_size, "num_gpu_blocks": cache.num_gpu_blocks,
        "enable_prefix_caching": cache.enable_prefix_caching,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
        "async_scheduling": getattr(sched, "async_scheduling", None),
        "max_concurrent_batches": getattr(cfg, "max_concurrent_batches", None),
        "cudagraph_mode": str(getattr(comp, "cudagraph_mode", None)),
        "seed": getattr(model, "seed", None),
        "tensor_parallel_size": getattr(par, "tensor_parallel_size", None),
    }


def worker(spec: dict, out_path: str | None = None) -> dict:
    """Build the engine as e2e.py's long phase, warm up, run the workload once with every
    step recorded; rewrites `out_path` after the build and at the end."""
    import e2e
    dtype, p = spec["dtype"], spec["profile"]
    n, plen, olen, kv_bytes = spec["workload"]
    out: dict = {"dtype": dtype, "workload": {"requests": n, "prompt_len": plen,
                                              "output_len": olen, "kv_bytes": kv_bytes}}

    def save():
        if out_path:
            tmp = Path(out_path + ".tmp")
            tmp.write_text(json.dumps(out))
            tmp.replace(out_path)

    t0 = time.perf_counter()
    llm = e2e.build_llm(spec["model"], dtype, kv_bytes, p, spec["eager"])
    try:
        out["startup_s"] = time.perf_counter() - t0
        out["build"] = {"via": "e2e.build_llm", "kv_bytes": kv_bytes, "eager": spec["eager"],
                        "max_model_len": p["max_model_len"], "max_num_seqs": p["max_num_seqs"]}
        out["engine"] = engine_settings(llm)
        out.update(e2e.capacity(llm))
        save()
        rec = StepRecorder(llm)
        prompts = e2e.make_prompts(llm.get_tokenizer(), spec["prompts"], n, plen, seed=1)
        t = time.perf_counter()
        e2e.timed_generate(llm, prompts[:2], 4)  # warm-up, as e2e.py
        out["warmup_s"] = time.perf_counter() - t
        rec.start()
        try:
            elapsed, out_tokens, outs = e2e.timed_generate(llm, prompts, olen)
        finally:
            rec.stop()
        out.update({"wall_s": elapsed, "output_tokens": out_tokens,
                    "out_tok_s": out_tokens / elapsed,
                    "prompt_tokens": sum(len(x) for x in prompts)})
        tpot = e2e.engine_tpot(outs)
        if tpot is not None:
            out["tpot_ms"] = tpot * 1000
        out["schedule_calls_outside_steps"] = rec.outside
        out["steps"] = rec.steps
        out["summary"] = summarize(rec.steps, "done")
        out["summary_by_scheduled"] = summarize(rec.steps, "sched")
    except Exception as e:  # noqa: BLE001 - keep what was measured
        traceback.print_exc()
        out["error"] = e2e._error(e)
    finally:
        save()
        e2e.shutdown(llm)
    return out


# -- the driver ----------------------------------------------------------------------------------
def run_dtype(dtype: str, spec: dict, out_dir: Path, timeout_s: float) -> dict:
    """`worker` for `dtype` in a fresh process, engine in-process; log in out_dir."""
    from profile_step import run_in_process_worker
    row = run_in_process_worker(__file__, "step_log", dtype, spec, out_dir, timeout_s)
    if "timed out" in row.get("error", ""):
        row["error"] += " (its share of the budget)"
    return row


def versions() -> dict:
    """Versions machine_info leaves out, and whether the checkout has uncommitted changes."""
    out = {}
    for name in ("triton", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["git_dirty"] = bool(subprocess.run(
            ["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_dirty"] = None
    return out


def write_report(results: list[dict], info: dict, workload: dict, json_path: Path,
                 md_path: Path | None) -> str:
    table = report_md(results, info, workload)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"machine": info, "workload": workload,
                                     "results": results, "table": table}))
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(table + "\n")
    return table


def main(argv=None) -> dict:
    from e2e import PROFILES, _on_sigterm, size, threading_is_main
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model folder (default: SmolLM2 via `python -m vllm_turboquant.models`)")
    ap.add_argument("--dtypes", default=DEFAULT_DTYPES,
                    help="comma-separated kv-cache dtypes; NAME@VAR=VALUE runs NAME again with "
                         "an environment variable set (an A/B of a knob, as in e2e.py)")
    ap.add_argument("--sizes", choices=sorted(PROFILES), default=None,
                    help="e2e.py profile whose long phase is the workload (default: full on "
                         "GPU, cpu without one)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--kv-bytes", type=parse_bytes, default=None,
                    help="kv_cache_memory_bytes (4GiB, 512MiB or bytes)")
    ap.add_argument("--prompts", choices=("real", "synthetic"), default="real")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock bound (default 540 s on GPU, 900 s on CPU)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "step_log",
                    help="per-dtype logs and worker files")
    ap.add_argument("--json", type=Path, default=None,
                    help="result JSON (default OUT_DIR/step_log.json)")
    ap.add_argument("--md", type=Path, default=None, help="also write the table here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:  # inside the per-dtype subprocess
        return worker(json.loads(args.worker), args.worker_out)

    t_start = time.perf_counter()
    gpu = on_gpu()
    name = args.sizes or ("full" if gpu else "cpu")
    profile = PROFILES[name]
    n, plen, olen, kv = profile["long"]
    workload = (args.requests or n, args.prompt_len or plen, args.output_len or olen,
                args.kv_bytes or kv)
    if workload[1] + workload[2] > profile["max_model_len"]:
        ap.error(f"prompt + output ({workload[1]} + {workload[2]}) exceeds max_model_len "
                 f"{profile['max_model_len']} of the {name} sizes")
    dtypes = [d for d in args.dtypes.split(",") if d]
    check_dtype_entries(ap, dtypes)
    eager = args.eager or not gpu  # CPU: torch.compile costs minutes
    budget = args.budget_s or (540.0 if gpu else 900.0)
    from vllm_turboquant.models import resolve_model
    model = resolve_model(args.model)
    info = {**machine_info(), **versions()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.json or args.out_dir / "step_log.json"
    spec = {"model": model, "profile": profile, "workload": workload,
            "prompts": args.prompts, "eager": eager}
    meta = {"model": model, "sizes": name + (" (eager)" if eager else " (CUDA graphs)"),
            "workload": f"{workload[0]} x ({workload[1]} in, {workload[2]} out) at "
                        f"{size(workload[3])} KV, {args.prompts} token ids, ignore_eos",
            "engine": f"max_num_seqs {profile['max_num_seqs']}, max_model_len "
                      f"{profile['max_model_len']}, max_num_batched_tokens vLLM's default, "
                      "prefix caching off, engine in-process"}
    if info.get("git_dirty"):
        meta["checkout"] = f"{info.get('git_sha')} with uncommitted changes"
    if threading_is_main():
        signal.signal(signal.SIGTERM, _on_sigterm)
    results: list[dict] = []
    try:
        for i, dtype in enumerate(dtypes):
            left = budget - (time.perf_counter() - t_start)
            if left < 30:
                results.append({"dtype": dtype, "error": "skipped: budget spent"})
                continue
            print(f"== {dtype} ({name} sizes, {left:.0f} s of budget left)", flush=True)
            row = run_dtype(dtype, spec, args.out_dir, left / (len(dtypes) - i))
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                              for k, v in row.items() if k not in ("steps", "summary",
                                                                   "summary_by_scheduled")}),
                  flush=True)
            results.append(row)
            write_report(results, info, {**meta, "wall time": _since(t_start)}, json_path,
                         args.md)
    finally:
        done = {r["dtype"] for r in results}
        for d in dtypes:  # stopped (SIGTERM): what the running worker saved
            if d not in done:
                row = {}
                try:
                    row.update(json.loads(
                        (args.out_dir / f"step_log_{file_label(d)}.json").read_text()))
                except (OSError, ValueError):
                    pass
                results.append({**row, "dtype": d, "error": "not run or not finished (stopped)"})
        table = write_report(results, info, {**meta, "wall time": _since(t_start)},
                             json_path, args.md)
    print("\n" + table)
    print(f"\nJSON: {json_path}")
    return json.loads(json_path.read_text())


def _since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"


if __name__ == "__main__":
    main()
