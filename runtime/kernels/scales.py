"""The fixed-point reference engine with scales asserted: a wrong scale fails loudly instead of giving a wrong number.

The secure protocols track fixed-point scales by hand (a product is at ``qs``, a truncation brings it back to
``qs - f``); the engine itself only sees ring elements. :class:`ScaleCheckingEngine` is the
:class:`siguard.runtime.kernels.plain.PlainEngine` (same arithmetic, same results) whose secrets also carry a
scale, the number of fractional bits they are encoded with. Only this engine pays for it: the secure engine
and the cost engine are untouched.

Rules (``None`` = unknown scale; public ring tensors are plain tensors and have an unknown scale):

1. ``add``, ``sub``, ``cat`` and ``local`` with several secrets: the known scales must be equal
   (:class:`ScaleError` otherwise); the result has that scale. An operand of unknown scale (a public
   constant, or a value whose scale was lost) adopts it: public constants are scale-agnostic.
2. ``mul``, ``matmul``, ``conv2d`` of two secrets: the scales add. With a public operand the result's
   scale is unknown (the constant may be an integer, scale 0, or a fixed-point real), except in
   :meth:`~siguard.runtime.kernels.engine.Engine.mul_public_real`, which keeps x's scale by contract.
3. ``trunc(x, k)``: x's scale minus k. ``neg``, one-secret ``local`` (reshape, sum, pad, ...),
   ``mul_bit`` (x times a bit) and ``rerandomise`` keep the scale; ``b2a`` gives scale 0.
4. At the step boundaries the executor asks :class:`ScaleCheck` (built by :meth:`ScaleCheckingEngine.scale_check`):
   before a step, every secret argument of unknown scale (a client input, a weight) takes the scale the plan
   declares for it, and one of known scale must have it; after the step, every secret output must have the
   scale the plan's value table declares (``None`` there = ``frac_bits``). A product step (``mul``, ``matmul``,
   ``conv``) with a public constant of the plan as an operand uses that constant's declared scale, so its
   output is checked too. Outputs whose scale was lost inside a step (rule 2: a kernel's product with a public
   constant of its own) cannot be checked: they are listed in :attr:`ScaleCheck.unchecked` and take their
   declared scale for the steps after.

Errors name the step, its op and implementation, the value, its scale and the declared one; the executor
re-raises them naming the step's index and the party.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from siguard.core.errors import SiguardError

from .plain import Clear, PlainEngine, _raw

__all__ = ["ScaleCheckingEngine", "ScaleCheck", "Scaled", "ScaleError"]


class ScaleError(SiguardError):
    """A value's fixed-point scale is not the one the arithmetic or the plan requires."""


class Scaled(Clear):
    """A secret of the scale-checking engine: the ring tensor ``v`` and its ``scale`` (None = unknown)."""

    __slots__ = ("scale",)

    def __init__(self, v: torch.Tensor, scale: int | None):
        super().__init__(v)
        self.scale = scale

    def __repr__(self) -> str:
        return f"Scaled(shape={tuple(self.v.shape)}, scale={self.scale})"


def _scale(x: Any) -> int | None:
    return x.scale if isinstance(x, Scaled) else None


def _same(what: str, xs: Sequence[Any]) -> int | None:
    """Rule 1: the one known scale among ``xs`` (None if none is known)."""
    known = {s for s in (_scale(x) for x in xs) if s is not None}
    if len(known) > 1:
        raise ScaleError(f"{what} of values at different fixed-point scales {sorted(known)}")
    return known.pop() if known else None


def _sum(xs: Sequence[Any]) -> int | None:
    """Rule 2: the sum of the scales of secret operands; None if an operand is public or of unknown scale."""
    scales = [_scale(x) for x in xs]
    if any(s is None for s in scales):
        return None
    return sum(scales)  # type: ignore[arg-type]


class ScaleCheckingEngine(PlainEngine):
    """:class:`PlainEngine` whose secrets carry their fixed-point scale (see the module docstring)."""

    def _out(self, xs: Sequence[Any], result: torch.Tensor, scale: int | None):
        return Scaled(result, scale) if any(isinstance(x, Clear) for x in xs) else result

    def input(self, owner, value, shape):
        return Scaled(super().input(owner, value, shape).v, None)  # the executor declares it (rule 4)

    def add(self, a, b):
        return self._out((a, b), _raw(a) + _raw(b), _same("add", (a, b)))

    def sub(self, a, b):
        return self._out((a, b), _raw(a) - _raw(b), _same("sub", (a, b)))

    def neg(self, a):
        return self._out((a,), -_raw(a), _scale(a))

    def local(self, fn: Callable[..., torch.Tensor], *xs):
        return self._out(xs, fn(*[_raw(x) for x in xs]), _same("a local map", xs))

    def cat(self, xs: Sequence, dim: int):
        return self._out(xs, torch.cat([_raw(x) for x in xs], dim=dim), _same("cat", xs))

    def mul(self, a, b):
        return self._out((a, b), _raw(super().mul(a, b)), _sum((a, b)))

    def matmul(self, a, b):
        return self._out((a, b), _raw(super().matmul(a, b)), _sum((a, b)))

    def conv2d(self, x, w, stride, padding, dilation, groups):
        return self._out((x, w), _raw(super().conv2d(x, w, stride, padding, dilation, groups)), _sum((x, w)))

    def trunc(self, x, bits):
        s = _scale(x)
        return self._out((x,), _raw(super().trunc(x, bits)), None if s is None else s - bits)

    def mul_bit(self, x, b):
        return Scaled(_raw(x) * b.v, _scale(x))

    def b2a(self, b):
        return Scaled(b.v.clone(), 0)

    def mul_public_real(self, x, c, bits=None):
        y = super().mul_public_real(x, c, bits)
        if isinstance(y, Scaled):
            y.scale = _scale(x)
        return y

    def scale_check(self, plan: Any) -> ScaleCheck:
        """The step-boundary check of ``plan`` for :class:`siguard.runtime.executor.Executor` (rule 4)."""
        f = int(plan.frac_bits)
        declared = {name: f if v.get("scale") is None else int(v["scale"]) for name, v in plan.values.items()}
        declared.update({w["name"]: int(w["scale"]) for w in plan.doc["weights"]})
        constants = {name: int(c["scale"]) for name, c in plan.doc["constants"].items()}
        return ScaleCheck(declared, constants)


#: steps whose output is the raw product of their first two operands (a bias, if any, is at that scale)
PRODUCTS = ("mul", "matmul", "conv")


class ScaleCheck:
    """Rule 4 for one plan: ``declared`` maps every secret value and weight to its scale, ``constants`` every
    public constant."""

    def __init__(self, declared: dict[str, int], constants: dict[str, int] | None = None):
        self.declared = declared
        self.constants = constants or {}
        #: (step, value) of outputs whose scale was lost on the way (rule 2), so not checked
        self.unchecked: list[tuple[str, str]] = []
        self._product: int | None = None

    def arguments(self, step: Any, args: Sequence[Any]) -> None:
        """Before ``step``: its secret arguments take their declared scale, or must already have it."""
        for name, x in zip(step.inputs, args, strict=True):
            if not isinstance(x, Scaled) or name not in self.declared:
                continue
            want = self.declared[name]
            if x.scale is None:
                x.scale = want
            elif x.scale != want:
                raise ScaleError(f"step {step.name!r} (op {step.op}, impl {step.impl}) reads {name!r} at scale "
                                 f"{x.scale}, the plan declares {want}")
        self._product = None
        if step.op in PRODUCTS and len(args) >= 2:
            pair = [_scale(x) if isinstance(x, Scaled) else self.constants.get(n)
                    for n, x in zip(step.inputs[:2], args[:2], strict=True)]
            self._product = None if None in pair else sum(pair)  # type: ignore[arg-type]

    def results(self, step: Any, outputs: Sequence[Any]) -> None:
        """After ``step``: each secret output must have the scale the plan's value table declares."""
        for name, y in zip(step.outputs, outputs, strict=True):
            if not isinstance(y, Scaled) or name not in self.declared:
                continue
            want = self.declared[name]
            if y.scale is None and self._product is not None:
                y.scale = self._product
            if y.scale is None:
                self.unchecked.append((step.name, name))
                y.scale = want
            elif y.scale != want:
                raise ScaleError(f"step {step.name!r} (op {step.op}, impl {step.impl}) wrote {name!r} at scale "
                                 f"{y.scale}, the plan's value table declares {want}")
