"""mhla_nlp: MHLA language models on transformers + flash-linear-attention.

`import mhla_nlp` registers `MHLAConfig` (model_type "mhla"), `MHLAModel` and `MHLAForCausalLM`
with transformers' `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`.

- `mhla_nlp.layers.MHLAAttention`: q/k/v/g/o projections, ReLU on q and k, rotary, the causal
  chunked op `mhla_core.chunk_mhla` (decoding: `mhla_core.fused_recurrent_mhla`), gated RMSNorm.
- Padding masks are packed into documents (`cu_seqlens`), packed input takes `cu_seqlens=` (or the
  `position_ids` / flash kwargs of transformers' `DataCollatorWithFlattening`);
  `generate(use_cache=True)` equals uncached decoding, also for left-padded batches.
- Inputs longer than `chunk_size * max_chunks` raise a ValueError naming `max_chunks`.
- Authors' checkpoints: `model.load_reference_state_dict(sd)` (reshapes and constrains the mixing; plain
  `load_state_dict` only reshapes it).
- Saved folders load after `import mhla_nlp`, or without it with `trust_remote_code=True` (the config's
  `auto_map` names `mhla_auto.py`, which imports the installed classes).
- The mixing constraint (clamp into `mixing_clamp`, lower triangle) runs after every step of any torch
  optimiser that updates the mixing (`mhla_core.constraint`); `model.constrain_mixing()` applies it now.

fla's Triton modules run on CUDA tensors; `mhla_nlp.modules` gives PyTorch twins for CPU.
See docs/nlp.md for what is done and what is left (training, evaluation, MQAR, replication).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from mhla_nlp.layers import MHLAAttention
from mhla_nlp.models.mhla import MHLAConfig, MHLAForCausalLM, MHLAModel

AutoConfig.register(MHLAConfig.model_type, MHLAConfig, exist_ok=True)
AutoModel.register(MHLAConfig, MHLAModel, exist_ok=True)
AutoModelForCausalLM.register(MHLAConfig, MHLAForCausalLM, exist_ok=True)

__all__ = ["MHLAConfig", "MHLAModel", "MHLAForCausalLM", "MHLAAttention"]
