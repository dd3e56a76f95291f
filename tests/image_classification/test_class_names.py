"""Evaluation maps labels by the class names stored with the run, and refuses a split with other classes."""

import shutil

import pytest
import yaml

from mhla_image_classification import eval as eval_script
from mhla_image_classification.train import main as train

from .test_train_eval import _flags


def test_eval_refuses_a_split_whose_classes_differ(image_folder, tmp_path):
    train(_flags(image_folder, tmp_path / "run", 1, ["--eval-every", "0"]))
    ckpt = tmp_path / "run" / "last" / "model.safetensors"
    assert yaml.safe_load((ckpt.parent / "config.yaml").read_text())["class_names"] == ["class0", "class1", "class2"]
    for name, change in (("renamed", lambda v: (v / "class2").rename(v / "classX")),
                         ("extra", lambda v: shutil.copytree(v / "class0", v / "class3")),
                         ("missing", lambda v: shutil.rmtree(v / "class1"))):
        data = tmp_path / name
        shutil.copytree(image_folder / "val", data / "val")
        change(data / "val")
        with pytest.raises(ValueError, match="not the training classes") as e:
            eval_script.main(["--checkpoint", str(ckpt), "--data-dir", str(data), "--batch-size", "4",
                              "--workers", "0", "--device", "cpu"])
        assert {"renamed": "'class2'", "extra": "'class3'", "missing": "'class1'"}[name] in str(e.value)
    same = eval_script.main(["--checkpoint", str(ckpt), "--data-dir", str(image_folder), "--batch-size", "4",
                             "--workers", "0", "--device", "cpu"])
    assert same["count"] == 12
