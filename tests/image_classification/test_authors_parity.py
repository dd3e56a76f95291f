"""Our MHLA DeiT against the authors' own classification code: their model -> our key names -> same logits.

Needs their release: set MHLA_AUTHORS_REPO to a git clone (or bare mirror) of DAGroup-PKU/MHLA; skipped otherwise.
Everything is their code (`models/mhla_vit.py`, `models/modules/attention/mhla.py`,
`models/modules/timm_block/mhla.py`), with three patches, all for the library versions installed here:

1. Their `MHLA_Uniform_Block` subclasses timm's `Block` as of timm 1.0.15 (their requirements.txt). Since then
   timm inserted `scale_attn_norm, scale_mlp_norm` into `Block.__init__`'s positional arguments, which their
   block fills by position (so `norm_layer` lands on `drop_path` and the build fails), and `Block.forward`
   passes `attn_mask=` / `is_causal=` to an attention whose `forward(x)` takes neither. Their block is given a
   `Block` with timm 1.0.15's positional order (forwarded by keyword) and timm 1.0.15's `forward`.
2. timm's `VisionTransformer.forward` now passes `attn_mask=` to `forward_features`, which their `MHLA_ViT`
   overrides without it; their model is called as timm 1.0.15's `forward` did:
   `forward_head(forward_features(x))` (`their_forward`).
3. Their `@torch.compile` methods run eagerly (`torch.compile` is the identity while their files load):
   the same operations, without an Inductor C++ build per test on a CPU machine.

With `normalizer="reference"` (the paper's configs) ours must equal theirs to fp32 rounding. With
`normalizer="exact"` ours must differ, as docs/spec.md section 6 (item 1) documents: their denominator mixes
the queries of other blocks (W applied to the per-block products q_{j,w} . z_j). There ours must equal their
module with the denominator corrected to (s q_t) . z~_i, built from their own sub-modules.
"""

import sys
from functools import partial

import pytest
import timm
import timm.models.vision_transformer as tvt
import torch
from einops import rearrange

import mhla_image_classification  # noqa: F401  (registers the timm models)
from tests.authors_release import corrected, eager_compile, extract, load_module, package, report

PIECE, DIM, HEADS, DEPTH, CLASSES = 4, 24, 2, 2, 10  # 224 px padded to 256: a 16x16 patch grid, 16 blocks


class _Timm1015Block(tvt.Block):
    """Patch 1: timm 1.0.15's positional order of `Block.__init__`, forwarded by keyword."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_bias=True, proj_drop=0.0,
                 attn_drop=0.0, init_values=None, drop_path=0.0, act_layer=torch.nn.GELU,
                 norm_layer=torch.nn.LayerNorm, mlp_layer=tvt.Mlp):
        super().__init__(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                         proj_drop=proj_drop, attn_drop=attn_drop, init_values=init_values, drop_path=drop_path,
                         act_layer=act_layer, norm_layer=norm_layer, mlp_layer=mlp_layer)

    def forward(self, x):  # timm 1.0.15's: the attention takes no attn_mask / is_causal
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


@pytest.fixture
def authors(tmp_path, monkeypatch):
    """Their `models` package, loaded from the release (a dict of its three modules)."""
    root = extract(tmp_path, "mhla_image_classification/models") / "mhla_image_classification/models"
    for name, path in (("models", root), ("models.modules", root / "modules"),
                       ("models.modules.attention", root / "modules/attention"),
                       ("models.modules.timm_block", root / "modules/timm_block")):
        monkeypatch.setitem(sys.modules, name, package(name, path))  # their package __init__s are not needed
    monkeypatch.setattr(torch, "compile", eager_compile)  # patch 3
    monkeypatch.setattr(tvt, "Block", _Timm1015Block)  # patch 1, while their block class is defined
    mods = {}
    for name, rel in (("attention", "modules/attention/mhla.py"), ("block", "modules/timm_block/mhla.py"),
                      ("vit", "mhla_vit.py")):
        mods[name] = load_module(monkeypatch, f"models.{rel[:-3].replace('/', '.')}", root / rel)
    monkeypatch.undo()  # their classes keep what they bound; timm, torch and sys.modules are restored
    return mods


def their_model(authors, transform="linear"):
    """Their `deit_tiny_pla_1d_v6_6` recipe (timm_registers.py, `--gp avg`) at a tiny width and depth."""
    attn = partial(authors["attention"].MHLA_Normed_Torch, window_size=PIECE**2, embed_len=256, transform=transform,
                   exp_sigma=3)
    return authors["vit"].MHLA_ViT(
        patch_size=16, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, img_size=256, qk_norm=True, flatten=False,
        piece_size=PIECE, class_token=False, global_pool="avg", num_classes=CLASSES,
        block_fn=partial(authors["block"].MHLA_Uniform_Block, attn_func=attn),
    )


def their_forward(model, x):
    """Patch 2: timm 1.0.15's `VisionTransformer.forward`."""
    return model.forward_head(model.forward_features(x))


def to_ours(sd):
    """Their key names -> ours: `attn.to_qkv` -> `attn.mhla.qkv`, `attn.to_out.0` -> `attn.mhla.proj`,
    `attn.{q,k}_norm`, `attn.lepe` -> under `attn.mhla`, `attn.piece_attn.conv.weight` [M, M, 1, 1] ->
    `attn.mhla.mixing` [M, M]; `attn.norm` and everything outside the attention keep their names."""
    out = {}
    for key, value in sd.items():
        if ".attn." in key and ".attn.norm." not in key:
            head, tail = key.split(".attn.")
            tail = {"to_qkv.weight": "qkv.weight", "to_out.0.weight": "proj.weight", "to_out.0.bias": "proj.bias",
                    "piece_attn.conv.weight": "mixing"}.get(tail, tail)
            key, value = f"{head}.attn.mhla.{tail}", value.flatten(1) if tail == "mixing" else value
        out[key] = value
    return out


def randomise(model):
    """Every parameter matters: random norms (around 1), biases, LePE and mixing (in [0, 1], their clamp)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "piece_attn" in n:
                p.copy_(torch.rand_like(p))
            elif "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 0.1))


def ours_from(theirs, normalizer):
    ours = timm.create_model("mhla_deit_tiny_patch16_224", embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                             num_classes=CLASSES, normalizer=normalizer)
    ours.load_state_dict(to_ours(theirs.state_dict()))
    return ours.to(next(theirs.parameters()).dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_normaliser_matches_their_model(authors, dtype):
    torch.manual_seed(0)
    theirs = their_model(authors)
    randomise(theirs)
    theirs = theirs.to(dtype).eval()
    ours = ours_from(theirs, "reference")
    x = torch.randn(2, 3, 224, 224, dtype=dtype)
    with torch.no_grad():
        a, b = their_forward(theirs, x), ours(x)
        fa = rearrange(theirs.forward_features(x), "b (hb wb p1 p2) c -> b (hb p1 wb p2) c", hb=4, wb=4, p1=4, p2=4)
        fb = ours.forward_features(x)  # theirs leave in block-major order, ours in row-major order
    report(f"classification logits, reference normaliser, {dtype}", b, a)
    report(f"classification features, reference normaliser, {dtype}", fb, fa)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())
    torch.testing.assert_close(fb, fa, rtol=tol, atol=tol * fa.abs().max().item())


def test_exact_normaliser_is_their_attention_with_the_corrected_denominator(authors):
    """docs/spec.md section 6 (item 1): ours ("exact") = their attention with the corrected denominator;
    their released attention differs from both."""
    torch.manual_seed(1)
    theirs = their_model(authors)
    randomise(theirs)
    theirs = theirs.double().eval()
    ours = ours_from(theirs, "exact")
    attn_t, attn_o = theirs.blocks[0].attn, ours.blocks[0].attn
    x = torch.randn(2, 256, DIM, dtype=torch.float64)  # row-major tokens of the 16x16 grid
    x_blocks = rearrange(x, "b (hb p1 wb p2) c -> b (hb wb) (p1 p2) c", hb=4, wb=4, p1=4, p2=4)
    with torch.no_grad():
        o = attn_o(x)
        back = partial(rearrange, pattern="b (hb wb) (p1 p2) c -> b (hb p1 wb p2) c", hb=4, wb=4, p1=4, p2=4)
        fixed, a = back(corrected(attn_t, x_blocks)), back(attn_t(x_blocks))
    report("classification attention, exact normaliser vs their corrected denominator", o, fixed)
    _, rel = report("classification attention, exact normaliser vs their released attention (documented)", o, a)
    torch.testing.assert_close(o, fixed, rtol=1e-10, atol=1e-10 * fixed.abs().max().item())
    assert rel > 1e-3  # the documented difference is far above rounding
