"""The public API of mhla_core: names and keyword names exactly as promised (issue 2, item 4)."""

import inspect

import mhla_core


def _params(fn):
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_exports():
    for name in ["mhla", "chunk_mhla", "fused_recurrent_mhla", "BlockLayout", "block_distance_mixing",
                 "causal_mixing_init", "MHLA", "NoncausalConfig", "StateConfig"]:
        assert name in mhla_core.__all__ and hasattr(mhla_core, name)


def test_signatures():
    P, K = "POSITIONAL_OR_KEYWORD", "KEYWORD_ONLY"
    empty = inspect.Parameter.empty
    assert _params(mhla_core.mhla) == [
        ("q", P, empty), ("k", P, empty), ("v", P, empty), ("mixing", P, empty), ("block_size", K, None),
        ("layout", K, None),  # added 2026-12-02: tokens in grid order (then block_size may be left out)
        ("normalize", K, True), ("normalizer", K, "exact"), ("eps", K, 1e-6), ("scale", K, None),
        ("backend", K, "auto"), ("config", K, None)]  # added 2026-12-01: the Triton path's settings
    assert _params(mhla_core.chunk_mhla) == [
        ("q", P, empty), ("k", P, empty), ("v", P, empty), ("mixing", P, empty), ("chunk_size", K, 64),
        ("scale", K, None), ("initial_state", K, None), ("output_final_state", K, False),
        ("cu_seqlens", K, None), ("backend", K, "auto")]
    assert _params(mhla_core.fused_recurrent_mhla) == [
        ("q", P, empty), ("k", P, empty), ("v", P, empty), ("mixing", P, empty), ("chunk_size", K, 64),
        ("scale", K, None), ("initial_state", K, None), ("output_final_state", K, False),
        ("backend", K, "torch")]  # added 2026-11-29: the Triton decode step, "torch" until timed on a GPU
    assert _params(mhla_core.block_distance_mixing) == [
        ("layout", P, empty), ("transform", P, "linear"), ("local_thres", K, 1.5), ("exp_sigma", K, 3.0)]
    assert [p[0] for p in _params(mhla_core.causal_mixing_init)] == ["num_chunks"]
    assert [p[0] for p in _params(mhla_core.BlockLayout)] == ["grid", "blocks"]
    for attr in ("to_blocks", "from_blocks", "distances", "num_blocks", "block_size"):
        assert hasattr(mhla_core.BlockLayout, attr)


def test_reference_names():
    """The PyTorch references are named `naive_*` (as fla names its own); the former names are aliases."""
    from mhla_core.ops import causal, noncausal

    assert causal.chunk_mhla_naive is causal.naive_chunk_mhla
    assert noncausal.mhla_naive is noncausal.naive_mhla
    for mod, name in ((causal, "naive_chunk_mhla"), (causal, "naive_recurrent_mhla"), (noncausal, "naive_mhla")):
        assert name in mod.__all__ and getattr(mod, name).__name__ == name
