"""The TurboQuant attention backend class: what vLLM asks before it builds anything.

vLLM picks it for our kv-cache dtypes (compat: backend routing) and sizes the paged cache from
it: one page = block_size tokens x num_kv_heads slots of ``SlotLayout.slot_bytes`` uint8 bytes
(docs/layout.md draws one slot). Head 64 at 4/4 bits: 68 B per token and KV head against 256 B
for bf16, so the planner fits 3.76x the tokens into the same memory.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import torch
from vllm.v1.attention.backend import AttentionBackend, AttentionType, MultipleOf

from vllm_turboquant import settings
from vllm_turboquant.codec import KERNEL_HEAD_SIZES


def slot_bytes(head_size: int, cache_dtype: str | None = None) -> int:
    """Bytes of one packed slot (one token, one KV head) of the preset this process serves."""
    if settings.is_turboquant_dtype(cache_dtype) and cache_dtype != settings.GENERIC_DTYPE:
        config = settings.resolve(cache_dtype)
    else:
        config = settings.active()
    return config.layout(head_size).slot_bytes


class TurboQuantBackend(AttentionBackend):
    """Paged uint8 cache of packed TurboQuant slots; see backend/impl.py for the forward."""

    accept_output_buffer: bool = True
    # The store runs inside forward(): it needs the batch rows and positions for the window
    # copy, which only the attention metadata has.
    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16,
                                                     torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(settings.kv_cache_dtypes())

    @staticmethod
    def get_name() -> str:
        # Registered as AttentionBackendEnum.CUSTOM (vLLM maps names back to that enum).
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from vllm_turboquant.backend.impl import TurboQuantImpl
        return TurboQuantImpl

    @staticmethod
    def get_builder_cls():
        from vllm_turboquant.backend.metadata import TurboQuantMetadataBuilder
        return TurboQuantMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # The kernels address tokens through the block table one token at a time: any size.
        return [MultipleOf(1)]

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        """vLLM's pick when the user gives no --block-size (CUDA; vLLM's CPU platform picks
        128 itself): an aligned preset gets pages of a multiple of its align (settings)."""
        from vllm.config import get_current_vllm_config

        vllm_config = get_current_vllm_config()
        dtype = getattr(vllm_config.cache_config, "cache_dtype", None)
        if not settings.is_turboquant_dtype(dtype):
            return default_block_size
        config = settings.resolve(dtype, getattr(vllm_config, "additional_config", None))
        return settings.preferred_block_size(config, default_block_size)

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(KERNEL_HEAD_SIZES)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return settings.is_turboquant_dtype(kv_cache_dtype)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        # VLLM_BATCH_INVARIANT=1 on CUDA: fixed decode splits, decodes never in the prefill
        # kernel, the prefill kernel's invariant tile order (backend/impl.py). The CPU path
        # has none; compat.validate_vllm_config refuses it at startup.
        return True

    # -- vLLM 0.32: the backend adjusts the layer's spec -------------------------------------
    @classmethod
    def customize_spec(cls, spec):
        """One uint8 slot of ``slot_bytes`` per (token, KV head): page = block x heads x slot."""
        if getattr(spec, "state_content_bytes", None) is not None:
            return spec
        return replace(spec, state_content_bytes=slot_bytes(spec.head_size))

    # -- vLLM 0.25: the backend gives the cache tensor's shape --------------------------------
    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """[num_blocks, block_size, num_kv_heads, slot_bytes] uint8 (no K/V leading 2: K and V
        share a slot). 0.25's V1 runner passes "auto" here for any non-fp8 spec, so the size
        comes from the active preset unless the dtype names one."""
        return (num_blocks, block_size, num_kv_heads, slot_bytes(head_size, cache_dtype_str))
