"""The CUDA path (fla's fused modules, Triton chunk_mhla) against the CPU path; skipped without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from mhla_nlp import MHLAConfig, MHLAForCausalLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _model() -> MHLAForCausalLM:
    torch.manual_seed(0)
    cfg = MHLAConfig(hidden_size=128, num_hidden_layers=2, num_heads=2, vocab_size=128, chunk_size=16,
                     max_chunks=8, initializer_range=0.1, pad_token_id=0)
    return MHLAForCausalLM(cfg).eval()


def test_cuda_matches_cpu():
    cpu = _model()
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(3, 128, (2, 100))
    cu = torch.tensor([0, 37, 100], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(gpu(ids.cuda()).logits.cpu(), cpu(ids).logits, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(
            gpu(ids[:1].cuda(), cu_seqlens=cu.cuda()).logits.cpu(), cpu(ids[:1], cu_seqlens=cu).logits,
            atol=2e-3, rtol=2e-3,
        )
        lab = ids.cuda()
        loss_gpu = gpu(lab, labels=lab).loss.item()
    assert abs(loss_gpu - cpu(ids, labels=ids).loss.item()) < 1e-3


def test_cuda_cached_generate_equals_uncached():
    model = _model().cuda()
    ids = torch.randint(3, 128, (2, 21), device="cuda")
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_decode_step_has_no_host_sync():
    """One cached decode step (batch rows at different offsets) issues no stream synchronisation."""
    from mhla_nlp.models.mhla.modeling_mhla import output_cache

    model = _model().cuda()
    ids = torch.randint(3, 128, (2, 40), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the rows decode at different offsets
    with torch.no_grad():
        cache = output_cache(model(ids, attention_mask=mask, use_cache=True))
        step = torch.randint(3, 128, (2, 1), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            logits = model(step, past_key_values=cache, use_cache=True).logits
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logits).all()
