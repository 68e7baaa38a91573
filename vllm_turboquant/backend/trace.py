"""Debug trace of the attention forward: a checksum of every row of q, k, v and the output,
per layer and step, with each row's request row and position, appended as JSON lines.

Off unless a path is set, through `$VLLM_TURBOQUANT_TRACE` or `start(path)` (in-process
engines). For localizing where two runs that should agree bit for bit part ways (chunked vs
unchunked prefill under VLLM_BATCH_INVARIANT, benchmarks/quality_vllm.py --trace): the first
layer and position whose inputs differ says whether the difference enters upstream of
attention (vLLM's projections) or in it. Costs a device->host copy per layer: never on in
serving.
"""

from __future__ import annotations

import json
import os

import torch

_path: str | None = os.environ.get("VLLM_TURBOQUANT_TRACE") or None
_step = {"layer0": None, "n": 0}


def start(path: str | None) -> None:
    """Trace into `path` from now on (None: stop)."""
    global _path
    _path = path
    _step.update(layer0=None, n=0)


def active() -> bool:
    return _path is not None


def row_sums(x: torch.Tensor) -> list[int]:
    """One 64-bit checksum per row of x [t, ...] (16- or 32-bit floats), from its raw bits:
    two rows get the same value only if (barring a collision) their bits are equal."""
    t = x.shape[0]
    bits = x.reshape(t, -1)
    bits = bits.view(torch.int16 if bits.element_size() == 2 else torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.shape[1] + 1, device=x.device, dtype=torch.int64)
    weights = weights * 1_000_003 % 998_244_353 + 1
    return (bits * weights).sum(-1).tolist()


def record(layer_name: str, md, q, k, v, out) -> None:
    """Append one layer call: rows' (batch row, position) and checksums of q, k, v, out."""
    if _step["layer0"] is None:
        _step["layer0"] = layer_name
    if layer_name == _step["layer0"]:
        _step["n"] += 1
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    rows, pos = [], []
    for r, (lo, hi) in enumerate(zip(qsl[:-1], qsl[1:])):
        start = seq_lens[r] - (hi - lo)
        rows += [r] * (hi - lo)
        pos += list(range(start, seq_lens[r]))
    entry = {"step": _step["n"], "layer": layer_name, "row": rows, "pos": pos,
             "q": row_sums(q), "k": row_sums(k), "v": row_sums(v), "out": row_sums(out)}
    with open(_path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def first_divergence(path_a: str, path_b: str) -> dict | None:
    """The first (layer order, position) where two traces of one request differ: for each
    tensor (q, k, v, out) and layer, the smallest position with different checksums. Rows are
    keyed by (layer, position), so chunking and step boundaries do not matter; positions seen
    more than once (a recomputed request) keep their first occurrence."""
    def load(path):
        rows, layers = {}, []
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                if e["layer"] not in layers:
                    layers.append(e["layer"])
                for i, p in enumerate(e["pos"]):
                    rows.setdefault((e["layer"], p), {n: e[n][i] for n in ("q", "k", "v", "out")})
        return rows, layers

    a, layers = load(path_a)
    b, _ = load(path_b)
    report = {}
    for name in ("q", "k", "v", "out"):
        for li, layer in enumerate(layers):
            diff = sorted(p for (lay, p), x in a.items()
                          if lay == layer and (lay, p) in b and b[(lay, p)][name] != x[name])
            if diff:
                report[name] = {"layer_index": li, "layer": layer, "first_position": diff[0],
                                "positions_differing": len(diff)}
                break
    common = sum(1 for key in a if key in b)
    return {"rows_compared": common, "first_differences": report}
