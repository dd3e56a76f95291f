"""Tiny random Wan transformers for the video tests (CPU, no downloads)."""

import pytest

pytest.importorskip("diffusers")

# 2 heads x 32 dims (RoPE splits 32 into 12 / 10 / 10 for frames / height / width), 3 layers so that
# "hybrid" (i % 3 != 0) picks layers 1 and 2 and leaves layer 0 softmax.
TINY_WAN = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=96, num_layers=3, cross_attn_norm=True, rope_max_seq_len=64,
)
BLOCKS = (2, 2, 3)


@pytest.fixture
def tiny_wan_config():
    return dict(TINY_WAN)


def tiny_inputs(frames=4, height=8, width=12, batch=2, seed=0):
    """(latents, timestep, text embeddings) for the tiny config; token grid (frames, height / 2, width / 2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY_WAN["in_channels"], frames, height, width, generator=g)
    t = torch.tensor([100, 700][:batch])
    e = torch.randn(batch, 5, TINY_WAN["text_dim"], generator=g)
    return x, t, e
