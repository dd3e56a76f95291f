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


def tiny_text_parts(text_dim=16):
    """A word-level tokenizer (built locally) and a tiny random UMT5 encoder with d_model = text_dim."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = "a cat dog surfing wave on the in red blue running field sky".split()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=len(vocab), d_model=text_dim, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return tokenizer, UMT5EncoderModel(cfg).eval()


def tiny_vae(z_dim=4):
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True],
                            latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()


@pytest.fixture
def tiny_pipeline_dir(tmp_path):
    """A saved tiny WanPipeline (random weights, softmax transformer) and a saved tiny MHLA transformer."""
    return make_tiny_pipeline(tmp_path)


def make_tiny_pipeline(tmp_path):
    """Save a tiny random WanPipeline to tmp_path / "wan" and a tiny MHLA transformer to tmp_path / "mhla"."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    from mhla_videogen.model import MHLAWanTransformer3DModel

    tokenizer, text_encoder = tiny_text_parts(TINY_WAN["text_dim"])
    torch.manual_seed(0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(TINY_WAN["in_channels"]),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=WanTransformer3DModel(**TINY_WAN))
    pipe.save_pretrained(tmp_path / "wan")
    MHLAWanTransformer3DModel(**TINY_WAN, mhla_layers="hybrid", block_layout=BLOCKS).save_pretrained(tmp_path / "mhla")
    return tmp_path
