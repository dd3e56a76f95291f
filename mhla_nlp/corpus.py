"""A small English corpus that needs no download: Python's own documentation shipped with the interpreter.

    python -m mhla_nlp.corpus --out data/pydocs            # corpus.jsonl, tokenizer/, corpus.json

Documents (about 2.3 MB of text with CPython 3.11):
- every topic of `pydoc_data.topics` (the language reference and library sections that `help()`
  shows; 79 documents, ~0.46 MB), and
- for every standard-library module outside test packages, its docstrings (module, classes,
  functions and methods, in source order, joined by blank lines) as one document (~1.8 MB).
Validation documents are those whose name hashes (sha1) to 0 mod `--val-every` (default 20, ~5%);
they are written first, and `corpus.json` records how many (`val_docs`) for
`prepare_data --val-docs`. A byte-level BPE tokenizer (`--vocab-size`, default 8192, with
`<s>`/`</s>`/`<pad>`) is trained on the training documents only and saved as a
`PreTrainedTokenizerFast` in `tokenizer/`. The output depends only on the Python version.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path


def documents(max_modules: int = 0) -> list[tuple[str, str]]:
    """(name, text) pairs: pydoc topics, then per-module docstrings of the standard library."""
    import pydoc_data.topics as topics

    docs = [(f"topic:{k}", v.strip()) for k, v in sorted(topics.topics.items()) if v.strip()]
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    if max_modules:
        files = files[:max_modules]
    for p in files:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = [d for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                 and (d := ast.get_docstring(node))]
        if parts:
            docs.append((f"module:{p.relative_to(root).as_posix()}", "\n\n".join(parts)))
    return docs


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return fast


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents(args.max_modules)
    is_val = [int(hashlib.sha1(n.encode()).hexdigest(), 16) % args.val_every == 0 for n, _ in docs]
    val = [d for d, v in zip(docs, is_val) if v]
    train = [d for d, v in zip(docs, is_val) if not v]
    with open(out / "corpus.jsonl", "w") as f:
        for name, text in val + train:
            f.write(json.dumps({"name": name, "text": text}) + "\n")
    tok = train_tokenizer([t for _, t in train], args.vocab_size, out / "tokenizer")
    meta = dict(python=sys.version.split()[0], documents=len(docs), val_docs=len(val), train_docs=len(train),
                chars=sum(len(t) for _, t in docs), val_chars=sum(len(t) for _, t in val),
                vocab_size=len(tok), bos=tok.bos_token_id, eos=tok.eos_token_id)
    (out / "corpus.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--val-every", type=int, default=20)
    p.add_argument("--max-modules", type=int, default=0, help="only the first N stdlib files (tests)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
