"""Fixed-point encoding of real numbers as ring words (int64, two's complement), on numpy arrays.

One implementation for every party: the runtime's ring arithmetic wraps these arrays in torch tensors
(:func:`siguard.runtime.ring.encode`, without a copy), and the networked query client, which never imports
torch, encodes its input and decodes its output with them directly. Invariants: a real x becomes
round(x * 2^f) (round half to even), rejected unless |x| < :func:`MAX_ABS_REAL`; a word w decodes to
w / 2^f exactly (float64; the words decoded are opened, small values). Ring values never pass through
float64 otherwise: bits above 2^53 would be lost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["MAX_ABS_REAL", "encode_words", "decode_words"]


def MAX_ABS_REAL(frac_bits: int) -> float:  # noqa: N802 - reads like a constant
    """Largest real magnitude encodable with ``frac_bits`` that still leaves 2 bits of headroom
    (comparisons need |x| < 2^62)."""
    return float(2 ** (62 - frac_bits))


def encode_words(x: Any, frac_bits: int) -> np.ndarray:
    """Real values (any array-like: numpy, a CPU torch tensor, a float) -> int64 words round(x * 2^f), same
    shape (a 0-d array for a scalar). Raises ValueError for NaN, infinities and magnitudes of
    :func:`MAX_ABS_REAL` or more."""
    a = np.asarray(x, dtype=np.float64)
    limit = MAX_ABS_REAL(frac_bits)
    if a.size:
        lo, hi = a.min(), a.max()  # NaN propagates into both, so one test covers NaN, inf and overflow
        if not max(-lo, hi) < limit:
            if not np.isfinite(a).all():
                raise ValueError("cannot encode NaN or infinite values")
            raise ValueError(f"value {np.abs(a).max():.4g} too large for {frac_bits} fractional bits "
                             f"(limit {limit:.4g})")
    scaled = np.multiply(a, float(2**frac_bits), out=np.empty(a.shape))  # (an array even for a 0-d input)
    return np.rint(scaled, out=scaled).astype(np.int64)


def decode_words(x: Any, frac_bits: int) -> np.ndarray:
    """int64 words (numpy, or a CPU torch tensor) -> float64 array x / 2^f."""
    w = np.asarray(x)
    if w.dtype != np.int64:
        raise TypeError(f"ring words are int64, got {w.dtype}")
    out = w.astype(np.float64)
    out /= float(2**frac_bits)  # in place: an array (not a numpy scalar) for a 0-d input too
    return out
