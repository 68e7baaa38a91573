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


def __getattr__(name):
    if name == "tq_store":
        from .store import tq_store
        return tq_store
    if name == "tq_decode":
        from .decode import tq_decode
        return tq_decode
    if name == "tq_prefill":
        from .prefill import tq_prefill
        return tq_prefill
    if name == "tq_unpack_pages":
        from .unpack import tq_unpack_pages
        return tq_unpack_pages
    raise AttributeError(name)
