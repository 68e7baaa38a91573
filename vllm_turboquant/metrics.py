"""Prometheus metrics for the KV cache: bytes per token, capacity, memory saved, throughput.

vLLM loads :class:`TurboQuantStatLogger` from the entry-point group
``vllm.stat_logger_plugins`` (vLLM 0.25 and 0.32 alike) in every API-server process and
feeds it the live engine stats: ``SchedulerStats.kv_cache_usage`` each step and
``IterationStats`` token counts. It publishes, next to vLLM's own ``vllm:*`` metrics on
the server's ``/metrics``::

    vllm_turboquant:kv_cache_bytes_per_token{model_name,engine,kv_cache_dtype}
    vllm_turboquant:kv_cache_bytes_per_token_model_dtype{...}
    vllm_turboquant:kv_cache_compression_ratio{...}
    vllm_turboquant:kv_cache_memory_bytes{...}
    vllm_turboquant:kv_cache_capacity_tokens{...}
    vllm_turboquant:kv_cache_capacity_tokens_model_dtype{...}
    vllm_turboquant:kv_cache_used_tokens{...}
    vllm_turboquant:kv_cache_used_bytes{...}
    vllm_turboquant:kv_cache_saved_bytes{...}
    vllm_turboquant:generation_throughput_toks_per_s{...}
    vllm_turboquant:prompt_throughput_toks_per_s{...}

Prefix ``vllm_turboquant:``: vLLM's ``name:metric`` style (a Grafana query for ``vllm.*``
finds both), the plugin's own namespace, and not ``vllm:`` itself, which vLLM's
``unregister_vllm_metrics()`` deletes from the registry whenever its Prometheus logger is
(re)built.

With ``--api-server-count N`` every API server is its own process with its own stat logger;
vLLM then runs prometheus_client in multiprocess mode and ``/metrics`` merges all of them.
The engine sends ``SchedulerStats`` to one front end per step (whichever has outputs), so
KV-usage gauges use ``mostrecent``; each front end only sees the tokens of its own
requests, so the throughput gauges use ``livesum``.
"""

from __future__ import annotations

import collections
import struct
import time
from dataclasses import dataclass

from prometheus_client import REGISTRY, Gauge
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from . import settings
from .codec import TQConfig

PREFIX = "vllm_turboquant:"
LABELS = ("model_name", "engine", "kv_cache_dtype")
# Tokens/s are averaged over this many seconds: vLLM's own log interval
# (VLLM_LOG_STATS_INTERVAL = 10 s) and a common scrape interval, so every token counts in
# at least one scrape and an idle server decays to 0 within one interval.
THROUGHPUT_WINDOW_S = 10.0

# name -> (help text with units, prometheus multiprocess mode)
METRICS: dict[str, tuple[str, str]] = {
    "kv_cache_bytes_per_token": (
        "KV-cache bytes stored per token (keys and values, all attention layers and KV "
        "heads) with the served --kv-cache-dtype. Unit: bytes.", "mostrecent"),
    "kv_cache_bytes_per_token_model_dtype": (
        "KV-cache bytes per token if keys and values were stored in the model dtype "
        "(the --kv-cache-dtype auto baseline). Unit: bytes.", "mostrecent"),
    "kv_cache_compression_ratio": (
        "Model-dtype bytes per token divided by served bytes per token. Unit: ratio.",
        "mostrecent"),
    "kv_cache_memory_bytes": (
        "Memory given to the KV cache (--kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE "
        "per worker times workers; else capacity times bytes per token). Unit: bytes.",
        "mostrecent"),
    "kv_cache_capacity_tokens": (
        "Tokens the allocated KV cache holds (num_gpu_blocks x block_size, from the "
        "engine). Unit: tokens.", "mostrecent"),
    "kv_cache_capacity_tokens_model_dtype": (
        "Tokens the same KV-cache memory would hold in the model dtype. Unit: tokens.",
        "mostrecent"),
    "kv_cache_used_tokens": (
        "Token slots of the KV cache in use now (kv_cache_usage x capacity; whole "
        "blocks). Unit: tokens.", "mostrecent"),
    "kv_cache_used_bytes": (
        "KV-cache bytes in use now (used tokens x bytes per token). Unit: bytes.",
        "mostrecent"),
    "kv_cache_saved_bytes": (
        "Bytes the KV cache in use now saves against the model dtype (used tokens x "
        "(model-dtype bytes per token - bytes per token)). Unit: bytes.", "mostrecent"),
    "generation_throughput_toks_per_s": (
        f"Generated tokens per second, averaged over the last {THROUGHPUT_WINDOW_S:g} s. "
        "Unit: tokens/s.", "livesum"),
    "prompt_throughput_toks_per_s": (
        f"Prompt tokens prefilled per second (prefix-cache hits excluded), averaged over "
        f"the last {THROUGHPUT_WINDOW_S:g} s. Unit: tokens/s.", "livesum"),
}
METRIC_NAMES = tuple(PREFIX + name for name in METRICS)

_FP8_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla")
_NAMED_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}


# ---------------------------------------------------------------------------------------
# Byte sizes and capacities (pure; no vLLM objects)
# ---------------------------------------------------------------------------------------

def tq_config_for(cache_dtype: str, additional_config=None) -> TQConfig | None:
    """Our preset served under ``--kv-cache-dtype cache_dtype`` (resolved like the plugin
    does: ``settings.resolve``), None for any other dtype."""
    if not settings.is_turboquant_dtype(cache_dtype):
        return None
    try:
        return settings.resolve(cache_dtype, additional_config)
    except settings.TurboQuantConfigError:
        return None  # the plugin refuses to start with it; nothing to measure


def kv_bytes_per_token(cache_dtype: str, head_size: int, num_kv_heads: int,
                       num_layers: int, model_dtype_bytes: int,
                       num_full_precision_layers: int = 0,
                       tq: TQConfig | None = None) -> int | None:
    """KV-cache bytes per token (keys + values, all layers and KV heads) for `cache_dtype`.

    Our dtypes: the packed slot of preset `tq` (default: resolved from the name) via
    ``TQConfig.bytes_per_token``. vLLM's own ``turboquant_*`` presets: their aligned slot,
    read from vLLM. ``auto`` / float names / fp8: 2 x head_size x element size.
    `num_full_precision_layers` (vLLM's ``kv_cache_dtype_skip_layers``) stay in the model
    dtype. None when the size is unknown.
    """
    per_head_full = 2 * head_size * model_dtype_bytes
    tq = tq or tq_config_for(cache_dtype)
    if tq is not None:
        per_head = tq.bytes_per_token(head_size, 1)
    elif cache_dtype == "auto":
        per_head = per_head_full
    elif cache_dtype in _NAMED_DTYPE_BYTES:
        per_head = 2 * head_size * _NAMED_DTYPE_BYTES[cache_dtype]
    elif cache_dtype in _FP8_DTYPES:
        per_head = 2 * head_size
    elif cache_dtype.startswith("turboquant_"):
        per_head = _vllm_turboquant_slot_bytes(cache_dtype, head_size)
        if per_head is None:
            return None
    else:
        return None
    skipped = min(num_full_precision_layers, num_layers)
    return num_kv_heads * ((num_layers - skipped) * per_head + skipped * per_head_full)


def _vllm_turboquant_slot_bytes(cache_dtype: str, head_size: int) -> int | None:
    """Bytes per token and KV head of vLLM's built-in TurboQuant presets (vLLM >= 0.25)."""
    try:
        from vllm.model_executor.layers.quantization.turboquant.config import (
            TurboQuantConfig)
        return TurboQuantConfig.from_cache_dtype(cache_dtype, head_size).slot_size_aligned
    except (ImportError, ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class KVFacts:
    """What one engine's KV cache is: its bytes per token and capacity, and the baseline.

    bytes_per_token / model_dtype_bytes_per_token: one token of the whole model (all
        attention layers and KV heads), served dtype / model dtype.
    capacity_tokens: num_gpu_blocks x block_size of one engine (from the engine).
    memory_bytes: KV memory of one engine (all its workers); None when vLLM sized the cache
        from gpu_memory_utilization and did not say how much it used.
    """

    cache_dtype: str
    block_size: int
    capacity_tokens: int
    bytes_per_token: int
    model_dtype_bytes_per_token: int
    memory_bytes: int | None = None

    @property
    def compression_ratio(self) -> float:
        return self.model_dtype_bytes_per_token / self.bytes_per_token

    @property
    def kv_memory_bytes(self) -> int:
        if self.memory_bytes is not None:
            return self.memory_bytes
        return self.capacity_tokens * self.bytes_per_token

    @property
    def model_dtype_capacity_tokens(self) -> int:
        """Tokens the same memory holds in the model dtype, in whole blocks as vLLM
        allocates them (``memory // page_bytes``)."""
        page = self.block_size * self.model_dtype_bytes_per_token
        return self.kv_memory_bytes // page * self.block_size

    def used_tokens(self, usage: float) -> int:
        """Token slots in use for a vLLM ``kv_cache_usage`` fraction (0..1)."""
        return int(round(min(max(usage, 0.0), 1.0) * self.capacity_tokens))

    def used_bytes(self, usage: float) -> int:
        return self.used_tokens(usage) * self.bytes_per_token

    def saved_bytes(self, usage: float) -> int:
        return self.used_tokens(usage) * (self.model_dtype_bytes_per_token
                                          - self.bytes_per_token)


def kv_facts_from_vllm_config(vllm_config, num_engines: int = 1) -> KVFacts | None:
    """:class:`KVFacts` of one engine from a live ``VllmConfig`` (front-end copy).

    Version-specific reads live here only (vLLM 0.25 and 0.32 agree on all of them):
    ``cache_config.num_gpu_blocks`` is the engines' sum after the startup handshake;
    ``cache_config.kv_cache_memory_bytes`` is per worker (set by --kv-cache-memory-bytes,
    and on CPU by VLLM_CPU_KVCACHE_SPACE). None before the engine reported its blocks or
    for a cache dtype whose size is unknown. With tensor parallelism wider than the KV head
    count vLLM replicates heads, so the model-dtype baseline here is an upper bound (the
    capacity ratio errs low).
    """
    cache = vllm_config.cache_config
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if not cache.num_gpu_blocks or model is None:
        return None
    dtype_bytes = _dtype_bytes(model.dtype)
    layers = _attention_layers(model, parallel) * parallel.pipeline_parallel_size
    heads, head_size = model.get_total_num_kv_heads(), model.get_head_size()
    skip = len(getattr(cache, "kv_cache_dtype_skip_layers", None) or ())
    cache_dtype = str(cache.cache_dtype)
    tq = tq_config_for(cache_dtype, getattr(vllm_config, "additional_config", None))
    ours = kv_bytes_per_token(cache_dtype, head_size, heads, layers, dtype_bytes, skip, tq)
    if ours is None:
        return None
    full = kv_bytes_per_token("auto", head_size, heads, layers, dtype_bytes)
    per_worker = getattr(cache, "kv_cache_memory_bytes", None)
    workers = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
    return KVFacts(
        cache_dtype=cache_dtype,
        block_size=cache.block_size,
        capacity_tokens=cache.num_gpu_blocks // max(num_engines, 1) * cache.block_size,
        bytes_per_token=ours,
        model_dtype_bytes_per_token=full,
        memory_bytes=per_worker * workers if per_worker else None,
    )


def _dtype_bytes(dtype) -> int:
    itemsize = getattr(dtype, "itemsize", None)
    return int(itemsize) if itemsize else _NAMED_DTYPE_BYTES.get(str(dtype), 2)


def _attention_layers(model_config, parallel_config) -> int:
    try:
        return model_config.get_num_layers_by_block_type(parallel_config, "attention")
    except (AttributeError, TypeError, ValueError):
        return model_config.get_num_layers(parallel_config)


# ---------------------------------------------------------------------------------------
# Throughput
# ---------------------------------------------------------------------------------------

def _monotonic() -> float:
    return time.monotonic()  # one indirection, so tests can drive the clock


class ThroughputMeter:
    """Tokens per second over a sliding window of `window_s` seconds (monotonic clock)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S, now: float | None = None):
        self.window_s = window_s
        self._start = _monotonic() if now is None else now
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    def add(self, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            self._events.append((_monotonic() if now is None else now, tokens))
            self._total += tokens

    def rate(self, now: float | None = None) -> float:
        now = _monotonic() if now is None else now
        while self._events and self._events[0][0] <= now - self.window_s:
            self._total -= self._events.popleft()[1]
        # A meter younger than the window divides by its age, not by the full window.
        span = min(self.window_s, now - self._start)
        return self._total / span if span > 0 else 0.0


# ---------------------------------------------------------------------------------------
# The stat logger vLLM calls
# ---------------------------------------------------------------------------------------

class TurboQuantStatLogger(AggregateStatLoggerBase):
    """vLLM stat logger plugin (entry point group ``vllm.stat_logger_plugins``).

    One instance per AsyncLLM (per API-server process); one label set per engine index.
    vLLM calls ``record()`` after every engine step's outputs and ``log()`` every
    VLLM_LOG_STATS_INTERVAL seconds (also when idle, which is when the rates decay).
    """

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None,
                 registry=REGISTRY):
        self.vllm_config = vllm_config
        self.engine_indexes = list(engine_indexes or [0])
        model_name = getattr(vllm_config.model_config, "served_model_name", "")
        if isinstance(model_name, (list, tuple)):
            model_name = model_name[0]
        self.model_name = str(model_name)
        self.cache_dtype = str(vllm_config.cache_config.cache_dtype)
        self._gauges = make_gauges(registry)
        self._gen = {e: ThroughputMeter() for e in self.engine_indexes}
        self._prompt = {e: ThroughputMeter() for e in self.engine_indexes}
        self._usage = {e: 0.0 for e in self.engine_indexes}
        self.facts: KVFacts | None = None
        self._refresh_static()
        from .stats_api import install_stats_route
        install_stats_route()

    def _child(self, name: str, engine: int):
        return self._gauges[name].labels(self.model_name, str(engine), self.cache_dtype)

    def _refresh_static(self) -> None:
        self.facts = kv_facts_from_vllm_config(self.vllm_config, len(self.engine_indexes))
        f = self.facts
        if f is None:
            return
        for e in self.engine_indexes:
            self._child("kv_cache_bytes_per_token", e).set(f.bytes_per_token)
            self._child("kv_cache_bytes_per_token_model_dtype", e).set(
                f.model_dtype_bytes_per_token)
            self._child("kv_cache_compression_ratio", e).set(f.compression_ratio)
            self._child("kv_cache_memory_bytes", e).set(f.kv_memory_bytes)
            self._child("kv_cache_capacity_tokens", e).set(f.capacity_tokens)
            self._child("kv_cache_capacity_tokens_model_dtype", e).set(
                f.model_dtype_capacity_tokens)
            self._set_usage(e, self._usage[e])
            self._set_rates(e)

    def _set_usage(self, engine: int, usage: float) -> None:
        self._usage[engine] = usage
        f = self.facts
        if f is None:
            return
        self._child("kv_cache_used_tokens", engine).set(f.used_tokens(usage))
        self._child("kv_cache_used_bytes", engine).set(f.used_bytes(usage))
        self._child("kv_cache_saved_bytes", engine).set(f.saved_bytes(usage))

    def _set_rates(self, engine: int) -> None:
        self._child("generation_throughput_toks_per_s", engine).set(self._gen[engine].rate())
        self._child("prompt_throughput_toks_per_s", engine).set(self._prompt[engine].rate())

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
               engine_idx: int = 0, **_ignored) -> None:
        if engine_idx not in self._usage:
            return
        if self.facts is None:  # the engine may report its blocks after we were built
            self._refresh_static()
        if scheduler_stats is not None:
            self._set_usage(engine_idx, float(scheduler_stats.kv_cache_usage))
        if iteration_stats is not None:
            self._gen[engine_idx].add(int(iteration_stats.num_generation_tokens))
            self._prompt[engine_idx].add(prompt_tokens_computed(iteration_stats))
            self._set_rates(engine_idx)

    def log(self) -> None:
        for e in self.engine_indexes:
            self._set_rates(e)

    def log_engine_initialized(self) -> None:
        self._refresh_static()


def prompt_tokens_computed(iteration_stats) -> int:
    """Prompt tokens prefilled this iteration (vLLM >= 0.25: ``prompt_token_stats``)."""
    pts = getattr(iteration_stats, "prompt_token_stats", None)
    if pts is not None:
        return int(pts.computed)
    return int(getattr(iteration_stats, "num_prompt_tokens", 0))


def make_gauges(registry=REGISTRY) -> dict[str, Gauge]:
    """(Re)create our gauges, dropping any left from an earlier stat logger in this
    process (vLLM rebuilds its loggers on elastic scaling; tests build several)."""
    for collector in list(getattr(registry, "_collector_to_names", {})):
        if getattr(collector, "_name", "").startswith(PREFIX):
            registry.unregister(collector)
    return {name: Gauge(PREFIX + name, doc, labelnames=LABELS, multiprocess_mode=mode,
                        registry=registry)
            for name, (doc, mode) in METRICS.items()}


# ---------------------------------------------------------------------------------------
# The JSON summary (GET /v1/turboquant/stats) from whatever /metrics would show
# ---------------------------------------------------------------------------------------

# prometheus_client's multiprocess collector reads every process's mmap'ed .db files; one that
# another process is creating at that moment can be read empty or part-written
# (prometheus/client_python#1199: created first, sized after), and that scrape raises
# (struct.error, RuntimeError "Read beyond file size", a decode error). vLLM's own /metrics
# answered 500 once under load with 2 API servers (tests/test_serving_cpu.py, CI 2026-12-07;
# no traceback was logged, so this race is the likely cause, not a seen one). The next read a
# moment later sees the finished file: the stats API retries.
COLLECT_TRIES = 3
COLLECT_PAUSE_S = 0.05


Samples = dict[str, list[tuple[dict[str, str], float]]]


def collect_samples(registry, tries: int = COLLECT_TRIES,
                    pause_s: float = COLLECT_PAUSE_S) -> Samples:
    """{metric name: [(labels, value)]} of our metrics and vLLM's KV usage in `registry`
    (the multiprocess collector in multi-API-server mode, so all processes count). A read
    that fails on a file another process is writing is retried (tries in all, pause_s
    apart); the last failure is raised."""
    wanted = set(METRIC_NAMES) | {"vllm:kv_cache_usage_perc"}
    for attempt in range(tries):
        try:
            out: Samples = {}
            for family in registry.collect():
                for sample in family.samples:
                    if sample.name in wanted:
                        labels = {k: v for k, v in sample.labels.items() if k != "pid"}
                        out.setdefault(sample.name, []).append((labels, float(sample.value)))
            return out
        except (struct.error, RuntimeError, ValueError):
            if attempt == tries - 1:
                raise
            time.sleep(pause_s)
    raise ValueError(f"collect_samples: tries must be >= 1, got {tries}")


def summarize(samples: Samples) -> dict:
    """The stats JSON: totals over engines plus one entry per engine."""
    engines: dict[str, dict] = {}
    meta: dict[str, str] = {}
    for name in METRIC_NAMES:
        for labels, value in samples.get(name, ()):
            meta.setdefault("model", labels.get("model_name", ""))
            meta.setdefault("kv_cache_dtype", labels.get("kv_cache_dtype", ""))
            short = name[len(PREFIX):]
            engines.setdefault(labels.get("engine", "0"), {})[short] = value
    for labels, value in samples.get("vllm:kv_cache_usage_perc", ()):
        engines.setdefault(labels.get("engine", "0"), {})["kv_cache_usage"] = value

    def total(key: str) -> float:
        return sum(e.get(key, 0.0) for e in engines.values())

    first = next(iter(engines.values()), {})
    bpt = first.get("kv_cache_bytes_per_token")
    capacity, baseline = total("kv_cache_capacity_tokens"), total(
        "kv_cache_capacity_tokens_model_dtype")
    return {
        "model": meta.get("model"),
        "kv_cache_dtype": meta.get("kv_cache_dtype"),
        "available": bpt is not None,
        "bytes_per_token": bpt,
        "model_dtype_bytes_per_token": first.get("kv_cache_bytes_per_token_model_dtype"),
        "compression_ratio": first.get("kv_cache_compression_ratio"),
        "kv_cache_memory_bytes": total("kv_cache_memory_bytes"),
        "capacity_tokens": int(capacity),
        "model_dtype_capacity_tokens": int(baseline),
        "capacity_ratio": capacity / baseline if baseline else None,
        "used_tokens": int(total("kv_cache_used_tokens")),
        "used_bytes": int(total("kv_cache_used_bytes")),
        "saved_bytes": int(total("kv_cache_saved_bytes")),
        "generation_tokens_per_s": total("generation_throughput_toks_per_s"),
        "prompt_tokens_per_s": total("prompt_throughput_toks_per_s"),
        "engines": {k: engines[k] for k in sorted(engines)},
        "units": {"bytes_per_token": "bytes", "capacity_tokens": "tokens",
                  "used_bytes": "bytes", "saved_bytes": "bytes",
                  "generation_tokens_per_s": "tokens/s"},
    }


def stats_snapshot(registry=None) -> dict:
    """The JSON summary of what this server's ``/metrics`` shows right now."""
    if registry is None:
        from vllm.v1.metrics.prometheus import get_prometheus_registry
        registry = get_prometheus_registry()
    return summarize(collect_samples(registry))
