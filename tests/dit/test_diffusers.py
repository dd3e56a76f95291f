"""The DiT as a diffusers model: config, save_pretrained / from_pretrained, gradient checkpointing, and the
same-block softmax baseline (SDPA inside the MHLA attention module)."""

import json

import pytest
import torch

from mhla_core import MHLA
from mhla_dit.diffusion import Diffusion
from mhla_dit.models import DiT, SoftmaxMHLABlockAttention, create_model

from .conftest import TINY


def _tiny(attention="mhla", seed=0, **kw):
    torch.manual_seed(seed)
    model = create_model("DiT-S/2", input_size=8, attention=attention, **{**TINY, **kw})
    for name, p in model.named_parameters():  # leave adaLN-Zero so every block reaches the output
        if "adaLN" in name or "final" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.tensor([1, 7])


def test_config_holds_what_dit_pipeline_reads():
    model = _tiny().eval()
    cfg = model.config
    assert cfg.sample_size == 8 and cfg.in_channels == 4 and cfg.out_channels == 8 and cfg.attention == "mhla"
    assert create_model("DiT-S/2", input_size=8, learn_sigma=False, **TINY).config.out_channels == 4
    out = model(*_inputs())
    assert out.sample.shape == (2, 8, 8, 8)
    assert torch.equal(model(*_inputs(), return_dict=False)[0], out.sample)
    with pytest.raises(ValueError, match="sample_size"):
        create_model("DiT-S/2", input_size=8, sample_size=16, **TINY)
    with pytest.raises(ValueError, match="out_channels"):
        create_model("DiT-S/2", input_size=8, out_channels=4, **TINY)
    with pytest.raises(ValueError, match="class_labels"):
        model(_inputs()[0], _inputs()[1], None)


def test_scalar_timestep_is_broadcast():
    model = _tiny().eval()
    x, _, y = _inputs()
    assert torch.equal(model(x, torch.tensor(500), y).sample, model(x, torch.tensor([500, 500]), y).sample)


@pytest.mark.parametrize("attention", ["mhla", "softmax", "softmax_mhla_block"])
def test_save_pretrained_round_trip(attention, tmp_path):
    model = _tiny(attention, qk_norm=attention != "softmax").eval()
    with torch.no_grad():  # trained-looking values everywhere, incl. the mixing and the LePE
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    assert config["_class_name"] == "DiT" and config["attention"] == attention and config["block_size"] == 4
    assert (tmp_path / "dit" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = DiT.from_pretrained(tmp_path / "dit")
    public = lambda m: {k: v for k, v in m.config.items() if not k.startswith("_")}  # noqa: E731
    assert not loaded.training and public(loaded) == public(model)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(model(*_inputs()).sample, loaded(*_inputs()).sample)
    if attention == "mhla":  # the loaded layers still project their mixing after every optimiser step
        opt = torch.optim.SGD(loaded.parameters(), lr=1.0)
        loaded(*_inputs()).sample.square().mean().backward()
        with torch.no_grad():
            loaded.blocks[0].attn.mixing.fill_(2.0)
        opt.step()
        assert loaded.blocks[0].attn.mixing.max() <= 1


@pytest.mark.parametrize("attention", ["mhla", "softmax_mhla_block"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(attention):
    model = _tiny(attention).train()  # train mode: label and output dropout are replayed in the recompute
    calls = []
    for block in model.blocks:  # count the MLP's runs (module hooks do not fire in the recompute)
        block.mlp.forward = lambda x, f=block.mlp.forward: calls.append(1) or f(x)
    x, t, y = _inputs()

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(1)
        loss = Diffusion().training_losses(model, x, t, y, noise=torch.ones_like(x))["loss"].mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads()
    assert len(calls) == 2 and not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    calls.clear()
    ckpt_loss, ckpt = loss_and_grads()
    assert model.is_gradient_checkpointing and len(calls) == 4  # every block ran again in the backward
    assert torch.equal(plain_loss, ckpt_loss) and plain.keys() == ckpt.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt[name], g, rtol=1e-5, atol=1e-7, msg=name)
    with torch.no_grad():  # no recompute without grad
        calls.clear()
        model(x, t, y)
    assert len(calls) == 2
    model.disable_gradient_checkpointing()
    assert not model.is_gradient_checkpointing


def test_same_block_softmax_shares_every_non_attention_parameter_with_mhla():
    for qk_norm in (False, True):
        mhla, soft = _tiny("mhla", qk_norm=qk_norm), _tiny("softmax_mhla_block", qk_norm=qk_norm)
        a = {k: v.shape for k, v in mhla.named_parameters()}
        b = {k: v.shape for k, v in soft.named_parameters()}
        assert set(a) - set(b) == {"blocks.0.attn.mixing", "blocks.1.attn.mixing"} and set(b) <= set(a)
        assert all(a[k] == b[k] for k in b)
        assert any(k.endswith("attn.q_norm.weight") for k in b) == qk_norm
        # the same seed gives the same initial values for every shared parameter
        pa, pb = dict(mhla.named_parameters()), dict(soft.named_parameters())
        assert all(torch.equal(pa[k], pb[k]) for k in pb)
    attn = soft.blocks[0].attn
    assert isinstance(attn, SoftmaxMHLABlockAttention) and not isinstance(attn, MHLA)
    assert attn.norm.elementwise_affine and attn.qkv.bias is not None and attn.lepe.kernel_size == (3, 3)
    assert attn.proj_drop.p == 0.1 and not hasattr(attn, "mixing")
    # the standard softmax DiT is not the same block: no attention LayerNorm, no LePE, no output dropout
    assert not any(".attn.norm." in k or ".attn.lepe." in k for k, _ in _tiny("softmax").named_parameters())


def test_same_block_softmax_is_softmax_attention():
    """Its attention equals a hand-written softmax over the normalised tokens, plus LePE, through proj."""
    attn = _tiny("softmax_mhla_block", qk_norm=True).blocks[0].attn.eval()
    torch.nn.init.normal_(attn.lepe.weight, std=0.1)
    x = torch.randn(2, 16, 32)
    q, k, v = attn.qkv(attn.norm(x)).chunk(3, dim=-1)
    q, k = attn.q_norm(q), attn.k_norm(k)
    heads = [a.reshape(2, 16, 2, 16).transpose(1, 2) for a in (q, k, v)]
    o = torch.softmax(heads[0] @ heads[1].transpose(-1, -2) / 4.0, dim=-1) @ heads[2]
    o = o.transpose(1, 2).reshape(2, 16, 32) + attn.lepe(v.transpose(1, 2).reshape(2, 32, 4, 4)).flatten(2).mT
    torch.testing.assert_close(attn(x, (4, 4)), attn.proj(o), rtol=1e-5, atol=1e-6)


def test_same_block_softmax_trains_one_step(latent_store, tmp_path):
    from mhla_dit.train import main as train

    out = train(["--data-path", str(latent_store), "--model-kwargs", *[f"{k}={v}" for k, v in TINY.items()],
                 "attention=softmax_mhla_block", "--global-batch-size", "4", "--max-steps", "1", "--workers", "0",
                 "--device", "cpu", "--output", str(tmp_path / "run"), "--lr", "1e-3"])
    assert out["step"] == 1 and torch.isfinite(torch.tensor(out["loss"]))
    model = out["model"]
    assert model.attention == "softmax_mhla_block" and isinstance(model.blocks[0].attn, SoftmaxMHLABlockAttention)
    from mhla_dit.checkpoints import load_model

    loaded, meta = load_model(tmp_path / "run" / "last" / "ema.safetensors")
    assert meta["model_kwargs"]["attention"] == "softmax_mhla_block" and loaded.attention == "softmax_mhla_block"
