"""benchmarks/step_log.py: its pure helpers on hand-made scheduler outputs and step records
(batch composition, prefill / decode split, the step summary and its tables), the step
recorder on a fake engine with and without vLLM's async batch queue, and one CPU run of the
script on the real model (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # appended: see tests/test_load_client.py
import step_log as sl  # noqa: E402


def _new(rid, prompt_len, computed=0):
    return NS(req_id=rid, prompt_token_ids=list(range(prompt_len)), num_computed_tokens=computed)


def _so(num_scheduled, new=(), cached=()):
    """A SchedulerOutput as vLLM 0.25 / 0.32 build it; cached: (req_id, computed before)."""
    return NS(num_scheduled_tokens=dict(num_scheduled), scheduled_new_reqs=list(new),
              scheduled_cached_reqs=NS(req_ids=[r for r, _ in cached],
                                       num_computed_tokens=[c for _, c in cached]),
              total_num_scheduled_tokens=sum(num_scheduled.values()))


# -- classification --------------------------------------------------------------------------
def test_classify_splits_prompt_tokens_from_decodes():
    plens = {"a": 100, "b": 100, "c": 50, "d": 40, "e": 30}
    n = {"a": 1, "b": 60, "c": 1, "d": 1, "e": 45}
    before = {"a": 100,  # decode: prompt done
              "b": 40,   # last prefill chunk (60 tokens)
              "c": 49,   # a 1-token prefill chunk: its prompt is not done yet
              "d": 43,   # decode after 3 outputs
              "e": 0}    # resumed after preemption: prompt + outputs recomputed
    assert sl.classify(n, before, plens) == (60 + 1 + 45, 2)


def test_classify_unknown_requests_count_by_token_count():
    assert sl.classify({"x": 1, "y": 7}, {}, {}) == (7, 1)


def test_batch_composition_of_a_chunked_mixed_batch():
    plens: dict = {}
    # step 1: r0 (300 tokens) is prefilled in chunks of 256
    so = _so({"r0": 256}, new=[_new("r0", 300)])
    assert sl.batch_composition(so, plens) == {"reqs": 1, "tokens": 256, "prompt_tokens": 256,
                                               "decode_reqs": 0, "new_reqs": 1}
    assert plens == {"r0": 300}
    # step 2: r0's last 44 prompt tokens, r1 starts
    so = _so({"r0": 44, "r1": 212}, new=[_new("r1", 500)], cached=[("r0", 256)])
    c = sl.batch_composition(so, plens)
    assert (c["prompt_tokens"], c["decode_reqs"], c["new_reqs"]) == (256, 0, 1)
    # step 3: r0 decodes, r1 goes on, r2 is only known to the scheduler
    so = _so({"r0": 1, "r1": 200, "r2": 1}, cached=[("r0", 300), ("r1", 212), ("r2", 90)])
    c = sl.batch_composition(so, plens, lookup={"r2": 80}.get)
    assert c == {"reqs": 3, "tokens": 202, "prompt_tokens": 200, "decode_reqs": 2,
                 "new_reqs": 0}
    assert plens["r2"] == 80


def test_step_kind_and_buckets():
    assert sl.step_kind({"prompt_tokens": 5, "decode_reqs": 9}) == "mixed"
    assert sl.step_kind({"prompt_tokens": 0, "decode_reqs": 9}) == "decode"
    assert sl.step_kind({"prompt_tokens": 0, "decode_reqs": 0}) == "none"
    labels = [sl.bucket_label(n) for n in (1, 8, 9, 32, 33, 64, 65, 128, 129)]
    assert labels == ["1-8", "1-8", "9-32", "9-32", "33-64", "33-64", "65-128", "65-128",
                      ">128"]


def test_combine_sums_a_steps_batches():
    a = {"reqs": 2, "tokens": 10, "prompt_tokens": 8, "decode_reqs": 2, "new_reqs": 1}
    b = {"reqs": 3, "tokens": 3, "prompt_tokens": 0, "decode_reqs": 3, "new_reqs": 0}
    assert sl.combine([(4, a), (5, b)]) == {"batches": [4, 5], "reqs": 5, "tokens": 13,
                                            "prompt_tokens": 8, "decode_reqs": 5}
    assert sl.combine([]) == {"batches": [], "reqs": 0, "tokens": 0, "prompt_tokens": 0,
                              "decode_reqs": 0}


# -- the summary -------------------------------------------------------------------------------
def _comp(prompt_tokens=0, decode_reqs=0, batch=0):
    return {"batches": [batch], "reqs": decode_reqs + (prompt_tokens > 0),
            "tokens": prompt_tokens + decode_reqs, "prompt_tokens": prompt_tokens,
            "decode_reqs": decode_reqs}


def _steps():
    """2 mixed steps (100 ms, 300 ms; 1000 + 3000 prompt tokens), 4 decodes at batch 4
    (10, 20, 30, 40 ms), 2 at batch 40 (50, 70 ms), one step with nothing (5 ms)."""
    spec = [(100, _comp(1000, 2)), (300, _comp(3000, 4))]
    spec += [(ms, _comp(0, 4)) for ms in (10, 20, 30, 40)]
    spec += [(ms, _comp(0, 40)) for ms in (50, 70)]
    spec += [(5, sl.combine([]))]
    return [{"i": i, "wall_ms": float(ms), "done": c, "sched": c} for i, (ms, c) in enumerate(spec)]


def test_summary_splits_time_by_kind_and_decode_bucket():
    s = sl.summarize(_steps())
    assert s["steps"] == 9 and s["step_time_s"] == pytest.approx(0.625)
    m = s["mixed"]
    assert m["steps"] == 2 and m["time_s"] == pytest.approx(0.4)
    assert m["share"] == pytest.approx(400 / 625)
    assert m["prompt_tokens"] == 4000 and m["ms_per_prompt_token"] == pytest.approx(0.1)
    assert m["mean_decode_reqs"] == 3 and m["median_ms"] == 200
    d = s["decode"]
    assert d["steps"] == 6 and d["time_s"] == pytest.approx(0.22)
    assert list(d["buckets"]) == ["1-8", "33-64"]
    small, big = d["buckets"]["1-8"], d["buckets"]["33-64"]
    assert small["steps"] == 4 and small["mean_ms"] == 25 and small["median_ms"] == 25
    assert small["p20_ms"] == pytest.approx(16) and small["p80_ms"] == pytest.approx(34)
    assert small["mean_batch"] == 4 and big["mean_batch"] == 40 and big["mean_ms"] == 60
    assert s["none"]["steps"] == 1 and s["none"]["time_s"] == pytest.approx(0.005)


def test_summary_follows_the_pairing():
    steps = _steps()
    for st in steps[2:6]:  # as if these decodes had been scheduled with a prefill chunk
        st["sched"] = _comp(16, 4)
    assert sl.summarize(steps, "done")["mixed"]["steps"] == 2
    by_sched = sl.summarize(steps, "sched")
    assert by_sched["pairing"] == "sched" and by_sched["mixed"]["steps"] == 6
    assert list(by_sched["decode"]["buckets"]) == ["33-64"]


def test_summary_of_no_steps():
    s = sl.summarize([])
    assert s["steps"] == 0 and s["mixed"]["steps"] == 0 and s["mixed"]["share"] is None
    assert s["mixed"]["ms_per_prompt_token"] is None and s["decode"]["buckets"] == {}


def test_tables_compare_with_auto():
    fast = [dict(st, wall_ms=st["wall_ms"] / 2) for st in _steps()]
    results = [
        {"dtype": "turboquant", "summary": sl.summarize(_steps()), "steps": _steps(),
         "engine": {"max_num_batched_tokens": 8192, "async_scheduling": True},
         "capacity_tokens": 700000, "wall_s": 2.0, "out_tok_s": 50.0},
        {"dtype": "auto", "summary": sl.summarize(fast), "steps": fast,
         "capacity_tokens": 180000, "wall_s": 1.0, "out_tok_s": 100.0},
        {"dtype": "fp8", "error": "timed out after 270 s (its share of the budget)"},
    ]
    rows = sl.summary_rows(results)
    tq = {r["kind"]: r for r in rows if r["dtype"] == "turboquant"}
    assert set(tq) == {"mixed", "decode (all)", "decode 1-8", "decode 33-64", "none"}
    assert tq["mixed"]["vs_auto"] == pytest.approx(2.0)
    assert tq["decode 1-8"]["vs_auto"] == pytest.approx(2.0)
    assert tq["mixed"]["per_step"] == 2000 and tq["decode 33-64"]["per_step"] == 40
    assert rows[-1] == {"dtype": "fp8", "kind": "-",
                        "note": "timed out after 270 s (its share of the budget)"}
    totals = {r["dtype"]: r for r in sl.total_rows(results)}
    assert totals["turboquant"]["tok_s_vs_auto"] == 0.5 and totals["turboquant"]["steps"] == 9
    assert totals["turboquant"]["max_num_batched_tokens"] == 8192
    md = sl.report_md(results, {"cpu": "test cpu", "vllm": "0.32"}, {"workload": "w"})
    assert "| turboquant | decode 1-8 | 4 | 0.10 |" in md
    assert "| turboquant | 700000 | 8192 | True | 2.00 | 50.0 | 0.50 |" in md


def test_parse_bytes():
    assert sl.parse_bytes("4GiB") == 4 << 30 and sl.parse_bytes("512MiB") == 512 << 20
    assert sl.parse_bytes("1.5GiB") == 3 << 29 and sl.parse_bytes("1048576") == 1 << 20
    with pytest.raises(Exception, match="not a size"):
        sl.parse_bytes("4 gigs")


# -- the recorder on a fake engine -------------------------------------------------------------
class FakeScheduler:
    """Requests of `prompt_len` tokens prefilled `budget` tokens per step (FCFS), then
    decoded until `output_len` tokens; SchedulerOutputs shaped as vLLM's."""

    def __init__(self, n, prompt_len, output_len, budget):
        self.prompt_len, self.output_len, self.budget = prompt_len, output_len, budget
        self.left = {f"r{i}": prompt_len + output_len - 1 for i in range(n)}  # tokens to feed
        self.computed = {r: 0 for r in self.left}
        self.seen: set = set()
        self.requests = {r: NS(num_prompt_tokens=prompt_len) for r in self.left}
        self.updates = 0

    def has_requests(self):
        return any(self.left.values())

    def schedule(self, throttle_prefills=False):
        n, budget = {}, self.budget
        for r in self.left:
            if self.left[r] and self.computed[r] >= self.prompt_len and budget:
                n[r], budget = 1, budget - 1
        for r in self.left:
            if self.left[r] and self.computed[r] < self.prompt_len and budget:
                n[r] = min(self.prompt_len - self.computed[r], budget)
                budget -= n[r]
        new = [_new(r, self.prompt_len, self.computed[r]) for r in n if r not in self.seen]
        cached = [(r, self.computed[r]) for r in n if r in self.seen]
        self.seen.update(n)
        so = _so(n, new, cached)
        for r, k in n.items():
            self.computed[r] += k
            self.left[r] -= k
        return so

    def update_from_output(self, scheduler_output, model_output):
        self.updates += 1
        return {}


class FakeCore:
    """EngineCore.step / step_with_batch_queue reduced to their calls into the scheduler."""

    def __init__(self, sched, queue_size):
        self.scheduler, self.queue = sched, deque()
        self.queue_size = queue_size
        self.step_fn = self.step if queue_size == 1 else self.step_with_batch_queue

    def step(self):
        if not self.scheduler.has_requests():
            return {}, False
        so = self.scheduler.schedule()
        return self.scheduler.update_from_output(so, "out"), True

    def step_with_batch_queue(self):
        if self.scheduler.has_requests():
            so = self.scheduler.schedule()
            self.queue.appendleft(so)
            if len(self.queue) < self.queue_size:
                return None, True
        elif not self.queue:
            return None, False
        return self.scheduler.update_from_output(self.queue.pop(), "out"), True


class FakeEngine:
    def __init__(self, core):
        self.engine_core = NS(engine_core=core)  # an InprocClient

    def has_unfinished_requests(self):
        core = self.engine_core.engine_core
        return core.scheduler.has_requests() or bool(core.queue)

    def step(self):
        self.engine_core.engine_core.step_fn()
        return []


def _record(queue_size, n=3, prompt_len=20, output_len=4, budget=32):
    core = FakeCore(FakeScheduler(n, prompt_len, output_len, budget), queue_size)
    llm = NS(llm_engine=FakeEngine(core))
    rec = sl.StepRecorder(llm)
    rec.start()
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()  # the StepHook's, as LLM's run loop calls it
    rec.stop()
    return rec, core


def test_recorder_without_async_pairs_each_step_with_its_own_batch():
    rec, core = _record(queue_size=1)
    steps = rec.steps
    assert [s["sched"]["batches"] for s in steps] == [[i] for i in range(len(steps))]
    assert all(s["done"] == s["sched"] for s in steps)
    # 60 prompt tokens at 32 per step (decodes first), then 3 decode tokens per request
    assert [s["sched"]["prompt_tokens"] for s in steps] == [32, 28, 0, 0, 0]
    assert [s["sched"]["decode_reqs"] for s in steps] == [0, 1, 3, 3, 2]
    assert sum(s["sched"]["prompt_tokens"] for s in steps) == 3 * 20
    assert sum(s["sched"]["decode_reqs"] for s in steps) == 3 * (4 - 1)
    assert all(s["wall_ms"] >= s["core_ms"] >= 0 for s in steps) and rec.outside == 0
    assert [s["i"] for s in steps] == list(range(5))
    assert all(b["t_start"] > a["t_start"] for a, b in zip(steps, steps[1:]))


def test_recorder_with_the_async_batch_queue_pairs_by_completion():
    rec, core = _record(queue_size=2)
    steps = rec.steps
    # step k schedules batch k and processes batch k-1; the last one only processes
    assert [s["sched"]["batches"] for s in steps] == [[0], [1], [2], [3], [4], []]
    assert [s["done"]["batches"] for s in steps] == [[], [0], [1], [2], [3], [4]]
    assert sl.step_kind(steps[0]["done"]) == "none"
    assert [s["done"]["prompt_tokens"] for s in steps] == [0, 32, 28, 0, 0, 0]
    s = sl.summarize(steps)
    assert s["mixed"]["steps"] == 2 and s["decode"]["steps"] == 3 and s["none"]["steps"] == 1
    assert s["mixed"]["prompt_tokens"] == 60
    assert sl.summarize(steps, "sched")["none"]["steps"] == 1


def test_recorder_records_only_while_started():
    core = FakeCore(FakeScheduler(1, 8, 3, 16), 1)
    llm = NS(llm_engine=FakeEngine(core))
    rec = sl.StepRecorder(llm)
    llm.llm_engine.step()  # warm-up: not recorded
    rec.start()
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
    assert [s["sched"]["decode_reqs"] for s in rec.steps] == [1, 1]
    assert core.scheduler.updates == 3


def test_find_scheduler_names_what_it_found():
    llm = NS(llm_engine=NS(engine_core=NS()))  # a multiprocess client: no .engine_core
    with pytest.raises(RuntimeError, match="VLLM_ENABLE_V1_MULTIPROCESSING=0"):
        sl.find_scheduler(llm)


# -- one CPU run of the script -----------------------------------------------------------------
def _model() -> str:
    try:
        from vllm_turboquant.models import resolve_model
        return resolve_model()
    except BaseException as e:  # noqa: BLE001 - SystemExit when the model package is missing
        pytest.skip(f"default model unavailable: {e}")


@pytest.mark.slow
def test_cpu_run_logs_every_step(tmp_path):
    model = _model()
    env = dict(os.environ)
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_TURBOQUANT_PRESET"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "step_log.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_log.py"), "--model", model,
         "--sizes", "cpu", "--dtypes", "turboquant,auto", "--out-dir", str(tmp_path),
         "--json", str(out), "--md", str(tmp_path / "step_log.md")],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    res = {r["dtype"]: r for r in data["results"]}
    assert set(res) == {"turboquant", "auto"}
    for dtype, r in res.items():
        assert "error" not in r, (dtype, r["error"])
        n, plen, olen = (r["workload"][k] for k in ("requests", "prompt_len", "output_len"))
        steps = r["steps"]
        assert steps and r["output_tokens"] == n * olen
        assert sum(s["sched"]["prompt_tokens"] for s in steps) == n * plen
        # every output token but each request's first comes from a decode
        assert sum(s["sched"]["decode_reqs"] for s in steps) == n * (olen - 1)
        decode_steps = r["summary"]["decode"]["steps"]
        assert olen - 1 <= decode_steps <= n * (olen - 1), (dtype, decode_steps)
        assert r["summary"]["mixed"]["prompt_tokens"] == n * plen
        assert r["engine"]["max_num_batched_tokens"] > 0
        assert r["engine"]["enable_prefix_caching"] is False
    assert res["turboquant"]["capacity_tokens"] > res["auto"]["capacity_tokens"]
    md = (tmp_path / "step_log.md").read_text()
    assert "| turboquant | mixed |" in md and "| auto | decode 1-8 |" in md
    assert md.strip() in proc.stdout
