"""Tensor parallelism: which KV heads a rank holds, and what the cache costs per rank.

vLLM splits KV heads evenly over tensor-parallel ranks and replicates them when there are
fewer KV heads than ranks (`ModelConfig.get_num_kv_heads`). Nothing in the codec depends on the
head index or the rank: the rotation and codebooks of a layer are derived from (preset seed,
layer index) alone, so every rank encodes its heads exactly as a single GPU would encode the
same heads. These helpers state that arithmetic once for the backend, the metrics and tests.
"""

from __future__ import annotations

from .codec.config import TQConfig


def kv_heads_per_rank(total_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank stores (vLLM's rule: split, or replicate if too few)."""
    if tp_size < 1 or total_kv_heads < 1:
        raise ValueError("total_kv_heads and tp_size must be >= 1")
    if total_kv_heads >= tp_size and total_kv_heads % tp_size:
        raise ValueError(f"{total_kv_heads} KV heads cannot be split over {tp_size} ranks")
    return max(1, total_kv_heads // tp_size)


def kv_head_range(total_kv_heads: int, tp_size: int, rank: int) -> range:
    """The global KV head indices stored on `rank`."""
    per = kv_heads_per_rank(total_kv_heads, tp_size)
    if total_kv_heads >= tp_size:
        return range(rank * per, (rank + 1) * per)
    # Replicated: ranks are grouped, each group holds one head.
    return range(rank * total_kv_heads // tp_size, rank * total_kv_heads // tp_size + 1)


def cache_bytes_per_token(config: TQConfig, head_size: int, total_kv_heads: int,
                          num_layers: int, tp_size: int = 1) -> dict[str, int]:
    """Packed-cache bytes one token costs: per rank, and summed over all ranks.

    With replication (tp_size > total_kv_heads) the sum exceeds one copy of the heads: each
    replica stores its head again, as vLLM does for bf16.
    """
    per_rank = config.bytes_per_token(head_size, kv_heads_per_rank(total_kv_heads, tp_size))
    per_rank *= num_layers
    return {"per_rank": per_rank, "all_ranks": per_rank * tp_size}
