"""The ring Z_2^64 on torch int64 tensors, and fixed-point encoding.

Two's-complement wrap-around of torch's CPU int64 arithmetic *is* arithmetic modulo 2^64 for
``+ - *``, ``sum``, ``matmul`` and ``conv2d`` (checked against Python integers in the tests).
``>>`` on int64 is arithmetic; :func:`lshift_logical`/:func:`rshift_logical` give logical shifts
where a protocol needs them. Ring values never pass through float64 (bits above 2^53 would be
lost): only encoding of real inputs and decoding of opened, small values touch floats.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = [
    "RING_BITS",
    "SIGN_BIT",
    "encode",
    "decode",
    "rshift_logical",
    "to_ring",
    "from_numpy_ring",
    "MAX_ABS_REAL",
    "broadcast_shape",
]

RING_BITS = 64
SIGN_BIT = -(2**63)  # the sign bit as a signed int64 constant


def MAX_ABS_REAL(frac_bits: int) -> float:  # noqa: N802 - reads like a constant
    """Largest real magnitude encodable with ``frac_bits`` that still leaves 2 bits of headroom
    (comparisons need |x| < 2^62)."""
    return float(2 ** (62 - frac_bits))


def encode(x: np.ndarray | torch.Tensor | float, frac_bits: int) -> torch.Tensor:
    """Real values -> ring elements round(x * 2^f) as int64. Rejects NaN/inf and overflow."""
    t = torch.as_tensor(np.asarray(x, dtype=np.float64) if not isinstance(x, torch.Tensor) else x)
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError("cannot encode NaN or infinite values")
    limit = MAX_ABS_REAL(frac_bits)
    if t.numel() and t.abs().max().item() >= limit:
        raise ValueError(
            f"value {t.abs().max().item():.4g} too large for {frac_bits} fractional bits (limit {limit:.4g})"
        )
    return torch.round(t * float(2**frac_bits)).to(torch.int64)


def decode(x: torch.Tensor, frac_bits: int) -> np.ndarray:
    """Ring elements (signed int64) -> float64 numpy array x / 2^f."""
    return (x.to(torch.float64) / float(2**frac_bits)).numpy()


def rshift_logical(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 words by 0 <= k <= 63 (int64 ``>>`` is arithmetic)."""
    if k == 0:
        return x
    if not 0 < k < 64:
        raise ValueError(f"shift {k} out of range")
    return (x >> k) & ((1 << (64 - k)) - 1)


def to_ring(x: np.ndarray) -> torch.Tensor:
    """An integer numpy array (int64 or uint64) as ring elements, without value changes."""
    a = np.ascontiguousarray(x)
    if a.dtype == np.uint64:
        a = a.view(np.int64)
    return torch.from_numpy(a.astype(np.int64, copy=False).copy())


def from_numpy_ring(x: np.ndarray) -> torch.Tensor:
    return to_ring(x)


@functools.lru_cache(maxsize=4096)
def broadcast_shape(s1: tuple[int, ...], s2: tuple[int, ...]) -> tuple[int, ...]:
    """numpy's broadcast shape of two shapes, cached. Plain Python on purpose: torch.broadcast_shapes
    imports sympy on first use (about a second), and this sits on hot paths of every engine."""
    if s1 == s2:
        return tuple(s1)
    n = max(len(s1), len(s2))
    p1, p2 = (1,) * (n - len(s1)) + tuple(s1), (1,) * (n - len(s2)) + tuple(s2)
    out = []
    for u, v in zip(p1, p2, strict=True):
        if u != v and u != 1 and v != 1:
            raise RuntimeError(f"shapes {tuple(s1)} and {tuple(s2)} cannot be broadcast together")
        out.append(v if u == 1 else u)
    return tuple(out)
