"""Implementation names as values: :class:`Impl` parses a plan step's ``impl`` string once.

A plan step names the protocol that computes its op with a short string (``"exact"``, ``"limit8"``,
``"newton4"``, ``"chebyshev24"``, ``"fit6"``, ``"max_exp_recip"``) and, where a pass tuned it, a dict of
keywords (the plan's ``impl_params``: a fitted range, an iteration count, the softmax's exp). An
:class:`Impl` holds both:

* ``family`` -- the name without its number (``"limit"``, ``"exact"``, ``"max_exp_recip"``);
* ``number`` -- the number of a numbered family (:data:`NUMBERED`: iterations of ``limit``/``newton``,
  degree of ``chebyshev``/``fit``), None for a fixed name (``"exp2"`` is a name, not ``exp`` with 2);
* ``params`` -- the tuning keywords, in the plan's order.

``Impl.parse(str(impl)) == impl`` (without params), so ``plan.json`` keeps its strings and its hash. Round
counts are not part of an Impl: they are what the cost engine measures running it
(:func:`siguard.runtime.kernels.nonlinear.describe`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Impl", "NUMBERED", "split_numbered"]

#: numbered families and what their number means
NUMBERED: dict[str, str] = {"limit": "iterations", "newton": "iterations", "chebyshev": "degree", "fit": "degree"}

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")


def split_numbered(text: str, families: Mapping[str, Any] | tuple[str, ...]) -> tuple[str, int | None]:
    """(family, number) of ``text`` if it is one of ``families`` followed by digits (``"limit8"`` ->
    ("limit", 8)), else (text, None). The one place a trailing number is read off a name."""
    for family in families:
        rest = text[len(family):]
        if text.startswith(family) and rest.isdigit() and rest.isascii():
            return family, int(rest)
    return text, None


@dataclass(frozen=True)
class Impl:
    """An op's implementation: ``op`` (None where only the name is known), ``family``, ``number`` and
    the tuning ``params`` as (keyword, value) pairs. See the module docstring."""

    op: str | None
    family: str
    number: int | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str | Impl, op: str | None = None, params: Mapping[str, Any] | None = None) -> Impl:
        """The Impl named ``text`` (an Impl is returned as it is, with ``op``/``params`` filled in where
        given). ValueError for text that is not a name."""
        if isinstance(text, Impl):
            out = text
            if op is not None and out.op is None:
                out = cls(op, out.family, out.number, out.params)
            return out.with_params(params) if params else out
        if not isinstance(text, str) or not _NAME.fullmatch(text):
            raise ValueError(f"not an implementation name: {text!r}")
        family, number = split_numbered(text, NUMBERED)
        return cls(op, family, number, _pairs(params))

    def with_params(self, params: Mapping[str, Any] | None) -> Impl:
        """The same implementation with tuning ``params`` in place of its own."""
        return Impl(self.op, self.family, self.number, _pairs(params))

    # ---- reading ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The plan's ``impl`` string: family and number (``"limit8"``)."""
        return self.family if self.number is None else f"{self.family}{self.number}"

    def __str__(self) -> str:
        return self.name

    @property
    def param_dict(self) -> dict[str, Any]:
        """The tuning keywords as a dict (the plan's ``impl_params``), in their order."""
        return dict(self.params)

    @property
    def iterations(self) -> int | None:
        """The number of an iterated family (``limit``, ``newton``), else None."""
        return self.number if NUMBERED.get(self.family) == "iterations" else None

    @property
    def degree(self) -> int | None:
        """The number of a polynomial family (``chebyshev``, ``fit``), else None."""
        return self.number if NUMBERED.get(self.family) == "degree" else None

    def numbered(self, family: str, what: str = "implementation") -> int:
        """This Impl's number, which must belong to ``family`` (KeyError naming ``what`` otherwise)."""
        if self.family != family or self.number is None:
            raise KeyError(f"unknown {what} {self.name!r} (expected {family}<n>)")
        return self.number


def _pairs(params: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple((params or {}).items())
