"""Launching a compiled Triton kernel with less host work than `kernel[grid](...)`.

Why: vLLM runs attention outside CUDA graphs in every step with a prefill chunk, so each of
our launches costs host time per layer and step. `JITFunction.run` spends most of its time
deciding which compiled variant the arguments need (a specialization per argument, a cache
key over all of them, hooks, global-value checks) before the C launcher runs: in the H200
profile of a mixed SmolLM2 layer step (benchmarks/results/h200-20261202b/layer_step.json) it
took 67 us of ~112 us per store call under cProfile. Measured without the profiler, this
shortcut saves 4-10 us per launch, 6-12% of a mixed layer step's host time
(`benchmarks/layer_step.py --ab-launch`, benchmarks/results/h200-20261202d/): cProfile had
inflated Triton's share.

How: `launch(kernel, grid, *args, **constexprs_and_options)` keys the call by what Triton's
specialization can depend on, at least as finely (computing it costs about what Triton's
native specialization does, benchmarks/host_python.py; the saving is the rest of run()):
  tensor  dtype and whether data_ptr() is 16-byte aligned (Triton's "D" divisibility);
  int     == 1 (Triton turns it into a constant), % 16 == 0, whether it fits int32 / int64;
  float, bool, None  their kind;
  keywords (constexprs, num_warps, num_stages)  their values; plus the device.
Two calls with the same key get the same specialization from Triton, so the first call of a
key goes through `kernel[grid](...)` (compiling if needed) and its returned CompiledKernel is
kept; later calls hand the same argument list (constexprs included, in signature order, as
`JITFunction.run` passes it) straight to its C launcher. Anything unusual (the interpreter,
launch hooks set, an argument of another type) takes the normal path.
`VLLM_TURBOQUANT_PLAIN_LAUNCH=1` turns the shortcut off (the A/B switch of
benchmarks/layer_step.py and the GPU test that compares both).

Removal plan: if Triton's own launch path gets as cheap (or a public "launch a compiled kernel
with these args" API appears in both supported versions, 3.6 and 3.9), call that instead.
"""

from __future__ import annotations

import os

import torch

from ._tl import interpreting

_PLAIN = os.environ.get("VLLM_TURBOQUANT_PLAIN_LAUNCH") == "1"
try:                       # read on every launch (the hook check): imported once
    from triton import knobs as _KNOBS
except ImportError:        # pragma: no cover - Triton without knobs (< 3.4)
    _KNOBS = None
_INT32 = 1 << 31
_INT64 = 1 << 63


def _spec(a):
    """The part of one argument that Triton's specialization can depend on (see the module
    doc); raises TypeError for kinds we do not key (the caller then takes the plain path)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if a is None or a is True or a is False:
        return a
    if isinstance(a, int):
        return (a == 1, a & 15 == 0, -_INT32 <= a < _INT32, -_INT64 <= a < _INT64)
    if isinstance(a, float):
        return float
    raise TypeError(type(a))


class _Site:
    """What one kernel needs for direct launches: its parameters in signature order."""

    def __init__(self, kernel):
        self.direct = not interpreting(kernel)        # decided once per kernel object
        if not self.direct:
            return
        params = kernel.signature.parameters          # inspect.Signature of the jit function
        self.names = list(params)
        self.defaults = {n: p.default for n, p in params.items() if p.default is not p.empty}
        self.compiled: dict = {}

    def full_args(self, args: tuple, kw: dict) -> list:
        """Every parameter's value in signature order (the leading positional ones, then the
        rest by name or default): what JITFunction.run hands the launcher."""
        full = list(args)
        for name in self.names[len(args):]:
            full.append(kw[name] if name in kw else self.defaults[name])
        return full


_SITES: dict = {}
stats = {"direct": 0}      # launches that took the shortcut (tests check it is taken)


def _hooks_set() -> bool:
    """Whether a launch hook (a profiler's, e.g. proton) is registered: such launches take
    the plain path, which calls it. Triton 3.9 keeps hooks in an always-present HookChain;
    older versions use None for none."""
    if _KNOBS is None:  # pragma: no cover - other Triton layouts
        return True
    hooks = (_KNOBS.runtime.launch_enter_hook, _KNOBS.runtime.launch_exit_hook)
    return any(h is not None and getattr(h, "calls", True) for h in hooks)


def launch(kernel, grid: tuple, *args, **kw) -> None:
    """kernel[grid](*args, **kw), through the cached CompiledKernel when its key was seen.
    args: the kernel's leading positional parameters (tensors and scalars); kw: the rest by
    name (constexprs) plus launch options (num_warps, num_stages)."""
    if _PLAIN or not args or not _on_gpu(args[0]):
        kernel[grid](*args, **kw)
        return
    site = _SITES.get(kernel)
    if site is None:
        site = _SITES[kernel] = _Site(kernel)
    if not site.direct:
        kernel[grid](*args, **kw)
        return
    try:
        key = (args[0].device.index, tuple(map(_spec, args)), tuple(sorted(kw.items())))
    except TypeError:
        kernel[grid](*args, **kw)
        return
    compiled = site.compiled.get(key)
    if compiled is None or _hooks_set():
        compiled = kernel[grid](*args, **kw)
        if compiled is not None:
            site.compiled[key] = compiled
        return
    full = site.full_args(args, kw)
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    stream = _current_stream(args[0].device.index)
    compiled.run(grid[0], g1, g2, stream, compiled.function, compiled.packed_metadata, None,
                 None, None, *full)
    stats["direct"] += 1


def _on_gpu(first) -> bool:
    return isinstance(first, torch.Tensor) and first.is_cuda


def _current_stream(index: int) -> int:
    # What Triton's CUDA driver asks torch for (torch.cuda.current_stream() builds a Stream
    # object first: slower).
    return torch._C._cuda_getCurrentRawStream(index)


def clear() -> None:
    """Forget the cached CompiledKernels (tests)."""
    _SITES.clear()
