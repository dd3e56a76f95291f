"""Tokenise a text corpus and pack it into fixed-length rows that keep document boundaries.

    python -m mhla_nlp.prepare_data --input corpus.jsonl --tokenizer path/to/tokenizer \
        --seq-len 2048 --output data/packed

Input: a `.jsonl` file (one document per line, text in `--text-field`), a `.txt` file (documents
separated by blank lines, or one per line with `--line-docs`), or an HF dataset saved with
`save_to_disk` (column `--text-field`; a DatasetDict uses `--split`). Each document is tokenised,
`bos` is prepended when the tokenizer has one and `eos` appended, and the token stream is cut into
rows of `--seq-len` tokens. Every row stores `input_ids` and `cu_seqlens` (the document offsets
within the row, from 0 to seq_len; a document cut by a row end continues as a new segment in the
next row). Packing runs per batch of `--batch-docs` documents; the tail of each batch that does not
fill a row is dropped (reported at the end). The result is written with `datasets.save_to_disk`;
a `--val-docs N` holds out the first N documents as a `validation` split (a DatasetDict).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from mhla_core.training.args import nonnegative_int, positive_int

BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_text(path: Path, encoding: str | None) -> str:
    """The file's text: `encoding`, else the one its byte-order mark names, else strict UTF-8.

    A file that does not decode stops with its name, the byte offset and the fix (--encoding), instead
    of turning into replacement characters (which tokenise to an all-<unk> dataset).
    """
    raw = path.read_bytes()
    if encoding is None:
        encoding = next((name for bom, name in BOMS if raw.startswith(bom)), "utf-8")
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise SystemExit(f"{path}: not valid {encoding} at byte {err.start} ({err.reason}); "
                         "pass --encoding (e.g. utf-16, latin-1) for this file") from None
    except LookupError:
        raise SystemExit(f"--encoding {encoding!r} is not a codec Python knows") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help=".jsonl, .txt, or a dataset directory saved with save_to_disk")
    p.add_argument("--tokenizer", required=True, help="local tokenizer directory (AutoTokenizer.from_pretrained)")
    p.add_argument("--output", required=True, help="directory for datasets.save_to_disk")
    p.add_argument("--seq-len", type=positive_int, default=2048)
    p.add_argument("--text-field", default="text")
    p.add_argument("--split", default="train", help="split to read when --input is a saved DatasetDict")
    p.add_argument("--line-docs", action="store_true", help=".txt: one document per line")
    p.add_argument("--batch-docs", type=positive_int, default=1000, help="documents packed together")
    p.add_argument("--val-docs", type=nonnegative_int, default=0,
                   help="hold out the first N documents as a validation split")
    p.add_argument("--max-docs", type=nonnegative_int, default=0, help="use at most N documents (0: all)")
    p.add_argument("--encoding", default=None,
                   help=".txt/.jsonl text encoding (default: the byte-order mark's, else strict UTF-8)")
    p.add_argument("--num-proc", type=int, default=None)
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's bos token")
    return p


def read_documents(path: str, text_field: str = "text", split: str = "train", line_docs: bool = False,
                   encoding: str | None = None):
    """A `datasets.Dataset` with one column `text_field`, one row per document."""
    import datasets

    src = Path(path)
    if src.is_dir():
        ds = datasets.load_from_disk(str(src))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise SystemExit(f"{src}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        if text_field not in ds.column_names:
            raise SystemExit(f"{src}: no column {text_field!r} (has {ds.column_names})")
        return ds.select_columns([text_field])
    if not src.is_file():
        raise SystemExit(f"input {src} does not exist")
    if src.suffix in (".jsonl", ".json"):
        docs = [json.loads(line)[text_field] for line in read_text(src, encoding).splitlines() if line.strip()]
    else:
        text = read_text(src, encoding)
        parts = text.splitlines() if line_docs else text.split("\n\n")
        docs = [d.strip() for d in parts if d.strip()]
    return datasets.Dataset.from_dict({text_field: docs})


def pack(token_lists: Iterable[Sequence[int]], seq_len: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Cut the concatenated documents into rows of seq_len; returns (rows, per-row cu_seqlens, dropped tokens)."""
    rows, cus = [], []
    cur, cu = [], [0]
    for toks in token_lists:
        toks = list(toks)
        while toks:
            take = min(len(toks), seq_len - len(cur))
            cur.extend(toks[:take])
            toks = toks[take:]
            cu.append(len(cur))
            if len(cur) == seq_len:
                rows.append(cur)
                cus.append(cu)
                cur, cu = [], [0]
    return rows, cus, len(cur)


def tokenize_and_pack(ds, tokenizer, seq_len: int, text_field: str = "text", batch_docs: int = 1000,
                      add_bos: bool = True, num_proc: int | None = None, desc: str = "pack"):
    bos = tokenizer.bos_token_id if add_bos else None
    eos = tokenizer.eos_token_id

    def fn(batch):
        enc = tokenizer(batch[text_field], add_special_tokens=False)["input_ids"]
        docs = [([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []) for ids in enc]
        rows, cus, dropped = pack(docs, seq_len)
        return {"input_ids": rows, "cu_seqlens": cus, "dropped": [dropped if i == 0 else 0 for i in range(len(rows))]}

    return ds.map(fn, batched=True, batch_size=batch_docs, remove_columns=ds.column_names, num_proc=num_proc,
                  desc=desc)


def run(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoTokenizer

    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    ds = read_documents(args.input, args.text_field, args.split, args.line_docs, args.encoding)
    if len(ds) == 0:
        raise SystemExit(f"{args.input}: no documents (empty input, or only blank lines)")
    if args.max_docs:
        ds = ds.select(range(min(args.max_docs, len(ds))))
    print(f"{len(ds)} documents from {args.input}; tokenizer {args.tokenizer} (vocab {len(tokenizer)}, "
          f"bos {tokenizer.bos_token_id}, eos {tokenizer.eos_token_id}); rows of {args.seq_len}", flush=True)
    splits = {}
    if args.val_docs:
        if args.val_docs >= len(ds):
            raise SystemExit(f"--val-docs {args.val_docs} leaves no training documents (have {len(ds)})")
        splits["validation"] = ds.select(range(args.val_docs))
        ds = ds.select(range(args.val_docs, len(ds)))
    splits["train"] = ds
    packed, stats = {}, {}
    for name, part in splits.items():
        out = tokenize_and_pack(part, tokenizer, args.seq_len, args.text_field, args.batch_docs,
                                add_bos=not args.no_bos, num_proc=args.num_proc, desc=f"tokenise+pack {name}")
        dropped = sum(out["dropped"])
        out = out.remove_columns("dropped")
        if len(out) == 0:
            raise SystemExit(f"{name}: no full row of {args.seq_len} tokens (lower --seq-len or add text)")
        packed[name] = out
        stats[name] = dict(rows=len(out), tokens=len(out) * args.seq_len, dropped_tokens=dropped)
        print(json.dumps({"split": name, **stats[name]}), flush=True)
    result = packed["train"] if len(packed) == 1 else datasets.DatasetDict(packed)
    result.save_to_disk(args.output)
    meta = dict(input=str(args.input), tokenizer=str(args.tokenizer), seq_len=args.seq_len,
                vocab_size=len(tokenizer), bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id, splits=stats)
    (Path(args.output) / "mhla_prepare.json").write_text(json.dumps(meta, indent=1))
    print(f"saved to {args.output} in {time.time() - t0:.1f}s", flush=True)
    return meta


def main(argv: Sequence[str] | None = None) -> dict:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
