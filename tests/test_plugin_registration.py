"""Plugin registration against the installed vLLM (0.32 CPU in CI): idempotence, the dtype
names vLLM accepts, version gating. No model is loaded."""

from __future__ import annotations

import logging
import typing

import pytest

vllm = pytest.importorskip("vllm")

from vllm_turboquant import compat, plugin, settings  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert plugin.register()


def _wrapped_depth(fn) -> int:
    """How many of our wrappers are stacked on `fn` (closures named `original`)."""
    depth = 0
    fn = getattr(fn, "__func__", fn)
    while getattr(fn, "_tq_wrapped", False):
        depth += 1
        cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))
        fn = getattr(cells["original"].cell_contents, "__func__", cells["original"].cell_contents)
    return depth


def test_register_is_idempotent():
    from vllm.config.cache import CacheDType
    from vllm.platforms import current_platform

    before = typing.get_args(CacheDType)
    for _ in range(3):
        assert plugin.register()
        # also when the module-level guard is bypassed (a re-imported plugin module)
        compat.apply_patches()
    assert typing.get_args(CacheDType) == before
    for name in settings.kv_cache_dtypes():
        assert before.count(name) == 1
    platform_cls = type(current_platform)
    assert _wrapped_depth(platform_cls.__dict__["get_attn_backend_cls"]) == 1
    assert _wrapped_depth(platform_cls.__dict__["check_and_update_config"]) == 1
    assert {"kv-cache dtype names", "attention backend routing",
            "startup validation"} <= compat.applied()


def test_worker_patches_are_idempotent():
    from vllm.v1.worker.cpu_worker import CPUWorker

    for _ in range(2):
        compat.apply_worker_patches()
    assert _wrapped_depth(CPUWorker.__dict__["determine_available_memory"]) == 1


def test_cache_config_accepts_our_names_and_still_rejects_others():
    from pydantic import ValidationError
    from vllm.config import CacheConfig

    for name in settings.kv_cache_dtypes():
        assert CacheConfig(cache_dtype=name).cache_dtype == name
    assert CacheConfig(cache_dtype="turboquant_4bit_nc").cache_dtype == "turboquant_4bit_nc"
    with pytest.raises(ValidationError):
        CacheConfig(cache_dtype="tq-bogus")


def test_cli_choices_include_our_names():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    for name in ("turboquant", "tq-k3v3", "auto", "fp8", "turboquant_4bit_nc"):
        assert parser.parse_args(["--kv-cache-dtype", name]).kv_cache_dtype == name
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "tq-bogus"])


def test_our_names_map_to_a_uint8_cache():
    import torch
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    for name in settings.kv_cache_dtypes():
        assert STR_DTYPE_TO_TORCH_DTYPE[name] is torch.uint8


def test_custom_backend_enum_points_at_our_backend():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_turboquant.backend.attention import TurboQuantBackend

    assert AttentionBackendEnum.CUSTOM.get_class() is TurboQuantBackend
    assert AttentionBackendEnum[TurboQuantBackend.get_name()] is AttentionBackendEnum.CUSTOM


@pytest.mark.parametrize("version,ok", [
    ("0.25.0", True), ("0.25.1.dev12+gabc", True), ("0.32.0", True), ("0.32.0+cpu", True),
    ("0.24.9", False), ("0.30.1", False), ("1.0.0", False), ("dev", False),
])
def test_version_gate(version, ok):
    if ok:
        compat.check_version(version)
    else:
        with pytest.raises(compat.UnsupportedVLLMVersion, match=r"0\.25\.x and 0\.32\.x.*"
                           + version.replace(".", r"\.").replace("+", r"\+")):
            compat.check_version(version)


def test_unsupported_version_logs_and_changes_nothing(monkeypatch, caplog):
    monkeypatch.setattr(compat, "vllm_version", lambda: "0.30.0")
    monkeypatch.setattr(plugin, "_registered", False)
    applied = compat.applied()
    with caplog.at_level(logging.ERROR, logger="vllm.turboquant"):
        assert plugin.register() is False
    assert "installed vLLM is 0.30.0" in caplog.text
    assert compat.applied() == applied


def test_patch_table_documents_every_patch():
    names = {p.name for p in compat.PATCHES}
    assert compat.applied() <= names
    for p in compat.PATCHES:
        assert p.why and p.how and p.removal and p.versions and p.target


def test_compat_doc_lists_every_patch():
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "compat.md").read_text()
    for p in compat.PATCHES:
        assert f"| {p.name} |" in doc, p.name


def test_entry_point_shim(tmp_path):
    dist = plugin.write_entry_point_shim(tmp_path)
    text = (dist / "entry_points.txt").read_text()
    assert "[vllm.general_plugins]" in text
    assert "turboquant = vllm_turboquant.plugin:register" in text
