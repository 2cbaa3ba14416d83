"""Configuration types shared across layers: the guard's counts and constants, the approximation budget and
modes, and the parsers of their command-line spellings (one clear :class:`InputError` on bad syntax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError

__all__ = ["GuardConfig", "AccuracyBudget", "MODES", "OBJECTIVES", "parse_budget", "parse_overrides"]

#: ``--approx`` modes: search within the budget, exact protocols only, CrypTen's defaults, the handlers' defaults
MODES = ("auto", "exact", "crypten", "default")
#: what the approximation search minimises
OBJECTIVES = ("rounds", "bytes")


@dataclass(frozen=True)
class GuardConfig:
    """Fixed counts and constants of the guard (all public, part of the plan)."""

    rounds: int = 6
    steps: int = 49
    c1: float = 1.0
    c2: float = 10.0
    c3: float = 0.1
    lr: float = 0.2
    schedule: str = "freeze"  # "freeze" (test every step, keep the first success) or "paper"
    validator: str = "margin"  # "margin" (|h| <= margin, default) or "sign" (defender decision flipped)
    margin: float = 0.1
    c3_max: float = 100.0
    exp_degree: int = 4
    recip_degree: int = 4
    norm_iterations: int = 2
    grad_bits_hi: int = 12  # gradients up to 2^12 in magnitude are bucketed exactly
    #: "siguard" (default: multiplicative softmax update by two low-degree polynomials, coupled-Newton inverse
    #: square root from a range-derived guess) or "crypten": the same algorithm with CrypTen's default
    #: approximations inside (a fresh softmax of u + delta per step by exp with 8 squarings and 10 Newton
    #: steps; inverse square root from CrypTen's exp-based guess and 3 Newton steps) -- the baseline the
    #: approximation pass is measured against (``--approx crypten``).
    internals: str = "siguard"

    def __post_init__(self) -> None:
        if self.internals not in ("siguard", "crypten"):
            raise ValueError(f"unknown guard internals {self.internals!r} (siguard or crypten)")
        if self.schedule not in ("freeze", "paper"):
            raise ValueError(f"unknown guard schedule {self.schedule!r} (freeze or paper)")
        if self.validator not in ("sign", "margin"):
            raise ValueError(f"unknown guard validator {self.validator!r} (sign or margin)")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("guard rounds and steps must be >= 1")

    @property
    def lr_max(self) -> float:
        """The largest learning rate any round can reach (it grows x1.1 per failed round)."""
        return self.lr * 1.1 ** (self.rounds - 1)


@dataclass(frozen=True)
class AccuracyBudget:
    """End-to-end budget on the calibration data, against onnxruntime's output: top-1 agreement
    at least ``top1`` and max absolute change of the revealed output at most ``prob``."""

    top1: float = 0.995
    prob: float = 1e-2

    def holds(self, top1: float, max_abs: float) -> bool:
        return top1 >= self.top1 and max_abs <= self.prob

    def __str__(self) -> str:
        return f"top1={self.top1:g},prob={self.prob:g}"


def parse_budget(text: str | None) -> AccuracyBudget:
    """``top1=0.995,prob=0.01`` (either key may be left out; ``abs`` is an alias of ``prob``) or a
    bare number (the top-1 agreement). Bad syntax -> InputError."""
    if text is None or str(text).strip() == "":
        return AccuracyBudget()
    vals: dict[str, float] = {}
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    for item in items:
        key, sep, val = item.partition("=")
        if not sep:
            key, val = ("top1", key) if len(items) == 1 else ("", key)
        key = {"abs": "prob"}.get(key.strip(), key.strip())
        if key not in ("top1", "prob"):
            raise InputError(f"--accuracy-budget: unknown key {key!r} in {text!r} (use top1=F,prob=F)")
        try:
            vals[key] = float(val)
        except ValueError:
            raise InputError(f"--accuracy-budget: {key}={val!r} is not a number") from None
    b = AccuracyBudget(**vals)
    if not 0.0 <= b.top1 <= 1.0:
        raise InputError(f"--accuracy-budget: top1 must lie in [0, 1] (got {b.top1})")
    if not b.prob > 0.0:
        raise InputError(f"--accuracy-budget: prob must be > 0 (got {b.prob})")
    return b


def parse_overrides(items: Sequence[str] | None) -> tuple[str, dict[str, str]]:
    """``--approx`` values: a mode (auto, exact, crypten, default; at most one) and NODE=IMPL pairs."""
    mode = "auto"
    overrides: dict[str, str] = {}
    for item in items or ():
        node, sep, impl = str(item).partition("=")
        if not sep:
            if item not in MODES:
                raise InputError(f"--approx: {item!r} is neither a mode ({', '.join(MODES)}) nor NODE=IMPL")
            mode = item
            continue
        if not node.strip() or not impl.strip():
            raise InputError(f"--approx: {item!r} must read NODE=IMPL")
        overrides[node.strip()] = impl.strip()
    return mode, overrides
