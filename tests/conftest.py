"""Make the repo importable when it is not pip-installed (CI, the GPU machine).

The repo root goes on sys.path, and when `vllm_turboquant.kernels` cannot be found (it lives
in the top-level kernels/ folder, mapped by pyproject's package-dir only in an install), the
folder is registered under that name, so every test imports one copy of the kernels.

On a machine without CUDA, TRITON_INTERPRET=1 is set here (unless already set), before
anything imports triton: Triton reads it when `triton.language` is first imported and when
each kernel is decorated, so a later setting cannot reach kernels' library helpers (tl.sum...).
Triton kernels can only run interpreted on such a machine anyway, and vLLM's CPU build
disables Triton ("doesn't include CPU backend"), so no other test is affected.
"""

import importlib.util
import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def _alias_kernels():
    import vllm_turboquant
    try:
        importlib.import_module("vllm_turboquant.kernels")
        return
    except ImportError:
        pass
    folder = os.path.join(_ROOT, "kernels")
    spec = importlib.util.spec_from_file_location(
        "vllm_turboquant.kernels", os.path.join(folder, "__init__.py"),
        submodule_search_locations=[folder])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["vllm_turboquant.kernels"] = mod
    spec.loader.exec_module(mod)
    vllm_turboquant.kernels = mod


_alias_kernels()


def _row_invariant_interpreter_dot():
    """Under TRITON_INTERPRET=1 a tl.dot is numpy's matmul, i.e. CPU BLAS, whose fp32 GEMM
    rounds a row by where its M-blocking puts it: on an AMD EPYC host (AVX-512, numpy 2.3.5's
    OpenBLAS 0.3.30) the last 4 rows of a 64-row store tile came out 1 ulp off the same rows
    placed higher up, so a token's rotation depended on its row in the tile (seen in
    test_prefill_invariant_same_bits_however_chunked, 2026-12-07; earlier hosts did not
    show it). A GPU's MMA rounds every row alike wherever it sits, which is what the kernels'
    bit-for-bit tests assume. So fp32 dots of float operands are computed here in fp64 and
    rounded to fp32 once: exact products, a sum far below fp32's rounding, the same bits for
    a row wherever it sits (more exact than the GPU, never less)."""
    try:
        import numpy as np
        from triton.runtime import interpreter as it
    except ImportError:
        return
    builder = getattr(it, "InterpreterBuilder", None)
    orig = getattr(builder, "create_dot", None)
    if orig is None or getattr(orig, "_tq_fp64", False):
        return
    floats = (np.float16, np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if (d.data.dtype == np.float32 and a.data.dtype in floats
                and b.data.dtype in floats):
            out = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64))
            return it.TensorHandle(out.astype(np.float32) + d.data, d.dtype.scalar)
        return orig(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._tq_fp64 = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _row_invariant_interpreter_dot()
