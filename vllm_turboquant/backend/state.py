"""Per-layer serving state: the kernels' parameter bundle and the recent-token window buffers.

The window side copy (docs/design-notes.md, "Recent-token window") is real memory the backend
owns while serving: per attention layer

    side.k, side.v   [rows, W, num_kv_heads, D]  model dtype (rotated keys / values)
    side.tag         [rows, W]                   int32 (slot id stored there, -1 = empty)
    side.check       [rows, W, num_kv_heads]     int32 (scale bytes of that packed slot)

with rows = max_num_seqs (one row per request of a batch). ``side_bytes`` is what vLLM's KV
budget is reduced by (compat.reserve_side_buffers), so the planner hands the packed pages
exactly the memory that is left: the side buffers never come on top of the planned memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.kernels import TQLayerParams, TQSide

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(layer_name: str) -> int:
    """The decoder layer index in a vLLM layer name ("model.layers.7.self_attn.attn" -> 7).

    The rotation of layer i is seeded by i, as in the evaluator, so both serve the same codec.
    """
    found = _LAYER_INDEX.findall(layer_name)
    if not found:
        raise ValueError(f"cannot find the layer index in attention layer name {layer_name!r}")
    return int(found[0])


def side_bytes(rows: int, window: int, num_kv_heads: int, head_size: int,
               dtype: torch.dtype) -> int:
    """Bytes of one layer's window buffers (0 when the window is off)."""
    if window <= 0 or rows <= 0:
        return 0
    elt = torch.empty((), dtype=dtype).element_size()
    kv = 2 * rows * window * num_kv_heads * head_size * elt
    tags = rows * window * 4
    checks = rows * window * num_kv_heads * 4
    return kv + tags + checks


@dataclass
class LayerState:
    params: TQLayerParams
    side: TQSide | None
    _side_rows: dict = field(default_factory=dict, repr=False)

    def side_from(self, row: int) -> TQSide | None:
        """The window buffers from batch row `row` on (impl.forward's split path hands the
        prefill kernel the chunks' rows), made once per row count: mixed steps run eagerly,
        and 4 views per layer and step are host time."""
        if self.side is None:
            return None
        rows = self._side_rows.get(row)
        if rows is None:
            rows = self._side_rows[row] = TQSide(*(x[row:] for x in self.side))
        return rows

    def reset_window(self) -> None:
        """Mark every window entry empty (a new engine: nothing stored is valid any more)."""
        if self.side is not None:
            self.side.tag.fill_(-1)


# Keyed by everything the state depends on, so two engines in one process (tests) never share
# a state built for another preset or shape.
_STATES: dict[tuple, LayerState] = {}


def get_layer_state(layer_name: str, config: TQConfig, head_size: int, num_kv_heads: int,
                    rows: int, dtype: torch.dtype, device: torch.device) -> LayerState:
    """The state of `layer_name`, created on first use (the metadata builder creates every
    layer's state right after the KV cache, before any CUDA graph is captured)."""
    key = (layer_name, config, head_size, num_kv_heads, rows, dtype, str(torch.device(device)))
    state = _STATES.get(key)
    if state is not None:
        return state
    codec = TQLayerCodec(config, head_size, layer_index(layer_name), device=device)
    params = TQLayerParams.from_codec(codec, device)
    side = None
    if config.window > 0:
        side = TQSide.empty(rows, config.window, num_kv_heads, head_size, dtype=dtype,
                            device=device)
    state = LayerState(params, side)
    _STATES[key] = state
    return state


def clear_states() -> None:
    """Drop every layer's state and the step workspaces (tests; a new engine in the same
    process)."""
    from vllm_turboquant.backend.workspace import clear_workspaces

    _STATES.clear()
    clear_workspaces()
