"""Debug trace of a model's forward inside vLLM: a checksum of every row of each attention
layer's q, k, v and output, of the final norm's output and of the logits, with each row's
position, appended as JSON lines.

For localizing where two runs that should agree bit for bit part ways (chunked vs unchunked
prefill under VLLM_BATCH_INVARIANT: benchmarks/quality_vllm.py --trace). Rows are keyed by
(module, position), so chunking and step boundaries do not matter: the first module and
position whose checksums differ says where a difference enters, in attention or outside it.
Works for any attention backend (forward hooks on vLLM's Attention modules), so `auto` is
traced the same way. In-process engines only (VLLM_ENABLE_V1_MULTIPROCESSING=0): `install`
runs through `LLM.apply_model`, `start` in the same process. Costs device->host copies per
module and step: a debugging tool, never on in serving.
"""

from __future__ import annotations

import json

import torch

_state = {"path": None, "ctx": None, "rows": None}


def start(path: str | None) -> None:
    """Append records to `path` from now on (None: stop)."""
    _state.update(path=path, ctx=None, rows=None)


def row_sums(x: torch.Tensor) -> list[int]:
    """One 64-bit checksum per row of x [t, ...] (16- or 32-bit floats), from its raw bits:
    two rows get the same value only if (barring a collision) their bits are equal."""
    t = x.shape[0]
    bits = x.reshape(t, -1)
    bits = bits.view(torch.int16 if bits.element_size() == 2 else torch.int32).to(torch.int64)
    weights = torch.arange(1, bits.shape[1] + 1, device=x.device, dtype=torch.int64)
    weights = weights * 1_000_003 % 998_244_353 + 1
    return (bits * weights).sum(-1).tolist()


def _positions():
    """(positions of this step's tokens, positions of each request's last token), from the
    forward context's attention metadata (any backend's: query_start_loc and seq_lens)."""
    from vllm.forward_context import get_forward_context

    ctx = get_forward_context()        # a new one per model forward
    if _state["ctx"] is ctx:
        return _state["rows"]
    mds = ctx.attn_metadata
    if isinstance(mds, list):
        mds = mds[0]
    md = next(iter(mds.values())) if isinstance(mds, dict) else mds
    qsl = md.query_start_loc.tolist()
    seq_lens = md.seq_lens.tolist()
    pos = []
    for r, (lo, hi) in enumerate(zip(qsl[:-1], qsl[1:])):
        pos += list(range(seq_lens[r] - (hi - lo), seq_lens[r]))
    last = [s - 1 for s in seq_lens[:len(qsl) - 1]]
    _state.update(ctx=ctx, rows=(pos, last))
    return pos, last


def _write(name: str, pos: list[int], **sums) -> None:
    with open(_state["path"], "a") as f:
        f.write(json.dumps({"module": name, "pos": pos, **sums}) + "\n")


def _capturing(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def install(model: torch.nn.Module) -> int:
    """Forward hooks on every attention layer, the final norm and the logits processor; they
    record only between start(path) and start(None). Returns the number of hooks."""
    hooks = 0

    def attn_hook(module, args, output):
        if _state["path"] is None or _capturing(output):
            return
        pos, _ = _positions()
        t = len(pos)
        q, k, v = args[:3]
        _write(module.layer_name, pos, q=row_sums(q[:t]), k=row_sums(k[:t]),
               v=row_sums(v[:t]), out=row_sums(output[:t]))

    def norm_hook(module, args, output):
        if _state["path"] is None:
            return
        h = output[0] if isinstance(output, tuple) else output
        if _capturing(h):
            return
        pos, _ = _positions()
        _write("final_norm", pos, h=row_sums(h[:len(pos)]))

    def logits_hook(module, args, output):
        # One row per request (prompt logprobs off, or a decode step): the row of each
        # request's last token. Other layouts are skipped.
        if _state["path"] is None or output is None or _state["rows"] is None:
            return
        _, last = _state["rows"]
        if output.shape[0] == len(last):
            _write("logits", last, logits=row_sums(output.float()))

    for name, mod in model.named_modules():
        if type(mod).__name__ == "Attention" and hasattr(mod, "layer_name"):
            mod.register_forward_hook(attn_hook)
            hooks += 1
    inner = getattr(model, "model", None)
    if inner is not None and getattr(inner, "norm", None) is not None:
        inner.norm.register_forward_hook(norm_hook)
        hooks += 1
    if getattr(model, "logits_processor", None) is not None:
        model.logits_processor.register_forward_hook(logits_hook)
        hooks += 1
    return hooks


def first_divergence(path_a: str, path_b: str) -> dict:
    """Per recorded quantity (q, k, v, out of the attention layers; h of the final norm;
    logits), the first module in forward order and the smallest position at which two traces
    of one request differ. Positions recorded more than once keep their first record."""
    def load(path):
        rows, order = {}, []
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                name = e.pop("module")
                pos = e.pop("pos")
                if name not in order:
                    order.append(name)
                for i, p in enumerate(pos):
                    rows.setdefault((name, p), {k: v[i] for k, v in e.items()})
        return rows, order

    a, order = load(path_a)
    b, _ = load(path_b)
    report = {}
    for name in ("q", "k", "v", "out", "h", "logits"):
        for mi, module in enumerate(order):
            diff = sorted(p for (m, p), x in a.items()
                          if m == module and name in x and (m, p) in b
                          and b[(m, p)][name] != x[name])
            if diff:
                report[name] = {"module_index": mi, "module": module,
                                "first_position": diff[0], "positions_differing": len(diff)}
                break
    compared = {m: sum(1 for (mm, p) in a if mm == m and (mm, p) in b)
                for m in ("final_norm", "logits")}
    return {"rows_compared": sum(1 for key in a if key in b),
            "final_norm_rows": compared["final_norm"], "logits_rows": compared["logits"],
            "first_differences": report}
