"""Tensor parallel 1 vs 2 with TurboQuant: same greedy tokens, KV capacity per rank.

Runs vLLM offline (each configuration in a fresh subprocess) on a checkpoint whose heads split
over 2 ranks (benchmarks/make_tiny_llama.py), for `auto` and `turboquant` at TP 1 and 2, and
compares greedy tokens and KV capacity. Needs 2 GPUs.

    python benchmarks/tp_compare.py --model DIR [--json OUT]
"""

import argparse
import json
import os
import subprocess
import sys

PROMPTS = [
    "The history of the city begins",
    "In the morning the train left the station and",
    "A list of prime numbers: 2, 3, 5,",
    "She opened the letter and read",
    "The recipe calls for flour, sugar and",
    "def fibonacci(n):",
]


def run_one(model: str, dtype: str, tp: int, max_tokens: int) -> dict:
    """Runs in a subprocess: returns greedy token ids and the engine's KV capacity."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, kv_cache_dtype=dtype, tensor_parallel_size=tp, max_model_len=1024,
              gpu_memory_utilization=0.3, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate(PROMPTS, params)
    cache = llm.llm_engine.vllm_config.cache_config
    return {"dtype": dtype, "tp": tp, "tokens": [list(o.outputs[0].token_ids) for o in outs],
            "num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
            "kv_tokens_per_rank": cache.num_gpu_blocks * cache.block_size}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    first_diff = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
                  for x, y in zip(a, b)]
    return {"identical_prompts": same, "prompts": len(a), "first_divergence": first_diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtypes", default="auto,turboquant")
    ap.add_argument("--json", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        dtype, tp = args._child.split(":")
        print("RESULT " + json.dumps(run_one(args.model, dtype, int(tp), args.max_tokens)))
        return
    runs = {}
    for dtype in args.dtypes.split(","):
        for tp in (1, 2):
            cmd = [sys.executable, __file__, "--model", args.model, "--max-tokens",
                   str(args.max_tokens), "--_child", f"{dtype}:{tp}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{dtype} tp={tp} failed")
            runs[(dtype, tp)] = json.loads(line[0][7:])
            print(f"{dtype:>12} tp={tp}: kv tokens per rank {runs[(dtype, tp)]['kv_tokens_per_rank']}")
    report = {"runs": list(runs.values()), "comparisons": {}}
    for dtype in args.dtypes.split(","):
        cmp = agreement(runs[(dtype, 1)]["tokens"], runs[(dtype, 2)]["tokens"])
        cmp["kv_tokens_ratio_tp2_vs_tp1"] = (runs[(dtype, 2)]["kv_tokens_per_rank"]
                                             / runs[(dtype, 1)]["kv_tokens_per_rank"])
        report["comparisons"][dtype] = cmp
        print(f"{dtype:>12}: tp1 vs tp2 identical on {cmp['identical_prompts']}/{cmp['prompts']} "
              f"prompts, first divergence {cmp['first_divergence']}, "
              f"kv tokens per rank x{cmp['kv_tokens_ratio_tp2_vs_tp1']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
