"""The ring Z_2^64 on torch int64 tensors, and fixed-point encoding (as tensors; the numpy implementation,
which the torch-free query client uses directly, is :mod:`siguard.core.fixedpoint`).

Two's-complement wrap-around of torch's CPU int64 arithmetic *is* arithmetic modulo 2^64 for
``+ - *``, ``sum``, ``matmul`` and ``conv2d`` (checked against Python integers in the tests).
``>>`` on int64 is arithmetic; :func:`lshift_logical`/:func:`rshift_logical` give logical shifts
where a protocol needs them. Ring values never pass through float64 (bits above 2^53 would be
lost): only encoding of real inputs and decoding of opened, small values touch floats.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from siguard.core.fixedpoint import MAX_ABS_REAL, encode_words
from siguard.core.fixedpoint import decode_words as decode  # one decoder for tensors and numpy arrays

__all__ = [
    "RING_BITS",
    "SIGN_BIT",
    "encode",
    "decode",
    "rshift_logical",
    "to_ring",
    "numel",
    "MAX_ABS_REAL",
    "broadcast_shape",
    "conv2d_ring",
    "conv2d_by_matmul",
    "conv_weight_matrix",
    "conv_uses_matmul",
]

RING_BITS = 64
SIGN_BIT = -(2**63)  # the sign bit as a signed int64 constant


def encode(x: np.ndarray | torch.Tensor | float, frac_bits: int) -> torch.Tensor:
    """Real values -> ring elements round(x * 2^f) as int64. Rejects NaN/inf and overflow.
    (:func:`siguard.core.fixedpoint.encode_words`, as a tensor sharing its memory.)"""
    return torch.from_numpy(encode_words(x, frac_bits))


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


def numel(shape: Sequence[int]) -> int:
    """The number of elements of a tensor of this shape (1 for a scalar)."""
    n = math.prod(shape)  # on the hot path of every protocol: no generator unless the sizes are not ints
    return n if type(n) is int else math.prod(int(s) for s in shape)


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


def conv_weight_matrix(w: torch.Tensor) -> torch.Tensor:
    """A kernel (Cout, Cin, kh, kw) as the contiguous (Cin·kh·kw, Cout) matrix :func:`conv2d_by_matmul` takes."""
    return w.reshape(w.shape[0], -1).t().contiguous()


def conv2d_by_matmul(
    x: torch.Tensor,
    w_matrix: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
) -> torch.Tensor:
    """conv2d (groups 1, dilation 1) as one (N·Ho·Wo, Cin·kh·kw) @ (Cin·kh·kw, Cout) int64 product;
    ``w_matrix`` from :func:`conv_weight_matrix`, ``kernel`` = (kh, kw). Exact mod 2^64."""
    n, c, h, wd = x.shape
    kh, kw = kernel
    (sh, sw), (ph, pw) = stride, padding
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    x = x.contiguous()
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    s = x.stride()
    cols = x.as_strided((n, ho, wo, c, kh, kw), (s[0], s[2] * sh, s[3] * sw, s[1], s[2], s[3]))
    out = cols.reshape(n * ho * wo, c * kh * kw) @ w_matrix
    return out.reshape(n, ho, wo, -1).permute(0, 3, 1, 2).contiguous()


def conv_uses_matmul(
    x_shape: tuple[int, ...],
    w_shape: tuple[int, ...],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> bool:
    """Whether :func:`conv2d_ring` computes this convolution by :func:`conv2d_by_matmul`.

    torch's CPU int64 convolution runs a per-image product (Cout, K) @ (K, Ho·Wo) that is about 4x
    slower than the transposed (Ho·Wo, K) @ (K, Cout) when the output plane is small (measured on
    ResNet's 4x4 stage: 39 ms against 9 ms per call, the weight matrix prepared), so small output
    planes with a large inner dimension go through an explicit im2col and one matmul."""
    if groups != 1 or tuple(dilation) != (1, 1) or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    ho = (x_shape[2] + 2 * padding[0] - w_shape[2]) // stride[0] + 1
    wo = (x_shape[3] + 2 * padding[1] - w_shape[3]) // stride[1] + 1
    return ho * wo <= _SMALL_PLANE and w_shape[1] * w_shape[2] * w_shape[3] >= _LARGE_INNER


def conv2d_ring(
    x: torch.Tensor,
    w: torch.Tensor,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Exact conv2d of int64 tensors modulo 2^64 (x: (N, Cin, H, W), w: (Cout, Cin/groups, kh, kw)):
    torch's convolution, or :func:`conv2d_by_matmul` where :func:`conv_uses_matmul` says it is faster.
    Both are exact (wrap-around integer products and sums)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if conv_uses_matmul(tuple(x.shape), tuple(w.shape), stride, padding, dilation, groups):
        return conv2d_by_matmul(x, conv_weight_matrix(w), tuple(w.shape[2:]), stride, padding)
    return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)


_SMALL_PLANE = 16  # output positions per image at or below which the matmul form wins
_LARGE_INNER = 512  # ... provided the inner dimension Cin·kh·kw is this large
