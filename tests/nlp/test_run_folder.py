"""An LM run's final/ is a library folder: tokenizer beside the model, pipeline(), --init-from, fresh processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mhla_nlp.train import main

from .helpers import make_packed

TINY = ["hidden_size=32", "num_hidden_layers=2", "num_heads=2", "vocab_size=40", "chunk_size=4", "max_chunks=8"]
ROOT = Path(__file__).resolve().parents[2]


def _train(data: Path, out: Path, *extra: str, model_kwargs: list[str] = TINY) -> dict:
    return main(["--data", str(data), "--output", str(out), "--model", "mhla", "--model-kwargs", *model_kwargs,
                 "--batch-size", "2", "--max-steps", "2", "--warmup-steps", "1", "--lr", "3e-3", "--log-interval",
                 "1", "--eval-batches", "1", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm")
    _train(make_packed(d), d / "run")
    return d / "run"


def _greedy(folder: Path, prompt: str, **kw) -> str:
    from transformers import pipeline

    pipe = pipeline("text-generation", model=str(folder), **kw)
    return pipe(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]


def test_final_holds_the_tokenizer_and_runs_in_a_pipeline(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run / "final"
    assert (final / "tokenizer.json").is_file() and (final / "mhla_auto.py").is_file()
    text = _greedy(final, "the cat sat")
    tok, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final).eval()
    ids = tok("the cat sat", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert text == "the cat sat" + tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) > 3
    assert model.generation_config.eos_token_id == tok.eos_token_id and model.generation_config.pad_token_id == 0


def test_fresh_process_loads_final_with_trust_remote_code(run, tmp_path):
    final = run / "final"
    code = ("import json, sys\n"
            "from transformers import AutoModelForCausalLM, pipeline\n"
            "try:\n"
            f"    AutoModelForCausalLM.from_pretrained({str(final)!r})\n"
            "    raise SystemExit('loaded without trust_remote_code')\n"
            "except ValueError as e:\n"
            "    assert 'trust_remote_code=True' in str(e), e\n"
            "assert 'mhla_nlp' not in sys.modules\n"
            f"pipe = pipeline('text-generation', model={str(final)!r}, trust_remote_code=True)\n"
            "text = pipe('the cat sat', max_new_tokens=6, do_sample=False)[0]['generated_text']\n"
            f"pipe.model.save_pretrained({str(tmp_path / 'again')!r})\n"
            "print('\\nRESULT', json.dumps({'text': text, 'cls': type(pipe.model).__module__}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)  # no terminal: transformers' prompt becomes an error
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.split("\nRESULT ")[-1])  # after the prompt transformers printed
    assert got["cls"] == "mhla_nlp.models.mhla.modeling_mhla"  # the installed classes, no copied code
    assert got["text"] == _greedy(final, "the cat sat")
    assert not list((tmp_path / "m").rglob("modeling_mhla.py"))
    # saved again in that process: the same auto_map, no copies of the package's source
    assert sorted(p.name for p in (tmp_path / "again").glob("*.py")) == ["mhla_auto.py"]
    again = json.loads((tmp_path / "again" / "config.json").read_text())["auto_map"]
    assert again == json.loads((final / "config.json").read_text())["auto_map"]


def test_init_from_starts_from_the_weights(run, tmp_path):
    data = run.parent / "data"
    _train(data, tmp_path / "b", "--init-from", str(run / "final"), "--lr", "0", "--weight-decay", "0")
    a, b = load_file(run / "final" / "model.safetensors"), load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fresh = _train(data, tmp_path / "c", "--lr", "0", "--weight-decay", "0")["model"].state_dict()
    assert not torch.equal(fresh["model.embeddings.weight"], a["model.embeddings.weight"])


def test_init_from_rejects_another_architecture(run, tmp_path):
    data, final = run.parent / "data", str(run / "final")
    other = [k for k in TINY if not k.startswith("num_hidden_layers")] + ["num_hidden_layers=3"]
    with pytest.raises(ValueError, match=r"num_hidden_layers: 2 there, 3 here.*num_hidden_layers=2"):
        _train(data, tmp_path / "d", "--init-from", final, model_kwargs=other)
    with pytest.raises(ValueError, match="holds a 'mhla' model, but --model transformer builds 'llama'"):
        main(["--data", str(data), "--output", str(tmp_path / "e"), "--model", "transformer", "--init-from", final,
              "--model-kwargs", "hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2", "vocab_size=40"])
    with pytest.raises(ValueError, match="no config.json"):
        _train(data, tmp_path / "f", "--init-from", str(tmp_path))
    assert not (tmp_path / "d").exists()  # refused before the run folder is made
