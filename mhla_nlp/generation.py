"""Greedy generation with the static cache, one whole-model decode step on fixed buffers (docs/nlp.md).

`StaticGreedyStep` reads the current tokens [B, 1] from a buffer, runs the model with an `MHLAStaticCache`
and writes the next tokens back; it makes no host sync and touches only preallocated buffers, so on CUDA
it can be captured once in a CUDA graph and replayed for every token (`static_greedy_generate(cuda_graph=True)`).
"""

from __future__ import annotations

from typing import Any

import torch

from mhla_nlp.cache import MHLAStaticCache


class StaticGreedyStep:
    """One greedy decode step: `tokens` [B, 1] -> model (static cache) -> argmax, written into `tokens`.

    With `eos_token_id`, rows that produced an end token keep emitting `pad_token_id` (on the device, as
    `generate` does); `unfinished` [B] tracks them.
    """

    def __init__(self, model: Any, cache: MHLAStaticCache, tokens: torch.Tensor,
                 eos_token_id: list[int] | None = None, pad_token_id: int | None = None) -> None:
        self.model, self.cache, self.tokens = model, cache, tokens
        self.eos = None if not eos_token_id else torch.tensor(eos_token_id, device=tokens.device).view(1, -1)
        if self.eos is not None and pad_token_id is None:
            raise ValueError("eos_token_id needs pad_token_id (the token finished rows emit)")
        self.pad = pad_token_id
        self.unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)

    def select(self, logits: torch.Tensor) -> None:
        """Greedy choice from the last position's logits [B, V], into `tokens` (and the finished mask)."""
        nxt = logits.argmax(-1)
        if self.eos is not None:
            nxt = torch.where(self.unfinished, nxt, torch.full_like(nxt, self.pad))
            self.unfinished &= ~(nxt.view(-1, 1) == self.eos).any(-1)
        self.tokens.copy_(nxt.view(-1, 1))

    def __call__(self) -> None:
        out = self.model(input_ids=self.tokens, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.select(out.logits[:, -1])


def _eos_list(eos_token_id: int | list[int] | None) -> list[int] | None:
    if eos_token_id is None:
        return None
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


@torch.no_grad()
def static_greedy_generate(
    model: Any,
    input_ids: torch.LongTensor,
    max_new_tokens: int,
    *,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    cache: MHLAStaticCache | None = None,
    cuda_graph: bool = False,
) -> torch.LongTensor:
    """Greedy decoding of an MHLA causal LM with a static cache; the tokens `generate(do_sample=False)` gives.

    Args:
        model: an `MHLAForCausalLM` (eval mode).
        input_ids: [B, T] prompts, left-padded where `attention_mask` ([B, T], 1 = token) says so.
        max_new_tokens: tokens to generate (>= 1); generation stops early once every row produced an end token.
        eos_token_id, pad_token_id: end token(s) and the token finished rows emit (default: the model config's).
        cache: an `MHLAStaticCache` to reuse (reset here); default a new one sized to the prompt and new tokens.
        cuda_graph: on CUDA, capture the decode step once and replay it (the first step runs eagerly as warm-up).

    Returns:
        [B, T + n] prompts and generated tokens, n <= max_new_tokens.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cuda_graph and input_ids.device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA inputs, got input_ids on {input_ids.device}")
    cfg = model.config
    eos = _eos_list(eos_token_id if eos_token_id is not None else cfg.eos_token_id)
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if eos and pad is None:
        pad = eos[0]  # as generate does when the model has no pad token
    B, T = input_ids.shape
    needed = T + max_new_tokens - 1  # the last generated token is not fed back
    if cache is None:
        cache = MHLAStaticCache(cfg, max_batch_size=B, max_cache_len=max(needed, 1), device=input_ids.device)
    elif cache.max_batch_size < B or cache.max_cache_len < needed:
        raise ValueError(f"the cache holds {cache.max_batch_size} sequences of {cache.max_cache_len} tokens; "
                         f"this call needs {B} of {needed} (prompt {T} + max_new_tokens {max_new_tokens} - 1)")
    else:
        cache.reset()

    tokens = torch.empty(B, 1, dtype=torch.long, device=input_ids.device)
    step = StaticGreedyStep(model, cache, tokens, eos, pad)
    prefill = model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=1)
    step.select(prefill.logits[:, -1])
    new = [tokens.clone()]
    alive = [step.unfinished.any()]
    run = step
    if cuda_graph and max_new_tokens > 2:
        run = _captured(step)  # runs the first decode step eagerly, then records it
        new.append(tokens.clone())
        alive.append(step.unfinished.any())
    for _ in range(max_new_tokens - len(new)):
        run()
        new.append(tokens.clone())
        alive.append(step.unfinished.any())
    if run is not step:
        cache.advance_host(max_new_tokens - 3)  # the replays after the warm-up step and the recorded one
    out = torch.cat([input_ids, *new], dim=1)
    if eos:
        done = ~torch.stack(alive)  # one host sync, after the loop: trim the steps after every row finished
        n = int(done.int().argmax()) + 1 if bool(done.any()) else len(new)
        out = out[:, : T + n]
    return out


def _captured(step: StaticGreedyStep):
    """Warm `step` up (one real decode step, on a side stream), capture it in a CUDA graph, return its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # autotuning, lazily built tables: nothing of that may happen under capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run: the cache does not advance here (its host counters do, once)
    step.graph = graph
    return graph.replay
