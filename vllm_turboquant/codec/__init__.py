"""The TurboQuant codec: pure PyTorch, no vLLM, no Triton."""

from .codebook import expected_mse, lloyd_max_codebook
from .codec import TQLayerCodec
from .config import (DEFAULT_PRESET, KERNEL_HEAD_SIZES, PRESETS, SUPPORTED_BITS, SlotLayout,
                     TQConfig, code_planes, compression_table)
from .packing import pack_codes, sign_magnitude, unpack_codes
from .rotation import hadamard_block_size, layer_signs, rotation_matrix

__all__ = [
    "DEFAULT_PRESET", "KERNEL_HEAD_SIZES", "PRESETS", "SUPPORTED_BITS", "SlotLayout", "TQConfig",
    "TQLayerCodec", "code_planes", "compression_table", "expected_mse", "hadamard_block_size",
    "layer_signs", "lloyd_max_codebook", "pack_codes", "rotation_matrix", "sign_magnitude",
    "unpack_codes",
]
