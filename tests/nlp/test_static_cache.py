"""The static cache (issue 16 item 2): the same tokens as the dynamic cache, and a decode step with no host sync."""

from __future__ import annotations

import os

import pytest
import torch

from mhla_nlp.cache import MHLAStaticCache
from mhla_nlp.generation import StaticGreedyStep, static_greedy_generate
from mhla_nlp.layers.mhla import MHLAAttention
from mhla_nlp.models.mhla.modeling_mhla import output_cache
from tests.core.test_decode_state import _NoHostReads
from tests.nlp.test_model import tiny_model

PROMPT, NEW = 13, 30  # chunks of 8: the rows cross chunk ends at different steps


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: the rows decode at different offsets
    return ids, mask


def test_static_cache_generate_equals_dynamic():
    """cache_implementation="static" and a user's MHLAStaticCache (a spare row) give the dynamic cache's tokens."""
    model = tiny_model()
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    ref = model.generate(ids, use_cache=True, **kw)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kw)
    assert isinstance(output_cache(out), MHLAStaticCache) and torch.equal(out.sequences, ref)
    cache = MHLAStaticCache(model.config, max_batch_size=3, max_cache_len=PROMPT + NEW)
    assert torch.equal(model.generate(ids, cache=cache, **kw), ref)
    assert cache.get_seq_length() == PROMPT + NEW - 1
    for st in cache.states():
        assert st.offsets.tolist() == [PROMPT + NEW - 1, PROMPT + NEW - 5, 0] and st.max_offset == PROMPT + NEW - 1


def test_static_cache_beam_search_equals_dynamic():
    model = tiny_model()
    ids, mask = _batch(1)
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, num_beams=3)
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kw)
    assert isinstance(output_cache(out), MHLAStaticCache) and output_cache(out).max_batch_size == 6
    assert torch.equal(out.sequences, model.generate(ids, **kw))


def test_static_greedy_generate_equals_generate():
    """The helper (end tokens handled on the device, trimmed after the loop) against generate()."""
    model = tiny_model()
    ids, mask = _batch(2)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(static_greedy_generate(model, ids, NEW, attention_mask=mask), ref)
    eos = int(ref[0, PROMPT + 6])  # a token row 0 emits: generation of row 0 alone stops there
    one = model.generate(ids[:1], max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert one.shape[1] <= PROMPT + 7
    cache = MHLAStaticCache(model.config, max_batch_size=2)  # reused (and reset) by the helper
    assert torch.equal(static_greedy_generate(model, ids[:1], NEW, eos_token_id=eos, pad_token_id=0, cache=cache), one)
    with pytest.raises(ValueError, match="needs 2 of 17"):
        static_greedy_generate(model, ids, 5, cache=MHLAStaticCache(model.config, 1, 12))


def _prefilled(model, device: str = "cpu"):
    ids, mask = (x.to(device) for x in _batch())
    cache = MHLAStaticCache(model.config, max_batch_size=2, max_cache_len=40, device=device)
    step = StaticGreedyStep(model, cache, torch.empty(2, 1, dtype=torch.long, device=device), [2], 0)
    step.select(model(ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1])
    return step


@torch.no_grad()
def test_static_decode_step_reads_no_value_on_the_host(monkeypatch):
    """A whole-model decode step under a dispatch mode that fails on host reads (.item(), bool(tensor), nonzero,
    a tensor built from host data); Tensor.tolist and friends are patched to fail too."""
    model = tiny_model()
    step = _prefilled(model)
    before = step.cache.states()[0].offsets.clone()
    for name in ("tolist", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *_, _n=name: pytest.fail(f"Tensor.{_n} in the decode step"))
    with _NoHostReads():
        for _ in range(4):  # row 0 completes a chunk on the way (offset 13 -> 17, chunks of 8)
            step()
    monkeypatch.undo()
    assert torch.equal(step.cache.states()[0].offsets, before + 4)
    # the dynamic cache's step copies its Python-int offsets to the device: the same check catches it
    ids, mask = _batch()
    cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
    with pytest.raises(AssertionError, match="lift_fresh"), _NoHostReads():
        model(step.tokens, cache=cache, use_cache=True)


@torch.no_grad()
def test_static_decode_step_traces_as_one_graph():
    """torch._dynamo with fullgraph=True over the whole step: a host read or a branch on a tensor value would
    break the graph and raise."""
    model = tiny_model()
    step, twin = _prefilled(model), _prefilled(model)
    torch._dynamo.reset()
    compiled = torch.compile(step.__call__, fullgraph=True, backend="eager")
    for _ in range(3):  # chunk ends of both rows on the way (offsets 13 and 9, chunks of 8)
        compiled()
        twin()
        assert torch.equal(step.tokens, twin.tokens)


def test_static_cache_errors():
    model = tiny_model()
    cfg = model.config
    with pytest.raises(ValueError, match="raise max_chunks in the config to at least 9"):
        MHLAStaticCache(cfg, max_batch_size=1, max_cache_len=cfg.chunk_size * cfg.max_chunks + 1)
    ids, _ = _batch()
    small = MHLAStaticCache(cfg, max_batch_size=1, max_cache_len=20)
    with torch.no_grad(), pytest.raises(ValueError, match="static state holds up to"):
        model(ids, cache=small, use_cache=True)
    cache = MHLAStaticCache(cfg, max_batch_size=2, max_cache_len=PROMPT + 1)  # 2 chunks of 8: 16 tokens
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        for _ in range(3):
            model(ids[:, :1], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="max_cache_len >= 17"):
            model(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton decode needs a GPU or TRITON_INTERPRET=1")
def test_triton_static_step_generates_the_same_tokens():
    model = tiny_model()
    ids, mask = _batch(3)
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    ref = model.generate(ids, **kw)
    for m in model.modules():
        if isinstance(m, MHLAAttention):
            m.static_decode_backend = "triton"
    out = model.generate(ids, cache_implementation="static", return_dict_in_generate=True, **kw)
    assert isinstance(output_cache(out), MHLAStaticCache) and torch.equal(out.sequences, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_generation_equals_eager():
    """Not yet run on a GPU: the whole decode step captured once in a CUDA graph and replayed."""
    model = tiny_model().cuda()
    ids, mask = (x.cuda() for x in _batch(4))
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    eager = static_greedy_generate(model, ids, NEW, attention_mask=mask)
    graphed = static_greedy_generate(model, ids, NEW, attention_mask=mask, cuda_graph=True)
    assert torch.equal(eager, ref) and torch.equal(graphed, ref)


def test_bench_lm_static_cache_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_lm.py"
    spec = importlib.util.spec_from_file_location("bench_lm", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    md = tmp_path / "bench.md"
    rows = mod.main(["--tiny", "--device", "cpu", "--models", "mhla", "--mhla-cache", "static", "--markdown", str(md)])
    assert rows[0]["decode_tok_s"] > 0
    assert '`fused_recurrent_mhla_static(backend="auto")`, generate, static cache' in md.read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cuda_static_step_has_no_host_sync():
    """Not yet run on a GPU: whole-model static steps under torch.cuda.set_sync_debug_mode("error")."""
    model = tiny_model().cuda()
    step = _prefilled(model, "cuda")
    step()  # warm-up (Triton compilation, autotuning)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_static_cache_sizes_survive_read_only_cache_properties(monkeypatch):
    """transformers 5.17's Cache defines max_batch_size / max_cache_len as read-only properties (the H200
    image: 'property ... has no setter'); the static cache keeps its sizes in its own fields."""
    from fla.models.utils import Cache

    monkeypatch.setattr(Cache, "max_batch_size", property(lambda self: -1), raising=False)
    monkeypatch.setattr(Cache, "max_cache_len", property(lambda self: -1), raising=False)
    model = tiny_model()
    cache = MHLAStaticCache(model.config, max_batch_size=3, max_cache_len=40)
    assert (cache.max_batch_size, cache.max_cache_len) == (3, 40)
