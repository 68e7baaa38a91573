# vllm-turboquant on the official vLLM OpenAI server image (CUDA).
#
#   docker build -t vllm-turboquant:0.25.0 .
#   docker run --gpus all --ipc=host -p 8000:8000 vllm-turboquant:0.25.0 \
#       HuggingFaceTB/SmolLM2-135M-Instruct --kv-cache-dtype turboquant
#
# The entrypoint is `vllm serve` (set below, as in the base image), so container arguments
# are `vllm serve` arguments.
# /metrics and /v1/turboquant/stats are served on the same port as the OpenAI API.
# VLLM_VERSION must be a vLLM version vllm_turboquant/compat.py supports on CUDA
# (tests/test_deploy.py checks it).
ARG VLLM_VERSION=0.25.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# The plugin is pure Python + Triton; the image already has torch, vLLM and Triton, so no
# dependency is (re)installed: --no-deps keeps the image's CUDA builds untouched.
WORKDIR /opt/vllm-turboquant
COPY pyproject.toml README.md ./
COPY vllm_turboquant ./vllm_turboquant
COPY kernels ./kernels
RUN (uv pip install --system --no-deps --no-cache . \
     || python3 -m pip install --no-deps --no-cache-dir .) \
    && python3 -c "import importlib.metadata as m, vllm, vllm_turboquant; \
eps = {e.group for e in m.entry_points() if e.value.startswith('vllm_turboquant')}; \
assert {'vllm.general_plugins', 'vllm.stat_logger_plugins'} <= eps, eps"

# Non-root: vLLM needs no privileges; caches (Hugging Face, torch.compile, Triton) go to the
# user's home, which a volume can back: -v hf-cache:/home/vllm/.cache
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin vllm \
    && mkdir -p /home/vllm/.cache && chown -R vllm:vllm /home/vllm/.cache
USER vllm
WORKDIR /home/vllm
ENV HF_HOME=/home/vllm/.cache/huggingface \
    VLLM_PORT_HEALTHCHECK=8000

EXPOSE 8000
ENTRYPOINT ["vllm", "serve"]
# Loading and compiling a model takes minutes: the start period covers it. The check uses
# Python (always in the image) rather than curl. Set VLLM_PORT_HEALTHCHECK with --port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('VLLM_PORT_HEALTHCHECK', '8000') + '/health', timeout=4)" || exit 1
