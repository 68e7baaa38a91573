"""The GPU suite's own plumbing, checked on the CPU (the GPU tests themselves need a device).

On 2026-12-07 `tests/gpu/test_vllm_gpu.py` errored on the device before starting any engine:
it asked for the default model, whose PyPI package the GPU bundle does not carry; the bundle
names its model folder in $TQ_MODEL.
"""

import importlib.util
from pathlib import Path

import pytest

GPU_TESTS = Path(__file__).resolve().parent / "gpu" / "test_vllm_gpu.py"


def _engine_tests():
    spec = importlib.util.spec_from_file_location("engine_tests", GPU_TESTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_engine_tests_take_the_bundle_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert _engine_tests().model_path({"TQ_MODEL": str(tmp_path)}) == str(tmp_path)


def test_engine_tests_refuse_a_model_that_is_not_there(tmp_path):
    with pytest.raises(SystemExit, match="neither a Hugging Face folder nor a .gguf"):
        _engine_tests().model_path({"TQ_MODEL": str(tmp_path / "missing")})
