"""TurboQuant kernels: quantize-on-write store, split-KV decode, prefill over packed pages,
and the unpacking of cached slots into rows (a bounded prefix for FlashAttention).

`reference` (pure torch) always imports; the Triton launchers (`tq_store`, `tq_decode`,
`tq_prefill`) take the same arguments and import lazily, so a machine without Triton can still
use the references (the CPU serving path).
"""

import importlib.util

from ._common import TQLayerParams, TQSide, as_params, page_planes, read_slots, write_slots
from .reference import tq_decode_ref, tq_prefill_ref, tq_store_ref, tq_unpack_pages_ref

__all__ = ["TQLayerParams", "TQSide", "as_params", "page_planes", "read_slots",
           "write_slots", "tq_store_ref", "tq_decode_ref",
           "tq_prefill_ref", "tq_unpack_pages_ref", "tq_store", "tq_decode", "tq_prefill",
           "tq_unpack_pages", "HAS_TRITON"]

# Not imported here: TRITON_INTERPRET must be set before triton's first import to take
# effect everywhere (the CPU tests set it).
HAS_TRITON = importlib.util.find_spec("triton") is not None


_LAUNCHERS = {"tq_store": "store", "tq_decode": "decode", "tq_prefill": "prefill",
              "tq_unpack_pages": "unpack"}


def __getattr__(name):
    module = _LAUNCHERS.get(name)
    if module is None:
        raise AttributeError(name)
    fn = getattr(importlib.import_module(f".{module}", __name__), name)
    # bound here once: the backend imports these per launch (host time of eager steps)
    globals()[name] = fn
    return fn
