"""Triton decode step of causal MHLA: one kernel launch per token for `fused_recurrent_mhla`.

For each (sequence b, head h, tile of Dv) one program, with i = offset_b // C the current chunk:
    P     = partial + k v^T                      (running state of chunk i, this token included)
    read  = sum_{j < i} W[i, j] S_j + W[i, i] P  (the mixed state, rebuilt from the stored chunk states)
    o     = (scale q) . read
and, when the token completes chunk i, S_i = P and the partial restarts at zero. States stay fp32;
q, k, v may be fp32 / bf16 / fp16. The op is functional: the input state is never written (the chunk
states are copied when some sequence completes a chunk, at most once per C tokens). Inference only:
there is no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhla_core.ops.causal.state import MHLAState
from mhla_core.ops.triton_helpers import next_pow2
from mhla_core.ops.utils import host_to_device

LAUNCH = {"tile_elems": 4096, "num_warps": 4}  # BK x BV register tile per program


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, part_ptr, off_ptr, o_ptr, new_cs_ptr, new_part_ptr,
    t, H, L, C, DK, DV, scale, sq_b, sk_b, sv_b, so_b, w_sh,
    BK: tl.constexpr, BV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    b = bh // H
    h = bh % H
    ok = tl.arange(0, BK)
    ov = pv * BV + tl.arange(0, BV)
    mk = ok < DK
    mv = ov < DV
    m2 = mk[:, None] & mv[None, :]
    tile = ok[:, None] * DV + ov[None, :]

    q = tl.load(q_ptr + b * sq_b + h * DK + ok, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + b * sk_b + h * DK + ok, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * DV + ov, mask=mv, other=0.0).to(tl.float32)
    p = tl.load(part_ptr + bh * DK * DV + tile, mask=m2, other=0.0) + k[:, None] * v[None, :]

    off = tl.load(off_ptr + b) + t
    i = (off // C).to(tl.int32)
    w_row = w_ptr + h * w_sh + i * L
    acc = tl.load(w_row + i) * p
    states = cs_ptr + bh * L * DK * DV
    for j in range(0, i):
        acc += tl.load(w_row + j) * tl.load(states + j * DK * DV + tile, mask=m2, other=0.0)
    o = tl.sum(q[:, None] * acc, axis=0)
    tl.store(o_ptr + b * so_b + h * DV + ov, o.to(o_ptr.dtype.element_ty), mask=mv)

    if (off + 1) % C == 0:  # this token completes chunk i
        tl.store(new_cs_ptr + bh * L * DK * DV + i * DK * DV + tile, p, mask=m2)
        p = p * 0.0
    tl.store(new_part_ptr + bh * DK * DV + tile, p, mask=m2)


def fused_recurrent_mhla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mixing: torch.Tensor,
    chunk_size: int,
    scale: float,
    initial_state: MHLAState | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, MHLAState | None]:
    """Decode T tokens (one launch each) from `initial_state`; same contract as the PyTorch op."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    L = mixing.shape[-1]
    w = (mixing if mixing.dim() == 3 else mixing.unsqueeze(0)).detach().float().contiguous()
    w_sh = 0 if w.shape[0] == 1 else L * L
    if initial_state is None:
        initial_state = MHLAState.zeros(B, H, L, Dk, Dv, C, device=q.device)
    cs = initial_state.chunk_states.detach().float().contiguous()
    part = initial_state.partial.detach().float().contiguous()
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=v.dtype)
    offsets = list(initial_state.offsets)
    off_dev = host_to_device(torch.tensor(offsets, dtype=torch.int64), q.device)

    BK = next_pow2(Dk)
    BV = max(16, min(next_pow2(Dv), LAUNCH["tile_elems"] // BK))
    grid = (B * H, triton.cdiv(Dv, BV))
    for t in range(T):
        new_cs = cs.clone() if any((off + t + 1) % C == 0 for off in offsets) else cs
        new_part = torch.empty_like(part)
        if B:
            _decode_step_kernel[grid](
                q[:, t], k[:, t], v[:, t], w, cs, part, off_dev, o[:, t], new_cs, new_part,
                t, H, L, C, Dk, Dv, float(scale), q.stride(0), k.stride(0), v.stride(0), o.stride(0), w_sh,
                BK=BK, BV=BV, num_warps=LAUNCH["num_warps"],
            )
        cs, part = new_cs, new_part
    final = MHLAState(cs, part, tuple(off + T for off in offsets), C) if output_final_state else None
    return o, final
