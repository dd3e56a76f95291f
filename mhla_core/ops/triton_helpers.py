"""Triton helpers shared by the MHLA kernels (non-causal parallel, chunk and mix; causal chunk).

Under the Triton interpreter (TRITON_INTERPRET=1, the CPU tests) device helpers are plain functions
and dots upcast their operands (the interpreter keeps bf16 as raw uint16).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mhla_core.ops.utils import INTERPRET

__all__ = ["INTERPRET", "UPCAST_DOT", "device_fn", "dot", "cast", "next_pow2", "cdiv"]


def device_fn(fn):
    """triton.jit for device helpers; under the interpreter a plain function (each interpreted
    device-function call re-patches triton.language, which dominates the CPU test time)."""
    return fn if INTERPRET else triton.jit(fn)


# The interpreter keeps bf16 as raw uint16 and its tl.dot does not convert it: upcast there.
UPCAST_DOT = tl.constexpr(INTERPRET)


@device_fn
def dot(a, b, acc, PREC: tl.constexpr):
    """tl.dot with fp32 accumulation (a * b + acc when acc is given)."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC, out_dtype=tl.float32)


@device_fn
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even also in the interpreter (which truncates to bf16)."""
    if UPCAST_DOT:
        if dtype == tl.bfloat16:
            u = x.to(tl.float32).to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)




def next_pow2(x: int, lo: int = 16) -> int:
    """The smallest power of two >= max(x, lo)."""
    return max(lo, 1 << (max(int(x), 1) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) in Python (triton.cdiv is a jit function in recent Triton: slow from Python)."""
    return -(-a // b)
