"""vLLM general plugin: ``--kv-cache-dtype turboquant`` (entry point ``vllm.general_plugins``).

vLLM calls `register()` in every process it starts (API server, engine core, workers), and may
call it more than once per process; it is idempotent. On a vLLM version this plugin does not
support it logs why and changes nothing, so an unrelated vLLM run is never broken by it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger("vllm.turboquant")

_registered = False


def register() -> bool:
    """Teach vLLM the TurboQuant kv-cache dtypes. Returns True when they are available."""
    global _registered
    if _registered:
        return True
    from vllm_turboquant import compat

    try:
        compat.apply_patches()
    except compat.UnsupportedVLLMVersion as e:
        logger.error("%s", e)
        return False
    _registered = True
    from vllm_turboquant.settings import kv_cache_dtypes
    logger.debug("vllm-turboquant registered kv-cache dtypes %s on vLLM %s",
                 ", ".join(kv_cache_dtypes()), compat.vllm_version())
    return True


def write_entry_point_shim(folder: str | os.PathLike) -> Path:
    """Make vLLM find this plugin without installing the package: writes a minimal
    ``*.dist-info`` declaring the entry point into `folder`. Put `folder` and the repository
    root on PYTHONPATH of the processes vLLM starts (tests, benchmarks on a bare checkout).
    Not needed after ``pip install vllm-turboquant``."""
    dist = Path(folder) / "vllm_turboquant_shim-0.0.0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-turboquant-shim\n"
                                   "Version: 0.0.0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nturboquant = vllm_turboquant.plugin:register\n")
    return dist


def plugin_installed() -> bool:
    """Whether vLLM will find the entry point by itself in new processes."""
    from importlib.metadata import entry_points
    return any(ep.value == "vllm_turboquant.plugin:register"
               for ep in entry_points(group="vllm.general_plugins"))


if __name__ == "__main__":  # python -m vllm_turboquant.plugin: print the state
    ok = register()
    from vllm_turboquant import compat
    print(f"vLLM {compat.vllm_version()}: turboquant plugin {'active' if ok else 'inactive'}; "
          f"entry point installed: {plugin_installed()}; patches: {sorted(compat.applied())}")
    sys.exit(0 if ok else 1)
