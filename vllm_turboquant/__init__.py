"""vllm-turboquant: TurboQuant KV-cache compression as a vLLM plugin.

Layers (each importable without the ones after it):
  vllm_turboquant.codec    pure PyTorch codec, presets, packed layout
  vllm_turboquant.kernels  Triton kernels and their launchers (top-level kernels/ folder)
  vllm_turboquant.plugin   vLLM registration, attention backend, metrics
"""

__version__ = "0.1.0"
