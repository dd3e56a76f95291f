"""Packed batches from transformers' DataCollatorWithFlattening: documents stay apart (position_ids, flash kwargs)."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from mhla_nlp import MHLAConfig, MHLAForCausalLM

TOL = dict(atol=1e-5, rtol=1e-4)
LENGTHS = (5, 17, 9, 1, 12)


def _model(seed: int = 0) -> MHLAForCausalLM:
    torch.manual_seed(seed)
    cfg = MHLAConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100, chunk_size=8, max_chunks=8,
                     initializer_range=0.2)
    model = MHLAForCausalLM(cfg).eval()
    with torch.no_grad():  # off the init, so that the mixing matters
        for layer in model.model.layers:
            layer.attn.mixing_matrix.mul_(torch.rand_like(layer.attn.mixing_matrix) + 0.5)
        model.constrain_mixing()
    return model


def _docs(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 100, (n,), generator=g).tolist() for n in LENGTHS]


def _collate(docs: list[list[int]], **kw) -> dict:
    return DataCollatorWithFlattening(**kw)([{"input_ids": d} for d in docs])


def _per_document(model: MHLAForCausalLM, docs: list[list[int]]) -> tuple[torch.Tensor, float]:
    """Logits of each document run alone, concatenated [N, V]; the token-weighted mean of their losses."""
    logits, total, count = [], 0.0, 0
    with torch.no_grad():
        for d in docs:
            ids = torch.tensor([d])
            out = model(ids, labels=ids)
            logits.append(out.logits[0])
            if len(d) > 1:
                total, count = total + float(out.loss) * (len(d) - 1), count + len(d) - 1
    return torch.cat(logits), total / count


@pytest.mark.parametrize("kw", [{}, {"return_flash_attn_kwargs": True},
                                {"return_flash_attn_kwargs": True, "return_position_ids": False},
                                {"return_seq_idx": True, "return_position_ids": False}],
                         ids=["position_ids", "flash_kwargs", "flash_kwargs_only", "seq_idx"])
def test_collator_batch_equals_per_document(kw):
    model, docs = _model(), _docs()
    batch = _collate(docs, **kw)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    alone, alone_loss = _per_document(model, docs)
    with torch.no_grad():
        out = model(**batch)
        whole = model(batch["input_ids"]).logits[0]
    torch.testing.assert_close(out.logits[0], alone, **TOL)
    assert torch.isfinite(out.loss)
    assert abs(float(out.loss) - alone_loss) < 1e-5
    assert not torch.allclose(whole[5:], alone[5:], atol=1e-3)  # without the bounds the documents would leak


def test_position_ids_and_cu_seqlens_must_agree():
    model, docs = _model(), _docs()
    batch = _collate(docs, return_flash_attn_kwargs=True)
    ids, pos = batch["input_ids"], batch["position_ids"]
    cu = batch["cu_seq_lens_q"]
    with torch.no_grad():
        same = model(ids, position_ids=pos, cu_seqlens=cu).logits  # the same bounds twice are fine
        torch.testing.assert_close(same, model(ids, cu_seqlens=cu).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=pos, cu_seqlens=torch.tensor([0, 5, ids.shape[1]], dtype=torch.int32))
        with pytest.raises(ValueError, match="position_ids"):  # one run of positions over several documents
            model(ids, position_ids=torch.arange(ids.shape[1])[None], cu_seqlens=cu)
        with pytest.raises(ValueError, match="cu_seq_lens_k"):
            model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, ids.shape[1]], dtype=torch.int32))
        with pytest.raises(ValueError, match="max_length_q"):
            model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
        with pytest.raises(ValueError, match="cu_seq_lens_q"):
            model(ids, max_length_q=17)
        with pytest.raises(ValueError, match="cu_seqlens"):
            model(ids, cu_seqlens=cu, cu_seq_lens_q=torch.tensor([0, 5, ids.shape[1]], dtype=torch.int32))


def test_restarting_position_ids_need_batch_one():
    model = _model()
    ids = torch.randint(3, 100, (2, 10))
    pos = torch.cat([torch.arange(4), torch.arange(6)]).expand(2, 10)
    with torch.no_grad(), pytest.raises(ValueError, match="batch 1"):
        model(ids, position_ids=pos)


def test_ordinary_position_ids_change_nothing():
    model = _model()
    ids = torch.randint(3, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding: generate-style positions (cumsum - 1, 0 on the padding)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, position_ids=pos).logits,
                                   model(ids, attention_mask=mask).logits, rtol=0, atol=0)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(12)[None] + 7).logits,
                                   model(ids).logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.arange(12)[None, None])
