"""kernels/_launch.py: the direct launch of a cached CompiledKernel. On CPU the key and the
bookkeeping are checked with a fake kernel; that the GPU shortcut gives the plain launch's
output (misaligned views included) is tests/gpu/test_kernels_gpu.py::test_direct_launch_*."""

from __future__ import annotations

import inspect
import types

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
        sig = inspect.signature(lambda a, n, BLOCK=4, FLAG=False: None)
        self.params = [types.SimpleNamespace(name=k, param=v) for k, v in sig.parameters.items()]
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
    _launch.launch(k, (3, 2), a, 9, FLAG=True, num_warps=4)      # same key: direct
    assert len(k.plain) == 1
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
