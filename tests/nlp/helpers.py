"""Tiny tokenizer and corpus built in a temporary directory (no downloads)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the cat dog sat on mat a bird flew over tree red blue green big small ran fast slow "
         "and then it was good bad day night sun moon").split()


def make_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))}) + "\n")
    return path


def make_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


def make_packed(d: Path, n_docs: int = 60, seq_len: int = 16, val_docs: int = 8) -> Path:
    """A corpus packed by prepare_data into d/data (tokenizer and corpus beside it, in d)."""
    from mhla_nlp.prepare_data import main as prepare

    prepare(["--input", str(make_corpus(d / "c.jsonl", n_docs)), "--tokenizer", str(make_tokenizer(d / "tok")),
             "--output", str(d / "data"), "--seq-len", str(seq_len), "--val-docs", str(val_docs)])
    return d / "data"
