"""The client's input as the servers take it: shared, checked for consistency, clamped obliviously.

The servers cannot rely on the client's own range check (:func:`siguard.runtime.runs.check_inputs`): a
malicious client can send any ring element. Findings (``tests/runtime/test_security.py``,
README *Threat model*): an input beyond the fixed-point range wraps mod 2^64 in the first product,
the exact truncation after it is only correct while abs(x) < 2^62, and a ReLU then tests the sign
bit of the wrapped value, i.e. one bit of (weights · input) mod 2^64 chosen by the input's scale
(bit 63-k of a weight's encoding for an input 2^k). So every client input is clamped to its public
bound [lo, hi] before any use: the servers then compute only on values an honest client could
have sent. (The client's own limit is loose enough that products can wrap at it; a tight input
domain in the plan is the bound that keeps every product in range.)

Clamp (written once against :class:`siguard.runtime.kernels.engine.Engine`, so the reference, the secure engine
and the cost model run the same code):

* u = x - lo and v = hi - x; l = msb(u) ([x < lo]) and h = msb(v) ([x > hi]) in one msb call;
* h' = h AND NOT l (one AND round): near -2^63 both bits can be set because v wraps;
* y = x + l·(lo - x) + h'·(hi - x) in one mul_bit call.

Whatever ring element x is, y lies in [lo, hi]: if neither bit is set, u and v are both in
[0, 2^63) and u + v = hi - lo, so x is in [lo, hi]. Cost: msb 8 rounds + AND 1 + mul_bit 2 =
**11 rounds** per input, bytes per element 2·64 + 8 + 2·24 = 184 (P0) / 2·64 + 8 + 2·16 = 168
(P1, P2). With the client's share round and the consistency check
(:meth:`siguard.runtime.mpc.rss.RSSEngine.input`): 13 rounds for the input step.

The bound is the input spec's ``domain`` [lo, hi] (real values) when the plan records one, else
the client's own limit: abs(x) < :func:`siguard.runtime.ring.MAX_ABS_REAL` (f) / 2^f.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from siguard.runtime.ring import MAX_ABS_REAL

from .engine import Engine

__all__ = ["client_bounds", "clamp", "client_input"]


def client_bounds(spec: Mapping[str, Any] | None, frac_bits: int) -> tuple[int, int]:
    """The public clamp bounds [lo, hi] of one plan input, as ring integers at ``frac_bits``."""
    domain = (spec or {}).get("domain")
    if domain is not None:
        lo, hi = (float(v) for v in domain)
        return int(round(lo * 2**frac_bits)), int(round(hi * 2**frac_bits))
    limit = int(MAX_ABS_REAL(frac_bits))  # the client's own check: abs(x) < 2^(62 - 2f) real
    return -limit, limit


def clamp(e: Engine, x: Any, lo: int, hi: int) -> Any:
    """The secret x clamped into [lo, hi] (ring integers, lo <= hi), obliviously; see the module
    docstring for the cost (11 rounds)."""
    if lo > hi:
        raise ValueError(f"empty clamp range [{lo}, {hi}]")
    shape = tuple(x.shape)
    n = 1
    for s in shape:
        n *= int(s)
    flat = e.local(lambda v: v.reshape(-1), x)
    lo_t = torch.full((n,), lo, dtype=torch.int64)
    hi_t = torch.full((n,), hi, dtype=torch.int64)
    bits = e.msb(e.cat([e.sub(flat, lo_t), e.sub(hi_t, flat)], 0))
    below = e.bit_local(lambda v: v[:n], bits)
    above = e.bit_and(e.bit_local(lambda v: v[n:], bits), e.bit_not(below))
    moves = e.mul_bit(e.cat([e.sub(lo_t, flat), e.sub(hi_t, flat)], 0), e.bit_cat([below, above], 0))
    y = e.add(flat, e.add(e.local(lambda v: v[:n], moves), e.local(lambda v: v[n:], moves)))
    return e.local(lambda v: v.reshape(shape), y)


def client_input(e: Engine, value: torch.Tensor | None, shape: Sequence[int], bounds: tuple[int, int]) -> Any:
    """A client input step: the engine's input (shares + consistency check), then :func:`clamp`."""
    x = e.input("client", value, tuple(shape))
    return clamp(e, x, *bounds)
