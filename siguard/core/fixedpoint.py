"""The fixed-point encoding's limit, shared by the runtime's ring arithmetic and its torch-free input checks."""

from __future__ import annotations

__all__ = ["MAX_ABS_REAL"]


def MAX_ABS_REAL(frac_bits: int) -> float:  # noqa: N802 - reads like a constant
    """Largest real magnitude encodable with ``frac_bits`` that still leaves 2 bits of headroom
    (comparisons need |x| < 2^62)."""
    return float(2 ** (62 - frac_bits))
