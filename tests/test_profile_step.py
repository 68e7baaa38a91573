"""benchmarks/profile_step.py's pure helpers on fake profiler events: step window, launches,
kernel time and groups, GPU busy union, host self time, the attention-op and backend-forward
attribution, the schedule plan and the table rows. No vLLM engine, no profiler."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step as ps  # noqa: E402

HOST, GPU = dict(pid=1, tid=1), dict(pid=0, tid=7)


def _ev(cat, name, ts, dur, where=HOST, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": float(ts), "dur": float(dur),
            **where, "args": args}


def _step(k: int, corr: int) -> list[dict]:
    """One model step at k * 1000 us: a GEMM op launching one kernel, then the attention op
    (inside our backend's forward, a Python frame) launching two of ours."""
    t = k * 1000
    return [
        _ev("user_annotation", "gpu_model_runner: forward", t, 600),
        _ev("user_annotation", "gpu_model_runner: sample", t + 700, 50),
        _ev("cpu_op", "aten::mm", t + 10, 100),
        _ev("cuda_runtime", "cudaLaunchKernel", t + 20, 30, correlation=corr),
        _ev("kernel", "nvjet_tst_gemm", t + 50, 200, GPU, correlation=corr),
        _ev("python_function", "vllm_turboquant/backend/impl.py(95): forward", t + 150, 400,
            **{"Python id": 10 + k, "Python parent id": 1}),
        _ev("python_function", "kernels/decode.py(342): tq_decode", t + 190, 300,
            **{"Python id": 100 + k, "Python parent id": 10 + k}),
        _ev("cpu_op", ps.ATTENTION_OP, t + 200, 300),
        _ev("cuda_driver", "cuLaunchKernelEx", t + 210, 20, correlation=corr + 1),
        _ev("cuda_driver", "cuLaunchKernelEx", t + 240, 20, correlation=corr + 2),
        # ours overlap the GEMM by 50 us on the GPU timeline (another stream)
        _ev("kernel", "_tq_decode_split_kernel", t + 200, 100, dict(pid=0, tid=8),
            correlation=corr + 1),
        _ev("kernel", "_tq_decode_merge_kernel", t + 300, 20, GPU, correlation=corr + 2),
        _ev("cuda_runtime", "cudaStreamSynchronize", t + 560, 30),
    ]


def _trace(steps: int = 3) -> list[dict]:
    evs = [e for k in range(steps) for e in _step(k, 10 * k)]
    # A graph launch in step 1 whose replayed kernel is reported under its correlation id.
    evs += [_ev("cuda_runtime", "cudaGraphLaunch", 1580, 5, correlation=99),
            _ev("kernel", "flash_fwd_kernel", 1600, 40, GPU, correlation=99)]
    return evs


def test_window_is_start_to_start_of_the_forward_scopes():
    s = ps.summarize(_trace(3))
    # 3 forwards -> 2 periods; the third step's events lie outside the window.
    assert s["steps"] == 2 and s["step_source"] == ps.STEP_SCOPE
    assert s["window_us"] == 2000 and s["step_wall_us"] == 1000
    assert s["step_wall_us_median"] == 1000 and s["forward_scope_us"] == 600
    assert s["vllm_scopes_us_per_step"] == {"forward": 600.0, "sample": 50.0}


def test_launches_kernels_and_busy_fraction():
    s = ps.summarize(_trace(3))
    # per step: cudaLaunchKernel + 2 cuLaunchKernelEx; one graph launch over 2 steps
    assert s["launches_per_step"] == 3.5 and s["graph_launches_per_step"] == 0.5
    assert s["kernels_per_step"] == 3.5 and s["graph_kernels_per_step"] == 0.5
    assert s["graph_kernels_missing"] is False
    assert s["kernel_us_per_step"] == pytest.approx((200 + 100 + 20) + 40 / 2)
    # union per step: [50, 320) = 270 us, + 40 us of the graph kernel over 2 steps
    assert s["gpu_busy_us_per_step"] == pytest.approx(270 + 20)
    assert s["gpu_busy_frac"] == pytest.approx(580 / 2000)
    assert s["syncs_per_step"] == 1 and s["sync_us_per_step"] == 30
    groups = s["kernel_groups_us_per_step"]
    assert groups["ours (_tq_*)"] == 120 and groups["gemm"] == 200
    assert groups["attention"] == 20 and groups["other"] == 0
    assert s["ours_kernel_share"] == pytest.approx(240 / 680, abs=1e-4)
    top = s["top_kernels"]
    assert [k["name"] for k in top[:2]] == ["nvjet_tst_gemm", "_tq_decode_split_kernel"]
    assert top[0]["calls"] == 2 and top[0]["total_us"] == 400 and top[0]["mean_us"] == 200


def test_missing_graph_kernels_are_flagged():
    evs = [e for e in _trace(3) if e["name"] != "flash_fwd_kernel"]
    s = ps.summarize(evs)
    assert s["graph_launches_per_step"] == 0.5 and s["graph_kernels_missing"] is True


def test_host_self_time_subtracts_nested_calls_only():
    s = ps.summarize(_trace(3))
    ops = {r["name"]: r for r in s["top_host_ops"]}
    assert ops["aten::mm"]["total_us"] == 2 * (100 - 30)
    assert ops[ps.ATTENTION_OP]["total_us"] == 2 * (300 - 20 - 20)
    assert "gpu_model_runner: forward" not in ops  # annotations are not host ops
    assert "vllm_turboquant/backend/impl.py(95): forward" not in ops


def test_attention_op_and_backend_forward_attribution():
    s = ps.summarize(_trace(3))
    att = s["attention_op"]
    assert att["calls_per_step"] == 1 and att["host_us_per_step"] == 300
    assert att["launches_per_step"] == 2 and att["gpu_us_per_step"] == 120
    assert {k["name"] for k in att["top_kernels"]} == {"_tq_decode_split_kernel",
                                                       "_tq_decode_merge_kernel"}
    fwd = s["backend_forward"]
    assert fwd["host_us_per_step"] == 400 and fwd["share_of_step"] == 0.4
    assert fwd["gpu_us_per_step"] == 120 and fwd["launches_per_step"] == 2
    assert fwd["top_callees"][0]["name"] == "kernels/decode.py(342): tq_decode"
    assert fwd["top_callees"][0]["per_step_us"] == 300
    assert "metadata_build" not in s


def test_cpu_only_trace_and_profiler_steps_fallback():
    evs = [e for e in _trace(3) if e["cat"] not in ps.GPU_CATS
           and e["name"] != "gpu_model_runner: forward"]
    evs += [_ev("user_annotation", f"ProfilerStep#{k}", k * 1000, 900) for k in range(3)]
    s = ps.summarize(evs)
    assert s["step_source"] == "ProfilerStep" and s["steps"] == 2
    assert s["has_gpu"] is False and "kernel_us_per_step" not in s
    assert "gpu_us_per_step" not in s["backend_forward"]


def test_skip_drops_the_first_steps():
    s = ps.summarize(_trace(4), skip=1)
    assert s["steps"] == 2 and s["window_us"] == 2000


def test_interval_union_and_outermost():
    assert ps.interval_union([(0, 10), (5, 15), (20, 30), (30, 31)]) == 26
    assert ps.interval_union([]) == 0
    outer = _ev("python_function", "a.py(1): forward", 0, 100)
    inner = _ev("python_function", "b.py(1): forward", 10, 50)
    other = _ev("python_function", "a.py(1): forward", 0, 100, dict(pid=1, tid=2))
    assert ps._outermost([inner, outer, other]) == [outer, other]


def test_kernel_groups():
    assert ps.kernel_group("_tq_store_kernel") == "ours (_tq_*)"
    assert ps.kernel_group("void flash::flash_fwd_splitkv_kernel<...>") == "attention"
    assert ps.kernel_group("sm90_xmma_gemm_bf16bf16") == "gemm"
    assert ps.kernel_group("triton_poi_fused_mul_silu_0") == "inductor triton"
    assert ps.kernel_group("void at::native::elementwise_kernel") == "other"


def test_backend_patterns_match_both_backends():
    assert ps.BACKEND_FORWARD.search("vllm_turboquant/backend/impl.py(95): forward")
    assert ps.BACKEND_FORWARD.search("vllm/v1/attention/backends/flash_attn.py(749): forward")
    assert ps.BACKEND_FORWARD.search("vllm/v1/attention/backends/cpu_attn.py(344): forward")
    assert not ps.BACKEND_FORWARD.search("vllm/model_executor/models/llama.py(200): forward")
    assert ps.METADATA_BUILD.search("vllm_turboquant/backend/metadata.py(80): build")


def test_schedule_simulation_and_plans():
    sim = ps.simulate_schedule([(4, 100, 10)], budget=128, max_seqs=4)
    # 400 prompt tokens at 128 per step (minus decode tokens): prompts end in step 3
    assert sim["last_prefill_step"] == 3 and sim["first_finish_step"] == 9
    for name, prof in ps.PROFILES.items():
        for phase, spec in prof["phases"].items():
            plan = ps.phase_plan(phase, spec, prof["max_num_batched_tokens"],
                                 prof["max_num_seqs"])
            first, last = plan["wait"] + 1, plan["wait"] + plan["active"]
            if phase.startswith("decode"):  # every recorded step decodes the whole batch
                assert first > plan["last_prefill_step"] + 1
                assert last < plan["first_finish_step"] - 1
            else:  # every recorded step carries prompt tokens
                assert last <= plan["last_prefill_step"] and first >= 2
            assert last < plan["steps"], (name, phase)
    with pytest.raises(ValueError, match="too few steps"):
        ps.phase_plan("decode", {"requests": [(1, 16, 3)]}, 64, 4)


def test_load_trace_reads_gzip_and_keeps_complete_events(tmp_path):
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": [{"ph": "M", "name": "process_name"}, *_trace(2)]}, f)
    evs = ps.load_trace(path)
    assert len(evs) == len(_trace(2)) and all(e["ph"] == "X" for e in evs)


def test_rows_and_tables():
    prof = ps.summarize(_trace(3))
    res = [{"dtype": "turboquant", "phases": {"decode": {
               "clean": {"step_wall_us": 800.0, "tpot_ms": 0.81},
               "profile": prof, "stack": prof}}},
           {"dtype": "auto", "error": "worker exit 1: boom"}]
    rows = ps.compare_rows(res)
    r = rows[0]
    assert r["clean_step_ms"] == 0.8 and r["prof_step_ms"] == 1.0 and r["steps"] == 2
    assert r["busy_pct"] == pytest.approx(100 * 290 / 800)
    assert r["ours_pct"] == pytest.approx(100 * 240 / 680, abs=0.01)
    assert r["fwd_share_pct"] == pytest.approx(40) and r["attn_host_ms"] == 0.3
    assert rows[1] == {"dtype": "auto", "note": "worker exit 1: boom"}
    table = ps.markdown_table(rows, ps.COLUMNS)
    assert "| turboquant | decode | 2 | 0.800 |" in table
    assert "| forward ms |" in ps.scope_table(res)


def test_python_builtins_lose_their_object_address():
    evs = [_ev("python_function", f"<built-in method view of Tensor object at 0x7f{i}a0>", 0, i)
           for i in (1, 2)]
    assert dict(ps._aggregate(evs, "dur")) == {"<built-in method view>": {"calls": 2, "dur": 3.0}}


def test_ratio_to_auto_and_details():
    prof = ps.summarize(_trace(3))
    res = [{"dtype": d, "phases": {"decode": {"clean": {"step_wall_us": us},
                                              "profile": prof, "stack": prof}}}
           for d, us in (("auto", 500.0), ("turboquant", 800.0))]
    assert [r["vs_auto"] for r in ps.compare_rows(res)] == [1.0, 1.6]
    md = ps.details_md(res)
    assert "**turboquant / decode**" in md and "`nvjet_tst_gemm` 200" in md
    assert "`kernels/decode.py(342): tq_decode` 300" in md


# -- the driver: --dtypes variants (NAME@VAR=VALUE), as in e2e.py (its worker runner's test:
# tests/test_load_client.py) --------------------------------------------------------------------
@pytest.mark.parametrize("script", ["profile_step", "step_log"])
def test_bad_dtype_entries_stop_before_any_model(monkeypatch, script):
    import importlib

    mod = importlib.import_module(script)

    def no_model(*a, **kw):
        raise AssertionError("the model was resolved before the --dtypes check")
    monkeypatch.setattr("vllm_turboquant.models.resolve_model", no_model)
    for entries in ("turboquant@own=0", "auto,turboquant,auto"):
        with pytest.raises(SystemExit) as exc:      # argparse's usage error, exit code 2
            mod.main(["--dtypes", entries, "--out-dir", "/nonexistent/profile"])
        assert exc.value.code == 2
