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
