"""The plan's cost model: rounds and bytes of every Engine primitive, and an Engine that counts them.

:data:`PRIMITIVE_COSTS` lists, per primitive, the rounds and the bytes sent per element by P0,
P1, P2 and the client in :class:`siguard.runtime.mpc.rss.RSSEngine` ("per element" = per output element,
except where noted). :class:`CostEngine` runs the Engine interface on shapes only -- secrets are
``torch`` tensors on the ``meta`` device, so :meth:`CostEngine.local` learns output shapes by
running ``fn`` -- and adds up the cost of every call in call order (primitives are sequential, so
rounds add; calls merged by :meth:`CostEngine.parallel` count the longest one's rounds and all their
bytes). The tests check that these numbers equal what the in-process transport counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from siguard.runtime.linalg import ring_conv2d, ring_matmul
from siguard.runtime.ring import numel

from .engine import Engine, TensorBox, check_parallel_call, msb_layout

__all__ = ["PrimitiveCost", "PRIMITIVE_COSTS", "CostTotals", "CostEngine", "MetaShares", "MetaBits"]

_META = torch.device("meta")


@dataclass(frozen=True)
class PrimitiveCost:
    """``rounds`` and bytes sent per element by (P0, P1, P2) and by the client."""

    rounds: int
    bytes: tuple[int, int, int] = (0, 0, 0)
    client: int = 0


_LOCAL = PrimitiveCost(0)
_RESHARE = PrimitiveCost(1, (8, 8, 8))

PRIMITIVE_COSTS: dict[str, PrimitiveCost] = {
    "input:client": PrimitiveCost(1, (0, 0, 0), 48),
    # the servers' consistency check of the client's input: one SHA-256 digest per input, not per element
    "input:client:check": PrimitiveCost(1, (32, 32, 32)),
    "input:P0": PrimitiveCost(1, (8, 0, 0)),  # owner "model"
    "input:P1": PrimitiveCost(1, (0, 8, 0)),
    "input:P2": PrimitiveCost(1, (0, 0, 8)),
    "reveal:client": PrimitiveCost(1, (8, 8, 8)),
    "reveal:P0": PrimitiveCost(1, (0, 8, 0)),  # P_{t+1} sends to P_t
    "reveal:P1": PrimitiveCost(1, (0, 0, 8)),
    "reveal:P2": PrimitiveCost(1, (8, 0, 0)),
    "add": _LOCAL,
    "sub": _LOCAL,
    "neg": _LOCAL,
    "local": _LOCAL,
    "cat": _LOCAL,
    "mul": _RESHARE,
    "matmul": _RESHARE,
    "conv2d": _RESHARE,
    "mul:public": _LOCAL,  # also matmul/conv2d with a public operand
    "trunc": PrimitiveCost(2, (16, 8, 8)),
    "msb": PrimitiveCost(8, (64, 64, 64)),
    "bit_not": _LOCAL,
    "bit_xor": _LOCAL,
    "bit_and": _RESHARE,
    "bit_and:public": _LOCAL,
    "bit_cat": _LOCAL,
    "bit_local": _LOCAL,
    "b2a": PrimitiveCost(2, (16, 8, 8)),
    # Per output element when x and b have the same shape; with broadcasting P0 also sends one word
    # per element of b (its input of t) and 16 B per output element, P1 and P2 16 B per output element.
    "mul_bit": PrimitiveCost(2, (24, 16, 16)),
    "mul_bit:public": PrimitiveCost(2, (16, 8, 8)),  # = b2a of b, per element of b
}


class MetaShares(TensorBox):
    """A secret of the cost engine: only its shape (a meta tensor ``v``)."""

    __slots__ = ()


class MetaBits(TensorBox):
    """A bit tensor of the cost engine: only its shape (a meta tensor ``v``)."""

    __slots__ = ()


@dataclass
class CostTotals:
    """Accumulated cost: rounds, bytes sent by P0, P1, P2, bytes sent by the client."""

    rounds: int = 0
    bytes_per_party: list[int] = field(default_factory=lambda: [0, 0, 0])
    client_bytes: int = 0

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "bytes_per_party": list(self.bytes_per_party), "client_bytes": self.client_bytes}


def _meta(shape: Sequence[int]) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=torch.int64, device=_META)


def _raw(x: Any) -> torch.Tensor:
    return x.v if isinstance(x, (MetaShares, MetaBits)) else torch.as_tensor(x, dtype=torch.int64)


class CostEngine(Engine):
    """Counts the rounds and bytes RSSEngine would spend on the same sequence of calls.

    ``total`` -> {"rounds", "bytes_per_party": [b0, b1, b2], "client_bytes"}; ``steps`` the same
    per named step (:meth:`step`, used by the executor like the transport's). Public values stay
    real CPU tensors, so public-only arithmetic is computed; ``reveal`` returns a meta tensor.
    """

    party = None
    #: a list to collect the guard's phase marks in (siguard.runtime.kernels.guard.guard_phases), or None
    guard_marks: list | None = None

    def __init__(self, frac_bits: int = 16):
        self.frac_bits = frac_bits
        self._total = CostTotals()
        self._steps: dict[str, CostTotals] = {}
        self._step_names: list[str] = []

    # ---- accounting -------------------------------------------------------------------------
    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Attribute the enclosed costs to ``name`` as well (innermost wins)."""
        self._step_names.append(name)
        try:
            yield
        finally:
            self._step_names.pop()

    @property
    def total(self) -> dict:
        return self._total.as_dict()

    @property
    def steps(self) -> dict[str, dict]:
        return {name: t.as_dict() for name, t in self._steps.items()}

    def _charge_raw(self, rounds: int, bytes3: Sequence[int], client: int = 0) -> None:
        targets = [self._total]
        if self._step_names:
            targets.append(self._steps.setdefault(self._step_names[-1], CostTotals()))
        for t in targets:
            t.rounds += rounds
            for p in range(3):
                t.bytes_per_party[p] += bytes3[p]
            t.client_bytes += client

    def parallel(self, *calls: tuple[Any, ...]) -> list[Any]:
        """The calls' rounds overlap (the longest counts), their bytes add (see Engine.parallel)."""
        targets = [self._total]
        if self._step_names:
            targets.append(self._steps.setdefault(self._step_names[-1], CostTotals()))
        start = [t.rounds for t in targets]
        results, longest = [], 0
        for c in calls:
            before = self._total.rounds
            method = c[0] if c[0] == self._branch else check_parallel_call(self, c)
            results.append(method(*c[1:]))
            longest = max(longest, self._total.rounds - before)
            for t, r0 in zip(targets, start, strict=True):
                t.rounds = r0
        for t in targets:
            t.rounds += longest
        return results

    def fork(self, *branches: Callable[[], Any]) -> list[Any]:
        """The branches' rounds overlap (the longest counts), their bytes add (see Engine.fork)."""
        return self.parallel(*[(self._branch, b) for b in branches])

    def _branch(self, body: Callable[[], Any]) -> Any:
        return body()

    def _charge(self, primitive: str, n: int) -> None:
        c = PRIMITIVE_COSTS[primitive]
        self._charge_raw(c.rounds, [b * n for b in c.bytes], c.client * n)

    # ---- kinds ------------------------------------------------------------------------------
    def is_secret(self, x: Any) -> bool:
        return isinstance(x, MetaShares)

    # ---- input and output -------------------------------------------------------------------
    def input(self, owner: str, value: torch.Tensor | None, shape: Sequence[int]) -> MetaShares:
        key = {"client": "input:client", "model": "input:P0", "P0": "input:P0", "P1": "input:P1", "P2": "input:P2"}
        if owner not in key:
            raise ValueError(f"unknown input owner {owner!r}")
        self._charge(key[owner], numel(shape))
        if owner == "client":
            self._charge("input:client:check", 1)
        return MetaShares(_meta(shape))

    def reveal(self, x: MetaShares, to: str = "client") -> torch.Tensor:
        if to not in ("client", "P0", "P1", "P2"):
            raise ValueError(f"unknown receiver {to!r}")
        self._charge(f"reveal:{to}", numel(x.shape))
        return _meta(x.shape)

    # ---- local ------------------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Any:
        if not (isinstance(a, MetaShares) or isinstance(b, MetaShares)):
            return _raw(a) + _raw(b)
        return MetaShares(_meta(torch.broadcast_shapes(_raw(a).shape, _raw(b).shape)))

    def sub(self, a: Any, b: Any) -> Any:
        if not (isinstance(a, MetaShares) or isinstance(b, MetaShares)):
            return _raw(a) - _raw(b)
        return self.add(a, b)

    def neg(self, a: Any) -> Any:
        return MetaShares(_meta(a.shape)) if isinstance(a, MetaShares) else -_raw(a)

    def local(self, fn: Callable[..., torch.Tensor], *xs: Any) -> Any:
        """Runs fn on meta tensors (public arguments first as they are, then moved to meta); if fn
        cannot run on meta tensors, on zero CPU tensors of the secrets' shapes."""
        if not any(isinstance(x, MetaShares) for x in xs):
            return fn(*xs)
        attempts = (
            lambda x: x,
            lambda x: x.to(_META) if isinstance(x, torch.Tensor) else x,
        )
        for public_as in attempts:
            try:
                out = fn(*[x.v if isinstance(x, MetaShares) else public_as(x) for x in xs])
                return MetaShares(out.to(_META))
            except Exception:  # noqa: BLE001 - fn may not support meta tensors; try the next form
                continue
        out = fn(*[torch.zeros(x.shape, dtype=torch.int64) if isinstance(x, MetaShares) else x for x in xs])
        return MetaShares(out.to(_META))

    def cat(self, xs: Sequence[Any], dim: int) -> Any:
        if not any(isinstance(x, MetaShares) for x in xs):
            return torch.cat([_raw(x) for x in xs], dim=dim)
        return MetaShares(torch.cat([_raw(x).to(_META) for x in xs], dim=dim))

    # ---- products ---------------------------------------------------------------------------
    def _product(self, name: str, a: Any, b: Any, op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
        secret = isinstance(a, MetaShares) or isinstance(b, MetaShares)
        if not secret:
            return op(_raw(a), _raw(b))
        out = op(_raw(a).to(_META), _raw(b).to(_META))
        both = isinstance(a, MetaShares) and isinstance(b, MetaShares)
        self._charge(name if both else "mul:public", out.numel())
        return MetaShares(out)

    def mul(self, a: Any, b: Any) -> Any:
        return self._product("mul", a, b, torch.mul)

    def matmul(self, a: Any, b: Any) -> Any:
        return self._product("matmul", a, b, ring_matmul)

    def conv2d(
        self,
        x: Any,
        w: Any,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Any:
        st, pad, dil = tuple(stride), tuple(padding), tuple(dilation)
        return self._product("conv2d", x, w, lambda u, v: ring_conv2d(u, v, st, pad, dil, groups))

    def trunc(self, x: MetaShares, bits: int) -> MetaShares:
        if not 0 <= bits <= 62:
            raise ValueError(f"truncation by {bits} bits is outside 0..62")
        if bits:
            self._charge("trunc", numel(x.shape))
        return MetaShares(_meta(x.shape))

    # ---- bits -------------------------------------------------------------------------------
    def msb(self, x: MetaShares, bits: int | None = None, drop: int = 0) -> MetaBits:
        """8 rounds, 64 B per element; with a bound that leaves w <= 32 bits (:func:`msb_layout`)
        2 + ceil(log2 w) rounds and 8 B per round per word of 64 / 2^ceil(log2 w) lanes."""
        layout = msb_layout(bits, drop)
        n = numel(x.shape)
        if layout is None:
            self._charge("msb", n)
        else:
            _, levels, lanes = layout
            words = -(-n // lanes)
            self._charge_raw(2 + levels, [8 * (2 + levels) * words] * 3)
        return MetaBits(_meta(x.shape))

    def bit_not(self, b: MetaBits) -> MetaBits:
        return MetaBits(_meta(b.shape))

    def bit_xor(self, a: Any, b: Any) -> Any:
        if not (isinstance(a, MetaBits) or isinstance(b, MetaBits)):
            return _raw(a) ^ _raw(b)
        return MetaBits(_meta(torch.broadcast_shapes(_raw(a).shape, _raw(b).shape)))

    def bit_and(self, a: Any, b: Any) -> Any:
        if not (isinstance(a, MetaBits) or isinstance(b, MetaBits)):
            return _raw(a) & _raw(b)
        shape = torch.broadcast_shapes(_raw(a).shape, _raw(b).shape)
        both = isinstance(a, MetaBits) and isinstance(b, MetaBits)
        self._charge("bit_and" if both else "bit_and:public", numel(shape))
        return MetaBits(_meta(shape))

    def bit_cat(self, bs: Sequence[MetaBits], dim: int) -> MetaBits:
        return MetaBits(torch.cat([b.v for b in bs], dim=dim))

    def bit_local(self, fn: Callable[[torch.Tensor], torch.Tensor], b: MetaBits) -> MetaBits:
        out = self.local(fn, MetaShares(b.v))
        return MetaBits(out.v)

    def b2a(self, b: MetaBits) -> MetaShares:
        self._charge("b2a", numel(b.shape))
        return MetaShares(_meta(b.shape))

    def mul_bit(self, x: Any, b: MetaBits) -> MetaShares:
        shape = torch.broadcast_shapes(_raw(x).shape, b.shape)
        if not isinstance(x, MetaShares):
            self._charge("mul_bit:public", numel(b.shape))
            return MetaShares(_meta(shape))
        n_out, n_bit = numel(shape), numel(b.shape)
        if n_out == n_bit:
            self._charge("mul_bit", n_out)
        else:  # P0's input of t has b's size; the two products have the output's size
            self._charge_raw(2, [8 * n_bit + 16 * n_out, 16 * n_out, 16 * n_out])
        return MetaShares(_meta(shape))
