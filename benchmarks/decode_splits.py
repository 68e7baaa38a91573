"""The decode kernel's time by KV split count at small batches (SmolLM2's 9 / 3 heads, head
64, bf16, the default preset's pages): whether the default split count
(kernels/_common.default_num_splits, what backend/impl.decode_splits asks) suits the TPOT
shapes, each count fused (one launch) and in three launches. GPU only:

    python3 benchmarks/decode_splits.py --json OUT.json

First run: benchmarks/results/h100-20261208/call10-decode-splits/ (then named
decode_splits_probe.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import layer_step as L  # noqa: E402
from vllm_turboquant.kernels import tq_decode  # noqa: E402
from vllm_turboquant.kernels._common import default_num_splits, next_pow2  # noqa: E402

# (decodes, context): e2e.py's TPOT shapes (1 and 16 requests at 2K), a longer context, and
# a larger batch
SHAPES = ((1, 2048), (16, 2048), (1, 8192), (64, 2048))
MAX_MODEL_LEN = 8192


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for nd, ctx in SHAPES:
        s = L.build_step(nd, ctx, 0, 0, device="cuda", max_model_len=MAX_MODEL_LEN)
        default = default_num_splits(next_pow2(nd), s["hkv"], MAX_MODEL_LEN, s["q"].device)
        for splits in sorted({1, 2, 4, 8, 16, 32, default}):
            for fused in (True, False):
                def fn(splits=splits, fused=fused):
                    tq_decode(s["q"][:nd], s["cache"], s["bt"][:nd], s["seq_lens"][:nd],
                              s["params"], s["scale"], s["side"], num_splits=splits,
                              out=s["out"][:nd], fused=fused)
                r = L.timeit(fn, 50, torch.cuda.synchronize)
                row = dict(batch=nd, ctx=ctx, splits=splits, fused=fused,
                           default=splits == default, gpu_us=r["gpu_us"], host_us=r["host_us"])
                rows.append(row)
                print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
