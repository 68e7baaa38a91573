"""Shared, torch-only pieces of the kernels: the per-layer parameter bundle and the window side.

No Triton import here: the references (the CPU serving path) and the launchers take the same
`TQLayerParams`, so a backend builds it once per layer and hands it to whichever path runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from vllm_turboquant.codec import SlotLayout, TQLayerCodec, code_planes, sign_magnitude


@dataclasses.dataclass(frozen=True)
class TQLayerParams:
    """Everything a kernel needs to encode/decode one layer's packed slots.

    Tensors (all float32, on the cache's device):
      rotation        [D, D]  R; rotate with y = x @ R.T, un-rotate with x = y @ R.
      rotation_pm1    [D, D]  R / rotation_scale: entries exactly +-1 (or 0), so it is exact in
                              fp16/bf16 and the kernels can rotate on tensor cores with fp32
                              accumulation, then multiply by rotation_scale.
      key_centroids   [2**key_bits]        ascending Lloyd-Max levels of a unit-vector coordinate.
      key_bounds      [2**key_bits - 1]    midpoints; code = #(bounds < u) (= torch.bucketize).
      value_centroids / value_bounds       same for values.
    Ints: head_size D, key_bits, value_bits, layout (SlotLayout: byte offsets of one slot).
    scale_mode: "lsq" (least-squares scale) or "norm" (|y| / |codeword|), as the codec.
    window: the preset's recent-token window W (0 = off); the side tensors carry their own W.
    align: the preset's align A (0 = off): the window's exact reads start no earlier than the
        query's own A-token block (key j exact for query t iff j > t - W and j // A == t // A).
    codebooks: (key bounds, key centroids, value bounds, value centroids) as tuples of Python
        floats (the float32 values exactly): the store kernel compiles them in as constants.
        Taken from the codec's CPU tensors here, never from device tensors at launch (a
        device read would sync, and fail inside a CUDA graph capture).
    symmetric: both codebooks exactly symmetric (C[-1 - k] = -C[k], middle bound 0), the
        store's cheaper nearest-centroid search (store._levels).
    """

    head_size: int
    key_bits: int
    value_bits: int
    scale_mode: str
    layout: SlotLayout
    window: int
    rotation: torch.Tensor
    rotation_pm1: torch.Tensor
    rotation_scale: float
    key_centroids: torch.Tensor
    key_bounds: torch.Tensor
    value_centroids: torch.Tensor
    value_bounds: torch.Tensor
    align: int = 0
    codebooks: tuple = ()
    symmetric: bool = False

    @classmethod
    def from_codec(cls, codec: TQLayerCodec, device=None) -> "TQLayerParams":
        if codec.config.key_qjl:
            raise ValueError("the kernels do not serve key_qjl presets (evaluator only)")
        device = device if device is not None else codec.rotation.device
        # Derive on the CPU in float64: on CUDA, tensor / scalar is a multiply by the
        # reciprocal, which is 1 ulp off and would break the exact +-1 matrix.
        rot = codec.rotation.detach().cpu().double()
        scale = float(rot.abs().max())
        pm1 = rot / scale
        if not torch.equal(pm1.abs().round(), pm1.abs()):
            raise ValueError("rotation is not a scaled +-1 matrix; the kernels need one")
        f32 = dict(device=device, dtype=torch.float32)
        books = tuple(tuple(t.detach().cpu().float().tolist()) for t in (
            codec.key_bounds, codec.key_centroids, codec.value_bounds, codec.value_centroids))
        return cls(
            head_size=codec.head_size, key_bits=codec.config.key_bits,
            value_bits=codec.config.value_bits, scale_mode=codec.config.scale,
            layout=codec.layout, window=codec.config.window,
            rotation=codec.rotation.detach().to(**f32), rotation_pm1=pm1.round().to(**f32),
            rotation_scale=scale,
            key_centroids=codec.key_centroids.to(**f32),
            key_bounds=codec.key_bounds.to(**f32),
            value_centroids=codec.value_centroids.to(**f32),
            value_bounds=codec.value_bounds.to(**f32), align=codec.config.align,
            codebooks=books, symmetric=all(_symmetric(b, c) for b, c in (books[:2], books[2:])))

    def to(self, device) -> "TQLayerParams":
        tensors = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **tensors)


def _symmetric(bounds: tuple, cents: tuple) -> bool:
    """C[-1 - k] == -C[k] for every level, bounds likewise, and the middle bound exactly 0."""
    return (all(a == -b for a, b in zip(cents, reversed(cents)))
            and all(a == -b for a, b in zip(bounds, reversed(bounds)))
            and len(bounds) % 2 == 1 and bounds[len(bounds) // 2] == 0.0)


class TQSide(NamedTuple):
    """The recent-token window side copy (docs/design-notes.md, "Recent-token window").

    k, v   [num_rows, W, num_kv_heads, D] model dtype: *rotated* key/value (x @ R.T).
    tag    [num_rows, W] int32: slot id stored at that ring entry, -1 = empty.
    check  [num_rows, W, num_kv_heads] int32: the packed slot's 4 scale bytes (K scale | V scale
           << 16, little endian) written at the same time.
    Row = the request's index in this step's block_table / seq_lens; ring index = position % W.
    """

    k: torch.Tensor
    v: torch.Tensor
    tag: torch.Tensor
    check: torch.Tensor

    @property
    def window(self) -> int:
        return self.k.shape[1]

    @classmethod
    def empty(cls, num_rows: int, window: int, num_kv_heads: int, head_size: int,
              dtype=torch.bfloat16, device=None) -> "TQSide":
        return cls(
            torch.zeros(num_rows, window, num_kv_heads, head_size, dtype=dtype, device=device),
            torch.zeros(num_rows, window, num_kv_heads, head_size, dtype=dtype, device=device),
            torch.full((num_rows, window), -1, dtype=torch.int32, device=device),
            torch.zeros(num_rows, window, num_kv_heads, dtype=torch.int32, device=device))


def as_params(codec_or_params, device=None) -> TQLayerParams:
    """Accept a TQLayerCodec or TQLayerParams (the kernels' bundle); return the bundle."""
    if isinstance(codec_or_params, TQLayerParams):
        p = codec_or_params
        if device is not None and p.rotation.device != torch.device(device):
            p = p.to(device)
        return p
    if isinstance(codec_or_params, TQLayerCodec):
        return TQLayerParams.from_codec(codec_or_params, device)
    raise TypeError(f"expected TQLayerParams or TQLayerCodec, got {type(codec_or_params)}")


def plane_layout(bits: int, head_size: int) -> list[tuple[int, int, int]]:
    """[(plane width w, byte offset of the plane inside the code bytes, plane bytes)]."""
    out, start = [], 0
    for w in code_planes(bits):
        out.append((w, start, head_size * w // 8))
        start += head_size * w // 8
    return out


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints: triton.cdiv is a ConstexprFunction in triton 3.9, ~5 us of
    Python per host call (every launch's grid)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, x))))


def stored_order(centroids: torch.Tensor) -> torch.Tensor:
    """The codebook indexed by stored (sign-magnitude) code: entry c = C[sign_magnitude(c)]
    (codec.packing), what a table lookup of a packed code must return."""
    bits = int(centroids.numel()).bit_length() - 1
    return centroids[sign_magnitude(torch.arange(centroids.numel(), device=centroids.device),
                                    bits)]


def pair_table(centroids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 [256]: entry byte = bits(C'[byte & 15]) | bits(C'[byte >> 4]) << 16 in `dtype`
    (fp16/bf16), C' = stored_order(C): the 4-bit lookup table of `dequant_halves`."""
    bits = stored_order(centroids).to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    idx = torch.arange(256, device=centroids.device)
    t = bits[idx & 15] | (bits[idx >> 4] << 16)
    return torch.where(t >= 2 ** 31, t - 2 ** 32, t).to(torch.int32).contiguous()


def prmt_dequant_asm(centroids: torch.Tensor, dtype: torch.dtype) -> str | None:
    """PTX for `dequant_halves` MODE 3: one 32-bit register of 4 code bytes (byte j = code of
    coordinate j | code of coordinate j + D/2 << 4) -> $0, $1: the 4 low-half values, $2, $3:
    the 4 high-half values, as 16-bit floats of `dtype` (two per register, element 0 low).

    Lloyd-Max codebooks are symmetric (C[15 - v] = -C[v]) and the stored code is already in
    sign-magnitude form (codec.packing.sign_magnitude): bit 3 set = positive, bits 0-2 = the
    index m into the 8 magnitudes M[i] = C[8 + i]. `prmt` picks 4 bytes out of 8 by the 4
    nibbles of its selector: one prmt looks up the low bytes of 4 magnitudes, one the high
    bytes (the tables are immediates), one builds the sign bytes (prmt's sign-replicate mode
    copies bit 7 of the selected byte), then two prmts interleave low/high bytes into 16-bit
    values. About 12 instructions per 8 values, registers only: no gather through L1.
    Returns None when the codebook is not 16 levels or not exactly symmetric in `dtype`."""
    if centroids.numel() != 16 or dtype not in (torch.float16, torch.bfloat16):
        return None
    bits = centroids.detach().cpu().to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF
    if not all(int(bits[15 - v]) == int(bits[v]) ^ 0x8000 for v in range(8)):
        return None
    mag = [int(bits[8 + i]) for i in range(8)]
    if any(m & 0x8000 for m in mag):
        return None

    def word(vals):
        return sum(v << (8 * i) for i, v in enumerate(vals))

    lo0, lo1 = word([m & 0xFF for m in mag[:4]]), word([m & 0xFF for m in mag[4:]])
    hi0, hi1 = word([m >> 8 for m in mag[:4]]), word([m >> 8 for m in mag[4:]])
    # Nibble order of the input word: [lo0, hi0, lo1, hi1, lo2, hi2, lo3, hi3] (coordinate j
    # of the low half, coordinate j of the high half, ...), kept through the lookups; the
    # interleaving prmts (0x6240 / 0x7351) split it back into the two halves.
    return f"""{{
.reg .b32 r4, m, mb, la, ha, lb, hb, sa, sb, t0, t1, t2, t3;
mov.b32 t0, {lo0:#010x};
mov.b32 t1, {lo1:#010x};
mov.b32 t2, {hi0:#010x};
mov.b32 t3, {hi1:#010x};
shl.b32 r4, $4, 4;
and.b32 m, $4, 0x77777777;
shr.b32 mb, m, 16;
prmt.b32 la, t0, t1, m;
prmt.b32 ha, t2, t3, m;
prmt.b32 sa, r4, $4, 0xD9C8;
not.b32 sa, sa;
and.b32 sa, sa, 0x80808080;
or.b32 ha, ha, sa;
prmt.b32 lb, t0, t1, mb;
prmt.b32 hb, t2, t3, mb;
prmt.b32 sb, r4, $4, 0xFBEA;
not.b32 sb, sb;
and.b32 sb, sb, 0x80808080;
or.b32 hb, hb, sb;
prmt.b32 $0, la, ha, 0x6240;
prmt.b32 $1, lb, hb, 0x6240;
prmt.b32 $2, la, ha, 0x7351;
prmt.b32 $3, lb, hb, 0x7351;
}}"""


def unused_arg(params, device) -> torch.Tensor:
    """The tensor a launcher passes for a pointer the kernel does not read (no window side, no
    deq copy): one fixed, 16-byte aligned buffer, not a slice of a live tensor, whose
    alignment would change with the batch and make Triton compile another variant."""
    return cached(params, ("unused", str(device)),
                  lambda: torch.zeros(4, dtype=torch.int32, device=device))


def cached(params, key, make):
    """Per-params cache of small derived device tensors (rotation in a dtype, pair tables)."""
    store = params.__dict__.setdefault("_derived", {})
    if key not in store:
        store[key] = make()
    return store[key]


def page_layout_ok(kv_cache: torch.Tensor) -> bool:
    """True if every block of `kv_cache` [num_blocks, block_size, Hkv, slot_bytes] is one dense
    run of block_size * Hkv * slot_bytes bytes starting at data_ptr + n * stride(0): any order
    of the last three dims (vLLM 0.32 hands a transposed view), any block stride."""
    expect = 1
    for i in sorted(range(1, 4), key=lambda i: kv_cache.stride(i)):
        if kv_cache.shape[i] > 1 and kv_cache.stride(i) != expect:
            return False
        expect *= kv_cache.shape[i]
    return kv_cache.shape[0] <= 1 or kv_cache.stride(0) >= expect


def check_cache_alignment(kv_cache: torch.Tensor) -> None:
    """The kernels address a block as one dense page (docs/layout.md) and read its planes as
    4-byte words: dense blocks, 4-byte aligned base and block stride."""
    if not page_layout_ok(kv_cache):
        raise ValueError(f"kv_cache blocks must be dense pages (strides {kv_cache.stride()} "
                         f"for shape {tuple(kv_cache.shape)})")
    if kv_cache.data_ptr() % 4 or kv_cache.stride(0) % 4:
        raise ValueError("kv_cache base and block stride must be multiples of 4 bytes")


_PAGE_ALIGN: dict = {}


def page_align(kv_cache: torch.Tensor, layout: SlotLayout) -> int:
    """Validate a cache for the kernels (check_cache_alignment) and return the byte alignment
    (16 or 4) they may assume for every token's code rows: 16 when the base, block stride,
    per-head plane and code widths are multiples of 16 (then rows load as 16-byte vectors),
    else 4. Every launch calls it: memoized per (pointer, shape, strides, layout), since the
    stride checks cost ~7 us of Python per call on our CI CPU."""
    key = (kv_cache.data_ptr(), kv_cache.shape, kv_cache.stride(), layout)
    align = _PAGE_ALIGN.get(key)
    if align is None:
        check_cache_alignment(kv_cache)
        bs = kv_cache.shape[1]
        sizes = (kv_cache.data_ptr(), kv_cache.stride(0), bs * layout.slot_bytes,
                 layout.v_codes_offset, layout.k_scale_offset - layout.v_codes_offset)
        align = 16 if all(x % 16 == 0 for x in sizes) else 4
        if len(_PAGE_ALIGN) >= 1024:        # tests make many caches; serving, a few
            _PAGE_ALIGN.clear()
        _PAGE_ALIGN[key] = align
    return align


def _plane_cuts(layout: SlotLayout) -> tuple[int, int, int, int]:
    """Slot byte offsets where the page's three planes start, and the slot's end."""
    return (0, layout.v_codes_offset, layout.k_scale_offset, layout.slot_bytes)


def page_planes(kv_cache: torch.Tensor, layout: SlotLayout):
    """The three planes of a paged cache (docs/layout.md) as uint8 views, each
    [num_blocks, Hkv, block_size, width]: key codes (width v_codes_offset), value codes
    (k_scale_offset - v_codes_offset) and the scale word + padding (slot_bytes -
    k_scale_offset). Block n, head h is one run of block_size * slot_bytes bytes: all its
    tokens' key codes, then their value codes, then their scale words."""
    nb, bs, hkv, sb = kv_cache.shape
    if sb != layout.slot_bytes:
        raise ValueError(f"kv_cache slot bytes {sb} != the layout's {layout.slot_bytes}")
    if not page_layout_ok(kv_cache):
        raise ValueError("kv_cache blocks must be dense pages")
    cuts = _plane_cuts(layout)
    return tuple(kv_cache.as_strided((nb, hkv, bs, b - a), (kv_cache.stride(0), bs * sb, b - a, 1),
                                     kv_cache.storage_offset() + bs * a)
                 for a, b in zip(cuts, cuts[1:]))


def read_slots(kv_cache: torch.Tensor, layout: SlotLayout, blocks: torch.Tensor,
               rows: torch.Tensor) -> torch.Tensor:
    """Slots of tokens (block ids [n], rows in block [n], int64) -> uint8 [n, Hkv, slot_bytes]
    in the codec's slot order (docs/layout.md, "One slot")."""
    return torch.cat([p[blocks, :, rows] for p in page_planes(kv_cache, layout)], dim=-1)


def write_slots(kv_cache: torch.Tensor, layout: SlotLayout, blocks: torch.Tensor,
                rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Inverse of read_slots: slots uint8 [n, Hkv, slot_bytes] into their pages, in place."""
    cuts = _plane_cuts(layout)
    for plane, a, b in zip(page_planes(kv_cache, layout), cuts, cuts[1:]):
        plane[blocks, :, rows] = slots[..., a:b]


_SMS: dict = {}


def _num_sms(device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's tests)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device,
                       block_n: int = 64) -> int:
    """Enough (sequence, KV head, split) programs to fill the GPU ~4 times over, but no split
    shorter than 4 tiles. Depends only on shapes (no host sync), so CUDA graphs can capture."""
    target = 4 * _num_sms(device)
    splits = -(-target // max(1, batch * num_kv_heads))
    splits = min(splits, max(1, -(-max_context // (4 * block_n))), 64)
    return max(1, splits)
