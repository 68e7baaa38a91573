"""The decode kernel's code as the GPU would run it, compiled for sm_90 on the CPU.

benchmarks/kernel_sass.py (run in a subprocess: the tests' own triton is the interpreter)
compiles the decode split kernel with and without int32 word loads. What it pins:
word loads leave no one-byte global load in the tile loop and fewer instructions, the byte
tile has its one-byte loads (what docs/kernels-notes.md, "2026-12-02 late", describes), and
the figures the docs cite come from a script that runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVDISASM = None
try:
    import triton
    NVDISASM = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
except ImportError:  # pragma: no cover
    pass


@pytest.mark.skipif(NVDISASM is None or not NVDISASM.exists(),
                    reason="triton's bundled nvdisasm is not installed")
def test_word_loads_remove_the_byte_loads_of_the_decode_loop(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")   # "0", not unset: conftest would set "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), str(ROOT),
                                         env.get("PYTHONPATH", "")])
    out = tmp_path / "sass.json"
    code = ("import conftest, runpy, sys; sys.argv = ['kernel_sass.py', '--json', %r]; "
            "runpy.run_path(%r, run_name='__main__')" % (str(out),
                                                         str(ROOT / "benchmarks/kernel_sass.py")))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    dec = {(r["words"], r["prefetch"], r["block_n"], r["num_warps"], r["num_stages"]): r
           for r in rows if r["kernel"] == "decode split"}
    words, byte_tile = dec[(True, False, 64, 4, 2)], dec[(False, False, 64, 4, 2)]
    default = dec[(True, True, 128, 4, 1)]          # decode.decode_defaults for 4-bit, head 128
    assert (default["instructions_per_64_tokens_all_warps"]
            < 0.5 * byte_tile["instructions_per_64_tokens_all_warps"]), (default, byte_tile)
    assert byte_tile["byte_loads"] >= 32, byte_tile
    assert all(r["byte_loads"] == 0 for k, r in dec.items() if k[0]), dec
    assert all(r["byte_loads"] > 0 for k, r in dec.items() if not k[0]), dec
    assert words["loop_instructions"] < 0.75 * byte_tile["loop_instructions"], (words, byte_tile)
    assert all(r["stack_bytes"] == 0 for r in dec.values() if r["block_n"] == 64), dec
