"""The fixed-point reference engine: cleartext ring arithmetic with the secure runtime's semantics.

Secret values are wrapped in :class:`Clear` (and bits in :class:`ClearBits`) so that code written
against :class:`siguard.runtime.kernels.engine.Engine` takes the same branches (public vs secret) here as in the
secure engine. Truncation is the deterministic floor ``x >> bits``; the secure truncation differs
from it by at most one unit in the last place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from siguard.runtime.linalg import ring_conv2d, ring_matmul

from .engine import Engine, TensorBox, msb_layout

__all__ = ["PlainEngine", "Clear", "ClearBits"]


class Clear(TensorBox):
    """A 'secret' value of the plain engine: the ring tensor itself."""

    __slots__ = ()


class ClearBits(TensorBox):
    """A Boolean bit tensor of the plain engine (int64 0/1)."""

    __slots__ = ()


def _raw(x):
    return x.v if isinstance(x, Clear) else x


class PlainEngine(Engine):
    """Cleartext engine (see module docstring). ``party`` is None."""

    party = None

    def __init__(self, frac_bits: int = 16):
        self.frac_bits = frac_bits
        self.bound_violations = 0  # values outside an msb call's declared bound (see msb)
        self.bound_peak = 0.0

    def is_secret(self, x) -> bool:
        return isinstance(x, Clear)

    def _wrap(self, *xs, result: torch.Tensor):
        return Clear(result) if any(isinstance(x, Clear) for x in xs) else result

    # input / output
    def input(self, owner, value, shape):
        if value is None:
            raise ValueError("the plain engine needs the value at input")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"input shape {tuple(value.shape)} != declared {tuple(shape)}")
        return Clear(value.to(torch.int64))

    def reveal(self, x, to="client"):
        return _raw(x).clone()

    # local
    def add(self, a, b):
        return self._wrap(a, b, result=_raw(a) + _raw(b))

    def sub(self, a, b):
        return self._wrap(a, b, result=_raw(a) - _raw(b))

    def neg(self, a):
        return self._wrap(a, result=-_raw(a))

    def local(self, fn: Callable[..., torch.Tensor], *xs):
        return self._wrap(*xs, result=fn(*[_raw(x) for x in xs]))

    def cat(self, xs: Sequence, dim: int):
        return self._wrap(*xs, result=torch.cat([_raw(x) for x in xs], dim=dim))

    # products
    def mul(self, a, b):
        return self._wrap(a, b, result=_raw(a) * _raw(b))

    def matmul(self, a, b):
        return self._wrap(a, b, result=ring_matmul(_raw(a), _raw(b)))

    def conv2d(self, x, w, stride, padding, dilation, groups):
        y = ring_conv2d(_raw(x), _raw(w), tuple(stride), tuple(padding), tuple(dilation), groups)
        return self._wrap(x, w, result=y)

    def trunc(self, x, bits):
        return self._wrap(x, result=_raw(x) >> bits if bits else _raw(x))

    # bits
    def msb(self, x, bits=None, drop=0):
        """The sign bit; with a bound (see Engine.msb) the secure result with carry c = 0: the sign of
        floor(x / 2^drop) in w bits -- exact inside the bound (as floor models the secure truncation, the
        band's other outcome is the secure engine's alone) and the same wrap-around outside it. Values
        outside a declared bound are counted in ``bound_violations`` (a bound the plan relies on must
        never be exceeded); ``bound_peak`` keeps the largest |x| / 2^(bits-1) seen."""
        v = _raw(x)
        layout = msb_layout(bits, drop)
        if bits is not None and int(bits) < 64:
            half = 1 << (int(bits) - 1)
            self.bound_violations += int(((v < -half) | (v >= half)).sum())
            if v.numel():
                peak = max(float(v.max()), -float(v.min())) / half
                self.bound_peak = max(self.bound_peak, peak)
        if layout is None:
            return ClearBits((v < 0).to(torch.int64))
        w = layout[0]
        return ClearBits((((v >> int(drop)) << (64 - w)) < 0).to(torch.int64))

    def bit_not(self, b):
        return ClearBits(1 - b.v)

    def bit_xor(self, a, b):
        return ClearBits(a.v ^ b.v)

    def bit_and(self, a, b):
        return ClearBits(a.v & b.v)

    def bit_cat(self, bs, dim):
        return ClearBits(torch.cat([b.v for b in bs], dim=dim))

    def bit_local(self, fn, b):
        return ClearBits(fn(b.v))

    def mul_bit(self, x, b):
        return Clear(_raw(x) * b.v)

    def b2a(self, b):
        return Clear(b.v.clone())
