"""`python -m mhla_videogen.generate` end to end on a tiny random pipeline (CPU, no downloads)."""

import json

import pytest

from mhla_videogen.generate import MissingWeights, check_model_dir, main, video_backend


def test_generate_tiny_end_to_end(tiny_pipeline_dir, capsys):
    out = tiny_pipeline_dir / "out"
    paths = main(["--model", str(tiny_pipeline_dir / "wan"), "--transformer", str(tiny_pipeline_dir / "mhla"),
                  "--prompt", "a cat surfing a wave", "--prompt", "a red dog", "--out-dir", str(out),
                  "--height", "64", "--width", "96", "--frames", "5", "--steps", "2", "--cfg", "3.0",
                  "--dtype", "float32", "--device", "cpu", "--max-sequence-length", "8", "--mhla-precision", "fast"])
    assert len(paths) == 2
    for p in paths:
        if video_backend() is None:
            frames = sorted(p.glob("*.png"))
            assert len(frames) == 5
            from PIL import Image

            assert Image.open(frames[0]).size == (96, 64)
        else:
            assert p.suffix == ".mp4" and p.stat().st_size > 0
    meta = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [m["seed"] for m in meta] == [0, 1] and meta[0]["scheduler"] == "unipc"


def test_generate_same_seed_same_video(tiny_pipeline_dir):
    import numpy as np
    import torch

    from mhla_videogen.generate import build_pipeline

    pipe = build_pipeline(tiny_pipeline_dir / "wan", tiny_pipeline_dir / "mhla", "dpm", 3.0, dtype=torch.float32)
    assert type(pipe.transformer).__name__ == "MHLAWanTransformer3DModel"
    assert pipe.scheduler.config.use_flow_sigmas and pipe.scheduler.config.flow_shift == 3.0

    kw = dict(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2, guidance_scale=3.0,
              max_sequence_length=8, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(3), **kw).frames[0]
    b = pipe(generator=torch.Generator().manual_seed(3), **kw).frames[0]
    assert a.shape == (5, 32, 48, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_missing_weights_are_clear_errors(tmp_path, tiny_pipeline_dir, capsys):
    with pytest.raises(MissingWeights, match="does not exist.*never downloads"):
        check_model_dir(tmp_path / "nope", need_transformer=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeights, match="model_index.json"):
        check_model_dir(tmp_path / "empty", need_transformer=False)
    import shutil

    shutil.rmtree(tiny_pipeline_dir / "wan" / "vae")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_pipeline_dir / "wan"), "--prompt", "a cat", "--device", "cpu"])
    assert e.value.code == 2 and "lacks vae" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no prompts"):
        main(["--model", str(tiny_pipeline_dir / "wan")])


def test_generate_shards_and_skips(tiny_pipeline_dir):
    out = tiny_pipeline_dir / "sharded"
    base = ["--model", str(tiny_pipeline_dir / "wan"), "--transformer", str(tiny_pipeline_dir / "mhla"),
            "--prompt", "a cat", "--prompt", "a dog", "--prompt", "sky", "--out-dir", str(out), "--height", "32",
            "--width", "48", "--frames", "5", "--steps", "1", "--dtype", "float32", "--device", "cpu",
            "--max-sequence-length", "8", "--skip-existing"]
    assert [p.name.split("_")[0] for p in main([*base, "--rank", "1", "--world", "2"])] == ["0001"]
    assert [p.name.split("_")[0] for p in main([*base, "--rank", "0", "--world", "1"])] == ["0000", "0002"]


def test_generate_refuses_grid_smaller_than_blocks(tiny_pipeline_dir):
    with pytest.raises(SystemExit, match="smaller than the MHLA block layout"):
        main(["--model", str(tiny_pipeline_dir / "wan"), "--transformer", str(tiny_pipeline_dir / "mhla"),
              "--prompt", "a cat", "--height", "16", "--width", "48", "--frames", "5", "--device", "cpu",
              "--dtype", "float32"])
