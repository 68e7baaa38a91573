"""benchmarks/load.py against a tiny fake OpenAI-compatible server (aiohttp, 127.0.0.1).

The fake streams one SSE chunk per token with a fixed delay, so TTFT / ITL / concurrency are
known, and records what each request asked for.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web

# Appended, not prepended: benchmarks/kernels.py must not shadow the kernels package.
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load  # noqa: E402

TOKEN_DELAY_S = 0.05


class FakeServer:
    """OpenAI completions (streaming), /tokenize, /metrics, /v1/turboquant/stats."""

    def __init__(self):
        self.payloads: list[dict] = []
        self.tokenize_chars: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.port = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/turboquant/stats", self.stats)
        return app

    async def version(self, request):
        return web.json_response({"version": "fake-1"})

    async def stats(self, request):
        return web.json_response({"kv_cache_dtype": "turboquant", "capacity_tokens": 10880,
                                  "model_dtype_capacity_tokens": 2816, "saved_bytes": 0,
                                  "used_tokens": 0})

    async def models(self, request):
        return web.json_response({"data": [{"id": "fake-model", "max_model_len": 4096}]})

    async def tokenize(self, request):
        body = await request.json()
        self.tokenize_chars.append(len(body["prompt"]))
        tokens = [1000 + (sum(map(ord, w)) % 20000) for w in body["prompt"].split()]
        return web.json_response({"tokens": tokens, "count": len(tokens)})

    async def metrics(self, request):
        return web.Response(text=(
            "# HELP vllm:num_requests_running x\n"
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {self.in_flight}.0\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 0.0\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5\n'
            'vllm:num_preemptions_total{engine="0",model_name="m"} 0.0\n'))

    async def completions(self, request):
        body = await request.json()
        self.payloads.append(body)
        if body.get("model") != "fake-model":
            return web.json_response({"error": "unknown model"}, status=404)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await resp.write(b": keep-alive comment\n\n")
            for i in range(body["max_tokens"]):
                await asyncio.sleep(TOKEN_DELAY_S)
                chunk = {"choices": [{"index": 0, "text": f" t{i}"}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"choices": [], "usage": {"prompt_tokens": len(body["prompt"]),
                                              "completion_tokens": body["max_tokens"]}}
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        finally:
            self.in_flight -= 1
        return resp

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self._app())
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._runner = runner
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self):
        self._thread.start()
        while self.port is None:
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def run(**kw) -> dict:
    cfg = load.LoadConfig(progress=False, **kw)
    return asyncio.run(load.run_load(cfg))


# -- pieces ------------------------------------------------------------------------------------
def test_sse_parsing():
    assert load.parse_sse_line(b'data: {"choices": [{"text": "hi"}]}\n') == \
        {"choices": [{"text": "hi"}]}
    assert load.parse_sse_line("data: [DONE]") == "[DONE]"
    assert load.parse_sse_line(b": keep-alive\n") is None
    assert load.parse_sse_line(b"\n") is None
    assert load.chunk_text({"choices": [{"delta": {"content": "x"}}]}) == "x"
    assert load.chunk_text({"choices": [], "usage": {}}) == ""


def test_percentiles():
    p = load.percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p == {"mean": 3.0, "p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert load.percentiles([])["p50"] is None


@pytest.mark.parametrize("url", ["http://example.com:8000", "http://10.0.0.1:8000",
                                 "ftp://127.0.0.1", "http://127.0.0.1.evil.com"])
def test_only_local_targets(url):
    with pytest.raises(ValueError, match="only targets this machine"):
        load.check_local_url(url)
    with pytest.raises(ValueError):
        load.parse_args(["--base-url", url])


def test_local_targets_accepted():
    assert load.check_local_url("http://localhost:8000/") == "http://localhost:8000"
    assert load.check_local_url("http://[::1]:8000") == "http://[::1]:8000"


def test_prompt_windows_have_exact_lengths_and_differ():
    tokens = list(range(10_000))
    ws = load.windows(tokens, n=20, length=300, seed=3)
    assert all(len(w) == 300 for w in ws)
    assert len({tuple(w) for w in ws}) == 20
    assert load.windows(tokens, 20, 300, seed=3) == ws  # same seed, same prompts
    with pytest.raises(ValueError):
        load.windows(tokens[:10], 1, 300, seed=0)


# -- against the fake server -------------------------------------------------------------------
def test_concurrency_bound_and_latencies(server):
    r = run(base_url=server.url, num_requests=12, concurrency=4, input_len=16, output_len=8,
            prompts="synthetic", time_limit_s=60)
    assert r["requests"] == {"planned": 12, "sent": 12, "completed": 12, "failed": 0,
                             "unfinished": 0}
    assert server.max_in_flight == 4
    for p in server.payloads:
        assert len(p["prompt"]) == 16 and p["max_tokens"] == 8
        assert p["ignore_eos"] is True and p["stream"] is True
    # One chunk per 50 ms: TTFT, ITL and TPOT are about 50 ms (generous bounds: shared CPU).
    for key in ("ttft_ms", "itl_ms", "tpot_ms"):
        assert 40 <= r[key]["p50"] <= 250, (key, r[key])
    assert r["output_throughput_tok_s"] == pytest.approx(
        12 * 8 / r["duration_s"], rel=1e-6)
    assert r["server"]["version"] == "fake-1"
    assert r["server"]["turboquant_stats_before"]["capacity_tokens"] == 10880
    assert r["samples"] and r["server_peaks"]["vllm:kv_cache_usage_perc"] == 0.5
    json.dumps(r)  # the report is JSON as is
    table = load.format_table(r)
    assert "TTFT" in table and "output throughput" in table and "10880" in table


def test_real_prompts_come_from_the_servers_tokenizer(server, monkeypatch, tmp_path):
    text = tmp_path / "austen.txt"
    text.write_text(" ".join(f"word{i}" for i in range(20000)))
    monkeypatch.setattr("vllm_turboquant.textdata.ensure_english_text", lambda: text)
    r = run(base_url=server.url, num_requests=3, concurrency=3, input_len=40, output_len=2,
            prompts="real")
    assert r["requests"]["completed"] == 3
    assert all(len(p["prompt"]) == 40 for p in server.payloads)
    assert len({tuple(p["prompt"]) for p in server.payloads}) == 3
    # Tokenized in chunks below max_model_len (4096 tokens), only as much as needed.
    assert max(server.tokenize_chars) <= 3 * 4096 and len(server.tokenize_chars) == 1


def test_time_limit_stops_the_run(server):
    r = run(base_url=server.url, num_requests=4, concurrency=2, input_len=4, output_len=200,
            prompts="synthetic", time_limit_s=1.0)
    assert r["timed_out"] and r["duration_s"] < 5
    assert r["requests"]["completed"] == 0 and r["requests"]["unfinished"] == 2


def test_request_rate_mode_and_failures(server):
    r = run(base_url=server.url, num_requests=6, concurrency=None, request_rate=50.0,
            input_len=4, output_len=2, prompts="synthetic")
    assert r["requests"]["completed"] == 6
    bad = run(base_url=server.url, model="no-such-model", num_requests=2, concurrency=2,
              input_len=4, output_len=2, prompts="synthetic")
    assert bad["requests"]["failed"] == 2 and "HTTP 404" in bad["errors"][0]


def test_input_plus_output_must_fit_the_model(server):
    with pytest.raises(ValueError, match="max_model_len"):
        run(base_url=server.url, num_requests=1, input_len=4000, output_len=200,
            prompts="synthetic")


def test_cli_writes_json_and_plot_or_says_why_not(server, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    load.main(["--base-url", server.url, "--num-requests", "2", "--concurrency", "2",
               "--input-len", "4", "--output-len", "2", "--prompts", "synthetic",
               "--out", str(out), "--plot", str(png), "--no-progress", "--label", "fake"])
    assert json.loads(out.read_text())["label"] == "fake"
    try:
        import matplotlib  # noqa: F401
        assert png.is_file()
    except ImportError:
        assert "skipping the plot" in capsys.readouterr().err


# -- serving helpers (benchmarks/serving_common.py) ------------------------------------------------
def test_plugin_env_declares_entry_points_for_a_bare_checkout(monkeypatch):
    import importlib.metadata as md

    import serving_common
    monkeypatch.setattr(serving_common, "entry_points", lambda group: [])
    env = serving_common.plugin_env()
    folders = env["PYTHONPATH"].split(":")
    assert str(serving_common.REPO) in folders
    found = {ep.group: ep.value for d in md.distributions(path=[folders[0]])
             for ep in d.entry_points}
    assert found == serving_common.ENTRY_POINTS


def test_markdown_table():
    import serving_common
    t = serving_common.markdown_table([{"a": "x", "b": 1.234}, {"a": "y"}],
                                      [("a", "name", ""), ("b", "value", ".1f")])
    assert t.splitlines() == ["| name | value |", "|---|---|", "| x | 1.2 |", "| y | - |"]


# -- e2e.py helpers ------------------------------------------------------------------------------
def test_e2e_dtype_variants_parse_and_refuse_bad_entries():
    """--dtypes NAME@VAR=VALUE: the same dtype again with its worker's environment changed
    (an A/B in one call); malformed entries are an error before any engine starts."""
    import e2e
    from serving_common import file_label, parse_variant

    assert parse_variant("auto") == ("auto", {})
    assert parse_variant("turboquant@VLLM_TURBOQUANT_OWN_FA=0") == (
        "turboquant", {"VLLM_TURBOQUANT_OWN_FA": "0"})
    assert parse_variant("tq-k4v4@A=1@B_2=x=y") == ("tq-k4v4", {"A": "1", "B_2": "x=y"})
    for bad in ("turboquant@", "turboquant@own=0", "turboquant@A", "@A=1"):
        with pytest.raises(ValueError, match="--dtypes entry"):
            parse_variant(bad)
    assert file_label("turboquant@VLLM_TURBOQUANT_OWN_FA=0") == (
        "turboquant_VLLM_TURBOQUANT_OWN_FA_0")
    for argv in (["--dtypes", "turboquant@own=0"], ["--dtypes", "auto,turboquant,auto"]):
        with pytest.raises(SystemExit) as exc:      # argparse's usage error, exit code 2
            e2e.main(argv + ["--out-dir", "/nonexistent/e2e"])
        assert exc.value.code == 2


def test_a_variant_reaches_its_worker_with_its_environment(monkeypatch, tmp_path):
    """serving_common.run_entry, under e2e.py's workers and the in-process ones of
    profile_step.py / step_log.py: the worker gets the plain kv-cache dtype, the variant's
    variable and its own files; the row keeps the entry (the worker's JSON says the plain
    dtype). In-process: the engine in this process, V1 unless the caller's environment or
    runner_env (vLLM's presets: V2) says otherwise, no VLLM_CPU_KVCACHE_SPACE."""
    import e2e
    import profile_step
    import serving_common

    seen = {}

    def fake_run_worker(cmd, result_path, log_path, env, timeout_s):
        seen.update(spec=json.loads(cmd[cmd.index("--worker") + 1]), env=env,
                    result=result_path, log=log_path, script=cmd[1])
        return {"dtype": "turboquant", "short_out_tok_s": 1.0}
    monkeypatch.setattr(serving_common, "run_worker", fake_run_worker)
    monkeypatch.delenv("VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX", raising=False)
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    entry = "turboquant@VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX=16384"
    label = "turboquant_VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX_16384"
    for mod, prefix in ((e2e, "e2e"), (profile_step, "profile")):
        row = mod.run_dtype(entry, {"out_dir": str(tmp_path)}, tmp_path, 60)
        # labelled by the entry, not the worker's plain dtype (which once overwrote it: the
        # A/B rows of one e2e run both read "turboquant"); the worker's fields pass through
        assert row["dtype"] == entry and row["kv_cache_dtype"] == "turboquant"
        assert row["short_out_tok_s"] == 1.0
        assert seen["script"] == mod.__file__
        assert seen["spec"]["dtype"] == "turboquant" and seen["spec"]["label"] == label
        assert seen["env"]["VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX"] == "16384"
        assert seen["result"] == tmp_path / f"{prefix}_{label}.json"
        assert seen["log"] == tmp_path / f"{prefix}_{label}.log"
        mod.run_dtype("auto", {"out_dir": str(tmp_path)}, tmp_path, 60)
        assert "VLLM_TURBOQUANT_OWN_FA_PREFIX_MAX" not in seen["env"]   # the A side: unchanged
    # e2e's engines run in their own processes, in the caller's environment
    e2e.run_dtype("auto", {}, tmp_path, 60)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in seen["env"]
    assert seen["env"]["VLLM_CPU_KVCACHE_SPACE"] == "4"
    # the in-process runner's environment
    profile_step.run_dtype("auto", {}, tmp_path, 60)
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert seen["env"]["VLLM_CUSTOM_SCOPES_FOR_PROFILING"] == "1"
    assert seen["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert "VLLM_CPU_KVCACHE_SPACE" not in seen["env"]
    profile_step.run_dtype("turboquant_4bit_nc", {}, tmp_path, 60)
    assert seen["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "1"              # runner_env wins
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    profile_step.run_dtype("auto", {}, tmp_path, 60)
    assert seen["env"]["VLLM_USE_V2_MODEL_RUNNER"] == "1"              # the caller's wins


def test_e2e_without_the_text_stops_before_any_model(monkeypatch):
    """A machine that cannot fetch the evaluation text (no network) gets the fetch's message
    as a usage error before the model is built or any engine starts."""
    import e2e

    def no_text():
        raise RuntimeError("cannot fetch the evaluation text: copy austen.txt here")

    def no_model(*a, **kw):
        raise AssertionError("the model was resolved before the text was checked")
    monkeypatch.setattr("vllm_turboquant.textdata.ensure_english_text", no_text)
    monkeypatch.setattr("vllm_turboquant.models.resolve_model", no_model)
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--dtypes", "auto", "--out-dir", "/nonexistent/e2e"])
    assert exc.value.code == 2


def test_e2e_throughput_reports_the_median_of_its_repeats(monkeypatch):
    import e2e

    times = iter([4.0, 2.0, 3.0])
    monkeypatch.setattr(e2e, "timed_generate", lambda llm, prompts, n: (next(times), 100, []))
    got = e2e.throughput(None, [[1, 2], [3]], 50, repeats=3)
    assert got["elapsed_s"] == 3.0 and got["out_tok_s"] == pytest.approx(100 / 3)
    assert got["out_tok_s_runs"] == pytest.approx([25.0, 50.0, 100 / 3])
    assert got["total_tok_s"] == pytest.approx(103 / 3)
    with pytest.raises(SystemExit) as exc:
        e2e.main(["--repeats", "0", "--out-dir", "/nonexistent/e2e"])
    assert exc.value.code == 2


def test_e2e_tpot_probe_reports_the_median_of_its_repeats(monkeypatch):
    import e2e

    tpots = iter([0.003, 0.001, 0.002, 0.005, 0.004, 0.006])
    monkeypatch.setattr(e2e, "timed_generate", lambda llm, prompts, n: (0.01, n, []))
    monkeypatch.setattr(e2e, "engine_tpot", lambda outs: next(tpots))
    monkeypatch.setattr(e2e, "make_prompts", lambda tok, kind, n, length, seed: [[1]] * n)
    p = dict(e2e.PROFILES["cpu"])
    res = {}
    e2e.latency_probes(None, None, "synthetic", p, 8, res, lambda: None, repeats=3)
    assert res["tpot_c1_ms"] == pytest.approx(2.0) and res["tpot_cN_ms"] == pytest.approx(5.0)
    assert res["tpot_c1_runs_ms"] == pytest.approx([3.0, 1.0, 2.0])


def test_e2e_engine_tpot_and_prompts():
    from types import SimpleNamespace as NS

    import e2e

    def out(first, last, n):
        return NS(metrics=NS(first_token_ts=first, last_token_ts=last, num_generation_tokens=n),
                  outputs=[NS(token_ids=list(range(n)))])
    assert e2e.engine_tpot([out(10.0, 10.9, 10), out(5.0, 5.45, 10)]) == pytest.approx(0.075)
    assert e2e.engine_tpot([NS(metrics=None, outputs=[NS(token_ids=[1, 2])])]) is None
    tok = list(range(50000))  # len() is all the synthetic path asks of a tokenizer
    ps = e2e.make_prompts(tok, "synthetic", 3, 17, seed=0)
    assert [len(p) for p in ps] == [17, 17, 17] and ps == e2e.make_prompts(tok, "synthetic",
                                                                            3, 17, seed=0)
    assert e2e.size(1 << 30) == "1 GiB" and e2e.size(256 << 20) == "256 MiB"
    full = e2e.PROFILES["full"]
    assert full["short"] == (400, 1024, 256, 1 << 30) and full["long"] == (96, 7700, 384, 4 << 30)
    assert full["tpot_ctx"] == 2048 and full["tpot_batch"] == 16
