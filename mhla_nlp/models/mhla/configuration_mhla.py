"""MHLAConfig: GLA's field names (fla) plus the causal MHLA settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers.configuration_utils import PretrainedConfig

# the file `save_pretrained` writes beside config.json, which `auto_map` names: it imports the installed classes
AUTO_MODULE = "mhla_auto"
AUTO_MAP = {
    "AutoConfig": f"{AUTO_MODULE}.MHLAConfig",
    "AutoModel": f"{AUTO_MODULE}.MHLAModel",
    "AutoModelForCausalLM": f"{AUTO_MODULE}.MHLAForCausalLM",
}
AUTO_SOURCE = '''"""The MHLA classes of the installed `mhla_nlp` package, named by this folder's config.json `auto_map`.

No model code lives here: it lets `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (or
`pipeline(..., trust_remote_code=True)`) load the folder in a process that has not imported mhla_nlp.
"""

from mhla_nlp import MHLAConfig, MHLAForCausalLM, MHLAModel  # noqa: F401
'''


class MHLAConfig(PretrainedConfig):
    """Configuration of an MHLA language model (fla GLA layout with the attention replaced by MHLA).

    Beyond GLA's fields: `chunk_size` (tokens per chunk, 64), `max_chunks` (size L of the mixing
    matrix, 32; the longest input is `chunk_size * max_chunks`), `mixing_clamp` (bounds applied by
    `constrain_mixing()`), `rope_theta` (rotary base).

    Saved configs carry an `auto_map` to `mhla_auto.py`, a file `save_pretrained` writes beside them that
    imports this package's classes, so that a saved folder loads without `import mhla_nlp` when the caller
    passes `trust_remote_code=True` (transformers' switch for classes it does not ship).
    """

    model_type = "mhla"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        hidden_size: int = 1024,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        feature_map: str = "relu",
        hidden_act: str = "swish",
        elementwise_affine: bool = True,
        norm_eps: float = 1e-6,
        chunk_size: int = 64,
        max_chunks: int = 32,
        mixing_clamp: tuple[float, float] | list[float] = (1e-5, 1.0),
        rope_theta: float = 10000.0,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = True,
        initializer_range: float = 0.02,
        fuse_norm: bool = True,
        fuse_swiglu: bool = True,
        fuse_cross_entropy: bool = True,
        vocab_size: int = 32000,
        **kwargs: Any,
    ) -> None:
        if feature_map != "relu":
            raise ValueError(f"MHLA uses feature_map 'relu', got {feature_map!r}")
        self.hidden_size = hidden_size
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.feature_map = feature_map
        self.hidden_act = hidden_act
        self.elementwise_affine = elementwise_affine
        self.norm_eps = norm_eps
        self.chunk_size = chunk_size
        self.max_chunks = max_chunks
        self.mixing_clamp = list(mixing_clamp)
        self.rope_theta = rope_theta
        self.max_position_embeddings = chunk_size * max_chunks
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = False
        self.use_l2warp = False
        self.attnres_block_size = None
        self.vocab_size = vocab_size
        kwargs.pop("max_position_embeddings", None)
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Write config.json (transformers) and `mhla_auto.py`, the file its `auto_map` names."""
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if any(str(v).split(".")[0] == AUTO_MODULE for v in (getattr(self, "auto_map", None) or {}).values()):
            (Path(save_directory) / f"{AUTO_MODULE}.py").write_text(AUTO_SOURCE)

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoConfig") -> None:
        """No-op. transformers calls it after loading a folder with `trust_remote_code=True` and would then copy
        this module's source into every folder saved later; the `auto_map` to `mhla_auto.py` already does the job."""
