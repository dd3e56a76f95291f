"""Packed documents: the model inputs of rows packed by `mhla_nlp.prepare_data`, and the document bounds
(`cu_seqlens`) that other packers name through `position_ids`, `seq_idx` or flash-attention kwargs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# the document-bound kwargs of transformers' DataCollatorWithFlattening(return_flash_attn_kwargs=True)
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def make_batch(rows: list[list[int]], cus: list[list[int]], model_name: str, device) -> dict:
    """Model inputs for a micro-batch of packed rows; labels are -100 where a new document starts."""
    B, T = len(rows), len(rows[0])
    ids = torch.tensor(rows, dtype=torch.long)
    starts = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.empty(B, T, dtype=torch.long)
    for r, cu in enumerate(cus):
        for a, b in zip(cu[:-1], cu[1:]):
            starts[r, a] = True
            pos[r, a:b] = torch.arange(b - a)
    labels = ids.masked_fill(starts, -100)
    if model_name == "transformer":
        return dict(input_ids=ids.to(device), labels=labels.to(device), position_ids=pos.to(device))
    cu = sorted({r * T + o for r, c in enumerate(cus) for o in c})
    return dict(input_ids=ids.view(1, -1).to(device), labels=labels.view(1, -1).to(device),
                cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device))


def _bounds(name: str, value: torch.Tensor | Sequence[int], num_tokens: int) -> list[int]:
    b = torch.as_tensor(value)
    if b.dim() != 1 or b.numel() < 2:
        raise ValueError(f"{name} must be 1-D document bounds [0, ..., T] with at least 2 entries, "
                         f"got shape {tuple(b.shape)}")
    out = [int(x) for x in b.tolist()]
    if out[0] != 0 or out[-1] != num_tokens or any(y < x for x, y in zip(out, out[1:])):
        raise ValueError(f"{name} must rise from 0 to T = {num_tokens} without decreasing, got {out}")
    return out


def _starts(name: str, ids: torch.Tensor, batch: int, num_tokens: int, mask: torch.Tensor | None) -> list[int]:
    """Document bounds from per-token ids: a document starts wherever `position_ids` do not go up by one, or
    `seq_idx` changes. Only a batch of one without padding may hold several documents."""
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[1] != num_tokens or ids.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be [B, T] = [{batch}, {num_tokens}] (or [1, T]), got {tuple(ids.shape)}")
    ids = ids.expand(batch, num_tokens)
    step = 1 if name == "position_ids" else 0
    new = ids[:, 1:] != ids[:, :-1] + step
    padded = mask is not None and not bool(mask.all())
    if padded:
        new &= mask[:, 1:].bool() & mask[:, :-1].bool()  # padding and the first real token start nothing
    if batch > 1 or padded:
        if bool(new.any()):
            raise ValueError(f"{name} start a new document inside a row of a batch of {batch}"
                             f"{' with padding' if padded else ''}; packed documents need batch 1 without padding "
                             "(as DataCollatorWithFlattening gives) or cu_seqlens")
        return [0, num_tokens]
    return [0, *(new[0].nonzero().flatten() + 1).tolist(), num_tokens]


def packed_cu_seqlens(
    batch: int,
    num_tokens: int,
    device: torch.device | str,
    *,
    cu_seqlens: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | Sequence[int] | None = None,
    cu_seq_lens_k: torch.Tensor | Sequence[int] | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The document bounds of a forward of `batch` x `num_tokens` tokens, as int32 `cu_seqlens`, or None.

    Every source that is given must name the same documents, else a ValueError names the two that differ:
    `cu_seqlens` (fla's name); `cu_seq_lens_q` / `cu_seq_lens_k` with `max_length_q` / `max_length_k`
    (DataCollatorWithFlattening's flash kwargs; causal self-attention needs q and k bounds equal); and
    `position_ids` (a document starts where they do not go up by one) or `seq_idx` (where it changes), which
    name several documents only in a batch of 1 without padding. None when only `position_ids` / `seq_idx` are
    given and they name one document per row: the input is not packed. Their values are not used otherwise:
    each document's rotary positions restart at 0, and rotary enters q.k only through differences of positions.
    """
    if cu_seqlens is not None and all(x is None for x in (position_ids, seq_idx, cu_seq_lens_q, cu_seq_lens_k,
                                                          max_length_q, max_length_k)):
        return cu_seqlens  # fla's packed input as before: the layers check it
    mask = attention_mask[:, -num_tokens:] if attention_mask is not None and attention_mask.dim() == 2 else None
    named: dict[str, list[int]] = {}
    for name, value in (("cu_seqlens", cu_seqlens), ("cu_seq_lens_q", cu_seq_lens_q),
                        ("cu_seq_lens_k", cu_seq_lens_k)):
        if value is not None:
            named[name] = _bounds(name, value, num_tokens)
    for name, value, of in (("max_length_q", max_length_q, "cu_seq_lens_q"),
                            ("max_length_k", max_length_k, "cu_seq_lens_k")):
        if value is None:
            continue
        if of not in named:
            raise ValueError(f"{name} was given without {of}, the document bounds it describes")
        longest = max(y - x for x, y in zip(named[of], named[of][1:]))
        if int(value) != longest:
            raise ValueError(f"{name}={int(value)} but the longest document of {of} has {longest} tokens")
    explicit = bool(named)
    for name, value in (("position_ids", position_ids), ("seq_idx", seq_idx)):
        if value is not None and num_tokens > 1:
            named[name] = _starts(name, value, batch, num_tokens, mask)
    if not named:
        return None
    (first, bounds), *rest = named.items()
    for name, other in rest:
        if other != bounds:
            raise ValueError(f"{first} names documents {bounds} but {name} names {other}; pass bounds that agree "
                             "(or only one of them)")
    if not explicit and len(bounds) == 2:
        return None  # one document per row: not packed
    return torch.tensor(bounds, dtype=torch.int32, device=device)
