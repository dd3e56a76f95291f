"""Training, evaluation and MQAR on CUDA (bf16, Triton kernels, fla's GLA); skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from mhla_nlp.mqar import main as mqar
from mhla_nlp.prepare_data import main as prepare
from mhla_nlp.train import main as train

from .helpers import make_corpus, make_tokenizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = {
    "mhla": ["hidden_size=64", "num_hidden_layers=2", "num_heads=2", "vocab_size=40", "chunk_size=16",
             "max_chunks=4"],
    "linear": ["hidden_size=64", "num_hidden_layers=2", "num_heads=2", "vocab_size=40", "chunk_size=16",
               "max_chunks=4"],
    "gla": ["hidden_size=64", "num_hidden_layers=2", "num_heads=2", "vocab_size=40"],
    "transformer": ["hidden_size=64", "num_hidden_layers=2", "num_attention_heads=2", "num_key_value_heads=2",
                    "intermediate_size=128", "vocab_size=40"],
}


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    prepare(["--input", str(make_corpus(d / "c.jsonl", 200)), "--tokenizer", str(make_tokenizer(d / "tok")),
             "--output", str(d / "data"), "--seq-len", "64", "--val-docs", "20"])
    return d / "data"


@pytest.mark.parametrize("model", list(KW))
def test_train_on_cuda(packed, tmp_path, model):
    out = train(["--data", str(packed), "--output", str(tmp_path / model), "--model", model, "--model-kwargs",
                 *KW[model], "--batch-size", "4", "--max-steps", "30", "--warmup-steps", "3", "--lr", "3e-3",
                 "--log-interval", "10", "--eval-batches", "4", "--device", "cuda"])
    assert out["step"] == 30 and out["val_loss"] < 3.5  # uniform over 40 tokens is 3.69


def test_mqar_tiny_on_cuda(tmp_path):
    rows = mqar(["--tiny", "--out", str(tmp_path), "--device", "cuda"])
    assert {r["model"] for r in rows} == {"mhla", "linear", "softmax", "gla"}
