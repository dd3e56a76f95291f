"""Model inputs from rows packed by `mhla_nlp.prepare_data` (documents kept apart)."""

from __future__ import annotations

import torch


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
