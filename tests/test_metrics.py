"""Metrics with fakes: byte sizes, capacities, the stat logger, multiprocess merging, the route.

No model and no engine: a fake VllmConfig carries what the front end knows after the engine
handshake (SmolLM2-135M: 30 layers, 3 KV heads of 64, bf16; 64 MiB of KV memory).
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from vllm_turboquant import metrics, stats_api
from vllm_turboquant.codec import TQConfig

MIB = 1 << 20
SMOL = dict(head_size=64, num_kv_heads=3, num_layers=30, model_dtype_bytes=2)


def fake_vllm_config(cache_dtype="turboquant", num_gpu_blocks=85, block_size=128,
                     memory=64 * MIB, additional_config=None, skip_layers=(), tp=1):
    model = SimpleNamespace(
        dtype=torch.bfloat16, served_model_name="smollm2",
        get_total_num_kv_heads=lambda: 3, get_head_size=lambda: 64,
        get_num_layers_by_block_type=lambda parallel, kind: 30,
        get_num_layers=lambda parallel: 30)
    cache = SimpleNamespace(cache_dtype=cache_dtype, num_gpu_blocks=num_gpu_blocks,
                            block_size=block_size, kv_cache_memory_bytes=memory,
                            kv_cache_dtype_skip_layers=list(skip_layers))
    parallel = SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1)
    return SimpleNamespace(model_config=model, cache_config=cache, parallel_config=parallel,
                           additional_config=additional_config or {})


# -- byte sizes --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, expected", [
    ("turboquant", 30 * 3 * 68),   # 4/4 bits, head 64: 32 + 32 + 2 + 2 bytes
    ("tq-k3v3", 30 * 3 * 52),      # 24 + 24 + 2 + 2
    ("auto", 30 * 3 * 256),        # 2 x 64 x bf16
    ("fp8", 30 * 3 * 128),
    ("float32", 30 * 3 * 512),
    ("turboquant_4bit_nc", 30 * 3 * 70),  # vLLM's own: (32 + 2) + (32 + 4)
])
def test_bytes_per_token_table(dtype, expected):
    assert metrics.kv_bytes_per_token(dtype, **SMOL) == expected


def test_bytes_per_token_matches_codec_and_counts_skipped_layers():
    tq = TQConfig.from_name("turboquant")
    assert metrics.kv_bytes_per_token("turboquant", **SMOL) == \
        30 * tq.bytes_per_token(64, 3)
    # Two layers kept in bf16 (vLLM's kv_cache_dtype_skip_layers) cost 256 B per head each.
    assert metrics.kv_bytes_per_token("turboquant", **SMOL, num_full_precision_layers=2) == \
        3 * (28 * 68 + 2 * 256)
    assert metrics.kv_bytes_per_token("no-such-dtype", **SMOL) is None


def test_preset_resolution_follows_the_plugin_settings():
    assert metrics.tq_config_for("auto") is None
    assert metrics.tq_config_for("turboquant").name == "turboquant"
    # --kv-cache-dtype turboquant + additional_config picks another preset: its size counts.
    picked = metrics.tq_config_for("turboquant", {"turboquant": {"preset": "tq-k3v3"}})
    assert (picked.key_bits, picked.value_bits) == (3, 3)
    facts = metrics.kv_facts_from_vllm_config(fake_vllm_config(
        additional_config={"turboquant": {"preset": "tq-k3v3"}}))
    assert facts.bytes_per_token == 30 * 3 * 52


# -- capacities ------------------------------------------------------------------------------
def test_facts_from_live_config_smollm2_64mib():
    # The numbers the real CPU server reported: 85 blocks of 128 for turboquant, 22 for auto.
    f = metrics.kv_facts_from_vllm_config(fake_vllm_config())
    assert (f.bytes_per_token, f.model_dtype_bytes_per_token) == (6120, 23040)
    assert f.capacity_tokens == 85 * 128 == 10880
    assert f.model_dtype_capacity_tokens == 22 * 128  # 64 MiB // (128 * 23040 B)
    assert f.compression_ratio == pytest.approx(23040 / 6120)
    assert f.capacity_tokens / f.model_dtype_capacity_tokens >= 3.5
    auto = metrics.kv_facts_from_vllm_config(fake_vllm_config("auto", num_gpu_blocks=22))
    assert auto.model_dtype_capacity_tokens == auto.capacity_tokens == 2816
    assert auto.compression_ratio == 1.0 and auto.saved_bytes(1.0) == 0


def test_facts_without_memory_budget_derive_it_from_the_pages():
    f = metrics.kv_facts_from_vllm_config(fake_vllm_config(memory=None, num_gpu_blocks=100))
    assert f.kv_memory_bytes == 100 * 128 * 6120
    assert f.model_dtype_capacity_tokens == (100 * 128 * 6120) // (128 * 23040) * 128


def test_facts_split_data_parallel_blocks_and_wait_for_the_engine():
    # The front end sums num_gpu_blocks over DP engines; each engine gets its share.
    f = metrics.kv_facts_from_vllm_config(fake_vllm_config(num_gpu_blocks=170), num_engines=2)
    assert f.capacity_tokens == 85 * 128
    assert metrics.kv_facts_from_vllm_config(fake_vllm_config(num_gpu_blocks=None)) is None
    assert metrics.kv_facts_from_vllm_config(fake_vllm_config("mystery")) is None


def test_used_and_saved_bytes():
    f = metrics.kv_facts_from_vllm_config(fake_vllm_config())
    assert f.used_tokens(0.25) == 2720
    assert f.used_bytes(0.25) == 2720 * 6120
    assert f.saved_bytes(0.25) == 2720 * (23040 - 6120)
    assert f.used_tokens(-1.0) == 0 and f.used_tokens(7.0) == f.capacity_tokens


# -- throughput --------------------------------------------------------------------------------
def test_throughput_meter_window_and_decay():
    m = metrics.ThroughputMeter(window_s=10.0, now=0.0)
    assert m.rate(now=0.0) == 0.0
    m.add(50, now=1.0)
    assert m.rate(now=2.0) == pytest.approx(25.0)  # young meter: divides by its 2 s of age
    for t in range(3, 21):
        m.add(10, now=float(t))
    assert m.rate(now=20.0) == pytest.approx(10 * 10 / 10.0)  # events at 11..20 s
    assert m.rate(now=31.0) == 0.0  # idle for a whole window


# -- the stat logger -------------------------------------------------------------------------
def scheduler_stats(usage):
    return SimpleNamespace(kv_cache_usage=usage)


def iteration_stats(generated, prompt):
    return SimpleNamespace(num_generation_tokens=generated,
                           prompt_token_stats=SimpleNamespace(computed=prompt))


def scrape(registry) -> dict[str, float]:
    """{name: value} of our metrics as the /metrics text shows them (one engine)."""
    text = generate_latest(registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith(metrics.PREFIX)}


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(metrics, "_monotonic", lambda: now[0])
    return now


def test_stat_logger_publishes_live_values(clock):
    registry = CollectorRegistry()
    logger = metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=registry)
    logger.log_engine_initialized()
    m = scrape(registry)
    assert set(m) == set(metrics.METRIC_NAMES)
    assert m["vllm_turboquant:kv_cache_compression_ratio"] == pytest.approx(3.7647, abs=1e-3)
    assert m["vllm_turboquant:kv_cache_capacity_tokens"] == 10880
    assert m["vllm_turboquant:kv_cache_capacity_tokens_model_dtype"] == 2816
    assert m["vllm_turboquant:kv_cache_saved_bytes"] == 0

    clock[0] += 1.0
    logger.record(scheduler_stats(0.25), iteration_stats(40, 300), engine_idx=0)
    clock[0] += 1.0
    logger.record(scheduler_stats(0.5), iteration_stats(40, 0), engine_idx=0)
    m = scrape(registry)
    assert m["vllm_turboquant:kv_cache_used_tokens"] == 5440
    assert m["vllm_turboquant:kv_cache_saved_bytes"] == 5440 * (23040 - 6120)
    assert m["vllm_turboquant:generation_throughput_toks_per_s"] == pytest.approx(80 / 2.0)
    assert m["vllm_turboquant:prompt_throughput_toks_per_s"] == pytest.approx(300 / 2.0)

    # Requests finish: the engine reports usage 0; idle log() calls decay the rates.
    logger.record(scheduler_stats(0.0), None, engine_idx=0)
    clock[0] += metrics.THROUGHPUT_WINDOW_S + 1
    logger.log()
    m = scrape(registry)
    assert m["vllm_turboquant:kv_cache_saved_bytes"] == 0
    assert m["vllm_turboquant:generation_throughput_toks_per_s"] == 0
    # Stats for an engine this front end does not manage are ignored, not crashed on.
    logger.record(scheduler_stats(0.9), None, engine_idx=7)


def test_stat_logger_waits_for_blocks_then_fills_in():
    registry = CollectorRegistry()
    config = fake_vllm_config(num_gpu_blocks=None)
    logger = metrics.TurboQuantStatLogger(config, [0], registry=registry)
    assert "vllm_turboquant:kv_cache_capacity_tokens" not in scrape(registry)
    config.cache_config.num_gpu_blocks = 85
    logger.record(scheduler_stats(0.1), None, engine_idx=0)
    assert scrape(registry)["vllm_turboquant:kv_cache_capacity_tokens"] == 10880


def test_rebuilding_the_logger_does_not_duplicate_metrics():
    registry = CollectorRegistry()
    for _ in range(2):  # a second build in one process must not raise "Duplicated timeseries"
        metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=registry)
    assert scrape(registry)["vllm_turboquant:kv_cache_capacity_tokens"] == 10880


def test_every_metric_has_help_with_a_unit_and_the_prefix():
    for name, (doc, mode) in metrics.METRICS.items():
        assert "Unit:" in doc, name
        assert mode in ("mostrecent", "livesum"), name
    assert all(n.startswith("vllm_turboquant:") for n in metrics.METRIC_NAMES)
    # vLLM's unregister_vllm_metrics() drops every collector named "vllm:*"; ours survive it.
    assert not any(n.startswith("vllm:") for n in metrics.METRIC_NAMES)


def test_plugin_class_is_a_vllm_aggregate_stat_logger():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, StatLoggerBase
    assert issubclass(metrics.TurboQuantStatLogger, AggregateStatLoggerBase)
    assert issubclass(metrics.TurboQuantStatLogger, StatLoggerBase)


# -- multiprocess mode (--api-server-count 2) --------------------------------------------------
def test_multiprocess_merge_two_api_servers(tmp_path, monkeypatch, clock):
    """Two front ends write their own files; /metrics (MultiProcessCollector) must show the
    latest KV usage (whichever front end got the scheduler stats) and the summed rates."""
    pid = [101]
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: pid[0]))

    server_a = metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=CollectorRegistry())
    pid[0] = 102
    server_b = metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=CollectorRegistry())

    clock[0] += 2.0
    pid[0] = 101
    server_a.record(scheduler_stats(0.5), iteration_stats(100, 0), engine_idx=0)
    pid[0] = 102
    server_b.record(scheduler_stats(0.25), iteration_stats(60, 0), engine_idx=0)

    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=str(tmp_path))
    m = scrape(merged)
    assert m["vllm_turboquant:kv_cache_used_tokens"] == 2720  # B wrote last
    assert m["vllm_turboquant:generation_throughput_toks_per_s"] == pytest.approx(
        (100 + 60) / 2.0)
    assert m["vllm_turboquant:kv_cache_capacity_tokens"] == 10880  # not doubled
    summary = metrics.stats_snapshot(merged)
    assert summary["capacity_tokens"] == 10880 and summary["used_tokens"] == 2720
    assert summary["generation_tokens_per_s"] == pytest.approx(80.0)


# -- the JSON summary and the route -------------------------------------------------------------
def test_summary_matches_metrics(clock):
    registry = CollectorRegistry()
    logger = metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=registry)
    clock[0] += 1.0
    logger.record(scheduler_stats(0.25), iteration_stats(10, 0), engine_idx=0)
    s = metrics.stats_snapshot(registry)
    assert s["available"] and s["kv_cache_dtype"] == "turboquant" and s["model"] == "smollm2"
    assert s["bytes_per_token"] == 6120 and s["model_dtype_bytes_per_token"] == 23040
    assert s["capacity_ratio"] == pytest.approx(10880 / 2816)
    assert s["saved_bytes"] == 2720 * (23040 - 6120)
    assert s["engines"]["0"]["kv_cache_used_tokens"] == 2720
    empty = metrics.stats_snapshot(CollectorRegistry())
    assert not empty["available"] and empty["capacity_ratio"] is None


def test_stats_retry_a_scrape_that_reads_a_file_being_written(clock):
    """The multiprocess collector raises when another API server's .db file is read while
    being created (prometheus/client_python#1199): the stats read retries and gets the
    values; a file that stays broken is still an error, not an empty answer."""
    import struct

    registry = CollectorRegistry()
    logger = metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=registry)
    clock[0] += 1.0
    logger.record(scheduler_stats(0.25), iteration_stats(10, 0), engine_idx=0)

    class Flaky:
        def __init__(self, failures):
            self.failures, self.calls = failures, 0

        def collect(self):
            self.calls += 1
            if self.calls <= self.failures:
                raise struct.error("unpack_from requires a buffer of at least 4 bytes")
            return registry.collect()

    flaky = Flaky(failures=2)
    s = metrics.stats_snapshot(flaky)
    assert flaky.calls == 3 and s["engines"]["0"]["kv_cache_used_tokens"] == 2720
    broken = Flaky(failures=10)
    with pytest.raises(struct.error):
        metrics.collect_samples(broken, pause_s=0.0)
    assert broken.calls == metrics.COLLECT_TRIES


@pytest.fixture
def fake_server_module(monkeypatch):
    """A module standing in for vLLM's API-server module, with a `build_app`."""
    from fastapi import FastAPI
    mod = types.ModuleType("fake_vllm_api_server")
    mod.build_app = lambda *a, **k: FastAPI()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(stats_api, "_SERVER_MODULES", (mod.__name__, "not.imported.module"))
    return mod


def test_route_patch_is_idempotent_and_serves_json(fake_server_module, monkeypatch):
    from fastapi.testclient import TestClient
    registry = CollectorRegistry()
    metrics.TurboQuantStatLogger(fake_vllm_config(), [0], registry=registry)
    monkeypatch.setattr(stats_api, "_snapshot", lambda: metrics.stats_snapshot(registry))

    stats_api.install_stats_route()
    assert stats_api.install_stats_route() == []  # second call: already wrapped
    app = fake_server_module.build_app()
    paths = [getattr(r, "path", None) for r in app.routes]
    assert paths.count(stats_api.STATS_PATH) == 1
    body = TestClient(app).get(stats_api.STATS_PATH).json()
    assert body["capacity_tokens"] == 10880 and body["compression_ratio"] > 3.5
    assert not stats_api.add_stats_route(app)  # never a second route


def test_route_patch_can_be_turned_off(fake_server_module, monkeypatch):
    monkeypatch.setenv(stats_api.ROUTE_ENV, "0")
    assert stats_api.install_stats_route() == []
    app = fake_server_module.build_app()
    assert stats_api.STATS_PATH not in [getattr(r, "path", None) for r in app.routes]


def test_middleware_answers_only_its_path(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    monkeypatch.setattr(stats_api, "_snapshot", lambda: {"ok": 1})
    app = FastAPI()
    app.get("/other")(lambda: {"other": True})
    app.add_middleware(stats_api.TurboQuantStatsMiddleware)
    client = TestClient(app)
    assert client.get(stats_api.STATS_PATH).json() == {"ok": 1}
    assert client.get("/other").json() == {"other": True}


def test_route_patch_targets_exist_in_the_installed_vllm():
    """The version helper must name the module whose build_app the server calls."""
    import importlib
    found = []
    for name in stats_api._SERVER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "build_app", None)):
            found.append(name)
    assert found, f"none of {stats_api._SERVER_MODULES} has build_app in this vLLM"


def test_route_patch_target_in_vllm_025_source():
    """0.25 (the GPU version) builds the app in openai/api_server.py, calling the module's
    global build_app after the engine client (and so our stat logger) exists."""
    from pathlib import Path
    src = Path("/tmp/vllm025/src/vllm/entrypoints/openai/api_server.py")
    if not src.is_file():
        pytest.skip("vLLM 0.25 sources not unpacked (pip download vllm==0.25.0)")
    text = src.read_text()
    assert "vllm.entrypoints.openai.api_server" in stats_api._SERVER_MODULES
    assert "\ndef build_app(" in text
    serve = text[text.index("async def build_and_serve("):]
    assert "app = build_app(" in serve[:serve.index("\nasync def ", 10)]
    worker = text[text.index("async def run_server_worker("):]
    assert worker.index("build_async_engine_client(") < worker.index("build_and_serve(")
    stat_group = Path("/tmp/vllm025/src/vllm/plugins/__init__.py").read_text()
    assert 'STAT_LOGGER_PLUGINS_GROUP = "vllm.stat_logger_plugins"' in stat_group
