"""KV cache spec / page size per preset (no model): the page follows TQConfig's bytes per token,
on 0.32 through customize_spec and on 0.25 through the patched Attention.get_kv_cache_spec
(exercised here with a stand-in for 0.25's TQFullAttentionSpec); and the window buffers'
memory is taken out of the KV budget."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm_turboquant import compat, plugin, settings  # noqa: E402
from vllm_turboquant.codec import PRESETS  # noqa: E402

HEAD_SIZES = (64, 128, 256)


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert plugin.register()


@pytest.fixture(autouse=True)
def _restore_active():
    yield
    settings.activate(PRESETS[settings.DEFAULT_PRESET])


def _bf16_page(block, heads, head_size):
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head_size,
                             dtype=torch.bfloat16).page_size_bytes


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_customize_spec_page_follows_bytes_per_token(preset, head_size):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_turboquant.backend.attention import TurboQuantBackend

    config = settings.activate(PRESETS[preset])
    block, heads = 16, 3
    spec = FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=head_size,
                             dtype=torch.uint8)
    custom = TurboQuantBackend.customize_spec(spec)
    assert custom.page_size_bytes == block * config.bytes_per_token(head_size, heads)
    assert TurboQuantBackend.customize_spec(custom) == custom  # idempotent
    ratio = _bf16_page(block, heads, head_size) / custom.page_size_bytes
    want = 4 * head_size / config.layout(head_size).slot_bytes
    assert ratio == pytest.approx(want)
    if config.key_bits + config.value_bits <= 8:
        assert ratio >= 3.5


def test_kv_cache_shape_025_names_or_active_preset():
    from vllm_turboquant.backend.attention import TurboQuantBackend

    settings.activate(PRESETS["tq-k3v3"])
    slot3 = PRESETS["tq-k3v3"].layout(128).slot_bytes
    slot4 = PRESETS["tq-k4v4"].layout(128).slot_bytes
    assert TurboQuantBackend.get_kv_cache_shape(10, 16, 8, 128, "auto") == (10, 16, 8, slot3)
    assert TurboQuantBackend.get_kv_cache_shape(10, 16, 8, 128, "tq-k4v4") == (10, 16, 8, slot4)


@dataclasses.dataclass(frozen=True)
class FakeTQFullAttentionSpec:
    """The fields and page size of vLLM 0.25's TQFullAttentionSpec."""
    block_size: int
    num_kv_heads: int
    head_size: int
    head_size_v: int
    dtype: torch.dtype
    tq_slot_size: int

    @property
    def page_size_bytes(self):
        return self.block_size * self.num_kv_heads * self.tq_slot_size


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_025_attention_spec_patch(preset):
    config = PRESETS[preset]
    sentinel = object()
    spec_fn = compat.make_get_kv_cache_spec_025(lambda self, vc: sentinel,
                                                FakeTQFullAttentionSpec)
    vc = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=16))
    layer = types.SimpleNamespace(kv_cache_dtype=preset, num_kv_heads=8, head_size=128,
                                  kv_cache_torch_dtype=torch.uint8,
                                  impl=types.SimpleNamespace(config=config))
    spec = spec_fn(layer, vc)
    assert spec.page_size_bytes == 16 * config.bytes_per_token(128, 8)
    assert spec.dtype is torch.uint8
    layer.kv_cache_dtype = "auto"
    assert spec_fn(layer, vc) is sentinel


def _impl(window, rows=4, kv_heads=3, head_size=64, dtype=torch.bfloat16):
    from vllm_turboquant.backend.impl import TurboQuantImpl
    impl = object.__new__(TurboQuantImpl)
    impl.config = PRESETS["turboquant"].with_overrides(window=window)
    impl.rows, impl.num_kv_heads, impl.head_size = rows, kv_heads, head_size
    impl.model_dtype = dtype
    return impl


def test_window_bytes_formula():
    from vllm_turboquant.backend.state import side_bytes
    assert side_bytes(4, 0, 3, 64, torch.bfloat16) == 0
    # K and V rows in bf16 + int32 tags + int32 scale checks
    assert side_bytes(4, 16, 3, 64, torch.bfloat16) == 2 * 4 * 16 * 3 * 64 * 2 + 4 * 16 * 4 \
        + 4 * 16 * 3 * 4
    assert _impl(16).window_bytes() == side_bytes(4, 16, 3, 64, torch.bfloat16)


def test_kv_budget_is_reduced_by_the_window_buffers():
    impls = [_impl(16), _impl(16), _impl(0)]
    layers = {f"model.layers.{i}.self_attn.attn": types.SimpleNamespace(impl=impl)
              for i, impl in enumerate(impls)}
    layers["model.embed"] = types.SimpleNamespace()
    vc = types.SimpleNamespace(compilation_config=types.SimpleNamespace(
        static_forward_context=layers))
    reserve = compat.window_reserve_bytes(vc)
    assert reserve == 2 * impls[0].window_bytes() > 0

    worker = types.SimpleNamespace(vllm_config=vc)
    wrapped = compat.make_determine_available_memory(lambda self: 64 << 20)
    assert wrapped(worker) == (64 << 20) - reserve
    tiny = compat.make_determine_available_memory(lambda self: reserve)
    with pytest.raises(ValueError, match="window buffers need .* lower --max-num-seqs"):
        tiny(worker)
