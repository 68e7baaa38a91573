"""Load generator for a local OpenAI-compatible server (vLLM ``vllm serve``).

    python benchmarks/load.py --base-url http://127.0.0.1:8000 \\
        --num-requests 200 --concurrency 32 --input-len 1024 --output-len 256 \\
        --prompts real --out results/load_turboquant.json

Sends streaming ``/v1/completions`` requests with exact prompt lengths (token ids; real
English from ``vllm_turboquant.textdata`` tokenized by the server's ``/tokenize``, or
synthetic ids) and fixed output lengths (``ignore_eos``), either N at a time
(``--concurrency``) or as a Poisson process (``--request-rate``, optionally capped by
``--concurrency``). Stops at ``--num-requests`` or ``--time-limit`` seconds, whichever comes
first (requests still running then are cancelled and counted as unfinished).

Reports request throughput, output tokens/s, TTFT / TPOT / ITL / end-to-end latency
(mean, p50, p90, p99) as a table and as JSON, together with what the server says about
itself while loaded: its version, ``/v1/turboquant/stats`` (KV bytes per token, capacity,
bytes saved; present when vllm-turboquant is installed in the server), one snapshot of
that JSON and of every ``vllm_turboquant:*`` series of ``/metrics`` taken under load
(``server.turboquant_under_load``), and the peaks of vLLM's ``vllm:num_requests_running`` /
``vllm:kv_cache_usage_perc``. ``--plot`` adds a PNG
(needs matplotlib; skipped with a message otherwise).

Only targets this machine: the host must be 127.0.0.1, ::1 or localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Synthetic prompts draw ids from here: below every tokenizer's vocabulary size we serve
# (SmolLM2: 49152, Llama: 32000+) and above the special tokens at the start of the vocab.
SYNTHETIC_ID_RANGE = (1000, 30000)
SAMPLE_INTERVAL_S = 1.0  # how often server gauges are sampled during the run


# -- configuration -------------------------------------------------------------------------------
@dataclass
class LoadConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model of /v1/models
    num_requests: int = 100
    concurrency: int | None = 16  # max requests in flight (None: unbounded, rate mode)
    request_rate: float | None = None  # requests/s, Poisson arrivals; None: all at once
    input_len: int = 512
    output_len: int = 128
    prompts: str = "real"  # "real" | "synthetic"
    time_limit_s: float = 600.0
    request_timeout_s: float = 600.0
    seed: int = 0
    label: str = ""
    progress: bool = True


def check_local_url(url: str) -> str:
    """`url` without a trailing slash; raises ValueError unless it points at this machine."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"load.py only targets this machine ({', '.join(LOCAL_HOSTS)}); "
                         f"got {url!r}")
    return url.rstrip("/")


# -- prompts -------------------------------------------------------------------------------------
def synthetic_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    lo, hi = SYNTHETIC_ID_RANGE
    return [[rng.randrange(lo, hi) for _ in range(length)] for _ in range(n)]


def windows(tokens: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    """`n` prompts of exactly `length` ids cut from `tokens` at spread-out offsets (distinct
    text per request, so vLLM's prefix cache does not make later requests free)."""
    if len(tokens) < length:
        raise ValueError(f"need at least {length} tokens of text, have {len(tokens)}")
    span = len(tokens) - length + 1
    start = random.Random(seed).randrange(span)
    step = max(1, span // max(n, 1))
    return [tokens[(start + i * step) % span:][:length] for i in range(n)]


async def real_prompts(session: aiohttp.ClientSession, base: str, model: str, n: int,
                       length: int, seed: int, max_model_len: int | None) -> list[list[int]]:
    """Jane Austen text tokenized by the server itself (vLLM's ``POST /tokenize``), in
    chunks that stay below the server's max_model_len (a server may refuse or truncate
    longer inputs)."""
    from vllm_turboquant.textdata import ensure_english_text
    text = ensure_english_text().read_text()
    chunk_chars = 3 * (max_model_len or 2048)  # ~4 characters per English token
    need_tokens = min((n + 1) * length, 2_000_000)
    tokens: list[int] = []
    for start in range(0, len(text), chunk_chars):
        if len(tokens) >= need_tokens:
            break
        async with session.post(f"{base}/tokenize", json={
                "model": model, "prompt": text[start:start + chunk_chars],
                "add_special_tokens": False}) as r:
            if r.status != 200:
                raise RuntimeError(f"POST /tokenize answered {r.status}; use --prompts "
                                   "synthetic for a server without it")
            tokens.extend((await r.json())["tokens"])
    return windows(tokens, n, length, seed)


# -- one request -------------------------------------------------------------------------------
@dataclass
class RequestResult:
    ok: bool = False
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0  # seconds since the run started
    ttft: float | None = None
    latency: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (vLLM bench's definition)."""
        if self.latency is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def parse_sse_line(line: bytes | str):
    """One Server-Sent-Events line -> the JSON payload, "[DONE]", or None (not data)."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return "[DONE]"
    return json.loads(data)


def chunk_text(chunk: dict) -> str:
    """The generated text of a completions (or chat) stream chunk."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    return c.get("text") or (c.get("delta") or {}).get("content") or ""


async def send_one(session: aiohttp.ClientSession, base: str, model: str, prompt: list[int],
                   output_len: int, t0: float) -> RequestResult:
    payload = {"model": model, "prompt": prompt, "max_tokens": output_len,
               "ignore_eos": True, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_tokens=len(prompt))
    start = time.perf_counter()
    res.start = start - t0
    last = None
    chunks_with_text = 0
    try:
        async with session.post(f"{base}/v1/completions", json=payload) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for line in r.content:
                msg = parse_sse_line(line)
                if msg is None:
                    continue
                if msg == "[DONE]":
                    break
                now = time.perf_counter()
                if chunk_text(msg):
                    chunks_with_text += 1
                    if res.ttft is None:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                usage = msg.get("usage")
                if usage:
                    res.output_tokens = int(usage.get("completion_tokens") or 0)
                    res.prompt_tokens = int(usage.get("prompt_tokens") or res.prompt_tokens)
        res.latency = time.perf_counter() - start
        if not res.output_tokens:  # server without usage in the stream: count chunks
            res.output_tokens = chunks_with_text
        res.ok = res.ttft is not None
        if not res.ok:
            res.error = "no tokens streamed"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


# -- server-side samples ---------------------------------------------------------------------------
def parse_prometheus(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum over label sets of the given metric names in a /metrics text."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return out


SERVER_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total")
OUR_PREFIX = "vllm_turboquant:"


def parse_our_metrics(text: str) -> dict[str, float]:
    """Every ``vllm_turboquant:*`` series of a /metrics text, keyed by name and labels as
    written there (``vllm_turboquant:kv_cache_compression_ratio{engine="0",...}``)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(OUR_PREFIX):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def stats_from_metrics(series: dict[str, float]) -> dict | None:
    """The ``/v1/turboquant/stats`` JSON rebuilt from ``parse_our_metrics`` series, for a
    server that exports our gauges but lacks the route (needs vllm_turboquant here)."""
    if not series:
        return None
    try:
        from vllm_turboquant.metrics import summarize
    except ImportError:
        return None
    samples: dict[str, list] = {}
    for key, value in series.items():
        name, _, rest = key.partition("{")
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', rest))
        samples.setdefault(name, []).append((labels, value))
    out = summarize(samples)
    out["source"] = "/metrics (the server has no /v1/turboquant/stats route)"
    return out


async def get_text(session, url: str) -> str | None:
    try:
        async with session.get(url) as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def get_stats(session, base: str) -> dict | None:
    """/v1/turboquant/stats, else the same rebuilt from /metrics, else None."""
    stats = await get_json(session, f"{base}/v1/turboquant/stats")
    if stats is None:
        stats = stats_from_metrics(parse_our_metrics(await get_text(session, f"{base}/metrics")
                                                     or ""))
    return stats


async def get_json(session, url: str):
    try:
        async with session.get(url) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, ValueError, asyncio.TimeoutError):
        return None


async def sample_server(session, base: str, stop: asyncio.Event, t0: float,
                        under_load: dict | None = None) -> list[dict]:
    """Every SAMPLE_INTERVAL_S: vLLM's scheduler gauges and our /v1/turboquant/stats.

    `under_load` (filled in place) gets one full snapshot taken under load: the whole stats
    JSON and every ``vllm_turboquant:*`` series of /metrics from the sample with requests
    running and the highest generation-throughput gauge (a 10 s average, so the best
    sample is one well into the run, not its first second)."""
    samples = []
    best = None
    while not stop.is_set():
        row = {"t": round(time.perf_counter() - t0, 3)}
        ours: dict[str, float] = {}
        try:
            async with session.get(f"{base}/metrics") as r:
                if r.status == 200:
                    text = await r.text()
                    row.update(parse_prometheus(text, SERVER_GAUGES))
                    ours = parse_our_metrics(text)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            pass
        stats = await get_json(session, f"{base}/v1/turboquant/stats")
        if stats:
            row["saved_bytes"] = stats.get("saved_bytes")
            row["used_tokens"] = stats.get("used_tokens")
            row["gen_tok_s_gauge"] = stats.get("generation_tokens_per_s")
        running = row.get("vllm:num_requests_running") or 0.0
        if under_load is not None and running > 0 and (stats or ours):
            gen = row.get("gen_tok_s_gauge") or sum(
                v for k, v in ours.items() if "generation_throughput_toks_per_s" in k)
            score = (gen, running)
            if best is None or score > best:
                best = score
                under_load.clear()
                under_load.update({"t": row["t"], "num_requests_running": running,
                                   "kv_cache_usage_perc": row.get("vllm:kv_cache_usage_perc"),
                                   "stats": stats, "metrics": ours})
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_INTERVAL_S)
        except asyncio.TimeoutError:
            pass
    return samples


# -- the run ---------------------------------------------------------------------------------------
async def run_load(cfg: LoadConfig) -> dict:
    base = check_local_url(cfg.base_url)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)  # concurrency is ours to bound, not aiohttp's
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        models = await get_json(session, f"{base}/v1/models")
        if not models or not models.get("data"):
            raise RuntimeError(f"{base}/v1/models did not answer; is the server up?")
        model = cfg.model or models["data"][0]["id"]
        max_len = models["data"][0].get("max_model_len")
        if max_len and cfg.input_len + cfg.output_len > max_len:
            raise ValueError(f"input {cfg.input_len} + output {cfg.output_len} tokens exceed "
                             f"the server's max_model_len {max_len}")
        if cfg.prompts == "real":
            prompts = await real_prompts(session, base, model, cfg.num_requests,
                                         cfg.input_len, cfg.seed, max_len)
        else:
            prompts = synthetic_prompts(cfg.num_requests, cfg.input_len, cfg.seed)
        server = {"version": (await get_json(session, f"{base}/version") or {}).get("version"),
                  "turboquant_stats_before": await get_stats(session, base)}

        results: list[RequestResult] = []
        started = [0]
        bar = _progress(cfg.num_requests, cfg.progress)
        limit = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
        stop = asyncio.Event()
        t0 = time.perf_counter()
        under_load: dict = {}
        sampler = asyncio.create_task(sample_server(session, base, stop, t0, under_load))

        async def one(prompt):
            async with limit if limit is not None else contextlib.nullcontext():
                started[0] += 1
                r = await send_one(session, base, model, prompt, cfg.output_len, t0)
            results.append(r)
            bar.update(1)

        async def issue():
            rng = random.Random(cfg.seed + 1)
            tasks = []
            for prompt in prompts:
                tasks.append(asyncio.create_task(one(prompt)))
                if cfg.request_rate:
                    await asyncio.sleep(rng.expovariate(cfg.request_rate))
            await asyncio.gather(*tasks)

        runner = asyncio.create_task(issue())
        done, _ = await asyncio.wait({runner}, timeout=cfg.time_limit_s)
        timed_out = runner not in done
        if timed_out:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        duration = time.perf_counter() - t0
        stop.set()
        samples = await sampler
        bar.close()
        if under_load and not under_load.get("stats"):  # no stats route: from /metrics
            under_load["stats"] = stats_from_metrics(under_load.get("metrics") or {})
        server["turboquant_under_load"] = under_load or None
        server["turboquant_stats_after"] = await get_stats(session, base)

    return build_report(cfg, model, results, started[0], duration, timed_out, samples,
                        server)


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, disable=not enabled, unit="req", dynamic_ncols=True)
    except ImportError:
        class _Bar:
            def update(self, n):
                pass

            def close(self):
                pass
        return _Bar()


# -- the report ------------------------------------------------------------------------------------
def percentiles(xs: list[float], qs=(50, 90, 99)) -> dict[str, float | None]:
    """Mean and the given percentiles (linear interpolation), None for an empty list."""
    if not xs:
        return {"mean": None, **{f"p{q}": None for q in qs}}
    s = sorted(xs)
    out = {"mean": sum(s) / len(s)}
    for q in qs:
        pos = (len(s) - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"p{q}"] = s[lo] + (s[hi] - s[lo]) * (pos - lo)
    return out


def _ms(xs: list[float]) -> dict[str, float | None]:
    return {k: (None if v is None else v * 1000) for k, v in percentiles(xs).items()}


def build_report(cfg: LoadConfig, model: str, results: list[RequestResult], started: int,
                 duration: float, timed_out: bool, samples: list[dict], server: dict) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    peaks = {k: max((s.get(k) or 0.0) for s in samples) if samples else None
             for k in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                       "vllm:kv_cache_usage_perc", "saved_bytes", "used_tokens")}
    preempt = [s["vllm:num_preemptions_total"] for s in samples
               if "vllm:num_preemptions_total" in s]
    return {
        "label": cfg.label,
        "config": asdict(cfg),
        "model": model,
        "server": server,
        "machine": {"host": platform.node(), "python": platform.python_version()},
        "duration_s": duration,
        "timed_out": timed_out,
        "requests": {"planned": cfg.num_requests, "sent": started, "completed": len(ok),
                     "failed": len(results) - len(ok), "unfinished": started - len(results)},
        "errors": sorted({r.error for r in results if r.error})[:5],
        "request_throughput_rps": len(ok) / duration if duration else 0.0,
        "output_throughput_tok_s": out_tokens / duration if duration else 0.0,
        "total_throughput_tok_s": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _ms([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": _ms([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _ms([x for r in ok for x in r.itl]),
        "e2e_latency_ms": _ms([r.latency for r in ok if r.latency is not None]),
        "server_peaks": peaks,
        "preemptions": (preempt[-1] - preempt[0]) if len(preempt) >= 2 else None,
        "samples": samples,
        "per_request": [{"start_s": r.start, "ttft_s": r.ttft, "latency_s": r.latency,
                         "output_tokens": r.output_tokens, "ok": r.ok} for r in results],
    }


def format_table(report: dict) -> str:
    """A plain-text summary table of one report."""
    stats = (report["server"] or {}).get("turboquant_stats_before") or {}
    head = [f"load.py  {report['label'] or ''}  model={report['model']}",
            f"server vLLM {report['server'].get('version')}  kv_cache_dtype="
            f"{stats.get('kv_cache_dtype', '?')}  KV capacity {stats.get('capacity_tokens', '?')}"
            f" tokens (model dtype: {stats.get('model_dtype_capacity_tokens', '?')})",
            f"requests {report['requests']}  in {report['duration_s']:.1f} s"
            + ("  [TIME LIMIT HIT]" if report["timed_out"] else "")]
    rows = [("request throughput", f"{report['request_throughput_rps']:.3f} req/s"),
            ("output throughput", f"{report['output_throughput_tok_s']:.1f} tok/s"),
            ("total throughput", f"{report['total_throughput_tok_s']:.1f} tok/s")]
    lines = head + [f"  {k:<22}{v}" for k, v in rows]
    lines.append(f"  {'latency (ms)':<22}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}")
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"),
                      ("e2e_latency_ms", "end-to-end")):
        d = report[key]
        cells = "".join(f"{'-' if d[q] is None else f'{d[q]:.1f}':>10}"
                        for q in ("mean", "p50", "p90", "p99"))
        lines.append(f"  {name:<22}{cells}")
    loaded = (report["server"] or {}).get("turboquant_under_load") or {}
    ls = loaded.get("stats") or {}
    if ls:
        ratio, cap = ls.get("compression_ratio"), ls.get("capacity_ratio")
        lines.append(
            f"  under load (t={loaded['t']:.0f} s, {loaded['num_requests_running']:.0f} "
            f"running): compression {'-' if ratio is None else f'{ratio:.2f}'}x, capacity "
            f"{'-' if cap is None else f'{cap:.2f}'}x the model dtype, "
            f"{(ls.get('saved_bytes') or 0) / 2**20:.1f} MiB saved, generation gauge "
            f"{ls.get('generation_tokens_per_s') or 0:.0f} tok/s")
    p = report["server_peaks"]
    if p and p.get("vllm:num_requests_running") is not None:
        lines.append(f"  peak running {p['vllm:num_requests_running']:.0f}, peak waiting "
                     f"{p['vllm:num_requests_waiting']:.0f}, peak KV usage "
                     f"{100 * p['vllm:kv_cache_usage_perc']:.0f}%, preemptions "
                     f"{report['preemptions']}, peak KV bytes saved "
                     f"{(p.get('saved_bytes') or 0) / 2**20:.1f} MiB")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a message) when not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)",
              file=sys.stderr)
        return None
    return plt


def plot_report(report: dict, path: Path) -> bool:
    """TTFT / ITL histograms and running requests over time. False when no matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    reqs = [r for r in report["per_request"] if r["ok"]]
    ax[0].hist([r["ttft_s"] * 1000 for r in reqs], bins=40)
    ax[0].set(title="TTFT", xlabel="ms", ylabel="requests")
    ax[1].scatter([r["start_s"] for r in reqs], [r["latency_s"] for r in reqs], s=6)
    ax[1].set(title="end-to-end latency by start time", xlabel="start (s)", ylabel="s")
    t = [s["t"] for s in report["samples"]]
    ax[2].plot(t, [s.get("vllm:num_requests_running", 0) for s in report["samples"]],
               label="running")
    ax[2].plot(t, [s.get("vllm:num_requests_waiting", 0) for s in report["samples"]],
               label="waiting")
    ax[2].set(title="scheduler", xlabel="s", ylabel="requests")
    ax[2].legend()
    fig.suptitle(f"{report['label']} {report['model']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- command line ------------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[LoadConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=16,
                   help="max requests in flight (0 = unbounded; use with --request-rate)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="Poisson arrival rate in requests/s (default: all at once)")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--prompts", choices=("real", "synthetic"), default="real")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name of this run in the output")
    p.add_argument("--out", type=Path, default=None, help="JSON report path")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = LoadConfig(base_url=a.base_url, model=a.model, num_requests=a.num_requests,
                     concurrency=a.concurrency or None, request_rate=a.request_rate,
                     input_len=a.input_len, output_len=a.output_len, prompts=a.prompts,
                     time_limit_s=a.time_limit, request_timeout_s=a.request_timeout,
                     seed=a.seed, label=a.label, progress=not a.no_progress)
    check_local_url(cfg.base_url)
    return cfg, a


def main(argv=None) -> dict:
    cfg, a = parse_args(argv)
    report = asyncio.run(run_load(cfg))
    print(format_table(report))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        print(f"JSON: {a.out}")
    if a.plot and plot_report(report, a.plot):
        print(f"plot: {a.plot}")
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vllm_turboquant.textdata
    main()
