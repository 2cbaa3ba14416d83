"""Shape helpers shared by the compiler (ONNX attributes) and the runtime (engine calls)."""

from __future__ import annotations

__all__ = ["normalize_axis"]


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` (negative counts from the end) as an index in ``[0, rank)``; a scalar's only axis is 0.

    Raises ValueError naming the axis and the rank when it is out of range."""
    a = int(axis)
    if not -max(rank, 1) <= a < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return a % max(rank, 1)
