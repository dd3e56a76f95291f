"""MHLA language modelling (to come): a transformers-compatible MHLAConfig / MHLAForCausalLM built on
flash-linear-attention modules, using mhla_core's causal chunked op, with training, evaluation and MQAR."""
