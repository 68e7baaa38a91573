"""Backend routing and startup refusals with fake configs (no model).

Our dtypes go to the TurboQuant backend; every other dtype gets exactly what the platform
chose before the plugin; what the backend cannot serve is refused with a message that names
the problem and the way out."""

from __future__ import annotations

import types

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm_turboquant import compat, plugin, settings  # noqa: E402
from vllm_turboquant.codec import PRESETS  # noqa: E402
from vllm_turboquant.settings import TurboQuantConfigError  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert plugin.register()


def _selector(kv_cache_dtype, **kw):
    from vllm.v1.attention.selector import AttentionSelectorConfig
    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=kv_cache_dtype,
                block_size=None)
    base.update(kw)
    return AttentionSelectorConfig(**base)


def _select(cfg, selected=None):
    from vllm.platforms import current_platform
    return current_platform.get_attn_backend_cls(selected, attn_selector_config=cfg)


def _original_select(cfg, selected=None):
    from vllm.platforms import current_platform
    wrapper = type(current_platform).__dict__["get_attn_backend_cls"].__func__
    cells = dict(zip(wrapper.__code__.co_freevars, wrapper.__closure__))
    return cells["original"].cell_contents(selected, cfg)


@pytest.mark.parametrize("name", settings.kv_cache_dtypes())
def test_our_dtypes_select_our_backend(name):
    assert _select(_selector(name)) == compat.BACKEND_PATH
    assert _select(_selector(name, head_size=128)) == compat.BACKEND_PATH


@pytest.mark.parametrize("name", ["auto", "bfloat16", "fp8", "turboquant_4bit_nc"])
def test_other_dtypes_are_untouched(name):
    cfg = _selector(name)
    assert _select(cfg) == _original_select(cfg)
    assert _select(cfg) != compat.BACKEND_PATH


def test_explicit_attention_backend_is_overridden_for_our_dtype():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    assert _select(_selector("turboquant"), AttentionBackendEnum.CPU_ATTN) == compat.BACKEND_PATH


@pytest.mark.parametrize("kw,needle", [
    (dict(use_mla=True), "MLA"),
    (dict(attn_type="encoder_decoder"), "encoder / cross attention"),
    (dict(attn_type="encoder_only"), "encoder / cross attention"),
    (dict(has_sink=True), "attention sinks"),
    (dict(has_sliding_window=True), "sliding-window"),
    (dict(head_size=96), "head sizes [64, 128, 256]"),
    (dict(head_size=80), "head size 80"),
])
def test_unservable_layers_are_refused(kw, needle):
    with pytest.raises(TurboQuantConfigError) as e:
        _select(_selector("turboquant", **kw))
    assert needle in str(e.value)
    assert "--kv-cache-dtype" in str(e.value)


# -- startup validation (check_and_update_config) with fake VllmConfigs -------------------------
class FakeModel:
    use_mla = False
    is_encoder_decoder = False
    is_hybrid = False
    is_attention_free = False

    def __init__(self, head_size=64, sliding_window=None, **flags):
        self._head, self._sw = head_size, sliding_window
        self.__dict__.update(flags)

    def get_head_size(self):
        return self._head

    def get_sliding_window(self):
        return self._sw


def _fake_config(cache_dtype="turboquant", model=None, additional=None, skip=(), spec=None,
                 dcp=1, dbo=False, ubatch=1):
    return types.SimpleNamespace(
        cache_config=types.SimpleNamespace(cache_dtype=cache_dtype,
                                           kv_cache_dtype_skip_layers=list(skip)),
        model_config=model if model is not None else FakeModel(),
        additional_config=additional or {}, speculative_config=spec,
        parallel_config=types.SimpleNamespace(decode_context_parallel_size=dcp,
                                              enable_dbo=dbo, ubatch_size=ubatch))


def test_validation_resolves_and_activates_the_preset(monkeypatch):
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    cfg = compat.validate_vllm_config(_fake_config(additional={"turboquant": "tq-k3v3"}))
    assert cfg == PRESETS["tq-k3v3"]
    assert settings.active() == cfg
    assert compat.validate_vllm_config(_fake_config("auto")) is None


@pytest.mark.parametrize("kw,needle", [
    (dict(additional={"turboquant": {"preset": "nope"}}), "valid presets: "),
    (dict(model=FakeModel(use_mla=True)), "MLA"),
    (dict(model=FakeModel(is_encoder_decoder=True)), "encoder-decoder"),
    (dict(model=FakeModel(is_hybrid=True)), "hybrid"),
    (dict(model=FakeModel(sliding_window=4096)), "sliding-window attention (window 4096)"),
    (dict(model=FakeModel(head_size=96)), "head size 96"),
    (dict(skip=["0"]), "--kv-cache-dtype-skip-layers"),
    (dict(spec=object()), "speculative decoding"),
    (dict(dcp=2), "decode context parallelism"),
    (dict(dbo=True), "--enable-dbo"),
    (dict(ubatch=2), "micro-batching"),
])
def test_startup_refusals(kw, needle, monkeypatch):
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    with pytest.raises(TurboQuantConfigError) as e:
        compat.validate_vllm_config(_fake_config(**kw))
    assert needle in str(e.value)


def test_env_preset_error_at_startup(monkeypatch):
    monkeypatch.setenv(settings.ENV_PRESET, "tq-k9v9")
    with pytest.raises(TurboQuantConfigError, match="tq-k9v9.*VLLM_TURBOQUANT_PRESET.*valid"):
        compat.validate_vllm_config(_fake_config())


def test_vllm_config_refuses_a_bad_preset_through_the_platform_hook(monkeypatch):
    """The same check, reached the way vLLM reaches it: building a VllmConfig."""
    from vllm.config import CacheConfig, VllmConfig
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    # pydantic wraps the ValueError in its ValidationError (also a ValueError), message kept
    with pytest.raises(ValueError, match="unknown TurboQuant preset 'tq-bogus'.*valid presets"):
        VllmConfig(cache_config=CacheConfig(cache_dtype="turboquant"),
                   additional_config={"turboquant": {"preset": "tq-bogus"}})


def test_validation_refuses_unverified_bits_at_head_128_on_cuda(monkeypatch):
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    monkeypatch.delenv("VLLM_TURBOQUANT_ALLOW_UNVERIFIED", raising=False)
    cuda = _fake_config(model=FakeModel(head_size=128))
    cuda.device_config = types.SimpleNamespace(device_type="cuda")
    assert compat.validate_vllm_config(cuda) == PRESETS["turboquant"]   # 4-bit + window: ok
    monkeypatch.setenv(settings.ENV_PRESET, "tq-k3v3")
    with pytest.raises(TurboQuantConfigError, match="head size 128"):
        compat.validate_vllm_config(cuda)
    cpu = _fake_config(model=FakeModel(head_size=128))
    cpu.device_config = types.SimpleNamespace(device_type="cpu")
    assert compat.validate_vllm_config(cpu) == PRESETS["tq-k3v3"]


def test_batch_invariant_mode_needs_cuda(monkeypatch):
    """VLLM_BATCH_INVARIANT=1: served on CUDA (the kernels' invariant order), refused with the
    way out on CPU, whose torch references have no such order."""
    import vllm.envs as envs
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", True, raising=False)
    cuda, cpu = _fake_config(), _fake_config()
    cuda.device_config = types.SimpleNamespace(device_type="cuda")
    cpu.device_config = types.SimpleNamespace(device_type="cpu")
    assert compat.validate_vllm_config(cuda) == PRESETS["turboquant"]
    with pytest.raises(TurboQuantConfigError, match="VLLM_BATCH_INVARIANT.*Unset"):
        compat.validate_vllm_config(cpu)
    monkeypatch.setattr(envs, "VLLM_BATCH_INVARIANT", False, raising=False)
    assert compat.validate_vllm_config(cpu) == PRESETS["turboquant"]
    from vllm_turboquant.backend.attention import TurboQuantBackend
    assert TurboQuantBackend.supports_batch_invariance()


def test_vllm_config_refuses_batch_invariance_on_cpu(monkeypatch):
    """The CPU refusal reached the way vLLM reaches it (VllmConfig -> the platform hook)."""
    from vllm.config import CacheConfig, VllmConfig
    monkeypatch.delenv(settings.ENV_PRESET, raising=False)
    monkeypatch.setenv("VLLM_BATCH_INVARIANT", "1")
    with pytest.raises(ValueError, match="VLLM_BATCH_INVARIANT=1: the TurboQuant backend"):
        VllmConfig(cache_config=CacheConfig(cache_dtype="turboquant"))
