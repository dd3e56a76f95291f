"""MHLAModel / MHLAForCausalLM on fla's FLAPreTrainedModel, fla's Cache and transformers' GenerationMixin.

Recent transformers releases name the cache `cache` (in `forward` and in the output classes), earlier 5.x
releases and fla 0.6.0's FLAModel `past_key_values`; the forwards accept both names and the outputs use the
installed release's field, also readable as `output_cache(out)`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from fla.models.modeling_utils import FLAPreTrainedModel
from fla.models.utils import Cache
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from mhla_nlp.cache import MHLAStaticCache
from mhla_nlp.layers.mhla import MHLAAttention, reshape_reference_mixing
from mhla_nlp.models.mhla.configuration_mhla import MHLAConfig
from mhla_nlp.modules import GatedMLP, RMSNorm
from mhla_nlp.packing import FLASH_KWARGS, packed_cu_seqlens

# the installed transformers' name of the cache field of model outputs ("cache" or "past_key_values")
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def output_cache(out: Any) -> Cache | None:
    """The cache of a model output, whatever the installed transformers calls the field."""
    return getattr(out, CACHE_FIELD)


class MHLABlock(GradientCheckpointingLayer):
    """Pre-norm block: RMSNorm -> MHLAAttention -> residual, RMSNorm -> GatedMLP -> residual."""

    def __init__(self, config: MHLAConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = MHLAAttention(
            hidden_size=config.hidden_size,
            expand_k=config.expand_k,
            expand_v=config.expand_v,
            num_heads=config.num_heads,
            norm_eps=config.norm_eps,
            elementwise_affine=config.elementwise_affine,
            chunk_size=config.chunk_size,
            max_chunks=config.max_chunks,
            mixing_clamp=tuple(config.mixing_clamp),
            rope_theta=config.rope_theta,
            layer_idx=layer_idx,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = GatedMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=config.fuse_swiglu,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, Any, None]:
        """Returns (hidden_states, None, past_key_values, None) as fla's FLAModel expects."""
        kwargs.pop("attnres_states", None)
        residual = hidden_states
        hidden_states = self.attn_norm(hidden_states)
        hidden_states, _, past_key_values = self.attn(
            hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
            use_cache=use_cache, **kwargs,
        )
        hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        hidden_states = residual + self.mlp(hidden_states)
        return hidden_states, None, past_key_values, None


def convert_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an authors' checkpoint (fla GLA layout, mixing [L, L, 1, 1, 1, 1]) to this model's keys."""
    out = {}
    for key, value in state_dict.items():
        out[key] = reshape_reference_mixing(value) if key.endswith("attn.mixing_matrix") else value
    return out


class MHLAPreTrainedModel(FLAPreTrainedModel):
    """Base class: weight init (fla's), mixing init and constraint, reference checkpoint loading."""

    config_class = MHLAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MHLABlock"]
    _supports_cache_class = True

    @classmethod
    def register_for_auto_class(cls, auto_class: str | type = "AutoModel") -> None:
        """No-op, as `MHLAConfig.register_for_auto_class`: saved folders name the installed classes through
        the config's `auto_map` rather than through copies of this package's source files."""

    @torch.no_grad()
    def _init_weights(self, module: nn.Module, *args: Any, **kwargs: Any) -> None:
        super()._init_weights(module, *args, **kwargs)
        if isinstance(module, MHLAAttention):
            module.reset_mixing()

    def constrain_mixing(self) -> None:
        """Clamp every layer's mixing into `config.mixing_clamp` (call after each optimiser step)."""
        for m in self.modules():
            if isinstance(m, MHLAAttention):
                m.constrain_mixing()

    def load_reference_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load an authors' checkpoint state dict (reshaping the mixing; tied lm_head may be absent).

        The mixing is then constrained (`constrain_mixing`): the authors save after an optimiser step, before
        their next forward clamps it, so their mixing can lie outside `mixing_clamp` or above the diagonal.
        """
        sd = convert_reference_state_dict(state_dict)
        result = self.load_state_dict(sd, strict=False)
        missing = [k for k in result.missing_keys if not (k == "lm_head.weight" and self.config.tie_word_embeddings)]
        if strict and (missing or result.unexpected_keys):
            raise ValueError(f"reference checkpoint mismatch: missing {missing}, unexpected {result.unexpected_keys}")
        self.constrain_mixing()
        return result


class MHLAModel(MHLAPreTrainedModel):
    """Embeddings, `num_hidden_layers` MHLA blocks, final RMSNorm."""

    def __init__(self, config: MHLAConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MHLABlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Hidden states of `input_ids` (or `inputs_embeds`); `cu_seqlens` for packed documents (batch 1).

        Packed documents may also be named as transformers' `DataCollatorWithFlattening` does: `position_ids`
        restarting per document, `seq_idx`, or `cu_seq_lens_q`/`cu_seq_lens_k`/`max_length_q`/`max_length_k`;
        `mhla_nlp.packing.packed_cu_seqlens` turns them into `cu_seqlens` and rejects sources that disagree.
        States are kept when `use_cache=True` (as `generate` passes) or when a `cache` is given.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache is None:  # states are large ([B, H, L, Dk, Dv] per layer): keep them only when asked
            use_cache = cache is not None and self.config.use_cache and not self.training
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and not isinstance(cache, Cache):
            cache = Cache.from_legacy_cache(cache)
        kwargs.pop("output_attentions", None)
        kwargs.pop("cache_position", None)
        B, T = hidden.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2 and bool(attention_mask[:, -T:].all()):
            attention_mask = None  # no padding among these tokens: one host sync here instead of one per layer
        packing = {k: kwargs.pop(k, None) for k in ("position_ids", "seq_idx", *FLASH_KWARGS)}
        cu_seqlens = packed_cu_seqlens(B, T, hidden.device, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                                       **packing)
        all_hidden = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden,)
            hidden, _, cache, _ = layer(
                hidden, attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache,
                cu_seqlens=cu_seqlens, **kwargs,
            )
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden += (hidden,)
        if not return_dict:
            return tuple(x for x in (hidden, cache, all_hidden) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=all_hidden, **{CACHE_FIELD: cache})


class MHLAForCausalLM(MHLAPreTrainedModel, GenerationMixin):
    """MHLA causal LM; `generate()` prefills with `chunk_mhla` and decodes with `fused_recurrent_mhla`.

    Extra forward kwarg: `cu_seqlens` ([N + 1] document boundaries, batch 1) for packed documents; the
    `position_ids` / flash kwargs of `DataCollatorWithFlattening` are honoured too (see `MHLAModel.forward`).
    Batched generation with left padding works (per-sequence offsets in the state).
    """

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MHLAConfig) -> None:
        super().__init__(config)
        self.model = MHLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own fla Cache of MHLAState per layer

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, *args: Any, **kwargs: Any):
        """`generate(cache_implementation="static")` gets an `MHLAStaticCache` sized like transformers' StaticCache."""
        if generation_config.cache_implementation != "static" or generation_config.use_cache is False \
                or model_kwargs.get(CACHE_FIELD) is not None:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        bound = inspect.signature(GenerationMixin._prepare_cache_for_generation).bind(
            self, generation_config, model_kwargs, *args, **kwargs).arguments
        length = max(bound["max_cache_length"], getattr(generation_config, "max_cache_len", None) or 0)
        batch = bound["batch_size"] * max(generation_config.num_beams, generation_config.num_return_sequences)
        model_kwargs[CACHE_FIELD] = MHLAStaticCache(
            self.config, max_batch_size=batch, max_cache_len=min(length, self.config.max_position_embeddings),
            device=self.device, dtype=torch.float64 if self.dtype == torch.float64 else torch.float32,
        )

    def get_decoder(self) -> MHLAModel:
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = 0,
        cu_seqlens: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits (and the next-token loss when `labels` are given; labels are shifted inside)."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items = kwargs.pop("num_items_in_batch", None)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
            cache=cache if cache is not None else past_key_values, use_cache=use_cache,
            output_hidden_states=output_hidden_states, return_dict=True, cu_seqlens=cu_seqlens, **kwargs,
        )
        loss, logits = self._compute_logits_and_loss(
            out.last_hidden_state, labels=labels, logits_to_keep=logits_to_keep, num_items_in_batch=num_items
        )
        if not return_dict:
            rest = tuple(x for x in (logits, output_cache(out), out.hidden_states) if x is not None)
            return (loss, *rest) if loss is not None else rest
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                      **{CACHE_FIELD: output_cache(out)})

    def _compute_logits_and_loss(self, hidden_states: torch.Tensor, labels=None, logits_to_keep=0, **kwargs):
        if hidden_states.is_cuda:
            return super()._compute_logits_and_loss(hidden_states, labels, logits_to_keep, **kwargs)
        if labels is None:
            if logits_to_keep is None:
                return None, self.lm_head(hidden_states)
            keep = logits_to_keep
            sel = hidden_states[:, -keep:] if isinstance(keep, int) else hidden_states[:, keep]
            return None, self.lm_head(sel)
        logits = self.lm_head(hidden_states)
        labels = labels.to(hidden_states.device)
        shift = torch.cat((labels[..., 1:], torch.full_like(labels[:, :1], -100)), dim=1)
        reduction = "mean" if kwargs.get("num_items_in_batch") is None else "sum"
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), shift.flatten(), ignore_index=-100, reduction=reduction
        )
        if reduction == "sum":
            loss = loss / kwargs["num_items_in_batch"]
        return loss, logits
