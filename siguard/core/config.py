"""Configuration types shared across layers: the guard's counts and constants, the approximation budget and
modes, and the parsers of their command-line spellings (one clear :class:`InputError` on bad syntax)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError

__all__ = ["GuardConfig", "SCHEDULE_DEFAULTS", "AccuracyBudget", "MODES", "OBJECTIVES", "parse_budget",
    "parse_overrides"]

#: ``--approx`` modes: search within the budget, exact protocols only, CrypTen's defaults, the handlers' defaults
MODES = ("auto", "exact", "crypten", "default")
#: what the approximation search minimises
OBJECTIVES = ("rounds", "bytes")


#: per schedule, the defaults of the fields a schedule changes (see :meth:`GuardConfig.for_schedule`)
SCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    # the default: every round a candidate of one batch, sign steps, the hybrid validator (README, "The guard")
    "parallel": {"rounds": 10, "steps": 25, "lr": 0.04, "lr_growth": 1.3, "validator": "hybrid", "margin": 0.2,
                 "sharpen_lr": 0.2, "release_bits": 7},
    # the sequential schedules with MemGuard's normalised-gradient step, released at full precision
    "freeze": {"rounds": 6, "steps": 49, "lr": 0.2, "lr_growth": 1.1, "validator": "margin", "margin": 0.1,
               "sharpen_lr": 0.0, "release_bits": 0},
    "paper": {"rounds": 6, "steps": 49, "lr": 0.2, "lr_growth": 1.1, "validator": "sign", "margin": 0.1,
              "sharpen_lr": 0.0, "release_bits": 0},
}


@dataclass(frozen=True)
class GuardConfig:
    """Fixed counts and constants of the guard (all public, part of the plan). The field defaults are
    the default schedule's (``parallel``); :meth:`for_schedule` gives another schedule's defaults."""

    rounds: int = 10
    steps: int = 25
    c1: float = 1.0
    c2: float = 10.0
    c3: float = 0.1
    lr: float = 0.04
    #: "parallel" (default: the R rounds as R candidates of one batch, sign steps, first success in
    #: (round, step) order), "freeze" (sequential rounds, test every step, keep the first success) or
    #: "paper" (sequential rounds, test at the end of each round); see :data:`SCHEDULE_DEFAULTS`
    schedule: str = "parallel"
    #: "sign" (the defender's decision flipped), "margin" (|h| <= margin) or "hybrid" (parallel schedule only:
    #: the first flip in (round, step) order, failing that the first |h| <= margin)
    validator: str = "hybrid"
    margin: float = 0.2
    lr_growth: float = 1.3  # a failed round's learning rate times this is the next round's
    #: the parallel schedule: one more candidate round (after every search candidate) whose every step raises
    #: the label's logit by sharpen_lr and lowers every other by as much, so that a query the search cannot bring to
    #: the defender's boundary is sharpened towards it instead of released unguarded; 0: no such round
    sharpen_lr: float = 0.2
    #: the sharpening round's margin test |h| <= sharpen_margin (wider than ``margin``): along its path the score
    #: rises towards the boundary from far below, and the round keeps its first step within this margin, failing
    #: that its first flip (README, "The guard")
    sharpen_margin: float = 0.5
    #: the parallel schedule: the released vector rounded down to multiples of 2^-release_bits for every class but
    #: the label, which takes the rest (README, "The guard"); 0: full fixed-point precision
    release_bits: int = 7
    c3_max: float = 100.0
    exp_degree: int = 4
    recip_degree: int = 4
    norm_iterations: int = 2
    grad_bits_hi: int = 12  # gradients up to 2^12 in magnitude are bucketed exactly
    #: the parallel schedule: |c1 grad h + c3| < 2^grad_bound_bits for every input (the guard pass sets it
    #: from the defender's weights, a power of two); it fixes the headroom of the sign test (:func:`s_shift`)
    grad_bound_bits: int = 6
    #: the parallel schedule's bounded sign tests (docs/guard.md, "Sign tests on fewer bits"): for every probability
    #: vector q, |q W1 + b1| < 2^h1_bound_bits (each unit), |relu(q W1 + b1) W2 + b2| < 2^h2_bound_bits and
    #: |h(q)| < 2^score_bound_bits. Set by the guard pass from the defender's weights (powers of two only);
    #: None: unknown, those tests take the full 64-bit comparison
    h1_bound_bits: int | None = None
    h2_bound_bits: int | None = None
    score_bound_bits: int | None = None
    #: "siguard" (default: multiplicative softmax update by two low-degree polynomials, coupled-Newton inverse
    #: square root from a range-derived guess) or "crypten": the same algorithm with CrypTen's default
    #: approximations inside (a fresh softmax of u + delta per step by exp with 8 squarings and 10 Newton
    #: steps; inverse square root from CrypTen's exp-based guess and 3 Newton steps) -- the baseline the
    #: approximation pass is measured against (``--approx crypten``). Sequential schedules only.
    internals: str = "siguard"

    def __post_init__(self) -> None:
        if self.internals not in ("siguard", "crypten"):
            raise ValueError(f"unknown guard internals {self.internals!r} (siguard or crypten)")
        if self.schedule not in SCHEDULE_DEFAULTS:
            raise ValueError(f"unknown guard schedule {self.schedule!r} ({', '.join(SCHEDULE_DEFAULTS)})")
        if self.validator not in ("sign", "margin", "hybrid"):
            raise ValueError(f"unknown guard validator {self.validator!r} (sign, margin or hybrid)")
        if self.validator == "hybrid" and self.schedule != "parallel":
            raise ValueError("the hybrid validator needs the parallel schedule")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("guard rounds and steps must be >= 1")
        if not (self.lr > 0 and self.lr_growth >= 1.0):
            raise ValueError("the guard's lr must be > 0 and lr_growth >= 1")
        if not 0.0 <= self.sharpen_lr <= 1.0 or not 0 <= self.release_bits <= 12 or not self.sharpen_margin > 0:
            raise ValueError("the guard's sharpen_lr must lie in [0, 1], sharpen_margin be > 0 and release_bits lie "
                             "in [0, 12]")
        if (self.sharpen_lr or self.release_bits) and self.schedule != "parallel":
            raise ValueError("the sharpening round and the release precision need the parallel schedule "
                             "(set sharpen_lr and release_bits to 0)")

    @classmethod
    def for_schedule(cls, schedule: str | None = None, **overrides: Any) -> GuardConfig:
        """The configuration of ``schedule`` (default: the default schedule) with its defaults
        (:data:`SCHEDULE_DEFAULTS`), then ``overrides`` (fields given as None are left at the default)."""
        name = schedule or cls.schedule
        if name not in SCHEDULE_DEFAULTS:
            raise ValueError(f"unknown guard schedule {name!r} ({', '.join(SCHEDULE_DEFAULTS)})")
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(**{**SCHEDULE_DEFAULTS[name], "schedule": name, **given})

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> GuardConfig:
        """The configuration a plan's guard step (or the guard node) records in its ``attrs``: its fields, with the
        schedule's defaults for any a plan lacks (:meth:`for_schedule`); other attributes are ignored."""
        return cls.for_schedule(**{k: v for k, v in attrs.items() if k in cls.__dataclass_fields__})

    @property
    def step(self) -> str:
        """The update rule: "sign" for the parallel schedule, MemGuard's normalised gradient "l2" otherwise
        (:func:`siguard.privacy.memguard.guard_reference`'s ``step``)."""
        return "sign" if self.schedule == "parallel" else "l2"

    @property
    def iterations(self) -> int:
        """Sequential iterations (what :func:`guard_progress` counts): R (T + 1), or T + 1 when the rounds
        run as one batch."""
        return self.steps + 1 if self.schedule == "parallel" else self.rounds * (self.steps + 1)

    @property
    def lr_max(self) -> float:
        """The largest learning rate any round can reach."""
        return self.lr * self.lr_growth ** (self.rounds - 1)

    def oracle_options(self) -> dict[str, Any]:
        """The float oracle's options for this configuration (:func:`siguard.privacy.memguard.guard_reference`)."""
        return {"rounds": self.rounds, "steps": self.steps, "c1": self.c1, "c2": self.c2, "c3": self.c3,
                "lr": self.lr, "schedule": self.schedule, "validator": self.validator, "margin": self.margin,
                "c3_max": self.c3_max, "step": self.step, "lr_growth": self.lr_growth, "sharpen_lr": self.sharpen_lr,
                "sharpen_margin": self.sharpen_margin, "release_bits": self.release_bits}


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
