"""The arithmetic interface every op handler and every nonlinear function is written against.

One interface, two engines:

* :class:`siguard.runtime.kernels.plain.PlainEngine` computes on cleartext ring elements with exactly the
  fixed-point arithmetic of the secure protocols (deterministic floor truncation, exact
  comparisons). It is the *fixed-point reference executor* and the fast evaluator used for
  calibration and accuracy measurement.
* :class:`siguard.runtime.mpc.rss.RSSEngine` computes on 3-party replicated secret shares over Z_2^64
  (one engine object per party), talking to its peers through a :class:`siguard.runtime.mpc.transport.Transport`.

Because the nonlinear functions in :mod:`siguard.runtime.kernels.nonlinear` call only this interface, the
reference and the secure runtime cannot drift apart: they run the same approximation code.

Value kinds seen through the interface:

* **public** values are plain ``torch.int64`` tensors (ring elements known to every party);
* **secret** values are engine-specific objects with a ``.shape`` (``torch.Size``); every
  arithmetic secret carries the fixed-point scale its caller gave it implicitly (the engines
  do not track scales, the plan does; :mod:`siguard.runtime.kernels.scales` is the reference
  engine that asserts them);
* **bits** are engine-specific Boolean-shared bits, one bit per element (``.shape`` as well).

Round and byte costs quoted per method are per element, for the busiest party, in the secure
engine; the plain engine communicates nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["Engine", "Secret", "Bits", "Value", "TensorBox", "SharePair", "msb_layout", "sign_bound"]

Secret = Any  # engine-specific secret arithmetic value
Bits = Any  # engine-specific secret Boolean bit tensor
Value = Any  # Secret or public torch.int64 tensor


class TensorBox:
    """A value an engine holds as one tensor ``v`` (the plain engine's cleartext, the cost engine's
    shape-only meta tensor). Engines subclass it once per kind (arithmetic, bits) so that type
    tests keep the kinds apart."""

    __slots__ = ("v",)

    def __init__(self, v: torch.Tensor):
        self.v = v

    @property
    def shape(self) -> torch.Size:
        return self.v.shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.v.shape)})"


class SharePair:
    """A party's two replicated shares ``a`` = x_i and ``b`` = x_{i+1}; subclassed per kind."""

    __slots__ = ("a", "b")

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a = a
        self.b = b

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.a.shape)})"


class Engine(ABC):
    """Arithmetic on secret (or public) ring tensors. See the module docstring."""

    frac_bits: int
    #: 0, 1, 2 for a compute server; None for the plain reference engine.
    party: int | None = None

    # ---- kinds ------------------------------------------------------------------------------
    @abstractmethod
    def is_secret(self, x: Value) -> bool:
        """True for a secret arithmetic value of this engine, False for a public tensor."""

    # ---- input and output (1 round each) ----------------------------------------------------
    @abstractmethod
    def input(self, owner: str, value: torch.Tensor | None, shape: Sequence[int]) -> Secret:
        """Secret-share a ring tensor owned by ``owner`` ("client" or "model").

        ``value`` is given only where the owner's data lives (the client, or the model owner's
        server P0); every other party passes None. Returns this party's share."""

    @abstractmethod
    def reveal(self, x: Secret, to: str = "client") -> torch.Tensor | None:
        """Open ``x`` to one named receiver ("client", or "P0"/"P1"/"P2"). Returns the ring tensor
        at the receiver (the plain engine always returns it), None elsewhere."""

    # ---- local linear algebra (0 rounds) ----------------------------------------------------
    @abstractmethod
    def add(self, a: Value, b: Value) -> Value:
        """a + b with broadcasting; either may be public."""

    @abstractmethod
    def sub(self, a: Value, b: Value) -> Value:
        """a - b with broadcasting; either may be public."""

    @abstractmethod
    def neg(self, a: Value) -> Value:
        """-a."""

    @abstractmethod
    def local(self, fn: Callable[..., torch.Tensor], *xs: Value) -> Value:
        """Apply a map that is linear over the ring *and* maps 0 to 0 (reshape, transpose, slice,
        zero pad, sum over axes, multiplication by a public integer tensor, ...) to every share
        of the secret arguments; public arguments are passed through unchanged. At most one
        argument may be secret unless ``fn`` is additive in each secret argument separately."""

    @abstractmethod
    def cat(self, xs: Sequence[Value], dim: int) -> Value:
        """Concatenate secrets (or public tensors; mixed is allowed) along ``dim``."""

    # ---- products (secret x secret: 1 round, 8 B per output element) ------------------------
    @abstractmethod
    def mul(self, a: Value, b: Value) -> Value:
        """Elementwise product with broadcasting, no truncation (scales add).

        Public x secret is local; secret x secret is one resharing round."""

    @abstractmethod
    def matmul(self, a: Value, b: Value) -> Value:
        """``torch.matmul`` semantics on ring elements, no truncation."""

    @abstractmethod
    def conv2d(
        self,
        x: Value,
        w: Value,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Value:
        """``torch.nn.functional.conv2d`` on ring elements (symmetric ``padding`` = (ph, pw)),
        no truncation. Callers pad asymmetric cases with :meth:`local` first."""

    @abstractmethod
    def trunc(self, x: Secret, bits: int) -> Secret:
        """Divide by 2^bits (fixed-point rescale). Secure: error at most 1 ulp, no catastrophic
        failure while |x| < 2^62 (see the engine's docstring for the protocol)."""

    # ---- Boolean bits, comparisons ----------------------------------------------------------
    @abstractmethod
    def msb(self, x: Secret, bits: int | None = None, drop: int = 0) -> Bits:
        """The sign bit of x (1 iff x < 0 as a signed ring element), Boolean-shared.
        Secure: 8 rounds, 64 B per element.

        With a PUBLIC bound ``bits`` = m (the caller guarantees -2^(m-1) <= x < 2^(m-1)) and ``drop`` = d,
        the test runs on the w = m - d (+1 if d > 0) bits left after each share component drops its d low
        bits (:func:`msb_layout`): 2 + ceil(log2 w) rounds (7 for w <= 32, 6 for w <= 16) and 64 / lanes
        bytes per element. The result is exact for x < 0 and for x >= 2^(d+1); for x in [0, 2^(d+1))
        (the band; empty for d = 0) it may read 1. Outside the bound the result is garbage (the value
        wraps modulo 2^w). A bound whose width exceeds 32 gives the exact 64-bit test."""

    @abstractmethod
    def bit_not(self, b: Bits) -> Bits:
        """1 - b (local)."""

    @abstractmethod
    def bit_xor(self, a: Bits, b: Bits) -> Bits:
        """a xor b (local)."""

    @abstractmethod
    def bit_and(self, a: Bits, b: Bits) -> Bits:
        """a and b (secure: 1 round)."""

    @abstractmethod
    def bit_cat(self, bs: Sequence[Bits], dim: int) -> Bits:
        """Concatenate bit tensors along ``dim``."""

    @abstractmethod
    def bit_local(self, fn: Callable[[torch.Tensor], torch.Tensor], b: Bits) -> Bits:
        """Apply a layout map (reshape, slice, index) to every share of a bit tensor."""

    @abstractmethod
    def mul_bit(self, x: Value, b: Bits) -> Secret:
        """x * b for an arithmetic x (secret or public) and a Boolean bit b, as an arithmetic
        secret at x's scale (no truncation). Secure: 2 rounds, 24 B per element."""

    @abstractmethod
    def b2a(self, b: Bits) -> Secret:
        """The bit as an arithmetic secret 0/1 at scale 0. Secure: 2 rounds, 16 B per element."""

    # ---- composition --------------------------------------------------------------------------
    def parallel(self, *calls: tuple[Any, ...]) -> list[Any]:
        """Independent primitive calls ``(method, *args)`` -- ``method`` this engine's ``msb`` or
        ``trunc`` (:data:`PARALLEL_PRIMITIVES`) -- returning their results in order.

        The secure engine runs them so that their k-th rounds travel together (one exchange,
        messages to the same peer concatenated): rounds = the longest call's, bytes add up. E.g. a
        ReLU after a product: the sign of the untruncated product and its truncation,
        ``e.parallel((e.msb, x), (e.trunc, x, d))``, in 8 rounds instead of 10. Here: in order."""
        return [check_parallel_call(self, c)(*c[1:]) for c in calls]

    def fork(self, *branches: Callable[[], Any]) -> list[Any]:
        """Run independent pieces of protocol code (zero-argument callables written against this engine)
        and return their results in order.

        The secure engine runs them side by side so that their k-th rounds travel together (one exchange
        per round, messages to the same peer concatenated in branch order): rounds = the longest branch's,
        bytes add up. Unlike :meth:`parallel` a branch may be any code (products, comparisons, nested
        forks); it must not depend on another branch's result. Here (the reference): in order."""
        return [b() for b in branches]

    def rerandomise(self, x: Value) -> Value:
        """The same secret with fresh share components (the secure engine re-randomises a server's
        input, e.g. the weights, at every session start: 0 rounds). Here: x itself."""
        return x

    # ---- conveniences built on the above (shared by both engines) ---------------------------
    def shape(self, x: Value) -> torch.Size:
        return x.shape

    def mul_public_real(self, x: Value, c: float | torch.Tensor, bits: int | None = None) -> Value:
        """x * c for a public real c (scalar or tensor), rescaled back to x's scale: multiply by
        round(c * 2^bits) then truncate by ``bits`` (default: the engine's fractional bits)."""
        bits = self.frac_bits if bits is None else bits
        c_ring = torch.round(torch.as_tensor(c, dtype=torch.float64) * float(2**bits)).to(torch.int64)
        y = self.mul(x, c_ring)
        return self.trunc(y, bits) if self.is_secret(y) else _floor_shift(y, bits)

    def public(self, value: float | torch.Tensor, scale: int | None = None) -> torch.Tensor:
        """A public real constant encoded at ``scale`` (default: the engine's fractional bits)."""
        scale = self.frac_bits if scale is None else scale
        return torch.round(torch.as_tensor(value, dtype=torch.float64) * float(2**scale)).to(torch.int64)


def msb_layout(bits: int | None, drop: int = 0) -> tuple[int, int, int] | None:
    """How :meth:`Engine.msb` runs a sign test with the public bound |x| < 2^(bits-1) after dropping
    ``drop`` low bits: None for the full 64-bit test (no bound, or a width above 32, where the bound
    saves no round), else (w, levels, lanes).

    Derivation (docs/protocols.md §5a). x = x0 + x1 + x2 mod 2^64; each holder replaces its component by
    y_j = lshr(x_j, d). Then y = y0 + y1 + y2 = floor(x / 2^d) - c (mod 2^(64-d)) with c in {0, 1, 2} the
    carry of the three dropped d-bit parts (the multiple of 2^64 vanishes mod 2^(64-d)). For
    -2^(m-1) <= x < 2^(m-1), floor(x / 2^d) - c lies in [-2^(m-1-d) - 2, 2^(m-1-d)), inside the signed
    range of w = m - d + 1 bits (w = m when d = 0: then c = 0), so the sign of y's low w bits is that of
    floor(x / 2^d) - c: 1 for x < 0, 0 for x >= 2^(d+1). Placed at the top of a lane of L = 2^levels >= w
    bits, the carry-out tree needs levels = ceil(log2 w) levels (positions below the lane's w live bits
    have g = p = 0, so every further level is a no-op), and 64 / L lanes share a word."""
    if bits is None:
        return None
    m, d = int(bits), int(drop)
    if d < 0 or not 2 <= m <= 64 or (d > 0 and m > 63):
        raise ValueError(f"msb bound: bits must be in 2..64 (2..63 with a drop), drop >= 0; got {m}, {d}")
    w = m - d + 1 if d > 0 else m
    if w < 2:
        raise ValueError(f"msb bound: dropping {d} of {m} bits leaves fewer than 2")
    if w > 32:
        return None
    levels = (w - 1).bit_length()
    return w, levels, 64 >> levels


def sign_bound(bound_bits: int, width: int = 32) -> tuple[int, int]:
    """(bits, drop) for :meth:`Engine.msb` of a value with |x| < 2^(bound_bits - 1): the smallest drop
    that leaves at most ``width`` bits (band 2^(drop + 1): as narrow as ``width`` allows)."""
    m = int(bound_bits)
    return (m, 0) if m <= width else (m, m + 1 - width)


#: the primitives :meth:`Engine.parallel` merges (the secure engine has a stepwise form of each)
PARALLEL_PRIMITIVES = ("msb", "trunc")


def check_parallel_call(engine: Engine, call: tuple[Any, ...]) -> Callable[..., Any]:
    """The method of a :meth:`Engine.parallel` call ``(method, *args)``; ValueError unless it is ``engine``'s own
    msb or trunc (every engine checks the same, so a plan that runs on one runs on all)."""
    method = call[0]
    name = getattr(method, "__name__", None)
    if name not in PARALLEL_PRIMITIVES or getattr(method, "__self__", None) is not engine:
        raise ValueError(f"parallel takes calls of this engine's {', '.join(PARALLEL_PRIMITIVES)}, got {method!r}")
    return method


def _floor_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return x >> bits if bits > 0 else x
