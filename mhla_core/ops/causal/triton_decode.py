"""Triton decode step of causal MHLA: one kernel launch per token.

For each (sequence b, head h, tile of Dv) one program, with i = offset_b // C the current chunk:
    P     = partial + k v^T                      (running state of chunk i, this token included)
    o     = (scale q) . (S~_i + W[i, i] P)       (S~_i: the mixed state, read from the state)
and, when the token completes chunk i (a branch on the device): S_i = P, the partial restarts at zero and
S~_{i+1} = sum_{j <= i} W[i+1, j] S_j is rebuilt from the stored chunk states; other tokens read no chunk state.
Each program reads and writes only its own (b, h, tile), so the outputs may alias the inputs.

`fused_recurrent_mhla_triton` is functional: the input state is never written (the first token writes new
buffers, later tokens of the call update those in place; the chunk states are copied once per call, and only
when some sequence completes a chunk). `fused_recurrent_mhla_static_triton` updates a `StaticMHLAState` in
place, offsets on the device, with no host work that depends on tensor values. States stay fp32; q, k, v may
be fp32 / bf16 / fp16. Inference only: there is no backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhla_core.ops.causal.state import MHLAState, StaticMHLAState, mix_chunk_states
from mhla_core.ops.triton_helpers import next_pow2
from mhla_core.ops.utils import host_to_device

LAUNCH = {"tile_elems": 4096, "num_warps": 4}  # BK x BV register tile per program


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, w_ptr, cs_ptr, part_ptr, mix_ptr, off_ptr, o_ptr, new_cs_ptr, new_part_ptr, new_mix_ptr,
    ahead, H, L, S, C, DK, DV, scale, sq_b, sk_b, sv_b, so_b, w_sh,
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
    own = bh * DK * DV + tile  # this program's tile of [B, H, Dk, Dv]

    q = tl.load(q_ptr + b * sq_b + h * DK + ok, mask=mk, other=0.0).to(tl.float32) * scale
    k = tl.load(k_ptr + b * sk_b + h * DK + ok, mask=mk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * sv_b + h * DV + ov, mask=mv, other=0.0).to(tl.float32)
    p = tl.load(part_ptr + own, mask=m2, other=0.0) + k[:, None] * v[None, :]
    mixed = tl.load(mix_ptr + own, mask=m2, other=0.0)

    off = tl.load(off_ptr + b) + ahead
    i = tl.minimum(off // C, S - 1).to(tl.int32)  # past the capacity only if the host check was bypassed
    w_h = w_ptr + h * w_sh
    o = tl.sum(q[:, None] * (mixed + tl.load(w_h + i * L + i) * p), axis=0)
    tl.store(o_ptr + b * so_b + h * DV + ov, o.to(o_ptr.dtype.element_ty), mask=mv)

    if (off + 1) % C == 0:  # this token completes chunk i
        states = bh * S * DK * DV + tile
        tl.store(new_cs_ptr + states + i * DK * DV, p, mask=m2)
        nxt = i + 1
        w_next = w_h + tl.minimum(nxt, L - 1) * L
        keep = (nxt < L).to(tl.float32)  # a sequence that fills all L chunks has no next chunk
        mixed = tl.load(w_next + i) * keep * p
        for j in range(0, i):
            mixed += tl.load(w_next + j) * keep * tl.load(cs_ptr + states + j * DK * DV, mask=m2, other=0.0)
        p = p * 0.0
    tl.store(new_part_ptr + own, p, mask=m2)
    tl.store(new_mix_ptr + own, mixed, mask=m2)


def _launch(q, k, v, w, cs, part, mixed, offsets, o, new_cs, new_part, new_mixed, t, ahead, C, scale) -> None:
    """Token t of q, k, v, o for every (sequence, head, Dv tile), at position offsets + ahead."""
    B, _, H, Dk = q.shape
    Dv = v.shape[-1]
    L, S = w.shape[-1], cs.shape[2]
    BK = next_pow2(Dk)
    BV = max(16, min(next_pow2(Dv), LAUNCH["tile_elems"] // BK))
    grid = (B * H, triton.cdiv(Dv, BV))
    _decode_step_kernel[grid](
        q[:, t], k[:, t], v[:, t], w, cs, part, mixed, offsets, o[:, t], new_cs, new_part, new_mixed,
        ahead, H, L, S, C, Dk, Dv, float(scale), q.stride(0), k.stride(0), v.stride(0),
        o.stride(0), 0 if w.shape[0] == 1 else L * L,
        BK=BK, BV=BV, num_warps=LAUNCH["num_warps"],
    )


def _kernel_mixing(mixing: torch.Tensor) -> torch.Tensor:
    return (mixing if mixing.dim() == 3 else mixing.unsqueeze(0)).detach().float().contiguous()


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
    w = _kernel_mixing(mixing)
    L = w.shape[-1]
    if initial_state is None:
        initial_state = MHLAState.zeros(B, H, L, Dk, Dv, C, device=q.device)
    offsets = list(initial_state.offsets)
    cs = initial_state.chunk_states.detach().float().contiguous()
    part = initial_state.partial.detach().float().contiguous()
    if initial_state.mixed is None:
        idx = host_to_device(torch.tensor([min(off // C, L - 1) for off in offsets]), q.device)
        mixed = mix_chunk_states(mixing.detach().float(), cs, idx)
    else:
        mixed = initial_state.mixed.detach().float().contiguous()
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    o = torch.empty(B, T, H, Dv, device=q.device, dtype=v.dtype)
    off_dev = host_to_device(torch.tensor(offsets, dtype=torch.int64), q.device)

    new_part, new_mixed = (torch.empty_like(part), torch.empty_like(mixed)) if T else (part, mixed)
    new_cs = cs.clone() if any((off + t + 1) % C == 0 for off in offsets for t in range(T)) else cs
    for t in range(T):  # token 0 reads the input state, later tokens the call's own buffers in place
        src = (cs, part, mixed) if t == 0 else (new_cs, new_part, new_mixed)
        _launch(q, k, v, w, *src, off_dev, o, new_cs, new_part, new_mixed, t, t, C, scale)
    final = MHLAState(new_cs, new_part, tuple(off + T for off in offsets), C, new_mixed) if output_final_state else None
    return o, final


def fused_recurrent_mhla_static_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mixing: torch.Tensor, state: StaticMHLAState, scale: float
) -> torch.Tensor:
    """Decode T tokens of rows [0, B) of `state` in place (one launch and one offset increment per token)."""
    B, T, H, Dk = q.shape
    w = _kernel_mixing(mixing)
    cs, part, mixed, offsets = state.chunk_states[:B], state.partial[:B], state.mixed[:B], state.offsets[:B]
    q, k, v = (x.detach().contiguous() for x in (q, k, v))
    o = torch.empty(B, T, H, v.shape[-1], device=q.device, dtype=v.dtype)
    for t in range(T):
        _launch(q, k, v, w, cs, part, mixed, offsets, o, cs, part, mixed, t, 0, state.chunk_size, scale)
        offsets.add_(1)
    return o
