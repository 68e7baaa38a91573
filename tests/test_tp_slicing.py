"""Per-rank KV head slicing under tensor parallelism, without GPUs.

The property the plugin relies on: a rank that holds a slice of the KV heads writes exactly the
bytes a single GPU writes for those heads, so TP=1 and TP=2 serve the same cache contents.
"""

import pytest
import torch

from vllm_turboquant.codec import TQConfig, TQLayerCodec
from vllm_turboquant.parallel import cache_bytes_per_token, kv_head_range, kv_heads_per_rank


@pytest.mark.parametrize("total,tp,expect", [(4, 1, 4), (4, 2, 2), (8, 4, 2), (2, 4, 1), (3, 1, 3)])
def test_heads_per_rank_follows_vllm_rule(total, tp, expect):
    assert kv_heads_per_rank(total, tp) == expect


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="cannot be split"):
        kv_heads_per_rank(3, 2)


def test_ranges_cover_heads_once_when_split():
    ranges = [kv_head_range(8, 4, r) for r in range(4)]
    assert [h for r in ranges for h in r] == list(range(8))


def test_replicated_heads_map_each_rank_to_one_head():
    assert [list(kv_head_range(2, 4, r)) for r in range(4)] == [[0], [0], [1], [1]]


@pytest.mark.parametrize("layer", [0, 3])
def test_rank_slices_encode_like_one_gpu(layer):
    """Two ranks, each with its codec built independently, reproduce the TP=1 bytes."""
    config = TQConfig.from_name("turboquant")
    gen = torch.Generator().manual_seed(layer)
    k = torch.randn(5, 4, 128, generator=gen)  # [tokens, 4 KV heads, head 128]
    v = torch.randn(5, 4, 128, generator=gen)
    full = TQLayerCodec(config, 128, layer).encode(k, v)
    for rank in range(2):
        heads = kv_head_range(4, 2, rank)
        rank_codec = TQLayerCodec(config, 128, layer)  # what that rank's process builds
        part = rank_codec.encode(k[:, heads.start:heads.stop], v[:, heads.start:heads.stop])
        assert torch.equal(part, full[:, heads.start:heads.stop])


def test_bytes_per_token_add_up_over_ranks():
    config = TQConfig.from_name("turboquant")
    one = cache_bytes_per_token(config, 128, total_kv_heads=4, num_layers=2, tp_size=1)
    two = cache_bytes_per_token(config, 128, total_kv_heads=4, num_layers=2, tp_size=2)
    assert two["all_ranks"] == one["all_ranks"] == 2 * 4 * config.layout(128).slot_bytes
    assert two["per_rank"] * 2 == one["per_rank"]
