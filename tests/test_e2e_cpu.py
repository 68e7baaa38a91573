"""End to end on vLLM's CPU build with the real model (SmolLM2-135M-Instruct, eager).

* same KV memory: ``turboquant`` plans >= 3.5x the KV tokens of ``auto`` (``tq-k3v3``, a
  named preset dtype, ~4.9x);
* greedy output agrees with ``auto`` for the first 8 tokens in most prompts, with chunked
  prefill (64-token chunks) and prefix caching on; a repeated long prompt hits the prefix
  cache and decodes the same tokens (bf16 and the window-less tq-k4v4; with the default's
  window a hit from another batch row reads the newest cached tokens packed, a known
  limitation pinned deterministically in tests/test_backend_forward.py: whether this e2e run
  decodes the same tokens depends on which batch row vLLM gives each request);
* ``vllm serve --kv-cache-dtype turboquant`` answers /v1/completions and /v1/chat/completions,
  streaming too;
* a bad preset name stops the server at startup with the error naming the valid presets.

Each engine runs in a child process (this file with --child) so engines never share a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Large enough that a preset window (its buffers come out of this budget, max_num_seqs 4)
# costs a few percent of the tokens, small enough to allocate in a blink.
KV_BYTES = 256 << 20
MAX_TOKENS = 8
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 12 times 7?\nAnswer:",
]


def _long_prompt() -> str:
    from vllm_turboquant.textdata import ensure_english_text
    text = Path(ensure_english_text()).read_text()
    start = text.index("CHAPTER 1") if "CHAPTER 1" in text else 0
    return text[start:start + 700] + "\n\nThe next day,"


def _model() -> str:
    try:
        from vllm_turboquant.models import resolve_model
        return resolve_model()
    except BaseException as e:  # noqa: BLE001 - SystemExit when the model package is missing
        pytest.skip(f"default model unavailable: {e}")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_TURBOQUANT_PRESET"):
        env.pop(k, None)  # the CPU platform would override --kv-cache-memory-bytes
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _run_child(kv_cache_dtype: str, **extra) -> dict:
    args = json.dumps({"model": _model(), "kv_cache_dtype": kv_cache_dtype, **extra})
    env = _child_env()
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in the child itself: faster startup
    proc = subprocess.run([sys.executable, __file__, "--child", args], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"child {kv_cache_dtype} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _child_main(args: dict) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(args["model"], dtype="bfloat16", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, max_num_batched_tokens=64, kv_cache_memory_bytes=KV_BYTES,
              kv_cache_dtype=args["kv_cache_dtype"], seed=0,
              additional_config=args.get("additional_config") or {})
    cc = llm.llm_engine.vllm_config.cache_config
    tokens = cc.kv_cache_size_tokens or cc.num_gpu_blocks * cc.block_size
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    if args.get("quick"):
        outs = llm.generate(PROMPTS[:2], greedy, use_tqdm=False)
        print("RESULT " + json.dumps({"kv_tokens": tokens,
                                      "texts": [o.outputs[0].text for o in outs]}), flush=True)
        return
    long = _long_prompt()
    outs = llm.generate(PROMPTS + [long], greedy, use_tqdm=False)
    again = llm.generate([long], greedy, use_tqdm=False)[0]
    print("RESULT " + json.dumps({
        "kv_tokens": tokens,
        "block_size": cc.block_size,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "texts": [o.outputs[0].text for o in outs],
        "long_prompt_tokens": len(outs[-1].prompt_token_ids),
        "long_again": list(again.outputs[0].token_ids),
        "long_again_cached": again.num_cached_tokens or 0,
    }), flush=True)


@pytest.fixture(scope="module")
def runs():
    return {"auto": _run_child("auto"), "turboquant": _run_child("turboquant")}


@pytest.fixture(scope="module")
def run_no_window():
    """tq-k4v4: the default's 4/4 bits without the recent-token window (every key packed)."""
    return _run_child("tq-k4v4")


@pytest.mark.slow
def test_turboquant_plans_at_least_3_5x_the_kv_tokens(runs):
    auto, tq = runs["auto"]["kv_tokens"], runs["turboquant"]["kv_tokens"]
    assert tq >= 3.5 * auto, (auto, tq)


@pytest.mark.slow
def test_greedy_output_agrees_with_auto_in_most_prompts(runs):
    auto, tq = runs["auto"]["tokens"], runs["turboquant"]["tokens"]
    assert runs["auto"]["long_prompt_tokens"] > 128  # several 64-token chunks
    agree = [a[:MAX_TOKENS] == t[:MAX_TOKENS] for a, t in zip(auto, tq)]
    detail = "\n".join(f"{ok}: auto {a!r} | tq {t!r}" for ok, a, t in
                       zip(agree, runs["auto"]["texts"], runs["turboquant"]["texts"]))
    # measured with the 4/4-bit default on vllm-cpu 0.32: 5 of 7 agree for all 8 tokens (the
    # other two first differ at tokens 3 and 6)
    assert sum(agree) > len(agree) / 2, detail


@pytest.mark.slow
def test_prefix_cache_hit_decodes_the_same_tokens(runs, run_no_window):
    """A repeated long prompt hits the prefix cache (several 16-token blocks) and decodes the
    same tokens as the first time: bf16, and TurboQuant without a window, where the hit reads
    exactly the packed bytes the first request wrote and read."""
    for name, run in (("auto", runs["auto"]), ("tq-k4v4", run_no_window)):
        assert run["long_again_cached"] >= run["block_size"], name
        assert run["long_again"] == run["tokens"][-1], name


@pytest.mark.slow
def test_named_preset_dtype_serves_with_its_own_page_size(runs):
    """--kv-cache-dtype tq-k3v3: 52 B per token and KV head at head 64, vs 256 for bf16."""
    from vllm_turboquant.codec import PRESETS
    k3 = _run_child("tq-k3v3", quick=True)
    want = 4 * 64 / PRESETS["tq-k3v3"].layout(64).slot_bytes      # 4.92x
    assert k3["kv_tokens"] >= 0.97 * want * runs["auto"]["kv_tokens"]
    assert k3["kv_tokens"] > runs["turboquant"]["kv_tokens"]
    assert "Paris" in k3["texts"][0]


# -- vllm serve ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cmd(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "vllm_cli.py"), "serve", _model(),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
            "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager",
            "--kv-cache-memory-bytes", str(KV_BYTES), *extra]


class Server:
    def __init__(self, *extra: str, log: Path):
        self.port = _free_port()
        self.log = log
        self._logf = open(log, "w")
        # own session: the server and the engine processes it spawns die together
        self.proc = subprocess.Popen(_serve_cmd(self.port, *extra), env=_child_env(),
                                     stdout=self._logf, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def wait_ready(self, timeout: float = 420) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url("/health"), timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise AssertionError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self._logf.flush()
        return self.log.read_text()[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(30)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(30)
        self._logf.close()


def _post(url: str, body: dict, stream: bool = False):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=180) as r:
        raw = r.read().decode()
    if not stream:
        return json.loads(raw)
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", raw[-500:]
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.slow
def test_vllm_serve_answers_completions_and_chat_streaming_too(tmp_path):
    server = Server("--kv-cache-dtype", "turboquant", log=tmp_path / "serve.log")
    try:
        server.wait_ready()
        model = _model()
        body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8,
                "temperature": 0}
        out = _post(server.url("/v1/completions"), body)
        text = out["choices"][0]["text"]
        assert out["usage"]["completion_tokens"] == 8 and text.strip()
        chunks = _post(server.url("/v1/completions"), {**body, "stream": True}, stream=True)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text

        chat = {"model": model, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Name a color."}]}
        out = _post(server.url("/v1/chat/completions"), chat)
        answer = out["choices"][0]["message"]["content"]
        assert answer and out["usage"]["completion_tokens"] <= 8
        chunks = _post(server.url("/v1/chat/completions"), {**chat, "stream": True},
                       stream=True)
        streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                           for c in chunks if c["choices"])
        assert streamed == answer
        assert "TurboQuant preset 'turboquant'" in server.output()
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("extra,needles", [
    (["--kv-cache-dtype", "turboquant", "--additional-config",
      '{"turboquant": {"preset": "tq-bogus"}}'],
     ["unknown TurboQuant preset 'tq-bogus'", "valid presets: "]),
    (["--kv-cache-dtype", "tq-bogus"], ["invalid choice: 'tq-bogus'", "'turboquant'"]),
])
def test_bad_preset_stops_the_server_with_a_clear_error(tmp_path, extra, needles):
    from vllm_turboquant.codec import PRESETS
    server = Server(*extra, log=tmp_path / "serve.log")
    try:
        rc = server.proc.wait(timeout=300)
    finally:
        server.stop()
    out = server.log.read_text()
    assert rc != 0, out[-3000:]
    for needle in needles:
        assert needle in out, out[-3000:]
    if "valid presets: " in needles:
        for name in PRESETS:
            assert name in out.split("valid presets: ")[1][:200]


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.path.insert(0, str(ROOT))
    _child_main(json.loads(sys.argv[2]))
