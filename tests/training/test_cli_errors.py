"""Trainer command lines a user gets wrong: each row gets its exception type and a message naming the argument
(or file) to fix, never a KeyError, IndexError or ZeroDivisionError from inside."""

import pytest

from .conftest import cls_flags, dit_flags, lm_flags, trainer_main, video_flags


def _set(argv, flag, value):
    i = argv.index(flag)
    return [*argv[:i + 1], value, *argv[i + 2:]]


def _yaml(tmp, text):
    (tmp / "bad.yaml").write_text(text)
    return str(tmp / "bad.yaml")


def _truncated_dit(c):
    trainer_main("dit")(c["dit"](c["tmp"] / "t", 1))
    f = c["tmp"] / "t" / "last" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return c["dit"](c["tmp"] / "t", 2, "--resume")


def _opt_changed(c):
    trainer_main("cls")(c["cls"](c["tmp"] / "o", 1))
    return [*c["cls"](c["tmp"] / "o", 2), "--resume", "--opt", "sgd"]


ROWS = [  # (name, trainer, argv from the context, exception, text the message holds)
    ("dit --global-batch-size 0", "dit", lambda c: _set(c["dit"](c["out"], 1), "--global-batch-size", "0"),
     SystemExit, "--global-batch-size"),
    ("cls --batch-size 0", "cls", lambda c: _set(c["cls"](c["out"], 1), "--batch-size", "0"), SystemExit,
     "--batch-size"),
    ("lm --batch-size 0", "lm", lambda c: _set(c["lm"](c["out"], 1), "--batch-size", "0"), SystemExit,
     "--batch-size"),
    ("video --batch-size 0", "video", lambda c: _set(c["video"](c["out"], 1), "--batch-size", "0"), SystemExit,
     "--batch-size"),
    ("--grad-accum-steps 0", "dit", lambda c: [*c["dit"](c["out"], 1), "--grad-accum-steps", "0"], SystemExit,
     "--grad-accum-steps"),
    ("--epochs 1.5", "cls", lambda c: _set(c["cls"](c["out"], 1), "--epochs", "1.5"), SystemExit, "--epochs"),
    ("epochs: 1.5 in YAML", "dit", lambda c: [*c["dit"](c["out"], 1), "--config", _yaml(c["tmp"], "epochs: 1.5\n")],
     SystemExit, "--epochs"),
    ("malformed YAML", "dit", lambda c: [*c["dit"](c["out"], 1), "--config", _yaml(c["tmp"], "lr: [1e-3\n")],
     SystemExit, "bad.yaml"),
    ("--amp-dtype fp8", "lm", lambda c: [*c["lm"](c["out"], 1), "--amp-dtype", "fp8"], SystemExit, "--amp-dtype"),
    ("no prefix matching", "dit", lambda c: [*c["dit"](c["out"], 1), "--warmup", "5"], SystemExit, "--warmup"),
    ("--num-classes below the class folders", "cls", lambda c: [*c["cls"](c["out"], 1), "--num-classes", "2"],
     ValueError, "--num-classes"),
    ("--resume without a checkpoint", "dit", lambda c: [*c["dit"](c["out"], 1), "--resume"], FileNotFoundError,
     "--resume"),
    ("--resume from a truncated checkpoint", "dit", _truncated_dit, ValueError, "model.safetensors"),
    ("--resume --opt sgd", "cls", _opt_changed, ValueError, "--opt"),
    ("raw text as --data", "lm", lambda c: _set(c["lm"](c["out"], 1), "--data", str(c["lm_text"])), SystemExit,
     "--data"),
    ("vocab below the tokenizer's", "lm", lambda c: [*c["lm"](c["out"], 1), "--model-kwargs", "vocab_size=8"],
     ValueError, "vocab_size"),
]


@pytest.mark.parametrize("name, trainer, argv, error, text", ROWS, ids=[r[0] for r in ROWS])
def test_clear_error(name, trainer, argv, error, text, dit_store, images, lm_data, wan, tmp_path, capsys):
    ctx = {"tmp": tmp_path, "out": tmp_path / "out", "lm_text": lm_data.parent / "c.jsonl",
           "dit": lambda out, n, *x: dit_flags(dit_store, out, n, *x),
           "cls": lambda out, n, *x: cls_flags(images, out, n, *x),
           "lm": lambda out, n, *x: lm_flags(lm_data, out, n, *x),
           "video": lambda out, n, *x: video_flags(wan, out, n, *x)}
    args = argv(ctx)  # (runs the earlier training a row needs)
    capsys.readouterr()
    with pytest.raises(error) as e:
        trainer_main(trainer)(args)
    message = f"{e.value.code if isinstance(e.value, SystemExit) else e.value}\n{capsys.readouterr().err}"
    assert text in message, message
    assert not isinstance(e.value, (KeyError, IndexError, ZeroDivisionError, AttributeError))


def test_drop_is_not_a_prefix_of_drop_path():
    from mhla_image_classification.train import build_parser

    args = build_parser().parse_args(["--drop", "0.3"])
    assert args.drop == 0.3 and args.drop_path == 0.1
