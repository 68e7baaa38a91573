"""The codec (pure torch): error per bit width, packing, determinism, rotation, bad input,
config errors, and the bytes every preset stores. CPU, a few seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_turboquant.codec import (DEFAULT_PRESET, PRESETS, SlotLayout, TQConfig, TQLayerCodec,
                                   codebook, expected_mse, pack_codes, rotation,
                                   rotation_matrix, sign_magnitude, unpack_codes)

# TurboQuant (Zandieh et al.), Theorem 1 / Table: MSE of a unit vector at b bits, d large.
PAPER_MSE = {1: 0.36, 2: 0.117, 3: 0.03, 4: 0.009}


def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", ["lsq", "norm"])
def test_mse_per_bit_width_matches_paper(bits, scale):
    """Encode + decode 4096 random unit vectors (d = 128) through packed slots."""
    x = _unit(4096, 128)
    codec = TQLayerCodec(TQConfig("t", key_bits=bits, value_bits=bits, scale=scale), 128, 3)
    k, v = codec.decode(codec.encode(x, x))
    mse_k = float(((k - x) ** 2).sum(-1).mean())
    mse_v = float(((v - x) ** 2).sum(-1).mean())
    assert mse_k == pytest.approx(mse_v, rel=1e-6)  # keys and values share the quantizer
    # The Lloyd-Max figure for the exact coordinate density (the paper rounds it)...
    assert mse_k == pytest.approx(expected_mse(128, bits), rel=0.03 if scale == "lsq" else 0.12)
    # ...and the paper's own numbers (3 bits: 0.034 exact vs 0.03 printed).
    assert mse_k == pytest.approx(PAPER_MSE[bits], rel=0.15)
    if scale == "lsq":  # least-squares scale never does worse than the codebook alone
        assert mse_k <= expected_mse(128, bits) * 1.01


def test_more_bits_less_error():
    x = _unit(1024, 64)
    errs = []
    for b in range(1, 7):
        c = TQLayerCodec(TQConfig("t", key_bits=b, value_bits=b), 64, 0)
        errs.append(float(((c.decode(c.encode(x, x))[0] - x) ** 2).sum(-1).mean()))
    assert all(a > 3 * b for a, b in zip(errs, errs[1:])), errs  # ~4x per bit
    assert errs[-1] < 1e-3


@pytest.mark.parametrize("bits", list(range(1, 9)))
@pytest.mark.parametrize("d", [16, 64, 128, 256])
def test_pack_unpack_round_trip(bits, d):
    g = torch.Generator().manual_seed(bits * 1000 + d)
    codes = torch.randint(0, 1 << bits, (5, 3, d), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 3, d * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, d), codes)
    assert torch.equal(pack_codes(unpack_codes(packed, bits, d), bits), packed)


def test_four_bit_plane_layout():
    """docs/layout.md: for 4 bits, byte j = s[j] | s[j + D/2] << 4, s = the sign-magnitude
    code: index v >= 8 stays v, v < 8 becomes 7 - v (bit 3 = sign, bits 0-2 = |level| rank)."""
    d = 64
    codes = torch.arange(d) % 16
    packed = pack_codes(codes, 4)
    stored = torch.where(codes >= 8, codes, 7 - codes)
    expect = (stored[:d // 2] | (stored[d // 2:] << 4)).to(torch.uint8)
    assert torch.equal(packed, expect)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sign_magnitude_code_reads_the_level_magnitude(bits):
    """The stored code's low bits index |C| from the center out; its top bit is the sign."""
    cb = codebook.lloyd_max_codebook(128, bits)[0]
    half = 1 << (bits - 1)
    v = torch.arange(1 << bits)
    s = sign_magnitude(v, bits)
    assert torch.equal(sign_magnitude(s, bits), v)                 # its own inverse
    mags = cb[half:]                                               # |C| ascending
    assert torch.allclose(cb[v].abs(), mags[s % half])
    assert torch.equal(cb[v] > 0, s >= half)


_ENCODE_SNIPPET = """
import hashlib, torch
from vllm_turboquant.codec import TQConfig, TQLayerCodec
for kb, vb, qjl, d in [(4, 4, False, 128), (3, 3, False, 64), (5, 3, True, 64)]:
    g = torch.Generator().manual_seed(1234)
    k = torch.randn(2, 3, 17, d, generator=g) * 3
    v = torch.randn(2, 3, 17, d, generator=g)
    codec = TQLayerCodec(TQConfig("t", key_bits=kb, value_bits=vb, key_qjl=qjl), d, 5)
    print(hashlib.sha256(codec.encode(k, v).numpy().tobytes()).hexdigest())
"""


def test_encoded_bytes_deterministic_across_fresh_codecs():
    """The same input gives the same bytes from a fresh codec (caches cleared) and from a
    fresh process: the cache is written by one process and read by another."""
    def run_here() -> list[str]:
        out = []
        exec(_ENCODE_SNIPPET.replace("print(", "out.append("), {"out": out})
        return out

    first = run_here()
    assert len(set(first)) == 3
    rotation_matrix.cache_clear()
    codebook.lloyd_max_codebook.cache_clear()
    assert run_here() == first
    proc = subprocess.run([sys.executable, "-c", _ENCODE_SNIPPET], capture_output=True,
                          text=True, timeout=120, cwd=str(Path(__file__).parent.parent))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == first


@pytest.mark.parametrize("d", [64, 128, 256, 80])
def test_rotation_orthogonal_per_layer_and_seeded(d):
    r = rotation_matrix(d, 11, 0)
    assert r.shape == (d, d) and r.dtype == torch.float32
    assert torch.allclose(r @ r.T, torch.eye(d), atol=1e-5)
    assert torch.equal(rotation_matrix(d, 11, 0), r)  # same seed, same layer: same matrix
    assert not torch.allclose(rotation_matrix(d, 11, 1), r)  # other layer: other signs
    assert not torch.allclose(rotation_matrix(d, 12, 0), r)  # other seed: other signs
    # Scores are preserved: q.k == (q R^T).(k R^T)
    q, k = torch.randn(4, d), torch.randn(4, d)
    assert torch.allclose((q @ r.T) @ (k @ r.T).T, q @ k.T, atol=1e-4)


def test_rotation_matches_fresh_signs():
    """Fresh computation (cache cleared) equals the cached one: no hidden global RNG use."""
    r = rotation_matrix(128, 20260423, 7).clone()
    torch.manual_seed(999)  # the global RNG must not matter
    rotation_matrix.cache_clear()
    assert torch.equal(rotation_matrix(128, 20260423, 7), r)
    assert torch.equal(rotation.layer_signs(128, 20260423, 7).abs(), torch.ones(128))


@pytest.mark.parametrize("qjl", [False, True])
def test_non_finite_input_stored_as_zero_without_touching_neighbours(qjl):
    codec = TQLayerCodec(TQConfig("t", key_bits=4, value_bits=4, key_qjl=qjl), 64, 0)
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(6, 64, generator=g), torch.randn(6, 64, generator=g)
    clean = codec.encode(k, v)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[1, 5] = float("nan")
    bad_k[3, 0] = float("inf")
    bad_v[4, 63] = float("-inf")
    slots = codec.encode(bad_k, bad_v)
    good = [0, 2, 5]
    assert torch.equal(slots[good], clean[good])  # other tokens: bit-identical
    kd, vd = codec.decode(slots)
    assert torch.isfinite(kd).all() and torch.isfinite(vd).all()
    assert torch.equal(kd[1], torch.zeros(64)) and torch.equal(kd[3], torch.zeros(64))
    assert torch.equal(vd[4], torch.zeros(64))
    # The finite half of a token with one bad half is kept.
    assert torch.allclose(vd[1], codec.decode(clean)[1][1])
    if qjl:
        q = torch.randn(2, 64)
        assert torch.isfinite(codec.qjl_score_correction(q, slots)).all()


def test_huge_but_finite_values_do_not_overflow_the_fp16_scale():
    codec = TQLayerCodec(TQConfig("t"), 64, 0)
    k = torch.randn(3, 64) * 1e6
    kd, _ = codec.decode(codec.encode(k, torch.randn(3, 64)))
    assert torch.isfinite(kd).all()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        TQConfig.from_name("turbo-nonexistent")
    for name in PRESETS:
        assert name in str(err.value)


@pytest.mark.parametrize("field,value,needle", [
    ("key_bits", 0, "key_bits"), ("key_bits", 9, "key_bits"), ("value_bits", 16, "value_bits"),
    ("window", -1, "window"), ("sink_tokens", -2, "sink_tokens"), ("scale", "max", "scale"),
])
def test_bad_config_values_are_named(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TQConfig("x", **{field: value})


def test_bad_head_size_is_explained():
    with pytest.raises(ValueError, match="multiple of 16"):
        SlotLayout(100, 4, 4)
    with pytest.raises(ValueError, match="multiple of 16"):
        TQLayerCodec(TQConfig("x"), 72, 0)


def test_default_preset_exists_and_is_servable():
    cfg = TQConfig.from_name(DEFAULT_PRESET)
    assert cfg.name == DEFAULT_PRESET
    # The vLLM backend cannot serve attention sinks or QJL sketches.
    for p in PRESETS.values():
        assert p.sink_tokens == 0 and not p.key_qjl, p
        assert not p.name.startswith("turboquant_")  # vLLM's own names


def test_from_name_overrides():
    cfg = TQConfig.from_name(DEFAULT_PRESET, window=0, value_bits=2)
    assert cfg.window == 0 and cfg.value_bits == 2
    assert PRESETS[DEFAULT_PRESET].value_bits != 2  # the preset itself is untouched


# Bytes per token and KV head: (packed slot, everything stored at 8K context incl. the bf16
# window), per preset and head size. Update together with PRESETS and README's table.
EXPECTED_BYTES = {
    #              head 64      head 128      head 256
    "turboquant": {64: (68, 70), 128: (132, 136), 256: (260, 268)},
    "tq-sliding": {64: (68, 70), 128: (132, 136), 256: (260, 268)},
    "tq-k4v4":    {64: (68, 68), 128: (132, 132), 256: (260, 260)},
    "tq-k3v3":    {64: (52, 54), 128: (100, 104), 256: (196, 204)},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_BYTES))
@pytest.mark.parametrize("head", [64, 128, 256])
def test_bytes_per_token_table(name, head):
    cfg = PRESETS[name]
    slot, stored = EXPECTED_BYTES[name][head]
    assert cfg.layout(head).slot_bytes == slot
    assert cfg.bytes_per_token(head, num_kv_heads=8) == 8 * slot
    assert cfg.stored_bytes_per_token(head, 8192) == pytest.approx(stored)
    assert cfg.compression_vs(head, 8192) == pytest.approx(4 * head / stored)


def test_table_covers_every_preset_and_targets_hold():
    assert set(EXPECTED_BYTES) == set(PRESETS)
    # Issue 2's byte budgets, head 128 at 8K context, every byte counted.
    assert PRESETS[DEFAULT_PRESET].compression_vs(128, 8192) >= 3.75
    assert PRESETS["tq-k3v3"].compression_vs(128, 8192) >= 4.9


def test_slot_layout_offsets_are_consistent():
    for cfg in PRESETS.values():
        for head in (64, 128, 256):
            lay = cfg.layout(head)
            assert lay.slot_bytes % 4 == 0
            assert lay.k_code_bytes == head * cfg.key_bits // 8
            assert lay.v_codes_offset == lay.k_code_bytes + lay.qjl_bytes
            assert lay.k_scale_offset == lay.v_codes_offset + lay.v_code_bytes
            assert lay.v_scale_offset + 2 <= lay.slot_bytes
    qjl = SlotLayout(128, 4, 4, key_qjl=True)
    assert qjl.qjl_bytes == 128 // 8 + 2 and qjl.slot_bytes == 152


def test_qjl_correction_estimates_the_key_residual_without_bias():
    """The QJL sketch estimates q . (k - k^) (k^ = the codebook key) without bias:
    E[estimate | true residual] = true residual, so regressing the estimate on the true
    residual score gives slope ~1, and the correlation is clearly positive (the estimate is
    noisy, a single 1-bit sketch). A wrong sign, norm or constant breaks either."""
    codec = TQLayerCodec(TQConfig("t", key_bits=3, value_bits=3, key_qjl=True), 128, 2)
    gen = torch.Generator().manual_seed(7)
    k = torch.randn(256, 128, generator=gen)
    q = torch.randn(64, 128, generator=gen)
    slots = codec.encode(k, torch.zeros_like(k))
    k_hat, _ = codec.decode(slots)
    resid = q @ (k - k_hat).T                                  # [64, 256] true residual scores
    est = codec.qjl_score_correction(q, slots)
    x, y = resid.flatten().double(), est.flatten().double()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    corr = torch.corrcoef(torch.stack([x, y]))[0, 1]
    assert 0.8 < slope < 1.25, slope
    assert corr > 0.4, corr
