"""Our DiT in diffusers' DiTPipeline (tiny AutoencoderKL, built here), and latents that follow the VAE's own
scaling_factor / shift_factor in extract_features and in decoding."""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

from mhla_core.checkpoint import save_weights
from mhla_dit.checkpoints import load_model, model_metadata
from mhla_dit.diffusion import create_scheduler, make_scheduler, sample
from mhla_dit.models import create_model
from mhla_dit.pipeline import main as export
from mhla_dit.pipeline import make_pipeline
from mhla_dit.sample import Decoder, latent_settings

from .conftest import TINY, write_folder

PIXELS = 16  # a 2-level VAE: 8x8 latents


def small_vae(scaling_factor=0.18215, shift_factor=None, seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, sample_size=PIXELS, scaling_factor=scaling_factor,
                         shift_factor=shift_factor).eval()


def tiny_dit(num_classes=1000, seed=0):
    torch.manual_seed(seed)
    model = create_model("DiT-S/2", input_size=8, num_classes=num_classes, **TINY)
    for name, p in model.named_parameters():
        if "adaLN" in name or "final" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_dit_pipeline_runs_our_dit(guidance):
    pipe = DiTPipeline(transformer=tiny_dit(), vae=small_vae(),
                       scheduler=DDIMScheduler.from_config(create_scheduler().config))
    out = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="np", guidance_scale=guidance,
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, PIXELS, PIXELS, 3) and np.isfinite(out.images).all()
    assert out.images.min() >= 0 and out.images.max() <= 1


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_pipeline_equals_our_sampler_and_decoder(scheduler):
    """DiTPipeline and mhla_dit.diffusion.sample + the VAE give the same images (same noise, same steps)."""
    model, vae = tiny_dit(), small_vae(scaling_factor=0.5)
    pipe = make_pipeline(model, vae, scheduler)
    images = pipe(class_labels=[1, 2], num_inference_steps=3, guidance_scale=3.0, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    z = sample(model, torch.tensor([1, 2]), (4, 8, 8), num_steps=3, cfg_scale=3.0, scheduler=make_scheduler(scheduler),
               generator=torch.Generator().manual_seed(7))
    if scheduler == "euler":  # DiTPipeline starts Euler from unit noise (no init_noise_sigma): not comparable
        assert images.shape == (2, 3, PIXELS, PIXELS) and torch.isfinite(images).all()
        return
    with torch.no_grad():
        ours = (vae.decode(z / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pipeline_save_and_load_round_trip(tmp_path):
    pipe = make_pipeline(tiny_dit(), small_vae())
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["mhla_dit.models", "DiT"]
    loaded = DiTPipeline.from_pretrained(tmp_path / "pipe")
    run = dict(class_labels=[3, 4], num_inference_steps=2, output_type="np")
    a = pipe(**run, generator=torch.Generator().manual_seed(1)).images
    b = loaded(**run, generator=torch.Generator().manual_seed(1)).images
    assert np.array_equal(a, b)
    model, meta = load_model(tmp_path / "pipe")  # the sampler reads a pipeline folder too
    assert model.config.attention == "mhla" and meta["data"]["vae"] == str(tmp_path / "pipe" / "vae")


def test_make_pipeline_refuses_what_dit_pipeline_cannot_do():
    with pytest.raises(ValueError, match="scheduler"):
        make_pipeline(tiny_dit(), small_vae(), "ddpm")
    with pytest.raises(ValueError, match="variance_type"):
        make_pipeline(tiny_dit(), small_vae(), create_scheduler())
    with pytest.raises(ValueError, match="shift"):
        make_pipeline(tiny_dit(), small_vae(shift_factor=0.1))
    with pytest.warns(UserWarning, match="guidance_scale=1"):
        make_pipeline(tiny_dit(num_classes=10), small_vae())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_pipeline(tiny_dit(), small_vae())
    # a DPM-Solver built from our DDPM config (learned_range: diffusers would keep 3 of 4 channels) is fixed
    from diffusers import DPMSolverMultistepScheduler

    pipe = make_pipeline(tiny_dit(), small_vae(), DPMSolverMultistepScheduler.from_config(create_scheduler().config))
    assert pipe.scheduler.config.variance_type is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_a_training_checkpoint_as_a_pipeline(tmp_path):
    small_vae().save_pretrained(tmp_path / "vae")
    model = tiny_dit()
    kwargs = dict(input_size=8, num_classes=1000, **TINY)
    save_weights(model, tmp_path / "ema.safetensors",
                 model_metadata("DiT-S/2", kwargs, {"vae": str(tmp_path / "vae"), "scale": 0.3, "shape": [4, 8, 8]}))
    export(["--ckpt", str(tmp_path / "ema.safetensors"), "--out", str(tmp_path / "pipe")])
    pipe = DiTPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.vae.config.scaling_factor == 0.3  # the store's scale, which DiTPipeline decodes with
    assert isinstance(pipe.scheduler, DDIMScheduler)
    a, b = pipe.transformer.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    images = pipe(class_labels=[0], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, PIXELS, PIXELS, 3) and np.isfinite(images).all()


@pytest.fixture
def shifted_vae(tmp_path):
    small_vae(scaling_factor=0.5, shift_factor=0.25).save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def _extract(images, out, vae, *extra):
    from mhla_dit.extract_features import main

    return main(["--data-path", str(images), "--out", str(out), "--vae", str(vae), "--image-size", str(PIXELS),
                 "--batch-size", "4", "--workers", "0", "--device", "cpu", "--mode", "mean", *extra])


def test_extract_features_uses_the_vaes_scaling_and_shift(tmp_path, shifted_vae):
    from mhla_dit.data import ImageLatentDataset, read_meta
    from mhla_dit.extract_features import _ToTensor

    images = write_folder(tmp_path / "images", classes=2, per_class=2, size=PIXELS)
    store = _extract(images, tmp_path / "store", shifted_vae)
    meta = read_meta(store)
    assert meta["scale"] == 0.5 and meta["shift"] == 0.25
    vae = AutoencoderKL.from_pretrained(shifted_vae).eval()
    from PIL import Image

    img = _ToTensor(PIXELS)(Image.open(sorted((images / "class0").iterdir())[0]))
    with torch.no_grad():
        mean = vae.encode(torch.stack([img, img.flip(-1)])).latent_dist.mode()
    x, _ = ImageLatentDataset(store)[0]
    torch.testing.assert_close(x, (mean - 0.25) * 0.5, rtol=1e-5, atol=1e-6)
    # explicit flags override the VAE's values (another store: the settings are part of a store)
    other = read_meta(_extract(images, tmp_path / "other", shifted_vae, "--scale", "1.0", "--shift", "0"))
    assert other["scale"] == 1.0 and other["shift"] == 0.0


def test_store_without_a_recorded_shift_still_resumes(tmp_path):
    small_vae(scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    images = write_folder(tmp_path / "images", classes=2, per_class=2, size=PIXELS)
    store = _extract(images, tmp_path / "store", tmp_path / "vae")
    meta = json.loads((store / "meta.json").read_text())
    assert meta["shift"] == 0.0 and meta["scale"] == 0.5
    del meta["shift"]  # as written before the shift was recorded
    (store / "meta.json").write_text(json.dumps(meta))
    _extract(images, store, tmp_path / "vae")  # the same settings: no "other settings" refusal


def test_decoding_adds_the_shift_back(shifted_vae):
    vae = AutoencoderKL.from_pretrained(shifted_vae).eval()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.clamp(127.5 * vae.decode(z / 0.5 + 0.25).sample + 128.0, 0, 255).permute(0, 2, 3, 1)
    decode = Decoder(str(shifted_vae), None, torch.device("cpu"))  # None: the VAE's own values
    assert (decode.scale, decode.shift) == (0.5, 0.25)
    assert np.array_equal(decode(z), want.to(torch.uint8).numpy())
    assert (Decoder(str(shifted_vae), 0.2, torch.device("cpu"), 0.0).scale,) == (0.2,)


def test_latent_settings_from_the_store_metadata():
    assert latent_settings({}) == (None, None, None)  # the VAE's config decides
    assert latent_settings({"vae": "v", "scale": 0.18215}) == ("v", 0.18215, 0.0)  # an older store: no shift
    assert latent_settings({"vae": "v", "scale": 0.5, "shift": 0.25}) == ("v", 0.5, 0.25)
    assert latent_settings({"vae": "v", "scale": 0.5, "shift": 0.25}, "w", 1.0, 0.0) == ("w", 1.0, 0.0)
