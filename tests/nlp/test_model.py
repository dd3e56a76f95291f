"""CPU tests of the MHLA language model (tiny configs)."""

from __future__ import annotations

import os

import pytest
import torch
from fla.models.utils import Cache
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import mhla_nlp
from mhla_nlp import MHLAConfig, MHLAForCausalLM, MHLAModel
from mhla_nlp.models.mhla.modeling_mhla import output_cache

ATOL = 1e-5


def tiny_config(**kw) -> MHLAConfig:
    base = dict(hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100, chunk_size=8, max_chunks=8,
                pad_token_id=0, eos_token_id=2, bos_token_id=1, initializer_range=0.2)
    base.update(kw)
    return MHLAConfig(**base)


def tiny_model(seed: int = 0, **kw) -> MHLAForCausalLM:
    torch.manual_seed(seed)
    model = MHLAForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # move the mixing off its init so that tests see its effect
        for layer in model.model.layers:
            w = layer.attn.mixing_matrix
            w.mul_(torch.rand_like(w) + 0.5)
        model.constrain_mixing()
    return model


def test_auto_classes_build():
    cfg = AutoConfig.for_model("mhla", hidden_size=64, num_hidden_layers=2, num_heads=2, vocab_size=100)
    assert isinstance(cfg, MHLAConfig)
    assert isinstance(AutoModel.from_config(cfg), MHLAModel)
    lm = AutoModelForCausalLM.from_config(cfg)
    assert isinstance(lm, MHLAForCausalLM)
    w = lm.model.layers[0].attn.mixing_matrix
    assert w.shape == (32, 32)
    assert torch.allclose(w, mhla_nlp.layers.mhla.causal_mixing_init(32))
    assert lm.lm_head.weight.data_ptr() == lm.model.embeddings.weight.data_ptr()  # tied


def test_save_load_round_trip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MHLAForCausalLM) and loaded.config.max_chunks == 8
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    ids = torch.randint(3, 100, (2, 20))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_loss_and_backward():
    model = tiny_model().train()
    ids = torch.randint(3, 100, (2, 20))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert model.model.layers[0].attn.mixing_matrix.grad is not None


def test_prefill_decode_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 29))  # 29 tokens: several chunks of 8, a partial last one
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = Cache()
        out = model(ids[:, :13], cache=cache, use_cache=True)
        logits = [out.logits]
        cache = output_cache(out)
        for t in range(13, 29):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits)
        assert cache[0]["recurrent_state"].offsets == (29, 29)
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=ATOL, rtol=1e-4)


def greedy_no_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids, use_cache=False).logits[:, -1]
            logits[:, 2] = -float("inf")  # as min_new_tokens: no eos
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids


def test_cached_generate_equals_uncached(monkeypatch):
    import mhla_nlp.layers.mhla as layer_mod

    calls = []
    orig = layer_mod.fused_recurrent_mhla
    monkeypatch.setattr(layer_mod, "fused_recurrent_mhla", lambda *a, **k: calls.append(1) or orig(*a, **k))
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 11))
    kw = dict(max_new_tokens=20, do_sample=False, min_new_tokens=20)
    a = model.generate(ids, use_cache=True, **kw)
    assert len(calls) == 19 * model.config.num_hidden_layers  # prefill chunked, then one token at a time
    b = model.generate(ids, use_cache=False, **kw)
    assert a.shape == (2, 31)
    assert torch.equal(a, b)
    assert torch.equal(a, greedy_no_cache(model, ids, 20))
    assert len(set(a[0, 11:].tolist())) > 3  # not a degenerate repetition


def test_left_padded_batched_generate_equals_single():
    model = tiny_model()
    seqs = [torch.randint(3, 100, (n,)) for n in (5, 12)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, 12 - len(s):], mask[i, 12 - len(s):] = s, 1
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    batched = model.generate(ids, attention_mask=mask, use_cache=True, **kw)
    for i, s in enumerate(seqs):
        single = model.generate(s[None], use_cache=True, **kw)
        assert torch.equal(batched[i, 12:], single[0, len(s):])


def test_padded_batch_equals_per_sample():
    model = tiny_model()
    lengths = (7, 19, 24)
    T = 24
    for side in ("right", "left"):
        ids = torch.zeros(3, T, dtype=torch.long)
        mask = torch.zeros(3, T, dtype=torch.long)
        seqs = [torch.randint(3, 100, (n,)) for n in lengths]
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
            ids[i, sl], mask[i, sl] = s, 1
        with torch.no_grad():
            out = model(ids, attention_mask=mask).logits
            for i, s in enumerate(seqs):
                alone = model(s[None]).logits[0]
                sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
                torch.testing.assert_close(out[i, sl], alone, atol=ATOL, rtol=1e-4)


def test_packed_equals_separate():
    model = tiny_model()
    lengths = (5, 17, 9)
    seqs = [torch.randint(3, 100, (n,)) for n in lengths]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 5, 22, 31], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, cu_seqlens=cu).logits[0]
        for s, a in zip(seqs, cu[:-1].tolist()):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(out[a:a + len(s)], alone, atol=ATOL, rtol=1e-4)
        whole = model(packed).logits[0]
    assert not torch.allclose(out[5:22], whole[5:22], atol=1e-3)  # the boundary matters


def test_too_long_input_names_max_chunks():
    model = tiny_model()
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 64)))  # exactly max_chunks * chunk_size is fine
        with pytest.raises(ValueError, match="max_chunks"):
            model(torch.randint(3, 100, (1, 65)))
        cache = output_cache(model(torch.randint(3, 100, (1, 64)), cache=Cache(), use_cache=True))
        with pytest.raises(ValueError, match="max_chunks"):
            model(torch.randint(3, 100, (1, 1)), cache=cache, use_cache=True)


def test_reference_state_dict_loads_exactly():
    model = tiny_model()
    torch.manual_seed(1)
    ref = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: the authors' checkpoints may leave it out
        new = torch.rand_like(v)
        ref[k] = new.reshape(*new.shape, 1, 1, 1, 1) if k.endswith("mixing_matrix") else new
    assert ref["model.layers.0.attn.mixing_matrix"].shape == (8, 8, 1, 1, 1, 1)
    for k in ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj"):
        assert f"model.layers.1.attn.{k}.weight" in ref
    assert "model.layers.1.attn.g_norm_swish_gate.weight" in ref
    target = tiny_model(seed=3)
    target.load_reference_state_dict(ref)
    sd = target.state_dict()
    for k, v in ref.items():  # the mixing is constrained on load (tests/nlp/test_reference_load.py)
        want = v.reshape(sd[k].shape)
        want = want.clamp(*target.config.mixing_clamp).tril() if k.endswith("mixing_matrix") else want
        assert torch.equal(sd[k], want), k
    assert torch.equal(sd["lm_head.weight"], ref["model.embeddings.weight"])
    plain = tiny_model(seed=4)  # plain load_state_dict reshapes the mixing through a pre-hook
    plain.load_state_dict(ref, strict=False)
    assert torch.equal(plain.model.layers[0].attn.mixing_matrix, ref["model.layers.0.attn.mixing_matrix"].view(8, 8))


def test_mixing_clamp():
    model = tiny_model(mixing_clamp=(1e-5, 1.0))
    w = model.model.layers[0].attn.mixing_matrix
    with torch.no_grad():
        w.copy_(torch.randn_like(w) * 3)
    model.constrain_mixing()
    low = torch.tril(torch.ones_like(w, dtype=torch.bool))
    w = w.detach()
    assert bool((w[low] >= torch.tensor(1e-5)).all()) and bool((w[low] <= 1.0).all())
    assert bool((w[low] == torch.tensor(1e-5)).any()) and bool((w[low] == 1.0).any())
    assert float(w[~low].abs().max()) == 0.0


def test_beam_search_cached_equals_uncached():
    model = tiny_model()
    ids = torch.randint(3, 100, (2, 10))
    kw = dict(max_new_tokens=10, min_new_tokens=10, num_beams=3)
    assert torch.equal(model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw))


def test_cached_continuation_rejects_padding():
    model = tiny_model()
    with torch.no_grad():
        cache = output_cache(model(torch.randint(3, 100, (2, 5)), cache=Cache(), use_cache=True))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[0, -1] = 0
        with pytest.raises(ValueError, match="left padding"):
            model(torch.randint(3, 100, (2, 2)), attention_mask=mask, cache=cache, use_cache=True)


def test_chunked_continuation_equals_full_forward():
    model = tiny_model()
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :11], cache=Cache(), use_cache=True)
        rest = model(ids[:, 11:], cache=output_cache(out), use_cache=True).logits  # chunk_mhla from a state
    torch.testing.assert_close(torch.cat([out.logits, rest], 1), full, atol=ATOL, rtol=1e-4)


def test_gradient_checkpointing_with_packed_input():
    model = tiny_model().train()
    ids = torch.randint(3, 100, (1, 30))
    cu = torch.tensor([0, 10, 30])
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()
    ref = model.model.layers[0].attn.q_proj.weight.grad.clone()
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids, cu_seqlens=cu).loss.backward()
    torch.testing.assert_close(model.model.layers[0].attn.q_proj.weight.grad, ref)


def test_row_of_only_padding():
    model = tiny_model()
    ids = torch.randint(3, 100, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=Cache(), use_cache=True)
        assert output_cache(out)[0]["recurrent_state"].offsets == (12, 0, 12)
        torch.testing.assert_close(out.logits[2], model(ids[2:3]).logits[0], atol=ATOL, rtol=1e-4)
        nxt = torch.randint(3, 100, (3, 1))
        step = model(nxt, attention_mask=torch.ones(3, 13, dtype=torch.long), cache=output_cache(out), use_cache=True)
        torch.testing.assert_close(step.logits[1], model(nxt[1:2]).logits[0], atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(
            step.logits[0], model(torch.cat([ids[0], nxt[0]])[None]).logits[0, -1:], atol=ATOL, rtol=1e-4
        )


def test_full_mask_is_checked_once_per_forward(monkeypatch):
    """A mask with no padding among the new tokens reaches no layer (each layer would sync to test it)."""
    from mhla_nlp.layers.mhla import MHLAAttention

    model = tiny_model()
    seen = []
    forward = MHLAAttention.forward

    def spy(self, hidden_states, attention_mask=None, **kw):
        seen.append(attention_mask)
        return forward(self, hidden_states, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(MHLAAttention, "forward", spy)
    ids = torch.randint(model.config.vocab_size, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    with torch.no_grad():
        plain = model(ids).logits
        masked = model(ids, attention_mask=mask).logits
        left = mask.clone()
        left[0, :3] = 0
        model(ids, attention_mask=left)
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)
    n = model.config.num_hidden_layers
    assert seen[: 2 * n] == [None] * (2 * n)
    assert all(m is not None for m in seen[2 * n:]) and len(seen) == 3 * n


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton decode needs a GPU or TRITON_INTERPRET=1")
def test_triton_decode_backend_generates_the_same_tokens():
    """Left-padded batch: the Triton decode step gives the PyTorch step's logits and tokens."""
    from mhla_nlp.layers.mhla import MHLAAttention

    model = tiny_model()
    ids = torch.randint(3, 100, (2, 13))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True,
              output_logits=True, return_dict_in_generate=True)
    ref = model.generate(ids, **kw)
    for m in model.modules():
        if isinstance(m, MHLAAttention):
            m.decode_backend = "triton"
    out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
