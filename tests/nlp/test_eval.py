"""mhla_nlp.eval: sliding-window perplexity against a token-by-token hand computation; harness error."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from mhla_nlp import MHLAConfig, MHLAForCausalLM
from mhla_nlp.eval import main, sliding_window_nll

from .helpers import make_tokenizer


def _model():
    torch.manual_seed(0)
    return MHLAForCausalLM(MHLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=40, chunk_size=4,
                                      max_chunks=2, initializer_range=0.2)).eval()


def _hand(model, tokens, max_length, stride):
    """NLL of every token t >= 1 given the window that first covers it: context from that window's start."""
    total, begin, prev_end = 0.0, 0, 0
    owner = {}
    while prev_end < len(tokens):
        end = min(begin + max_length, len(tokens))
        for t in range(max(prev_end, begin + 1), end):
            owner[t] = begin
        prev_end, begin = end, begin + stride
    with torch.no_grad():
        for t, b in owner.items():
            logits = model(input_ids=torch.tensor([tokens[b:t]])).logits[0, -1]
            total -= float(torch.log_softmax(logits.double(), -1)[tokens[t]])
    return total, len(owner)


@pytest.mark.parametrize("max_length,stride", [(8, 4), (8, 8), (8, 3)])
def test_sliding_window_matches_hand(max_length, stride):
    model = _model()
    tokens = torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    nll, n = sliding_window_nll(model, tokens, max_length, stride)
    ref, n_ref = _hand(model, tokens, max_length, stride)
    assert n == n_ref == (22 if stride < max_length else 20)  # a window's first token has no context
    assert math.isclose(nll, ref, rel_tol=1e-5)


def test_ppl_cli_on_text(tmp_path):
    model = _model()
    model.config.vocab_size = 40
    model.save_pretrained(tmp_path / "m")
    make_tokenizer(tmp_path / "tok")
    (tmp_path / "t.txt").write_text("the cat sat on the mat and then the dog ran fast " * 3)
    res = main(["ppl", "--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"),
                "--data", str(tmp_path / "t.txt"), "--output", str(tmp_path / "r.json")])
    assert res["max_length"] == 8 and res["stride"] == 4 and res["scored"] == res["tokens"] - 1
    assert 1 < res["ppl"] < 1e4 and (tmp_path / "r.json").is_file()


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_harness_without_lm_eval_says_how_to_install(tmp_path):
    with pytest.raises(SystemExit, match="pip install lm-eval"):
        main(["harness", "--model", str(tmp_path)])


TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""


def _choice_logprob(model, tok, context: str, choice: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx), len(ids)))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs lm-eval (pip install -e .[eval])")
def test_harness_runs_our_model_on_a_local_task(tmp_path, monkeypatch):
    """lm-eval scores a local multiple-choice task with the registered MHLA model; accuracy equals ours."""
    import random

    from transformers import AutoTokenizer

    from .helpers import WORDS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = _model()
    model.config.vocab_size = 40
    model.save_pretrained(tmp_path / "m")
    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    rng = random.Random(0)
    rows = [{"question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))),
             "choices": rng.sample(WORDS, 3), "label": rng.randrange(3)} for _ in range(12)]
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks" / "tiny.yaml").write_text(TASK_YAML.format(data=tmp_path / "tasks" / "data.jsonl"))

    res = main(["harness", "--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"),
                "--tasks", "tiny_choice", "--include-path", str(tmp_path / "tasks"), "--device", "cpu",
                "--dtype", "float32", "--batch-size", "4", "--output", str(tmp_path / "r.json")])
    mine = [max(range(3), key=lambda c: _choice_logprob(model, tok, r["question"], r["choices"][c])) == r["label"]
            for r in rows]
    assert res["tiny_choice"]["acc,none"] == pytest.approx(sum(mine) / len(rows))
    assert json.loads((tmp_path / "r.json").read_text()) == res
