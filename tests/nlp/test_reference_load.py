"""Authors' LM checkpoints: `load_reference_state_dict` applies the mixing constraint on load."""

from __future__ import annotations

import torch

from mhla_nlp import MHLAConfig, MHLAForCausalLM


def _model(seed: int) -> MHLAForCausalLM:
    torch.manual_seed(seed)
    return MHLAForCausalLM(MHLAConfig(hidden_size=32, num_hidden_layers=2, num_heads=2, vocab_size=50, chunk_size=4,
                                      max_chunks=6, initializer_range=0.2)).eval()


def _reference_sd(model: MHLAForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights as the authors store them (mixing [L, L, 1, 1, 1, 1], no tied lm_head), with mixing
    values as an optimiser step leaves them: below 1e-5, negative, above 1 and above the diagonal."""
    torch.manual_seed(1)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith("mixing_matrix"):
            v = torch.randn_like(v) * 2  # every entry, above the diagonal too
            v[0, 0], v[1, 0], v[2, 2], v[3, 1] = -0.5, 3.0, 1e-7, 0.0
            v = v.reshape(*v.shape, 1, 1, 1, 1)
        sd[k] = v.clone()
    return sd


def test_reference_mixing_is_constrained_on_load():
    sd = _reference_sd(_model(0))
    raw = sd["model.layers.0.attn.mixing_matrix"].view(6, 6)
    assert float(raw.min()) < 0 and float(raw.max()) > 1 and bool((raw.triu(1) != 0).any())
    model = _model(2)
    model.load_reference_state_dict(sd)
    lo, hi = model.config.mixing_clamp
    for i, layer in enumerate(model.model.layers):
        w = layer.attn.mixing_matrix.detach()
        raw = sd[f"model.layers.{i}.attn.mixing_matrix"].view(6, 6)
        assert torch.equal(w, raw.clamp(lo, hi).tril())
        low = torch.ones(6, 6, dtype=torch.bool).tril()
        assert bool((w[low] >= lo).all()) and bool((w[low] <= hi).all()) and bool((w[~low] == 0).all())
    # the output is that of the clamped matrices, loaded as they are
    clamped = {k: (v.view(6, 6).clamp(lo, hi).tril() if k.endswith("mixing_matrix") else v) for k, v in sd.items()}
    twin = _model(3)
    twin.load_state_dict(clamped, strict=False)
    ids = torch.randint(3, 50, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, twin(ids).logits, rtol=0, atol=0)
