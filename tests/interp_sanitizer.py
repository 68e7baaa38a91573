"""A bounds checker for Triton kernels run by the interpreter (TRITON_INTERPRET=1).

On a GPU an out-of-bounds load or store is an "illegal memory access" (or silent garbage);
the interpreter reads whatever host memory the pointer names. `check_bounds()` patches the
interpreter's load and store so that every *unmasked* lane must fall inside the storage of
one of the kernel's tensor arguments, and raises with the lane count and first address
otherwise. Test helper only; it relies on the interpreter's internals (triton 3.x).
"""

from __future__ import annotations

import contextlib

import numpy as np


@contextlib.contextmanager
def check_bounds():
    from triton.runtime import interpreter as it

    ranges: list[tuple[int, int]] = []
    builder_cls = type(it.interpreter_builder)
    orig_init = it.GridExecutor._init_args_hst
    orig_load = builder_cls.create_masked_load
    orig_store = builder_cls.create_masked_store

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if hasattr(a, "untyped_storage"):
                s = a.untyped_storage()
                ranges.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        return args_hst, kwargs_hst

    def check(kind, ptrs, mask):
        addr = ptrs.data.astype(np.int64)
        live = np.broadcast_to(mask.data, addr.shape).astype(bool)
        addr = addr[live]
        if addr.size == 0:
            return
        size = np.dtype(it._get_np_dtype(ptrs.get_element_ty())).itemsize
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in ranges:
            ok |= (addr >= lo) & (addr + size <= hi)
        if not ok.all():
            bad = addr[~ok]
            raise AssertionError(f"out-of-bounds {kind}: {bad.size} of {addr.size} live lanes, "
                                 f"first address {int(bad[0]):#x}; argument storages "
                                 f"{[(hex(lo), hi - lo) for lo, hi in ranges]}")

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return orig_store(self, ptrs, value, mask, cache_policy)

    it.GridExecutor._init_args_hst = init_args
    builder_cls.create_masked_load = load
    builder_cls.create_masked_store = store
    try:
        yield
    finally:
        it.GridExecutor._init_args_hst = orig_init
        builder_cls.create_masked_load = orig_load
        builder_cls.create_masked_store = orig_store
