"""extract_features -> train -> sample on a tiny random AutoencoderKL and PNG folder (CPU, no downloads)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mhla_dit.checkpoints import load_model, read_metadata
from mhla_dit.data import ImageLatentDataset, read_meta, shard_paths
from mhla_dit.diffusion import sample
from mhla_dit.extract_features import main as extract
from mhla_dit.sample import main as sample_main
from mhla_dit.train import epoch_batches
from mhla_dit.train import main as train

from .conftest import IMAGE_SIZE, TINY

KW = [f"{k}={v}" for k, v in TINY.items()]


def _flags(store, out, steps, *extra):
    return ["--data-path", str(store), "--model-kwargs", *KW, "--global-batch-size", "4", "--max-steps", str(steps),
            "--log-interval", "1", "--workers", "0", "--device", "cpu", "--output", str(out), "--lr", "1e-3",
            "--ema-decay", "0.9", *extra]


def _torchrun_env(monkeypatch, port):
    for k, v in dict(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)


def test_store_layout_flip_pairs_and_resume(latent_store, image_folder, vae_path, tmp_path):
    meta = read_meta(latent_store)
    assert meta["num_shards"] == 3 and meta["shape"] == [4, 8, 8] and meta["views"] == 2 and meta["num_classes"] == 2
    ds = ImageLatentDataset(latent_store)
    assert len(ds) == 12 and ds.labels.tolist() == [0] * 6 + [1] * 6
    x, y = ds[7]
    assert x.shape == (2, 4, 8, 8) and x.dtype == torch.float32 and int(y) == 1
    assert not torch.allclose(x[0], x[1])  # the flipped view is another latent
    # resumable: a missing shard is recomputed, identically (posterior samples are seeded per shard)
    copy = tmp_path / "store"
    args = ["--data-path", str(image_folder), "--out", str(copy), "--vae", str(vae_path), "--image-size",
            str(IMAGE_SIZE), "--shard-size", "5", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    extract(args)
    for i in range(3):
        assert np.array_equal(np.load(shard_paths(copy, i)[0]), np.load(shard_paths(latent_store, i)[0]))
    shard_paths(copy, 1)[1].unlink()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        ImageLatentDataset(copy)
    before = shard_paths(copy, 0)[0].stat().st_mtime_ns
    extract(args)
    assert shard_paths(copy, 0)[0].stat().st_mtime_ns == before  # finished shards are skipped
    assert np.array_equal(np.load(shard_paths(copy, 1)[0]), np.load(shard_paths(latent_store, 1)[0]))
    with pytest.raises(ValueError, match="other settings"):
        extract([*args[:-2], "--device", "cpu", "--no-flip"])


def test_flip_view_is_the_latent_of_the_flipped_image(latent_store, image_folder, vae_path):
    from diffusers import AutoencoderKL

    from mhla_dit.extract_features import _ToTensor

    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    img = _ToTensor(IMAGE_SIZE)(Image.open(sorted((image_folder / "class0").iterdir())[0]))
    with torch.no_grad():
        means = vae.encode(torch.stack([img, img.flip(-1)])).latent_dist.mean * 0.18215
    std = 0.18215 * torch.exp(0.5 * vae.encode(img[None]).latent_dist.logvar).max()
    x, _ = ImageLatentDataset(latent_store)[0]
    assert ((x - means).abs().max() < 6 * std)  # a posterior sample around each view's mean


def test_epoch_batches_partition_the_global_batch():
    full = epoch_batches(10, epoch=3, seed=1, global_batch=4, rank=0, world=1)
    parts = [epoch_batches(10, epoch=3, seed=1, global_batch=4, rank=r, world=2) for r in range(2)]
    assert len(full) == 2 and all(len(b) == 4 for b in full)
    assert [parts[0][i] + parts[1][i] for i in range(2)] == full
    assert epoch_batches(10, 4, 1, 4, 0, 1) != full


@pytest.mark.filterwarnings("ignore:Grad strides do not match")
def test_train_three_steps_resume_exact_and_ema(latent_store, tmp_path, monkeypatch):
    straight = train(_flags(latent_store, tmp_path / "straight", 3))
    assert straight["step"] == 3 and math.isfinite(straight["loss"]) and straight["vb"] > 0
    for name in ("last/model.safetensors", "last/ema.safetensors", "last/state.pt", "config.yaml", "log.jsonl"):
        assert (tmp_path / "straight" / name).is_file(), name
    log = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and {"img_per_s", "eta_min", "mse", "vb"} <= set(log[0])
    W = torch.stack([b.attn.mixing for b in straight["model"].blocks])
    assert W.min() >= 0 and W.max() <= 1
    # resume: 2 steps, then (as a 1-process torchrun job, DDP on gloo) the 3rd step
    train(_flags(latent_store, tmp_path / "split", 2))
    _torchrun_env(monkeypatch, 29517)
    resumed = train(_flags(latent_store, tmp_path / "split", 3, "--resume"))
    assert resumed["step"] == 3
    for name in ("last/model.safetensors", "last/ema.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), (name, key)
    meta = read_metadata(tmp_path / "split" / "last" / "ema.safetensors")
    assert meta["model"] == "DiT-S/2" and meta["model_kwargs"]["block_size"] == 4 and meta["data"]["scale"] == 0.18215


def test_ema_is_decay_weighted_average_of_init_and_model(latent_store, tmp_path):
    from mhla_dit.models import create_model

    one = train(_flags(latent_store, tmp_path / "one", 1))
    torch.manual_seed(0)  # the script seeds with --seed before building the model
    init = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=2, **TINY).state_dict()
    model, ema = one["model"].state_dict(), one["ema"].state_dict()
    moved = [k for k in ema if not torch.equal(model[k], init[k])]
    for k, v in ema.items():
        assert torch.allclose(v, 0.9 * init[k] + 0.1 * model[k], atol=1e-7), k
    assert "final_layer.linear.weight" in moved  # adaLN-Zero: the first step moves only the output layer
    assert all(not torch.equal(ema[k], model[k]) and not torch.equal(ema[k], init[k]) for k in moved)


@pytest.fixture(scope="module")
def checkpoint(latent_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(_flags(latent_store, out, 2))
    return out / "last" / "ema.safetensors"


def test_sample_grid_png(checkpoint, tmp_path):
    model, meta = load_model(checkpoint)
    assert not model.training and model.num_classes == 2
    path = sample_main(["--ckpt", str(checkpoint), "--class-labels", "0", "1", "--num-sampling-steps", "5",
                        "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (2 * IMAGE_SIZE + 6, IMAGE_SIZE + 4)  # 2 images, 2 px borders


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_sample_grid_with_other_schedulers(checkpoint, tmp_path, scheduler):
    path = sample_main(["--ckpt", str(checkpoint), "--class-labels", "0", "1", "--num-sampling-steps", "3",
                        "--scheduler", scheduler, "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert Image.open(path).size == (2 * IMAGE_SIZE + 6, IMAGE_SIZE + 4)


@pytest.mark.parametrize("argv,message", [
    (["--class-labels", "0", "2"], "--class-labels"),  # the model has classes 0 and 1
    (["--class-labels", "-1"], "--class-labels"),
])
def test_sample_rejects_labels_outside_the_model(checkpoint, tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        sample_main(["--ckpt", str(checkpoint), *argv, "--num-sampling-steps", "2", "--out", str(tmp_path / "g.png"),
                     "--device", "cpu"])


@pytest.mark.parametrize("flag", ["--num-sampling-steps", "--nrow", "--per-proc-batch-size"])
def test_sample_rejects_counts_below_one(checkpoint, capsys, flag):
    with pytest.raises(SystemExit):
        sample_main(["--ckpt", str(checkpoint), flag, "0"])
    assert flag in capsys.readouterr().err


def test_diffusion_sample_checks_steps_and_labels(checkpoint):
    model, _ = load_model(checkpoint)
    shape = (model.in_channels, model.grid[0] * model.patch_size, model.grid[1] * model.patch_size)
    with pytest.raises(ValueError, match="num_steps"):
        sample(model, torch.tensor([0]), shape, num_steps=0)
    with pytest.raises(ValueError, match="labels outside"):
        sample(model, torch.tensor([5]), shape, num_steps=1)


def test_sample_grid_compiled_matches_eager(checkpoint, tmp_path):
    argv = ["--ckpt", str(checkpoint), "--class-labels", "0", "1", "--num-sampling-steps", "3", "--device", "cpu"]
    eager = np.asarray(Image.open(sample_main([*argv, "--out", str(tmp_path / "e.png")])), dtype=np.int16)
    comp = np.asarray(Image.open(sample_main([*argv, "--out", str(tmp_path / "c.png"), "--compile", "blocks",
                                              "--compile-backend", "aot_eager"])), dtype=np.int16)
    assert np.abs(eager - comp).max() <= 1  # the same images up to uint8 rounding


def test_ddp_sampler_writes_adm_npz(checkpoint, tmp_path, monkeypatch):
    _torchrun_env(monkeypatch, 29518)
    npz = tmp_path / "samples.npz"
    sample_main(["--ckpt", str(checkpoint), "--num-samples", "5", "--npz", str(npz), "--per-proc-batch-size", "2",
                 "--num-sampling-steps", "3", "--device", "cpu"])
    with np.load(npz) as f:
        assert f.files == ["arr_0"]
        arr = f["arr_0"]
    assert arr.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and arr.dtype == np.uint8
    assert not (tmp_path / "samples.npz.parts").exists()
    with pytest.raises(SystemExit, match="both"):
        sample_main(["--ckpt", str(checkpoint), "--npz", str(npz)])
