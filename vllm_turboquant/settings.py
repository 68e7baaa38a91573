"""How a vLLM user picks the TurboQuant preset. Pure Python: no vLLM import.

Three knobs, from the most to the least specific:

1. ``--kv-cache-dtype NAME``. ``turboquant`` means "the configured preset" (default
   ``DEFAULT_PRESET``); every other preset name (``tq-k4v4``, ``tq-k3v3``, ...) is a kv-cache
   dtype of its own and fixes the preset. We never reuse vLLM's built-in ``turboquant_*`` names.
2. ``--additional-config '{"turboquant": {"preset": "tq-k3v3", "window": 64}}'``: the preset for
   ``--kv-cache-dtype turboquant`` and field overrides (``key_bits``, ``value_bits``, ``window``)
   for any of our dtypes.
3. Environment ``VLLM_TURBOQUANT_PRESET=tq-k3v3``: the preset for ``--kv-cache-dtype turboquant``
   when ``--additional-config`` names none (handy for launch scripts; inherited by vLLM's
   worker processes).

Every attention layer of the model uses the resolved preset (each with its own rotation, seeded
by the layer index). Errors name the valid choices.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from vllm_turboquant.codec import DEFAULT_PRESET, KERNEL_HEAD_SIZES, PRESETS, TQConfig

GENERIC_DTYPE = "turboquant"
ENV_PRESET = "VLLM_TURBOQUANT_PRESET"
ADDITIONAL_CONFIG_KEY = "turboquant"
# Fields a user may override on top of a preset. The others (seed, scale, sink_tokens, key_qjl)
# either must match the evaluator's numbers or are evaluator-only features.
OVERRIDABLE_FIELDS = ("key_bits", "value_bits", "window", "align")
_CONFIG_KEYS = ("preset", *OVERRIDABLE_FIELDS)


class TurboQuantConfigError(ValueError):
    """A wrong TurboQuant setting; the message names the problem and the valid choices."""


def env_token_count(name: str, default: int, environ=os.environ) -> int:
    """A token-count knob from the environment: $name as an integer >= 0, else `default`
    (unset or empty); anything else is a TurboQuantConfigError naming the variable."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit():
        raise TurboQuantConfigError(f"{name}: expected a token count >= 0, got {raw!r}")
    return int(raw)


def env_switch(name: str, default: bool, environ=os.environ) -> bool:
    """An on/off knob from the environment: $name 1 = on, 0 = off, unset or empty = `default`;
    anything else is a TurboQuantConfigError naming the variable."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in ("0", "1"):
        raise TurboQuantConfigError(f"{name}: expected 0 (off) or 1 (on), got {raw!r}")
    return raw == "1"


def kv_cache_dtypes() -> tuple[str, ...]:
    """The kv-cache dtype names this plugin adds to vLLM: ``turboquant`` + every preset name.

    Names in vLLM's own ``turboquant_*`` namespace are never taken (vLLM routes those to its
    built-in backend by prefix)."""
    names = (n for n in PRESETS if n != GENERIC_DTYPE and not n.startswith("turboquant_"))
    return (GENERIC_DTYPE, *sorted(names))


def is_turboquant_dtype(cache_dtype: object) -> bool:
    return isinstance(cache_dtype, str) and cache_dtype in kv_cache_dtypes()


def _valid_presets() -> str:
    return ", ".join(sorted(PRESETS))


def _section(additional_config: Any) -> dict:
    """The ``turboquant`` section of vLLM's ``additional_config`` (may be absent)."""
    if not isinstance(additional_config, Mapping):
        return {}
    section = additional_config.get(ADDITIONAL_CONFIG_KEY)
    if section is None:
        return {}
    if isinstance(section, str):  # --additional-config '{"turboquant": "tq-k3v3"}'
        return {"preset": section}
    if not isinstance(section, Mapping):
        raise TurboQuantConfigError(
            f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a preset name or a mapping "
            f"with keys {list(_CONFIG_KEYS)}, got {section!r}")
    unknown = sorted(set(section) - set(_CONFIG_KEYS))
    if unknown:
        raise TurboQuantConfigError(
            f"unknown key(s) {unknown} in additional_config[{ADDITIONAL_CONFIG_KEY!r}]; "
            f"valid keys: {list(_CONFIG_KEYS)}")
    return dict(section)


def _preset(name: object, source: str) -> TQConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise TurboQuantConfigError(
            f"unknown TurboQuant preset {name!r} (from {source}); valid presets: "
            f"{_valid_presets()}")
    return PRESETS[name]


def resolve(cache_dtype: str, additional_config: Any = None,
            environ: Mapping[str, str] | None = None) -> TQConfig:
    """The TQConfig a vLLM run with ``--kv-cache-dtype cache_dtype`` serves.

    Raises TurboQuantConfigError (a ValueError) for an unknown preset or key, a preset given
    twice with different values, or a value the codec rejects.
    """
    environ = os.environ if environ is None else environ
    if not is_turboquant_dtype(cache_dtype):
        raise TurboQuantConfigError(
            f"{cache_dtype!r} is not a TurboQuant kv-cache dtype; valid: "
            f"{', '.join(kv_cache_dtypes())}")
    section = _section(additional_config)
    asked = section.pop("preset", None)
    if cache_dtype != GENERIC_DTYPE:
        base = PRESETS[cache_dtype]
        if asked is not None and asked != cache_dtype:
            raise TurboQuantConfigError(
                f"--kv-cache-dtype {cache_dtype} fixes the preset, but additional_config "
                f"asks for preset {asked!r}; use --kv-cache-dtype turboquant to pick the preset "
                "in additional_config")
    elif asked is not None:
        base = _preset(asked, f"additional_config[{ADDITIONAL_CONFIG_KEY!r}]['preset']")
    elif environ.get(ENV_PRESET):
        base = _preset(environ[ENV_PRESET], f"environment variable {ENV_PRESET}")
    else:
        base = PRESETS[DEFAULT_PRESET]
    if not section:
        return base
    try:
        return base.with_overrides(**section)
    except (TypeError, ValueError) as e:
        raise TurboQuantConfigError(
            f"invalid TurboQuant override {section} on preset {base.name!r}: {e}") from None


def check_servable(config: TQConfig) -> None:
    """Refuse preset features the vLLM backend does not serve (they are evaluator-only)."""
    if config.sink_tokens:
        raise TurboQuantConfigError(
            f"TurboQuant preset {config.name!r} sets sink_tokens={config.sink_tokens}: attention "
            "sinks are an evaluator-only feature the vLLM backend does not serve; pick a preset "
            f"without sinks ({_servable_presets()})")
    if config.key_qjl:
        raise TurboQuantConfigError(
            f"TurboQuant preset {config.name!r} sets key_qjl: the QJL key sketch is an "
            "evaluator-only feature the vLLM backend does not serve; pick a preset without it "
            f"({_servable_presets()})")


# What is verified on CUDA (the Triton kernels against their references on the GPU, and vLLM
# serving a real model): head size 64 with every servable preset; other head sizes with 4-bit
# keys and values, which the kernels dequantize with register `prmt` lookups. History: on
# 2026-11-23 a head-128 model with the window-64 default died with "CUDA illegal memory access"
# on its first prompt longer than the window (2x H200, benchmarks/results/tp-H200x2-20261123/).
# On 2026-12-02 (H200, triton 3.6, tests/gpu/crash_matrix.py) the prefill kernel's table-lookup
# paths at head 128 with a window faulted (4-bit lookup 2, then the default) or returned wrong
# output (3-bit codes: relative error 1.19), while the register lookup (lookup 3, now the
# default) passed every case (heads 128 and 256, windows 16 and 64, GQA 2-8, fp16/bf16) and the
# GPU suite (74 tests; benchmarks/results/h200-20261202/). So 3-bit presets stay refused at
# head sizes other than 64 on CUDA. VLLM_TURBOQUANT_ALLOW_UNVERIFIED=1 lifts the refusal
# (developers).
GPU_ANY_BITS_HEAD_SIZES = (64,)
GPU_VERIFIED_BITS = (4, 4)


def check_verified_on_gpu(config: TQConfig, head_size: int, on_cuda: bool,
                          model_dtype=None) -> None:
    if (not on_cuda or head_size in GPU_ANY_BITS_HEAD_SIZES
            or os.environ.get("VLLM_TURBOQUANT_ALLOW_UNVERIFIED") == "1"):
        return
    if (config.key_bits, config.value_bits) == GPU_VERIFIED_BITS:
        if config.window > 0 and model_dtype is not None and model_dtype not in (
                torch.float16, torch.bfloat16):
            # fp32 attention takes the kernels' generic table path (no register lookup)
            raise TurboQuantConfigError(
                f"TurboQuant preset {config.name!r} keeps a {config.window}-token window; on "
                f"CUDA at head size {head_size} that is verified for fp16/bf16 models only, "
                f"this one runs in {model_dtype}. Use --dtype bfloat16 (or float16), or "
                "--kv-cache-dtype tq-k4v4 (no window)")
        return
    raise TurboQuantConfigError(
        f"TurboQuant preset {config.name!r} stores K{config.key_bits}/V{config.value_bits}-bit "
        f"codes, which on CUDA are verified only for head size {list(GPU_ANY_BITS_HEAD_SIZES)}; "
        f"this model has head size {head_size}, where the prefill kernel returned wrong results "
        "in the GPU tests (docs/serving-vllm.md). Use --kv-cache-dtype turboquant or tq-k4v4 "
        "(4-bit keys and values) for this model")


def check_block_size(config: TQConfig, block_size: int | None) -> None:
    """An aligned preset needs pages whose size is a multiple of its align A: a prefix-cache
    hit ends on a page boundary, and only then does a hit read what a miss reads."""
    if config.align and block_size and block_size % config.align:
        raise TurboQuantConfigError(
            f"TurboQuant preset {config.name!r} reads each token's own {config.align}-token "
            f"block exactly (align {config.align}), which needs a KV block size that is a "
            f"multiple of {config.align}; this run has --block-size {block_size}. Drop "
            f"--block-size (the TurboQuant backend then picks {config.align}), pass "
            f"--block-size {config.align}, or use --kv-cache-dtype tq-sliding (no align)")


def preferred_block_size(config: TQConfig, default: int) -> int:
    """The KV block size the backend asks vLLM for when the user sets none: the default,
    raised to the preset's align (rounded up to a multiple of it)."""
    if not config.align or default % config.align == 0:
        return default
    return -(-default // config.align) * config.align


def check_head_size(head_size: int) -> None:
    if head_size not in KERNEL_HEAD_SIZES:
        raise TurboQuantConfigError(
            f"TurboQuant serves head sizes {list(KERNEL_HEAD_SIZES)}; this model has head size "
            f"{head_size}. Use another --kv-cache-dtype (e.g. auto or fp8) for this model")


def _servable_presets() -> str:
    return ", ".join(sorted(n for n, p in PRESETS.items() if not p.sink_tokens and not p.key_qjl))


def describe(config: TQConfig, head_size: int) -> str:
    """One log line: the preset and what it costs per token and KV head."""
    lay = config.layout(head_size)
    return (f"TurboQuant preset {config.name!r}: K{config.key_bits}/V{config.value_bits} bits, "
            f"window {config.window}, align {config.align or 'off'}, {lay.slot_bytes} B per "
            "token and KV head "
            f"(bf16: {4 * head_size} B, {4 * head_size / lay.slot_bytes:.2f}x)")


# The preset this process serves. One vLLM process serves one model with one kv-cache dtype;
# hooks that vLLM calls without the config at hand (the 0.25 `get_kv_cache_shape`, the 0.32
# `customize_spec`) read it. Set on every resolution at engine start, so a second engine in the
# same process (tests) gets its own.
_ACTIVE: TQConfig | None = None


def activate(config: TQConfig) -> TQConfig:
    global _ACTIVE
    _ACTIVE = config
    return config


def active() -> TQConfig:
    if _ACTIVE is None:
        raise RuntimeError("no TurboQuant preset is active in this process; the plugin resolves "
                           "it when vLLM builds its config or its attention layers")
    return _ACTIVE
