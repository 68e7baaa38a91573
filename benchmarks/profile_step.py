"""Where a serving step's time goes: torch.profiler over vLLM's engine, per kv-cache dtype.

GPU, one device call after the vLLM bundle bootstrap (../shared/device/README.md); ~4 min on
an H100 (2 engine starts with CUDA graphs, ~60 s each; ``--budget-s`` bounds it at 450 s).
The device returns at most 8 files of at most 16 MiB: results in one archive, each dtype's
traces in another:

    source /opt/tqb/env.sh; export PYTHONUNBUFFERED=1 VLLM_USE_V2_MODEL_RUNNER=0
    python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/tmp/pip.log 2>&1
    mkdir -p /tmp/profile; timeout 480 python3 benchmarks/profile_step.py --model $TQ_MODEL \
        --out-dir /tmp/profile --trace 2>&1 | tee /tmp/profile/run.log
    cd /tmp/profile && tar -czf $OUT/profile.tgz *.json *.md *.log
    for d in auto turboquant; do tar -cf $OUT/traces_$d.tar trace_${d}_*; done

CPU smoke run (tiny sizes, float32, CPU activities only, ~3 min on 2 idle cores):

    python benchmarks/profile_step.py --profile cpu --out-dir /tmp/profile-cpu

For each kv-cache dtype (default ``auto,turboquant``) one fresh subprocess builds ``vllm.LLM``
with the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the profiler must see the
model runner; vLLM 0.25 and 0.32 then use ``InprocClient`` + ``UniProcExecutor``, so the
model runs on this process's main thread) and vLLM's own profiler scopes on
(``VLLM_CUSTOM_SCOPES_FOR_PROFILING=1``: ``gpu_model_runner: forward / preprocess / sample /
...`` annotate every model step). KV memory, ``max_num_seqs``, ``max_model_len`` and the
chunked-prefill token budget are fixed, prefix caching is off, CUDA graphs are on unless
``--eager``; on GPU the V1 model runner, as in gpu_suite.sh. Phases (gpu sizes):

  decode     128 requests x 1024-token prompts, 128 output tokens: the 40 steps recorded
             start after every prompt is prefilled and end before any request finishes, so
             every recorded step is a batch-128 decode (FULL CUDA graph) at ~1.1K context
  decode_c1  1 request x 2048-token prompt: 40 decode steps at batch 1 (TPOT c=1)
  mixed      64 requests x 256-token prompts (40 output tokens) submitted with 6 x 3072-token
             prompts: every recorded step carries decodes plus a chunk of prefill (2048-token
             budget), the batches that run PIECEWISE with eager attention

Each phase runs (1) once unrecorded (warm-up: Triton JIT, allocator), (2) once timed without
the profiler (clean wall time per engine step, engine TPOT), (3) once under torch.profiler
(CPU + CUDA activities; a schedule records only the phase's steady steps), (4) once more with
``with_stack`` for a few steps: Python-function events give the host time inside each
attention backend's ``forward`` (ours: ``vllm_turboquant/backend/impl.py``; auto:
``vllm/v1/attention/backends/*.py``) and metadata ``build`` without touching the backend.
The stack tracer slows the host, so pass (4) reports shares of its own step, not absolute
times. Steps are the ``gpu_model_runner: forward`` scopes; a phase's window runs from the
first recorded forward's start to the last one's (start-to-start periods, so async
scheduling's overlap is counted once).

Per dtype and phase, in the JSON: clean and profiled wall per step, CUDA kernel time per step
(sum) and GPU busy time (union of kernels, copies and memsets), busy fraction of the clean and
of the profiled step (low = host-bound), launches / kernels / graph launches / syncs per step,
kernel groups (ours ``_tq_*``, attention, GEMM, Inductor Triton, other), the top 25 kernels
(name, calls, total / mean us), the top 25 host ops by self time (aten ops, CUDA runtime and
driver calls), vLLM's scopes per step, the ``vllm::unified_attention_with_output`` op (the
attention layer's host time where it runs eagerly, and the GPU time it launches), and from
pass (4) the backend forward and metadata build with their top Python callees and ops.
``--trace`` keeps the chrome traces (``trace_<entry>_<phase>[_stack].json.gz``; open them in
https://ui.perfetto.dev).

Caveats: the engine in-process does the frontend's output processing between steps (the
multiprocess engine of e2e.py overlaps it), so steps are somewhat longer than in e2e.py for
every dtype alike (``detokenize=False`` keeps that small). Kernels replayed from CUDA graphs
are reported through their ``cudaGraphLaunch``; where the profiler gives none,
``graph_kernels_missing`` says so and GPU numbers of graph steps are lower bounds.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import re
import signal
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.extend(p for p in (str(HERE), str(HERE.parent)) if p not in sys.path)

from serving_common import (check_dtype_entries, file_label, header_lines,  # noqa: E402
                            machine_info, markdown_table, on_gpu, run_entry)

GiB, MiB = 1 << 30, 1 << 20
GPU_MEMORY_UTILIZATION = 0.5  # as e2e.py: kv_cache_memory_bytes sizes the cache
STEP_SCOPE = "gpu_model_runner: forward"
SCOPE_PREFIX = "gpu_model_runner: "
OURS_PREFIX = "_tq_"
ATTENTION_OP = "vllm::unified_attention_with_output"
# Python-function event names are "<path relative to sys.path>(<line>): <function>".
BACKEND_FORWARD = re.compile(
    r"(^|/)(vllm_turboquant/backend/impl\.py|vllm/v1/attention/backends/[\w/]+\.py)"
    r"\(\d+\): forward$")
METADATA_BUILD = re.compile(
    r"(^|/)(vllm_turboquant/backend/metadata\.py|vllm/v1/attention/backends/[\w/]+\.py)"
    r"\(\d+\): build$")
HOST_CATS = ("cpu_op", "cuda_runtime", "cuda_driver")  # what "host ops" means below
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
KERNEL_GROUPS = (  # first match wins; names lower-cased
    ("ours (_tq_*)", lambda n: n.startswith(OURS_PREFIX)),
    ("attention", lambda n: any(s in n for s in ("flash", "fmha", "attn", "attention"))),
    ("gemm", lambda n: any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas",
                                            "matmul", "splitkreduce"))),
    ("inductor triton", lambda n: n.startswith("triton_")),
    ("other", lambda n: True),
)

# Sizes. requests: (count, prompt tokens, output tokens) in submission order (FCFS).
# active: decode steps recorded; stack_active: steps recorded with Python stacks.
PROFILES = {
    # 4 GiB: 128 x 1152 tokens fit in bf16 too (auto: ~186K tokens), so both dtypes decode
    # the same batch; max_model_len 4096 gives the decode split count of 8192 (16).
    "gpu": dict(kv_bytes=4 * GiB, max_num_seqs=128, max_model_len=4096,
                max_num_batched_tokens=2048, warm_runs=1, stack_active=6,
                phases={"decode": dict(requests=[(128, 1024, 128)], active=40),
                        "decode_c1": dict(requests=[(1, 2048, 64)], active=40),
                        "mixed": dict(requests=[(64, 256, 40), (6, 3072, 4)])}),
    # e2e.py's long workload's mixed steps (16,384-token budget, 7,700-token prompts: each
    # step carries fresh prompts, one prompt's continuation chunk and the running decodes):
    # 16 prompts give ~7 such steps, 5 of them recorded.
    "long": dict(kv_bytes=4 * GiB, max_num_seqs=128, max_model_len=8192,
                 max_num_batched_tokens=16384, warm_runs=1, stack_active=3,
                 phases={"mixed": dict(requests=[(16, 7700, 4)])}),
    # float32: bf16 matmuls on a CPU without bf16 units cost ~1 s per decode step here.
    "cpu": dict(dtype="float32", kv_bytes=64 * MiB, max_num_seqs=4, max_model_len=512,
                max_num_batched_tokens=64, warm_runs=0, stack_active=2,
                phases={"decode": dict(requests=[(2, 16, 10)], active=4),
                        "decode_c1": dict(requests=[(1, 32, 8)], active=3),
                        "mixed": dict(requests=[(2, 16, 8), (1, 288, 2)])}),
}
DEFAULT_PHASES = {"gpu": "decode,decode_c1,mixed", "cpu": "decode,mixed", "long": "mixed"}


# -- pure helpers (tested in tests/test_profile_step.py) ---------------------------------------
def simulate_schedule(requests, budget: int, max_seqs: int) -> dict:
    """Step indices (0-based) of vLLM's FCFS chunked-prefill schedule for requests submitted
    together: each step gives one token to every decoding request, then the rest of the
    token budget to prefills in order (running ones first, then admitted ones, chunked).
    A request's first output token comes from the step that ends its prompt.
    Returns last_prefill_step (the last step with prompt tokens), first_finish_step and
    steps (until every request is done)."""
    reqs = [[p, o] for n, p, o in requests for _ in range(n)]  # prompt left, output left
    waiting, running = list(range(len(reqs))), []
    step, last_prefill, first_finish = 0, -1, None
    while waiting or running:
        tokens, done = budget, []

        def feed(i):  # prompt tokens for request i from this step's budget
            nonlocal tokens, last_prefill
            take = min(reqs[i][0], tokens)
            tokens -= take
            reqs[i][0] -= take
            last_prefill = step
            if reqs[i][0] == 0:  # prompt done: this step also gives its first output token
                reqs[i][1] -= 1
                if reqs[i][1] == 0:
                    done.append(i)

        for i in running:  # decodes
            if reqs[i][0] == 0 and tokens > 0:
                tokens -= 1
                reqs[i][1] -= 1
                if reqs[i][1] == 0:
                    done.append(i)
        for i in running:  # a prefill still in progress (from an earlier step)
            if reqs[i][0] > 0 and tokens > 0:
                feed(i)
        while waiting and tokens > 0 and len(running) < max_seqs:
            i = waiting.pop(0)
            running.append(i)
            feed(i)
        if done and first_finish is None:
            first_finish = step
        running = [i for i in running if i not in set(done)]
        step += 1
    return {"last_prefill_step": last_prefill, "first_finish_step": first_finish,
            "steps": step}


def phase_plan(phase: str, spec: dict, budget: int, max_seqs: int) -> dict:
    """Which engine steps of a phase the profiler records (torch.profiler schedule: `wait`
    steps skipped, 1 warm-up step, then steps wait+1 .. wait+active recorded).

    Decode phases start recording 2 steps after the last prompt token (slack for async
    scheduling) and stop 2 steps before the first request can finish, so each recorded step
    decodes the whole batch. The mixed phase records from step 2 to the last step with
    prompt tokens: each carries a prefill chunk and the decodes that started."""
    reqs = spec["requests"]
    sim = simulate_schedule(reqs, budget, max_seqs)
    if phase.startswith("decode"):
        wait = sim["last_prefill_step"] + 2
        active = min(spec.get("active", 40), sim["first_finish_step"] - wait - 3)
    else:
        wait = 1
        active = min(spec.get("active", 10 ** 6), sim["last_prefill_step"] - wait - 1)
    if active < 1:
        raise ValueError(f"phase {phase}: too few steps to record ({spec}, {sim})")
    return {"wait": wait, "active": active, **sim,
            "requests": sum(n for n, _, _ in reqs),
            "output_tokens": sum(n * o for n, _, o in reqs)}


def load_trace(path) -> list[dict]:
    """The complete ('X') events of a chrome trace (.json or .json.gz) as torch writes it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def _end(e: dict) -> float:
    return e["ts"] + e["dur"]


def add_self_times(events: list[dict], cats=HOST_CATS) -> None:
    """Set e["self_us"] on host-op events: duration minus that of the ops directly nested in
    it on the same thread (only events of `cats` nest; annotations and Python frames do
    not take time from an op)."""
    threads = defaultdict(list)
    for e in events:
        if e.get("cat") in cats:
            threads[(e.get("pid"), e.get("tid"))].append(e)
    for evs in threads.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[dict] = []
        for e in evs:
            e["self_us"] = e["dur"]
            while stack and _end(stack[-1]) <= e["ts"] + 1e-3:
                stack.pop()
            if stack:
                stack[-1]["self_us"] -= e["dur"]
            stack.append(e)
        for e in evs:
            e["self_us"] = max(e["self_us"], 0.0)


def interval_union(intervals) -> float:
    """Total length covered by (start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def kernel_group(name: str) -> str:
    low = name.lower()
    return next(g for g, match in KERNEL_GROUPS if match(low))


def _is_launch(e: dict) -> bool:
    return e.get("cat") in ("cuda_runtime", "cuda_driver") and "Launch" in e["name"]


def _corr(e: dict):
    return (e.get("args") or {}).get("correlation")


def _top(rows: dict, key: str, n: int, steps: int) -> list[dict]:
    out = []
    for name, r in sorted(rows.items(), key=lambda kv: -kv[1][key])[:n]:
        row = {"name": name[:200], "calls": r["calls"], "total_us": round(r[key], 1),
               "mean_us": round(r[key] / r["calls"], 2) if r["calls"] else None,
               "per_step_us": round(r[key] / steps, 2)}
        out.append(row)
    return out


class Trace:
    """One profiled phase: host events by thread, GPU events by correlation id, the step
    window. `events` are chrome-trace 'X' events (dicts with cat, name, ts, dur, pid, tid,
    args); tests pass fakes."""

    def __init__(self, events: list[dict], skip: int = 0):
        self.events = events
        add_self_times(events)
        self.host = [e for e in events if e.get("cat") not in GPU_CATS]
        self.gpu = [e for e in events if e.get("cat") in GPU_CATS]
        self.by_thread = defaultdict(list)
        for e in self.host:
            self.by_thread[(e.get("pid"), e.get("tid"))].append(e)
        for evs in self.by_thread.values():
            evs.sort(key=lambda e: e["ts"])
        self.starts = {k: [e["ts"] for e in v] for k, v in self.by_thread.items()}
        self.gpu_by_corr = defaultdict(list)
        for e in self.gpu:
            if _corr(e) is not None:
                self.gpu_by_corr[_corr(e)].append(e)
        self.launch_ts = {_corr(e): e["ts"] for e in self.host
                          if e.get("cat") in ("cuda_runtime", "cuda_driver")
                          and _corr(e) is not None}
        fw = sorted((e for e in self.host if e.get("cat") == "user_annotation"
                     and e["name"] == STEP_SCOPE), key=lambda e: e["ts"])
        self.step_source = STEP_SCOPE
        if len(fw) < 2:  # no vLLM scopes: the profiler's own steps (one per engine step)
            fw = sorted((e for e in self.host if e.get("cat") == "user_annotation"
                         and e["name"].startswith("ProfilerStep#")), key=lambda e: e["ts"])
            self.step_source = "ProfilerStep"
        fw = fw[skip:] if len(fw) - skip >= 2 else fw
        if len(fw) >= 2:  # start-to-start: N forwards give N - 1 periods
            self.t0, self.t1, self.steps = fw[0]["ts"], fw[-1]["ts"], len(fw) - 1
        else:
            allev = self.host or events
            self.t0 = min(e["ts"] for e in allev)
            self.t1 = max(_end(e) for e in allev)
            self.steps = max(1, len(fw))
            self.step_source = "whole trace"
        self.step_durations = [e["dur"] for e in fw[:-1]] if len(fw) >= 2 else []

    def in_window(self, e: dict) -> bool:
        return self.t0 <= e["ts"] < self.t1

    def gpu_in_window(self, e: dict) -> bool:
        """A GPU event belongs to the window when its launch call does (kernels of a step
        may run after the next step's host work began); without a launch, by its start."""
        ts = self.launch_ts.get(_corr(e))
        return self.t0 <= (ts if ts is not None else e["ts"]) < self.t1

    def inside(self, container: dict) -> list[dict]:
        """Host events on the container's thread that start within it (itself excluded)."""
        key = (container.get("pid"), container.get("tid"))
        evs, starts = self.by_thread.get(key, []), self.starts.get(key, [])
        lo = bisect.bisect_left(starts, container["ts"])
        hi = bisect.bisect_right(starts, _end(container))
        return [e for e in evs[lo:hi] if e is not container and _end(e) <= _end(container) + 1e-3]

    def gpu_of(self, host_events) -> list[dict]:
        """GPU events launched by these host events (by correlation id)."""
        out = []
        for e in host_events:
            if e.get("cat") in ("cuda_runtime", "cuda_driver") and _corr(e) is not None:
                out.extend(self.gpu_by_corr.get(_corr(e), ()))
        return out


def summarize(events: list[dict], skip: int = 0, top: int = 25) -> dict:
    """The per-step summary of one profiled phase (see the module docstring). Times in us;
    `*_per_step` divide by the window's step count."""
    tr = Trace(events, skip)
    s, wall = tr.steps, tr.t1 - tr.t0
    host = [e for e in tr.host if tr.in_window(e)]
    gpu = [e for e in tr.gpu if tr.gpu_in_window(e)]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    launches = [e for e in host if _is_launch(e)]
    graph = [e for e in launches if "GraphLaunch" in e["name"]]
    syncs = [e for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")
             and "Synchronize" in e["name"]]
    copies = [e for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")
              and ("Memcpy" in e["name"] or "Memset" in e["name"])]
    kernel_us = sum(e["dur"] for e in kernels)
    busy_us = interval_union((e["ts"], _end(e)) for e in gpu)
    periods = sorted(_periods(tr))
    out = {
        "steps": s, "step_source": tr.step_source, "window_us": round(wall, 1),
        "step_wall_us": round(wall / s, 1),
        "step_wall_us_median": round(periods[len(periods) // 2], 1) if periods else None,
        "forward_scope_us": (round(sum(tr.step_durations) / len(tr.step_durations), 1)
                             if tr.step_durations else None),
        "has_gpu": bool(tr.gpu),
        "launches_per_step": round(len(launches) / s, 2),
        "graph_launches_per_step": round(len(graph) / s, 2),
        "memcpy_memset_calls_per_step": round(len(copies) / s, 2),
        "syncs_per_step": round(len(syncs) / s, 2),
        "sync_us_per_step": round(sum(e["dur"] for e in syncs) / s, 1),
        "host_op_self_us_per_step": round(sum(e.get("self_us", 0) for e in host
                                              if e.get("cat") in HOST_CATS) / s, 1),
    }
    if tr.gpu:
        graph_corr = {_corr(e) for e in graph}
        out.update({
            "kernels_per_step": round(len(kernels) / s, 2),
            "kernel_us_per_step": round(kernel_us / s, 1),
            "gpu_busy_us_per_step": round(busy_us / s, 1),
            "gpu_busy_frac": round(busy_us / wall, 4) if wall > 0 else None,
            "graph_kernels_per_step": round(sum(
                1 for e in kernels if _corr(e) in graph_corr) / s, 2),
        })
        out["graph_kernels_missing"] = bool(graph) and out["graph_kernels_per_step"] == 0
        groups = defaultdict(float)
        for e in kernels:
            groups[kernel_group(e["name"])] += e["dur"]
        out["kernel_groups_us_per_step"] = {g: round(groups.get(g, 0.0) / s, 1)
                                            for g, _ in KERNEL_GROUPS}
        ours = groups.get(KERNEL_GROUPS[0][0], 0.0)
        out["ours_kernel_us_per_step"] = round(ours / s, 1)
        out["ours_kernel_share"] = round(ours / kernel_us, 4) if kernel_us else None
        out["top_kernels"] = _top(_aggregate(kernels, "dur"), "dur", top, s)
    out["top_host_ops"] = _top(_aggregate(
        (e for e in host if e.get("cat") in HOST_CATS), "self_us"), "self_us", top, s)
    scopes = defaultdict(lambda: {"calls": 0, "dur": 0.0})
    for e in host:
        if e.get("cat") == "user_annotation" and e["name"].startswith(SCOPE_PREFIX):
            scopes[e["name"][len(SCOPE_PREFIX):]]["calls"] += 1
            scopes[e["name"][len(SCOPE_PREFIX):]]["dur"] += e["dur"]
    out["vllm_scopes_us_per_step"] = {k: round(v["dur"] / s, 1) for k, v in sorted(
        scopes.items(), key=lambda kv: -kv[1]["dur"])}
    att = [e for e in host if e.get("cat") == "cpu_op" and e["name"] == ATTENTION_OP]
    if att:
        out["attention_op"] = container_summary(tr, att, s, top=10)
    for key, pattern, top in (("backend_forward", BACKEND_FORWARD, 15),
                              ("metadata_build", METADATA_BUILD, 5)):
        calls = _outermost([e for e in host if e.get("cat") == "python_function"
                            and pattern.search(e["name"])])
        if calls:
            out[key] = container_summary(tr, calls, s, top=top)
            out[key]["share_of_step"] = round(out[key]["host_us_per_step"]
                                              / out["step_wall_us"], 4)
    return out


def _periods(tr: Trace) -> list[float]:
    fw = sorted((e for e in tr.host if e.get("cat") == "user_annotation"
                 and e["name"] == STEP_SCOPE and tr.t0 <= e["ts"] <= tr.t1),
                key=lambda e: e["ts"])
    return [b["ts"] - a["ts"] for a, b in zip(fw, fw[1:])]


_ADDRESS = re.compile(r" (of \S+ )?(object )?at 0x[0-9a-f]+")


def _aggregate(events, key: str) -> dict:
    """name -> calls and summed `key`; Python built-ins lose their object address
    ("<built-in method view of Tensor object at 0x7f..>"), so calls on different objects
    add up."""
    rows = defaultdict(lambda: {"calls": 0, key: 0.0})
    for e in events:
        name = _ADDRESS.sub("", e["name"]) if " at 0x" in e["name"] else e["name"]
        rows[name]["calls"] += 1
        rows[name][key] += e.get(key, 0.0)
    return rows


def _outermost(events: list[dict]) -> list[dict]:
    """Drop events nested in another of the list on the same thread (a wrapper's forward
    calling the real one counts once)."""
    out, last_end = [], {}
    for e in sorted(events, key=lambda e: (e.get("pid"), e.get("tid"), e["ts"], -e["dur"])):
        key = (e.get("pid"), e.get("tid"))
        if key in last_end and e["ts"] < last_end[key]:
            continue
        out.append(e)
        last_end[key] = _end(e)
    return out


def container_summary(tr: Trace, containers: list[dict], steps: int, top: int) -> dict:
    """Host time of `containers` (one per call: an op or a Python frame), the launches, GPU
    time they caused, and what inside took the time: the top host ops by self time and, for
    a Python frame, its direct Python callees by inclusive time."""
    inner = [x for c in containers for x in tr.inside(c)]
    gpu = tr.gpu_of(inner)
    ops = [e for e in inner if e.get("cat") in HOST_CATS]
    out = {"name": containers[0]["name"], "calls_per_step": round(len(containers) / steps, 2),
           "host_us_per_step": round(sum(c["dur"] for c in containers) / steps, 1),
           "host_us_per_call": round(sum(c["dur"] for c in containers) / len(containers), 2),
           "launches_per_step": round(sum(1 for e in ops if _is_launch(e)) / steps, 2),
           "top_host_ops": _top(_aggregate(ops, "self_us"), "self_us", top, steps)}
    if tr.gpu:
        out["gpu_us_per_step"] = round(sum(e["dur"] for e in gpu) / steps, 1)
        out["top_kernels"] = _top(_aggregate(
            (e for e in gpu if e["cat"] == "kernel"), "dur"), "dur", top, steps)
    ids = {(c.get("args") or {}).get("Python id") for c in containers}
    ids.discard(None)
    if ids:
        callees = [e for e in inner if e.get("cat") == "python_function"
                   and (e.get("args") or {}).get("Python parent id") in ids]
        out["top_callees"] = _top(_aggregate(callees, "dur"), "dur", top, steps)
    return out


def compare_rows(results: list[dict]) -> list[dict]:
    """Flat table rows (dtype x phase) from the workers' results."""
    rows = []
    for res in results:
        for phase, ph in (res.get("phases") or {}).items():
            prof, stack = ph.get("profile") or {}, ph.get("stack") or {}
            clean = ph.get("clean") or {}
            row = {"dtype": res["dtype"], "phase": phase, "steps": prof.get("steps")}
            if clean.get("step_wall_us"):
                row["clean_step_ms"] = clean["step_wall_us"] / 1000
            if clean.get("tpot_ms") is not None:
                row["tpot_ms"] = clean["tpot_ms"]
            if prof.get("step_wall_us_median") or prof.get("step_wall_us"):
                row["prof_step_ms"] = (prof.get("step_wall_us_median")
                                       or prof["step_wall_us"]) / 1000
            if prof.get("kernel_us_per_step") is not None:
                row["kernel_ms"] = prof["kernel_us_per_step"] / 1000
                base = clean.get("step_wall_us") or prof.get("step_wall_us")
                row["busy_pct"] = 100 * prof["gpu_busy_us_per_step"] / base if base else None
            row["launches"] = prof.get("launches_per_step")
            row["kernels"] = prof.get("kernels_per_step")
            if prof.get("ours_kernel_share") is not None:
                row["ours_pct"] = 100 * prof["ours_kernel_share"]
            att = prof.get("attention_op") or {}
            if att:
                row["attn_host_ms"] = att["host_us_per_step"] / 1000
            fwd = stack.get("backend_forward") or {}
            if fwd:
                row["fwd_share_pct"] = 100 * fwd["share_of_step"]
            build = stack.get("metadata_build") or {}
            if build:
                row["build_share_pct"] = 100 * build["share_of_step"]
            if prof.get("graph_kernels_missing"):
                row["note"] = "graph kernels missing"
            errors = [f"{k}: {v}" for k, v in ph.items() if k.endswith("error")]
            if errors:
                row["note"] = "; ".join(errors)[:120]
            rows.append(row)
        if res.get("error") and not res.get("phases"):
            rows.append({"dtype": res["dtype"], "note": str(res["error"])[:120]})
    auto = {r["phase"]: r.get("clean_step_ms") for r in rows if r.get("dtype") == "auto"
            and "phase" in r}
    for r in rows:
        if auto.get(r.get("phase")) and r.get("clean_step_ms"):
            r["vs_auto"] = r["clean_step_ms"] / auto[r["phase"]]
    return rows


COLUMNS = [
    ("dtype", "kv-cache dtype", ""), ("phase", "phase", ""), ("steps", "steps", "d"),
    ("clean_step_ms", "step ms (clean, median)", ".3f"), ("vs_auto", "vs auto", ".2f"),
    ("tpot_ms", "TPOT ms (engine)", ".3f"),
    ("prof_step_ms", "step ms (profiled, median)", ".3f"), ("kernel_ms", "kernel ms/step", ".3f"),
    ("busy_pct", "GPU busy % of clean step", ".0f"), ("launches", "launches/step", ".0f"),
    ("kernels", "kernels/step", ".0f"), ("ours_pct", "_tq_ % of kernel time", ".1f"),
    ("attn_host_ms", "attention op host ms/step", ".3f"),
    ("fwd_share_pct", "backend forward % of step (stack pass)", ".0f"),
    ("build_share_pct", "metadata build % of step (stack pass)", ".0f"),
    ("note", "note", ""),
]


def scope_table(results: list[dict]) -> str:
    """vLLM's model-runner scopes, ms per step (profiled pass), dtype x phase."""
    names: list[str] = []
    for res in results:
        for ph in (res.get("phases") or {}).values():
            for k in ((ph.get("profile") or {}).get("vllm_scopes_us_per_step") or {}):
                if k not in names:
                    names.append(k)
    rows = []
    for res in results:
        for phase, ph in (res.get("phases") or {}).items():
            sc = (ph.get("profile") or {}).get("vllm_scopes_us_per_step") or {}
            rows.append({"dtype": res["dtype"], "phase": phase,
                         **{k: sc[k] / 1000 for k in sc}})
    cols = [("dtype", "kv-cache dtype", ""), ("phase", "phase", "")]
    cols += [(k, f"{k} ms", ".3f") for k in names]
    return markdown_table(rows, cols)


def details_md(results: list[dict], n: int = 5) -> str:
    """Per phase and dtype: the top kernels and host ops (profiled pass) and what the
    backend forward spends its host time in (stack pass), us per step."""
    def items(rows, key="per_step_us"):
        return ", ".join(f"`{r['name'][:70]}` {r[key]:.0f}" for r in (rows or [])[:n]) or "-"
    lines = []
    for res in results:
        for phase, ph in (res.get("phases") or {}).items():
            prof, stack = ph.get("profile") or {}, ph.get("stack") or {}
            if not prof:
                continue
            lines.append(f"- **{res['dtype']} / {phase}**")
            if prof.get("top_kernels"):
                lines.append(f"  - kernels: {items(prof['top_kernels'])}")
            lines.append(f"  - host ops (self): {items(prof.get('top_host_ops'))}")
            fwd = stack.get("backend_forward")
            if fwd:
                lines.append(f"  - backend forward callees (stack pass): "
                             f"{items(fwd.get('top_callees'))}")
    return "\n".join(lines)


# -- the worker (one dtype, in its own process) ------------------------------------------------
class StepHook:
    """Replaces ``llm.llm_engine.step`` (LLM's run loop calls it, 0.25 and 0.32): start time
    of every engine step, and one ``prof.step()`` after it while a profiler is attached."""

    def __init__(self, engine):
        self.step_fn = engine.step
        self.times: list[float] = []
        self.prof = None
        engine.step = self

    def __call__(self, *a, **kw):
        self.times.append(time.perf_counter())
        try:
            return self.step_fn(*a, **kw)
        finally:
            if self.prof is not None:
                self.prof.step()


def phase_inputs(tok, spec: dict, kind: str):
    """Prompts (token ids) and per-request SamplingParams, in submission order."""
    from vllm import SamplingParams
    from e2e import make_prompts
    inputs, params = [], []
    for i, (n, plen, out) in enumerate(spec["requests"]):
        for p in make_prompts(tok, kind, n, plen, seed=100 + i):
            inputs.append({"prompt_token_ids": p})
            params.append(SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True,
                                         detokenize=False))
    return inputs, params


def clean_run(llm, hook: StepHook, inputs, params, plan: dict) -> dict:
    """Wall time without the profiler: the median engine-step period over the steps the
    profiler would record, the whole call, and (decode) the engine's TPOT."""
    from e2e import engine_tpot
    hook.times = []
    t = time.perf_counter()
    outs = llm.generate(inputs, params, use_tqdm=False)
    wall = time.perf_counter() - t
    ts = hook.times
    lo = min(plan["wait"] + 1, max(len(ts) - 2, 0))
    hi = min(lo + plan["active"] + 1, len(ts))
    periods = sorted(b - a for a, b in zip(ts[lo:hi], ts[lo + 1:hi]))
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    res = {"wall_s": wall, "engine_steps": len(ts), "output_tokens": n_out,
           "us_per_output_token": wall / n_out * 1e6 if n_out else None,
           "step_wall_us": periods[len(periods) // 2] * 1e6 if periods else None,
           "step_wall_us_mean": sum(periods) / len(periods) * 1e6 if periods else None}
    tpot = engine_tpot(outs)
    if tpot is not None:
        res["tpot_ms"] = tpot * 1000
    return res


def profiled_run(llm, hook: StepHook, inputs, params, wait: int, active: int,
                 with_stack: bool, trace_path: Path) -> Path:
    """One generate call under torch.profiler recording engine steps wait+1..wait+active;
    the chrome trace goes to `trace_path` (gzip)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule
    acts = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(ProfilerActivity.CUDA)
    written = []

    def ready(p):
        p.export_chrome_trace(str(trace_path))
        written.append(trace_path)

    with profile(activities=acts, with_stack=with_stack,
                 schedule=schedule(wait=wait, warmup=1, active=active, repeat=1),
                 on_trace_ready=ready) as prof:
        hook.prof = prof
        try:
            llm.generate(inputs, params, use_tqdm=False)
        finally:
            hook.prof = None
    if not written:
        raise RuntimeError(f"the profiler recorded nothing (wait {wait}, active {active}): "
                           "the generate call ended first")
    return trace_path


def build_llm(model: str, dtype: str, p: dict, eager: bool):
    from vllm import LLM
    kwargs = dict(model=model, kv_cache_dtype=dtype, kv_cache_memory_bytes=p["kv_bytes"],
                  max_model_len=p["max_model_len"], max_num_seqs=p["max_num_seqs"],
                  max_num_batched_tokens=p["max_num_batched_tokens"],
                  enable_prefix_caching=False, seed=0, enforce_eager=eager,
                  disable_log_stats=False)
    if p.get("dtype"):
        kwargs["dtype"] = p["dtype"]
    if on_gpu():
        kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
    return LLM(**kwargs)


def _error(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}{where}"


def worker(spec: dict, out_path: str | None = None) -> dict:
    """Every phase for one dtype; rewrites `out_path` after each phase."""
    import torch
    p, dtype = spec["profile"], spec["dtype"]
    out_dir = Path(spec["out_dir"])
    out: dict = {"dtype": dtype, "phases": {}}

    def save():
        if out_path:
            tmp = Path(out_path + ".tmp")
            tmp.write_text(json.dumps(out, indent=1))
            tmp.replace(out_path)

    t0 = time.perf_counter()
    llm = build_llm(spec["model"], dtype, p, spec["eager"])
    out["startup_s"] = time.perf_counter() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    out["capacity_tokens"] = cache.num_gpu_blocks * cache.block_size
    sched = llm.llm_engine.vllm_config.scheduler_config
    out["async_scheduling"] = getattr(sched, "async_scheduling", None)
    comp = getattr(llm.llm_engine.vllm_config, "compilation_config", None)
    out["cudagraph_mode"] = str(getattr(comp, "cudagraph_mode", None))
    save()
    hook = StepHook(llm.llm_engine)
    tok = llm.get_tokenizer()
    # Warm-up: first-request costs, then one throwaway profiler session (CUPTI's set-up).
    warm_in, warm_params = phase_inputs(tok, {"requests": [(2, 32, 4)]}, spec["prompts"])
    llm.generate(warm_in, warm_params, use_tqdm=False)
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    with profile(activities=acts):
        llm.generate(warm_in[:1], warm_params[:1], use_tqdm=False)

    for phase in spec["phases"]:
        ph: dict = {}
        out["phases"][phase] = ph
        try:
            pspec = p["phases"][phase]
            plan = phase_plan(phase, pspec, p["max_num_batched_tokens"], p["max_num_seqs"])
            ph["plan"] = {**plan, "requests_spec": pspec["requests"]}
            inputs, params = phase_inputs(tok, pspec, spec["prompts"])
            for _ in range(p["warm_runs"]):
                llm.generate(inputs, params, use_tqdm=False)
            ph["clean"] = clean_run(llm, hook, inputs, params, plan)
            save()
            passes = [("profile", False, plan["active"])]
            if p["stack_active"] > 0 and not spec["no_stack"]:
                passes.append(("stack", True, min(p["stack_active"], plan["active"])))
            for key, stack, active in passes:
                suffix = "_stack" if stack else ""
                path = out_dir / f"trace_{spec['label']}_{phase}{suffix}.json.gz"
                t = time.perf_counter()
                profiled_run(llm, hook, inputs, params, plan["wait"], active, stack, path)
                t_parse = time.perf_counter()
                ph[key] = summarize(load_trace(path), skip=spec["skip"])
                ph[key]["profiled_call_s"] = round(t_parse - t, 2)
                ph[key]["parse_s"] = round(time.perf_counter() - t_parse, 2)
                if spec["trace"]:
                    ph[key]["trace"] = path.name
                else:
                    path.unlink(missing_ok=True)
                save()
        except Exception as e:  # noqa: BLE001 - keep what was measured, go on
            traceback.print_exc()
            ph["error"] = _error(e)
            save()
    out["wall_s"] = time.perf_counter() - t0
    save()
    return out


# -- the driver ----------------------------------------------------------------------------------
def run_in_process_worker(script: str, prefix: str, entry: str, spec: dict, out_dir: Path,
                          timeout_s: float, extra_env: dict | None = None) -> dict:
    """`script --worker SPEC` for one --dtypes entry (serving_common.run_entry: a dtype or a
    variant, files named by its label, the row by the entry) in a fresh process whose vLLM
    engine runs in-process (the profiler and the step hooks must see the model runner and the
    scheduler). Shared with step_log.py."""
    t0 = time.perf_counter()
    row = run_entry(script, prefix, entry, spec, out_dir, timeout_s,
                    extra_env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(extra_env or {})},
                    # V1 unless set (as gpu_suite.sh: ours fails on V2; runner_env's V2 for
                    # vLLM's presets stays); VLLM_CPU_KVCACHE_SPACE would override
                    # kv_cache_memory_bytes on CPU
                    env_defaults={"VLLM_USE_V2_MODEL_RUNNER": "0"},
                    env_drop=("VLLM_CPU_KVCACHE_SPACE",))
    row["driver_wall_s"] = time.perf_counter() - t0
    return row


def run_dtype(dtype: str, spec: dict, out_dir: Path, timeout_s: float) -> dict:
    return run_in_process_worker(__file__, "profile", dtype, spec, out_dir, timeout_s,
                                 {"VLLM_CUSTOM_SCOPES_FOR_PROFILING": "1"})


def write_report(results: list[dict], info: dict, meta: dict, out_dir: Path) -> str:
    table = "\n".join([
        "## profile_step", header_lines(info, meta), "",
        markdown_table(compare_rows(results), COLUMNS), "",
        "vLLM model-runner scopes (profiled pass, ms per step):", "", scope_table(results), "",
        "Top 5 per phase, us per step:", "", details_md(results)])
    (out_dir / "profile.json").write_text(json.dumps(
        {"machine": info, "workload": meta, "results": results}, indent=1))
    (out_dir / "profile.md").write_text(table + "\n")
    return table


def _on_sigterm(signum, frame):
    raise SystemExit(f"signal {signum}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="model folder (default: SmolLM2 via `python -m vllm_turboquant.models`)")
    ap.add_argument("--dtypes", default="auto,turboquant",
                    help="comma-separated kv-cache dtypes; NAME@VAR=VALUE runs NAME again with "
                         "an environment variable set (an A/B of a knob, as in e2e.py)")
    ap.add_argument("--profile", choices=sorted(PROFILES), default=None,
                    help="sizes (default: gpu with CUDA, else cpu)")
    ap.add_argument("--phases", default=None,
                    help="comma-separated, of " + ",".join(PROFILES["gpu"]["phases"])
                         + " (default: all on GPU, decode,mixed on CPU)")
    ap.add_argument("--prompts", choices=("real", "synthetic"), default="synthetic")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--no-stack", action="store_true",
                    help="skip the with_stack pass (backend forward / metadata build shares)")
    ap.add_argument("--skip", type=int, default=0,
                    help="recorded model steps to leave out of each window")
    ap.add_argument("--trace", action="store_true",
                    help="keep the chrome traces (trace_<entry>_<phase>[_stack].json.gz)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock bound (default 450 s on GPU, 900 s on CPU)")
    ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "profile")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return worker(json.loads(args.worker), args.worker_out)

    t_start = time.perf_counter()
    gpu = on_gpu()
    name = args.profile or ("gpu" if gpu else "cpu")
    profile = PROFILES[name]
    phases = (args.phases or DEFAULT_PHASES[name]).split(",")
    unknown = [ph for ph in phases if ph not in profile["phases"]]
    if unknown:
        raise SystemExit(f"unknown phases {unknown}; valid: {sorted(profile['phases'])}")
    dtypes = args.dtypes.split(",")
    check_dtype_entries(ap, dtypes)
    eager = args.eager or not gpu  # CPU: no CUDA graphs, torch.compile costs minutes
    budget = args.budget_s or (450.0 if gpu else 900.0)
    from vllm_turboquant.models import resolve_model
    model = resolve_model(args.model)
    info = machine_info()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"model": model, "profile": profile, "phases": phases, "prompts": args.prompts,
            "eager": eager, "trace": args.trace, "no_stack": args.no_stack, "skip": args.skip,
            "out_dir": str(args.out_dir)}
    e = profile
    meta = {"model": model + (f" ({e['dtype']})" if e.get("dtype") else ""),
            "sizes": name + (" (eager)" if eager else " (CUDA graphs)"),
            "engine": f"KV {e['kv_bytes'] / MiB:g} MiB, max_num_seqs {e['max_num_seqs']}, "
                      f"max_model_len {e['max_model_len']}, chunked prefill "
                      f"{e['max_num_batched_tokens']} tokens/step, prefix caching off, "
                      "engine in-process",
            "phases": "; ".join(f"{ph}: " + " + ".join(f"{n} x ({pl} in, {o} out)" for n, pl, o
                                                       in profile["phases"][ph]["requests"])
                                for ph in phases),
            "prompts": args.prompts + " token ids, ignore_eos, detokenize off"}
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
            results.append(run_dtype(dtype, spec, args.out_dir, left / (len(dtypes) - i)))
            write_report(results, info, {**meta, "wall time": _since(t_start)}, args.out_dir)
    finally:
        done = {r["dtype"] for r in results}
        for d in dtypes:  # stopped: what the running worker saved
            if d not in done:
                row = {}
                try:
                    row.update(json.loads(
                        (args.out_dir / f"profile_{file_label(d)}.json").read_text()))
                except (OSError, ValueError):
                    pass
                results.append({**row, "dtype": d, "error": "not run or not finished (stopped)"})
        table = write_report(results, info, {**meta, "wall time": _since(t_start)},
                             args.out_dir)
    print("\n" + table)
    print(f"\nJSON: {args.out_dir / 'profile.json'}")
    return json.loads((args.out_dir / "profile.json").read_text())


def _since(t0: float) -> str:
    return f"{time.perf_counter() - t0:.0f} s"


def threading_is_main() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    main()
