"""The decode kernel's code as the GPU would run it, compiled for sm_90 on the CPU.

benchmarks/kernel_sass.py (run in a subprocess: the tests' own triton is the interpreter)
compiles the decode split kernel in several configs. What it pins: with head-major pages
(docs/layout.md, "One page") no config has a one-byte global load in its tile loop, the
default loads its code rows as 16-byte vectors with almost no 4-byte loads left (the
slot-order pages took 34 four-byte loads per thread per tile), it needs fewer instructions
than the byte tile, and the figures the docs cite come from a script that runs.
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
def test_decode_loop_loads_code_rows_as_vectors(tmp_path):
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
    # the one-launch (fused) configs; the default once more as three launches
    dec = {(r["words"], r["prefetch"], r["block_n"], r["num_warps"], r["num_stages"]): r
           for r in rows if r["kernel"] == "decode split" and r["fused"]}
    three = [r for r in rows if r["kernel"] == "decode split" and not r["fused"]]
    assert len(three) == 1 and three[0]["byte_loads"] == 0, three
    words, byte_tile = dec[(True, False, 64, 4, 2)], dec[(False, False, 64, 4, 2)]
    default = dec[(True, True, 128, 4, 1)]          # decode.decode_defaults for 4-bit, head 128
    per64 = "instructions_per_64_tokens_all_warps"
    assert default[per64] < 0.7 * byte_tile[per64], (default, byte_tile)
    assert all(r["byte_loads"] == 0 for r in dec.values()), dec
    # head 128, 128-token tile, 128 threads: 4 x 16 B of key codes and 4 of value codes each;
    # 4-byte loads only for the scale word and the block-table entry
    assert default["vector16_loads"] >= 8 and default["word_loads"] <= 4, default
    assert words["loop_instructions"] < byte_tile["loop_instructions"], (words, byte_tile)
    assert all(r["stack_bytes"] == 0 for r in dec.values() if r["block_n"] == 64), dec
    # The store (a decode step's config, the default preset's window side): keys and values
    # stacked take little more than half the barriers of separate tiles (13 / 31 with triton
    # 3.6, 17 / 31 with 3.9); K and V rows load as 16-byte vectors
    # and the side copy stores 8 bytes at a time (2-byte accesses: only the scale halves).
    st = {(r["block_t"], r["num_warps"], r["stack"], r["symmetric"], r["preload"], r["rot"]): r
          for r in json.loads(out.read_text())["store"]}
    dflt, unstacked = st[(8, 4, True, True, True, 2)], st[(8, 4, False, True, False, 2)]
    assert dflt["barriers"] < 0.6 * unstacked["barriers"], (dflt, unstacked)
    widths = dflt["global_by_width"]
    assert widths.get("LDG.E.U16", 0) == 0 and widths.get("LDG.E.128", 0) >= 2, widths
    assert widths.get("STG.E.U16", 0) <= 2, widths
