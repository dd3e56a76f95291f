"""Paper configs build their models; the demo's data reader, folder writer, table, reading line and plot."""

import gzip
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mhla_core.config import parse_with_config
from mhla_core.digits import read_digits
from mhla_image_classification import demo
from mhla_image_classification.train import build_model, build_parser

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "mhla_image_classification" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_model(path):
    args = parse_with_config(build_parser(), ["--config", str(path), "--epochs", "3"])
    assert args.epochs == 3 and args.lr == 1e-3 and args.model_ema_decay == 0.9996  # file, then CLI override
    model = build_model(args, 10)
    res = int(path.stem.rsplit("_", 1)[1])
    assert model.patch_embed.img_size[0] in (res, 256 if res == 224 else res)


def test_seven_paper_configs_and_two_baselines():
    names = {p.stem for p in CONFIGS}
    assert len(names) == 8 and {"linear_deit_tiny_224", "softmax_block_deit_tiny_224"} <= names


def test_unknown_config_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: deit_tiny_patch16_224\nlearning_rate: 1\n")
    with pytest.raises(SystemExit, match="unknown keys"):
        parse_with_config(build_parser(), ["--config", str(bad)])


def test_demo_reader_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 256, (20, 784)), np.repeat(np.arange(10), 2)[:, None]], axis=1)
    path = tmp_path / "digits.csv.gz"
    with gzip.open(path, "wt") as f:
        np.savetxt(f, rows, fmt="%d", delimiter=",")
    images, labels = read_digits(path)
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8 and (labels == rows[:, -1]).all()
    root = demo.write_image_folder(images, labels, tmp_path / "folder", val_per_class=1)
    assert len(list((root / "val").glob("*/*.png"))) == 10 and len(list((root / "train").glob("*/*.png"))) == 10
    flags = demo.demo_args("mhla-exact", root, tmp_path, epochs=1, img_size=32, patch=4, piece=2, seed=0,
                           batch_size=4, workers=0, device="cpu")
    args = build_parser().parse_args(flags)
    assert args.model_kwargs["normalizer"] == "exact" and args.model_kwargs["piece_size"] == 2
    with pytest.raises(ValueError, match="784 pixels"):
        bad = tmp_path / "bad.csv.gz"
        with gzip.open(bad, "wt") as f:
            f.write("1,2,3\n4,5,6\n")
        read_digits(bad)


def _row(variant, accs, curves=None, params=216_000):
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return dict(variant=variant, params=params, top1=accs, top1_mean=statistics.mean(accs), top1_std=std,
                curves=curves or [[a / 2, a] for a in accs], train_img_s=1234.4, infer_img_s=5678.9)


def test_table_shows_seeds_only_when_several_ran():
    one = demo.format_table([_row("softmax", [41.4]), _row("mhla-reference", [87.8])])
    assert "±" not in one and "seeds" not in one and "| val top-1 % |" in one
    assert "| mhla-reference | MHLA, reference normaliser | 0.216M | 87.80 | 1,234 | 5,679 |" in one
    three = demo.format_table([_row("softmax", [40.0, 42.0, 44.0]), _row("linear", [70.0, 71.0, 75.0])])
    assert "val top-1 % (mean ± std, 3 seeds)" in three and "| 42.00 ± 2.00 |" in three
    assert "| seeds |" not in three  # the count is in the header
    mixed = demo.format_table([_row("softmax", [40.0, 44.0]), _row("linear", [70.0])])
    assert "| seeds |" in mixed and "| 42.00 ± 2.83 | 2 |" in mixed and "| 70.00 | 1 |" in mixed


def test_reading_is_computed_from_the_numbers():
    rows = [_row("softmax", [41.4]), _row("softmax-block", [80.0]), _row("linear", [73.8]),
            _row("mhla-reference", [87.8])]
    line = demo.reading(rows)
    assert line.startswith("Reading: mhla-reference is best at 87.80%, 7.80 points above softmax-block (80.00%)")
    assert "46.40 above the last (softmax, 41.40%)" in line and "one seed" in line
    rows[1] = _row("softmax-block", [90.0])  # another number, another reading
    assert demo.reading(rows).startswith("Reading: softmax-block is best at 90.00%, 2.20 points above mhla-reference")
    clear = demo.reading([_row("linear", [70.0, 71.0, 72.0]), _row("mhla-exact", [90.0, 91.0, 92.0])])
    assert "mhla-exact is best at 91.00% (mean), 20.00 points above linear" in clear
    assert "larger than the seed spread (std 1.00 + 1.00 = 2.00)" in clear
    close = demo.reading([_row("mhla-exact", [88.0, 92.0, 96.0]), _row("mhla-reference", [89.0, 91.0, 93.0])])
    assert "mhla-exact is best at 92.00% (mean), 1.00 points above mhla-reference" in close
    assert "within the seed spread (std 4.00 + 2.00 = 6.00), so these two are not separated" in close
    assert demo.reading([_row("linear", [50.0]), _row("softmax", [50.0])]) == "Reading: all 2 rows tie at 50.00%."
    three = [_row("linear", [50.0]), _row("softmax", [50.0]), _row("mhla-exact", [40.0])]
    tie = "Reading: linear and softmax tie at 50.00%, 10.00 above the last (mhla-exact, 40.00%)."
    assert demo.reading(three) == tie


def test_plot_is_a_small_png(tmp_path):
    rows = [_row("softmax", [40.0, 44.0], [[20.0, 30.0, 40.0], [22.0, 35.0, 44.0]]),
            _row("mhla-reference", [88.0], [[60.0, 80.0, 88.0]])]
    path = demo.plot_curves(rows, tmp_path / "sub" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size < 200_000
    assert Image.open(path).size == (640, 380)


def test_demo_end_to_end_on_a_tiny_folder(image_folder, tmp_path, capsys):
    md = tmp_path / "table.md"
    argv = ["--data-dir", str(image_folder), "--output", str(tmp_path / "runs"), "--epochs", "2", "--batch-size",
            "4", "--workers", "0", "--device", "cpu", "--markdown", str(md)]
    rows = demo.main(argv)
    assert [r["variant"] for r in rows] == ["softmax", "softmax-block", "linear", "mhla-reference"]
    assert all(len(r["curves"]) == 1 and len(r["curves"][0]) == 2 for r in rows)  # one seed, two epochs
    assert rows[-1]["curves"][0][-1] == rows[-1]["top1_mean"]
    out = capsys.readouterr().out
    table = out[out.index("| variant"):out.index("Reading:")]
    assert "±" not in table and "seed 0" in out and demo.reading(rows) in out
    png = md.with_suffix(".png")
    assert f"Validation top-1 per epoch: {png}" in out and png.read_bytes()[:4] == b"\x89PNG"
    assert "![validation top-1 per epoch](table.png)" in md.read_text()
    demo.main([*argv, "--variants", "linear", "--epochs", "1"])  # a second run replaces its run folders
    assert len(demo.val_curve(tmp_path / "runs" / "linear-s0")) == 1
