"""kernels/_launch.py: the direct launch of a cached CompiledKernel. On CPU the key and the
bookkeeping are checked with a fake kernel; that the GPU shortcut gives the plain launch's
output (misaligned views included) is tests/gpu/test_kernels_gpu.py::test_direct_launch_*."""

from __future__ import annotations

import inspect

import pytest
import torch

from vllm_turboquant.kernels import _launch


def test_key_separates_what_triton_specializes_on():
    buf = torch.zeros(64, dtype=torch.float16)
    spec = _launch._spec
    assert spec(buf) == spec(torch.zeros(8, dtype=torch.float16))
    assert spec(buf) != spec(buf[1:])                 # 2-byte offset: not 16-byte aligned
    assert spec(buf) != spec(buf.view(torch.bfloat16))
    assert spec(1) != spec(17)                        # == 1 becomes a constant in Triton
    assert spec(16) != spec(17) and spec(16) == spec(32)
    assert spec(3) == spec(5)
    assert spec(1 << 31) != spec(16)                  # int32 vs int64 argument
    assert spec(1 << 63) != spec(1 << 32)             # int64 vs uint64
    assert spec(True) != spec(False) != spec(None)
    assert spec(0.5) == spec(2.0)
    with pytest.raises(TypeError):
        spec("a string")


class FakeCompiled:
    function, packed_metadata = "fn", "meta"

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


class FakeKernel:
    """Stands in for a JITFunction(a, n, BLOCK: constexpr = 4, FLAG: constexpr = False)."""


    def __init__(self):
        self.signature = inspect.signature(lambda a, n, BLOCK=4, FLAG=False: None)
        self.plain = []
        self.compiled = []

    def __getitem__(self, grid):
        def go(*args, **kw):
            self.plain.append((grid, args, kw))
            self.compiled.append(FakeCompiled())
            return self.compiled[-1]
        return go


def test_first_call_of_a_key_is_plain_later_ones_direct(monkeypatch):
    monkeypatch.setattr(_launch, "_on_gpu", lambda first: True)
    monkeypatch.setattr(_launch, "_current_stream", lambda index: 7)
    monkeypatch.setattr(_launch, "_PLAIN", False)
    _launch.clear()
    k = FakeKernel()
    a = torch.zeros(16)
    _launch.launch(k, (3,), a, 5, FLAG=True, num_warps=4)
    assert len(k.plain) == 1
    before = _launch.stats["direct"]
    _launch.launch(k, (3, 2), a, 9, FLAG=True, num_warps=4)      # same key: direct
    assert len(k.plain) == 1 and _launch.stats["direct"] == before + 1
    # grid padded to 3 dims, no launch metadata or hooks, every parameter in signature order
    # (the default BLOCK included, options not)
    assert k.compiled[0].calls == [(3, 2, 1, 7, "fn", "meta", None, None, None, a, 9, 4, True)]
    _launch.launch(k, (3,), a, 1, FLAG=True, num_warps=4)        # n == 1: another variant
    _launch.launch(k, (3,), a[1:], 5, FLAG=True, num_warps=4)    # misaligned: another
    _launch.launch(k, (3,), a, 5, FLAG=False, num_warps=4)       # constexpr: another
    _launch.launch(k, (3,), a, 5, FLAG=True, num_warps=8)        # option: another
    assert len(k.plain) == 5
    monkeypatch.setattr(_launch, "_PLAIN", True)                 # the A/B switch
    _launch.launch(k, (3,), a, 5, FLAG=True, num_warps=4)
    assert len(k.plain) == 6
    _launch.clear()


def test_cpu_tensors_take_the_plain_path():
    _launch.clear()
    k = FakeKernel()
    for _ in range(2):
        _launch.launch(k, (1,), torch.zeros(4), 3)
    assert len(k.plain) == 2 and not k.compiled[0].calls


_ORDER_CHECK = r'''
import os, sys
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import create_function_from_signature
from vllm_turboquant.kernels import _launch
import vllm_turboquant.kernels.decode as dc, vllm_turboquant.kernels.prefill as pf
import vllm_turboquant.kernels.store as st
sys.path.insert(0, sys.argv[1])
import layer_step as ls
seen = []
def capture(kernel, grid, *args, **kw):
    seen.append((kernel, args, kw))
for m in (st, pf, dc):
    m.launch = capture
s = ls.build_step(2, 40, 20, 16, device="cpu")
for fn in ls.ops(s).values():
    fn()
nd = 2        # the step's decodes once more as three launches: the merge kernel's arguments
dc.tq_decode(s["q"][:nd], s["cache"], s["bt"][:nd], s["seq_lens"][:nd], s["params"],
             s["scale"], s["side"], num_splits=3, out=s["out"][:nd], fused=False)
kernels = set()
for kernel, args, kw in seen:
    binder = create_function_from_signature(kernel.signature, kernel.params, BaseBackend)
    options = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
    params, _, _ = binder(*args, **{k: v for k, v in kw.items() if k not in options}, **options)
    ours = _launch._Site(kernel).full_args(args, kw)
    assert len(ours) == len(params), (kernel, len(ours), len(params))
    for (name, want), got in zip(params.items(), ours):
        assert got is want or got == want, (kernel, name)
    kernels.add(kernel.__name__ if hasattr(kernel, "__name__") else str(kernel))
print("OK", len(seen), len(kernels))
'''


def test_direct_launch_passes_the_arguments_in_tritons_order(tmp_path):
    """The list handed to the CompiledKernel's launcher equals the one JITFunction.run builds
    (its generated binder), for every launch of a mixed layer step: all four kernels. Compiled
    (not interpreted) kernels, so in a subprocess without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "order.py"
    script.write_text(_ORDER_CHECK)
    proc = subprocess.run([sys.executable, str(script), os.path.join(root, "benchmarks")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout
    # store, prefill, decode split, merge (fused=False)
    assert proc.stdout.split()[-1] == "4", proc.stdout
