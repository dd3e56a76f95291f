"""prepare_data: tokenise, pack into rows with document offsets, save_to_disk."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoTokenizer

from mhla_nlp.prepare_data import main, pack, read_documents

from .helpers import make_corpus, make_tokenizer


def test_pack_offsets():
    rows, cus, dropped = pack([[1, 2, 3], [4, 5, 6, 7, 8], [9]], seq_len=4)
    assert rows == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert cus == [[0, 3, 4], [0, 4]]
    assert dropped == 1


def test_prepare_jsonl_roundtrip(tmp_path):
    corpus = make_corpus(tmp_path / "c.jsonl", n_docs=30)
    tok_dir = make_tokenizer(tmp_path / "tok")
    meta = main(["--input", str(corpus), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "out"),
                 "--seq-len", "16", "--val-docs", "5"])
    dd = datasets.load_from_disk(str(tmp_path / "out"))
    assert set(dd) == {"train", "validation"}
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    train = dd["train"]
    assert meta["splits"]["train"]["rows"] == len(train)
    # the rows, joined, are the documents with bos/eos, in order (the batch tail is dropped at the end)
    import json
    docs = [json.loads(x)["text"] for x in corpus.read_text().splitlines()][5:]
    stream = [t for d in docs for t in [1, *tok(d, add_special_tokens=False)["input_ids"], 2]]
    flat = [t for r in train["input_ids"] for t in r]
    assert flat == stream[: len(flat)]
    for row, cu in zip(train["input_ids"], train["cu_seqlens"]):
        assert len(row) == 16 and cu[0] == 0 and cu[-1] == 16 and cu == sorted(set(cu))
        for a in cu[1:-1]:  # a boundary inside a row starts with bos
            assert row[a] == 1


def test_prepare_text_and_saved_dataset(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    txt = tmp_path / "c.txt"
    txt.write_text("the cat sat on the mat\n\na dog ran fast and then it was night\n\nsun moon day " * 5)
    main(["--input", str(txt), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o1"), "--seq-len", "8"])
    ds = datasets.load_from_disk(str(tmp_path / "o1"))
    assert len(ds) > 0 and ds.column_names == ["input_ids", "cu_seqlens"]
    datasets.Dataset.from_dict({"text": ["the cat sat"] * 10}).save_to_disk(str(tmp_path / "raw"))
    main(["--input", str(tmp_path / "raw"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o2"),
          "--seq-len", "5", "--no-bos"])
    ds = datasets.load_from_disk(str(tmp_path / "o2"))
    assert ds[0]["input_ids"] == [4, 5, 7, 2, 4] and ds[0]["cu_seqlens"] == [0, 4, 5]


def test_stdlib_corpus(tmp_path):
    import json

    from mhla_nlp.corpus import main as corpus

    meta = corpus(["--out", str(tmp_path), "--max-modules", "5", "--vocab-size", "300", "--val-every", "4"])
    lines = [json.loads(x) for x in (tmp_path / "corpus.jsonl").read_text().splitlines()]
    assert len(lines) == meta["documents"] and meta["val_docs"] > 0 and meta["train_docs"] > 0
    assert any(d["name"].startswith("topic:") for d in lines) and any(d["name"].startswith("module:") for d in lines)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    text = "Return the number of items."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_bad_sizes_stop_at_the_parser(tmp_path, capsys):
    """--seq-len 0 used to loop forever; sizes are checked before any work (issue 14, item 8)."""
    for flag, value in (("--seq-len", "0"), ("--seq-len", "-4"), ("--batch-docs", "0"), ("--max-docs", "-1")):
        with pytest.raises(SystemExit) as err:
            main(["--input", "x.txt", "--tokenizer", "t", "--output", str(tmp_path / "o"), flag, value])
        assert err.value.code == 2
        assert flag in capsys.readouterr().err


def test_text_encodings(tmp_path):
    text = "Grüße aus Köln.\n\nΚαλημέρα κόσμε.\n"
    (tmp_path / "u8.txt").write_text(text, encoding="utf-8")
    (tmp_path / "u16.txt").write_bytes(text.encode("utf-16"))  # with its byte-order mark
    (tmp_path / "l1.txt").write_bytes("caf\xe9 cr\xe8me\n\nna\xefve\n".encode("latin-1"))
    want = read_documents(str(tmp_path / "u8.txt"))["text"]
    assert want == ["Grüße aus Köln.", "Καλημέρα κόσμε."]
    assert read_documents(str(tmp_path / "u16.txt"))["text"] == want
    with pytest.raises(SystemExit, match=r"l1\.txt: not valid utf-8 at byte 3.*--encoding"):
        read_documents(str(tmp_path / "l1.txt"))
    assert read_documents(str(tmp_path / "l1.txt"), encoding="latin-1")["text"] == ["café crème", "naïve"]


def test_empty_input_is_named(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(SystemExit, match="empty.txt: no documents"):
        main(["--input", str(tmp_path / "empty.txt"), "--tokenizer", str(tok_dir), "--output", str(tmp_path / "o")])
