"""How the preset is chosen (settings.py): pure Python, no vLLM."""

from __future__ import annotations

import pytest
import torch

from vllm_turboquant import settings
from vllm_turboquant.codec import DEFAULT_PRESET, PRESETS, TQConfig
from vllm_turboquant.settings import TurboQuantConfigError, resolve

NO_ENV: dict[str, str] = {}


def test_dtype_names_are_turboquant_and_the_presets_never_vllms_own():
    names = settings.kv_cache_dtypes()
    assert names[0] == "turboquant"
    assert set(names) == {"turboquant", *PRESETS}
    assert not any(n.startswith("turboquant_") for n in names)
    assert len(set(names)) == len(names)


def test_generic_dtype_uses_the_default_preset():
    assert resolve("turboquant", None, NO_ENV) == PRESETS[DEFAULT_PRESET]


def test_named_dtype_fixes_the_preset_even_with_env():
    assert resolve("tq-k3v3", {}, {"VLLM_TURBOQUANT_PRESET": "tq-k4v4"}) == PRESETS["tq-k3v3"]


def test_env_picks_the_preset_for_the_generic_dtype():
    assert resolve("turboquant", {}, {"VLLM_TURBOQUANT_PRESET": "tq-k3v3"}) == PRESETS["tq-k3v3"]


def test_additional_config_wins_over_env():
    cfg = resolve("turboquant", {"turboquant": {"preset": "tq-k4v4"}},
                  {"VLLM_TURBOQUANT_PRESET": "tq-k3v3"})
    assert cfg == PRESETS["tq-k4v4"]


def test_additional_config_as_plain_preset_name():
    assert resolve("turboquant", {"turboquant": "tq-k3v3"}, NO_ENV) == PRESETS["tq-k3v3"]


def test_overrides_apply_on_top_of_the_preset():
    cfg = resolve("tq-k3v3", {"turboquant": {"window": 64, "value_bits": 4}}, NO_ENV)
    assert (cfg.key_bits, cfg.value_bits, cfg.window) == (3, 4, 64)
    assert cfg.seed == PRESETS["tq-k3v3"].seed


@pytest.mark.parametrize("source,kwargs", [
    ("additional_config", dict(additional_config={"turboquant": {"preset": "tq-bogus"}},
                               environ=NO_ENV)),
    ("VLLM_TURBOQUANT_PRESET", dict(additional_config=None,
                                    environ={"VLLM_TURBOQUANT_PRESET": "tq-bogus"})),
])
def test_unknown_preset_lists_the_valid_ones(source, kwargs):
    with pytest.raises(TurboQuantConfigError) as e:
        resolve("turboquant", **kwargs)
    msg = str(e.value)
    assert "unknown TurboQuant preset 'tq-bogus'" in msg
    assert source in msg
    for name in PRESETS:
        assert name in msg


def test_unknown_key_lists_the_valid_keys():
    with pytest.raises(TurboQuantConfigError, match=r"unknown key\(s\) \['bits'\].*'preset'"):
        resolve("turboquant", {"turboquant": {"bits": 3}}, NO_ENV)


def test_conflicting_preset_and_named_dtype():
    with pytest.raises(TurboQuantConfigError, match="fixes the preset"):
        resolve("tq-k3v3", {"turboquant": {"preset": "tq-k4v4"}}, NO_ENV)


def test_bad_override_value_is_reported_with_the_preset():
    with pytest.raises(TurboQuantConfigError, match="key_bits must be one of"):
        resolve("turboquant", {"turboquant": {"key_bits": 9}}, NO_ENV)


def test_not_our_dtype():
    with pytest.raises(TurboQuantConfigError, match="not a TurboQuant kv-cache dtype"):
        resolve("fp8", None, NO_ENV)


def test_evaluator_only_features_are_refused():
    with pytest.raises(TurboQuantConfigError, match="sink_tokens=4.*evaluator-only"):
        settings.check_servable(TQConfig("x", sink_tokens=4))
    with pytest.raises(TurboQuantConfigError, match="key_qjl.*evaluator-only"):
        settings.check_servable(TQConfig("x", key_qjl=True))
    for preset in PRESETS.values():
        if not preset.sink_tokens and not preset.key_qjl:
            settings.check_servable(preset)


def test_head_size_refusal_names_the_served_sizes():
    settings.check_head_size(128)
    with pytest.raises(TurboQuantConfigError, match=r"\[64, 128, 256\].*head size 96"):
        settings.check_head_size(96)


def test_active_preset_follows_the_latest_resolution():
    settings.activate(PRESETS["tq-k3v3"])
    assert settings.active() is PRESETS["tq-k3v3"]
    settings.activate(PRESETS[DEFAULT_PRESET])
    assert settings.active() is PRESETS[DEFAULT_PRESET]


def test_unverified_bits_on_cuda_refused_for_head_sizes_other_than_64(monkeypatch):
    """3-bit codes at head 128 gave wrong prefill output on the H200 (2026-12-02): refused at
    startup with the way out; 4-bit presets (window or not), CPU and head 64 pass."""
    monkeypatch.delenv("VLLM_TURBOQUANT_ALLOW_UNVERIFIED", raising=False)
    default, k3 = PRESETS[DEFAULT_PRESET], PRESETS["tq-k3v3"]
    assert default.window > 0 and (default.key_bits, default.value_bits) == (4, 4)
    with pytest.raises(TurboQuantConfigError, match=r"K3/V3.*head size 128.*tq-k4v4"):
        settings.check_verified_on_gpu(k3, 128, on_cuda=True)
    with pytest.raises(TurboQuantConfigError, match=r"head size 256"):
        settings.check_verified_on_gpu(k3, 256, on_cuda=True)
    settings.check_verified_on_gpu(k3, 64, on_cuda=True)
    settings.check_verified_on_gpu(k3, 128, on_cuda=False)
    for head in (64, 128, 256):
        settings.check_verified_on_gpu(default, head, on_cuda=True)
        settings.check_verified_on_gpu(PRESETS["tq-k4v4"], head, on_cuda=True)
    # fp32 models take the generic table path, unverified with a window at head 128
    with pytest.raises(TurboQuantConfigError, match=r"fp16/bf16 models only.*float32"):
        settings.check_verified_on_gpu(default, 128, on_cuda=True, model_dtype=torch.float32)
    settings.check_verified_on_gpu(default, 128, on_cuda=True, model_dtype=torch.bfloat16)
    settings.check_verified_on_gpu(PRESETS["tq-k4v4"], 128, on_cuda=True,
                                   model_dtype=torch.float32)
    monkeypatch.setenv("VLLM_TURBOQUANT_ALLOW_UNVERIFIED", "1")
    settings.check_verified_on_gpu(k3, 128, on_cuda=True)
