"""The prefill kernel with the own part (tq_prefill's `own`) against the deq-copy path on
test_own_attention_gpu.mixed_step, over presets, block sizes and launch configs, with rows
without keys reported as +inf, -inf or NaN and the spare buffers NaN-filled. Diagnostic, not
a test (pytest does not collect it); CUDA only. Its run of 2026-12-03
(benchmarks/results/h200-20261203d/call1-probe/, an earlier version of this script that also
tried the own part seeding the loops, since removed) found the kernel finite and right in every
case with the torch stand-in: the NaN of that morning was FlashAttention's, which reads rows of
the own copy past the written ones. `--fa` runs the own part through vLLM's FlashAttention,
with the copy's unwritten rows NaN (`nan`) and zeroed as the backend does (`zero`).

    python3 tests/gpu/own_probe.py [--fa]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_own_attention_gpu import _rel_err, _torch_attend, mixed_step, prefill  # noqa: E402


def finite(x) -> bool:
    return bool(torch.isfinite(x).all())


def probe(preset, window, align, bs, attend, own_fill, launches) -> None:
    st = mixed_step(preset, window, align, own_fill=own_fill, bs=bs)
    own = attend(st.q_rot, st.own_k, st.own_v, st.cu, st.cu_k, st.max_query_len, window)
    has = torch.isfinite(own[1])
    print(f"{preset} W{window} align{align} block{bs} own rows {'NaN' if own_fill != 0 else '0'}"
          f" past the written: own out finite {finite(own[0])}, lse finite rows "
          f"{int(has.sum())}/{has.numel()}", flush=True)
    seeds = {"lse as given": own}
    for name, val in (("+inf", float("inf")), ("-inf", float("-inf")), ("nan", float("nan"))):
        seeds[f"empty rows' lse {name}"] = (own[0], torch.where(has, own[1], val))
    for i, launch in enumerate(launches):
        base = prefill(st, **launch)
        for name, seed in seeds.items():
            if i and name != "lse as given":
                continue
            got = prefill(st, seed, **launch)
            print(f"  {launch or 'default launch'}, {name}: finite {finite(got)}, vs deq path "
                  f"{_rel_err(torch.nan_to_num(got), base):.2e} (deq path finite "
                  f"{finite(base)})", flush=True)


def main() -> None:
    attend, fills = _torch_attend, (0.0, float("nan"))
    if "--fa" in sys.argv:
        from vllm_turboquant.backend import own_attention
        attend = own_attention.attend
    launches = [{}] + [dict(deq_stages=st, block_m=32, block_n=n)
                       for st in (1, 3) for n in (32, 64)]
    for i, (preset, w, a, bs) in enumerate([("turboquant", 64, 128, 128),
                                            ("turboquant", 64, 0, 128),
                                            ("turboquant", 64, 128, 16),
                                            ("tq-k4v4", 0, 0, 128)]):
        for fill in fills:
            probe(preset, w, a, bs, attend, fill, launches if i == 0 and fill == 0 else [{}])


if __name__ == "__main__":
    main()
