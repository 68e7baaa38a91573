"""Presets and the packed slot layout: configuration is data.

A *slot* is what the cache stores for one token and one KV head: the key and the value,
each as packed codebook indices plus a float16 scale. ``SlotLayout`` says where every byte
of a slot lives; ``docs/layout.md`` draws the same thing.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

SUPPORTED_BITS = tuple(range(1, 9))
# Head sizes the Triton kernels and the vLLM backend serve. The codec itself also takes any
# multiple of 16 (block Hadamard), which the evaluator can use.
KERNEL_HEAD_SIZES = (64, 128, 256)


def code_planes(bits: int) -> tuple[int, ...]:
    """Bit-plane widths a `bits`-bit code is split into, lowest bits first.

    A plane of width w packs 8 // w codes per byte. Splitting 3 bits into a 2-bit and a 1-bit
    plane keeps every code inside one byte, so a kernel unpacks with one shift and one mask.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if bits == 8:
        return (8,)
    return tuple(w for w in (4, 2, 1) if bits & w)


@dataclass(frozen=True)
class SlotLayout:
    """Byte layout of one slot (one token, one KV head).

    ::

        offset 0            key codes     head_size * key_bits / 8 bytes (bit planes)
        k_qjl_offset        [QJL signs    head_size / 8 bytes, then residual norm fp16]
        v_codes_offset      value codes   head_size * value_bits / 8 bytes
        k_scale_offset      key scale     float16
        v_scale_offset      value scale   float16
        ...                 zero padding up to slot_bytes (a multiple of 4)

    The sizes are cached properties: every kernel launch reads several of them (host time
    of eager mixed steps), and a frozen layout never changes.
    """

    head_size: int
    key_bits: int
    value_bits: int
    key_qjl: bool = False

    def __post_init__(self):
        if self.head_size % 16:
            raise ValueError(f"head size {self.head_size} is not a multiple of 16; TurboQuant "
                             "packs codes in bytes and rotates in blocks of 16 or more")
        code_planes(self.key_bits)
        code_planes(self.value_bits)

    @functools.cached_property
    def k_code_bytes(self) -> int:
        return self.head_size * self.key_bits // 8

    @functools.cached_property
    def v_code_bytes(self) -> int:
        return self.head_size * self.value_bits // 8

    @functools.cached_property
    def qjl_bytes(self) -> int:
        """Sign bits of the QJL residual sketch plus its float16 residual norm."""
        return self.head_size // 8 + 2 if self.key_qjl else 0

    @functools.cached_property
    def k_qjl_offset(self) -> int:
        return self.k_code_bytes

    @functools.cached_property
    def v_codes_offset(self) -> int:
        return self.k_code_bytes + self.qjl_bytes

    @functools.cached_property
    def k_scale_offset(self) -> int:
        return self.v_codes_offset + self.v_code_bytes

    @functools.cached_property
    def v_scale_offset(self) -> int:
        return self.k_scale_offset + 2

    @functools.cached_property
    def slot_bytes(self) -> int:
        return _round_up(self.v_scale_offset + 2, 4)


@dataclass(frozen=True)
class TQConfig:
    """One TurboQuant recipe.

    key_bits / value_bits: Lloyd-Max codebook bits per rotated coordinate.
    window: the newest `window` tokens of each sequence are also kept in the model dtype and
        read instead of their packed form (0 = off).
    align: exact reads stop at the start of the query's own `align`-token block (0 = no
        stop): query t reads key j exactly iff j > t - window and j // align == t // align.
        A prefix-cache hit ends on a block boundary, so with `align` dividing vLLM's block
        size no query ever needs an exact copy of a token before the hit: a hit, a miss, any
        chunking and a recompute read the same exact keys (docs/design-notes.md, "A
        block-aligned window"). No effect without a window (stored as 0 then).
    sink_tokens: the first `sink_tokens` tokens of each sequence are read at full precision
        (0 = off). Evaluator only: the vLLM backend refuses presets that set it.
    key_qjl: add a 1-bit QJL sketch of the key's quantization residual (evaluator only).
    scale: "lsq" stores the least-squares scale <y, c> / |c|^2 of the codeword c (minimal
        error); "norm" stores |y| and renormalizes the codeword (vLLM's norm correction).
    seed: seeds the per-layer random signs of the Hadamard rotation; the same on every rank.
    """

    name: str
    key_bits: int = 4
    value_bits: int = 4
    window: int = 0
    align: int = 0
    sink_tokens: int = 0
    key_qjl: bool = False
    scale: str = "lsq"
    seed: int = 20260423

    def __post_init__(self):
        for field, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{field} must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
        if self.window < 0 or self.sink_tokens < 0 or self.align < 0:
            raise ValueError("window, align and sink_tokens must be >= 0")
        if self.align and not self.window:
            # align clips the window's exact reads; without a window there are none (so
            # overriding window=0 on an aligned preset just turns the window off)
            object.__setattr__(self, "align", 0)
        if self.scale not in ("lsq", "norm"):
            raise ValueError(f"scale must be 'lsq' or 'norm', got {self.scale!r}")

    def layout(self, head_size: int) -> SlotLayout:
        return SlotLayout(head_size, self.key_bits, self.value_bits, self.key_qjl)

    def bytes_per_token(self, head_size: int, num_kv_heads: int = 1) -> int:
        """Packed-cache bytes per token (keys and values of `num_kv_heads` heads)."""
        return self.layout(head_size).slot_bytes * num_kv_heads

    def stored_bytes_per_token(self, head_size: int, context_len: int,
                               model_dtype_bytes: int = 2) -> float:
        """Every byte stored per token and KV head at `context_len`: the packed slot plus
        the window (and sinks) kept in the model dtype, spread over the context."""
        exact_tokens = min(context_len, self.window + self.sink_tokens)   # the ring's size
        exact = exact_tokens * 2 * head_size * model_dtype_bytes
        return self.layout(head_size).slot_bytes + exact / context_len

    def compression_vs(self, head_size: int, context_len: int = 8192,
                       model_dtype_bytes: int = 2) -> float:
        """How many times smaller than the model-dtype cache, counting every stored byte."""
        full = 2 * head_size * model_dtype_bytes
        return full / self.stored_bytes_per_token(head_size, context_len, model_dtype_bytes)

    def bits_per_value(self, head_size: int, context_len: int = 8192) -> float:
        """Stored bits per cached key or value element (everything counted, as above)."""
        return self.stored_bytes_per_token(head_size, context_len) * 8 / (2 * head_size)

    def with_overrides(self, **changes) -> "TQConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "TQConfig":
        """The preset called `name` (see PRESETS), optionally with fields overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown TurboQuant preset {name!r}; valid presets: "
                             f"{', '.join(sorted(PRESETS))}")
        base = PRESETS[name]
        return dataclasses.replace(base, **overrides) if overrides else base


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


# The presets. Measured quality and size of each is in README.md (from `python -m
# vllm_turboquant.eval`); pick by those numbers, not by the bits alone.
PRESETS: dict[str, TQConfig] = {
    p.name: p for p in (
        # Default: 4-bit keys and values; the newest 64 tokens read at full precision, but
        # never across a 128-token block boundary, so prefix-cache hits and misses read the
        # same (needs a KV block size that is a multiple of 128: the backend asks for 128).
        TQConfig("turboquant", key_bits=4, value_bits=4, window=64, align=128),
        # The sliding window: the newest 64 tokens exact everywhere. Better perplexity, but a
        # prefix-cache hit reads its newest cached tokens packed (a miss reads them exact).
        TQConfig("tq-sliding", key_bits=4, value_bits=4, window=64),
        # No window: the most tokens per byte and the simplest decode path.
        TQConfig("tq-k4v4", key_bits=4, value_bits=4),
        # 3-bit class: >= 4.9x at head 128 and 8K context, window included.
        TQConfig("tq-k3v3", key_bits=3, value_bits=3, window=64),
    )
}
DEFAULT_PRESET = "turboquant"


def compression_table(head_size: int, context_len: int = 8192) -> dict[str, float]:
    """{preset: compression vs bf16}, for docs and the table test."""
    return {n: round(p.compression_vs(head_size, context_len), 3) for n, p in PRESETS.items()}

