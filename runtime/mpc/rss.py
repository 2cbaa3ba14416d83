"""3-party replicated secret sharing over Z_2^64 (semi-honest, honest majority): the secure Engine.

Layout (docs/protocols.md §1): x = x0 + x1 + x2 mod 2^64 and server P_i holds (x_i, x_{i+1}) as the
two slots ``a``, ``b`` of a :class:`Shares`. Component j is held by P_j (slot a) and P_{j-1}
(slot b). Bits are XOR-shared the same way (:class:`BoolShares`), one bit per element in the
least significant bit of each share word (every share word is 0 or 1).

One :class:`RSSEngine` per server, each in its own thread or process, all executing the same
sequence of Engine calls. Every protocol round is exactly one
:meth:`siguard.runtime.mpc.transport.Transport.exchange_words` call at every server (also at a server with
nothing to send), with at most one message per peer: things that travel to the same peer in the
same round are concatenated (also across independent calls merged by :meth:`RSSEngine.parallel`,
which runs the stepwise forms of ``msb`` and ``trunc`` side by side). Costs in the docstrings are
per element: rounds, and bytes *sent* by P0, P1, P2 (the table in :mod:`siguard.runtime.kernels.cost` repeats them
and the tests check both).

:func:`siguard.runtime.mpc.inprocess.run_threads` runs the three servers and the client in one process;
the client's side is :class:`siguard.runtime.mpc.client.Client`.

Speed. With small tensors a round costs Python and per-op overhead, not arithmetic: the
elementwise protocols (mul, trunc, msb, bit_and, b2a, mul_bit) compute on zero-copy numpy views
of the share tensors (a numpy op on a few words costs about a third of a torch op and, unlike a
torch op, does not release the GIL to the other party threads), draw their masks as numpy words,
and drop the terms of known-zero slots; matmul and conv2d run in :mod:`siguard.runtime.linalg` (exact
mod 2^64: torch's int64 kernels or float64 BLAS on 22/21/21-bit digits, chosen per CPU and shape).
Share tensors are never modified in place (several values may share storage). The words sent and the results are the
same as computing the textbook formulas in the docstrings, except for products with a server's
input (:class:`ServerInput`, e.g. the weights: one of its components is 0), whose cross terms are
split so that each party computes one convolution or matmul instead of two (6 -> 3 products in
all, none on the critical path twice); a weight operand's matrix form (the slot sum, the im2col
matrix of a kernel, its float64 limbs) is prepared once per engine.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import greenlet
import numpy as np
import torch

from siguard.core.errors import RuntimeFault
from siguard.runtime.kernels.engine import Engine, SharePair, check_parallel_call, msb_layout
from siguard.runtime.linalg import Prepared, conv_prepared, prepare, prepare_conv, ring_conv2d, ring_matmul
from siguard.runtime.ring import (
    SIGN_BIT,
    broadcast_shape,
    numel,
)

from .prg import Randomness
from .transport import CLIENT, Transport

__all__ = ["Shares", "ServerInput", "BoolShares", "InconsistentInput", "RSSEngine", "public_tensor"]


_TWO_62 = 1 << 62
_ONE = torch.ones((), dtype=torch.int64)
_LOW63 = (1 << 63) - 1  # every bit but the sign bit


def _ring_int(v: int) -> int:
    """A Python integer reduced mod 2^64 into the signed int64 range (e.g. 2^63 -> -2^63)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def _positions_mask(step: int, residue: int) -> int:
    """The int64 word with bit k set for every k = residue (mod step)."""
    return _ring_int(sum(1 << k for k in range(residue, 64, step)))


# Carry-out tree levels: (distance d, positions 2d-1 mod 2d, positions d-1 mod 2d).
_CARRY_TREE = tuple((d, _positions_mask(2 * d, 2 * d - 1), _positions_mask(2 * d, d - 1)) for d in (1, 2, 4, 8, 16, 32))
_NP_LOW63 = np.int64(_LOW63)
_NP_SIGN = np.int64(SIGN_BIT)
_NP_CARRY_TREE = tuple((d, np.int64(hi), np.int64(lo)) for d, hi, lo in _CARRY_TREE)


@functools.lru_cache(maxsize=8)
def _lane_masks(lanes: int) -> tuple[np.int64, np.int64]:
    """(bit 0 of every lane, the top bit of every lane) for ``lanes`` lanes of 64 / lanes bits."""
    size = 64 // lanes
    return (np.int64(_ring_int(sum(1 << (t * size) for t in range(lanes)))),
            np.int64(_ring_int(sum(1 << (t * size + size - 1) for t in range(lanes)))))

# Elementwise protocol arithmetic runs on numpy views of the share tensors: on the small tensors
# of a protocol round a numpy op costs about a third of a torch op (and keeps the GIL), and the
# conversions both ways are zero-copy. Shapes: a 0-dim tensor is handled as shape (1,) (numpy
# turns 0-dim results into scalars) and every result is reshaped back before it leaves.


def _arr(t: torch.Tensor) -> np.ndarray:
    """The words of an int64 tensor as a numpy array sharing its memory (0-dim as shape (1,))."""
    a = t.numpy()
    return a if a.ndim else a.reshape(1)


def _nshape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The numpy working shape of a tensor shape (0-dim -> (1,))."""
    return shape if shape else (1,)


def _tensor(a: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(a.reshape(shape))


class Shares(SharePair):
    """Party P_i's replicated shares of an arithmetic secret: ``a`` = x_i, ``b`` = x_{i+1}."""

    __slots__ = ()


class ServerInput(Shares):
    """Shares of a value input by a server (e.g. the weights): component ``zero`` (= owner + 2) is 0,
    a fact every party knows from the plan. The party holding that component has it as a broadcast
    zero view of one word. Products with such a value use a cheaper split of the cross
    terms (:meth:`RSSEngine._product`); single-argument local maps keep the marker."""

    __slots__ = ("zero",)

    def __init__(self, a: torch.Tensor, b: torch.Tensor, zero: int):
        super().__init__(a, b)
        self.zero = zero


class InconsistentInput(RuntimeFault):
    """The client gave the two holders of a share component different copies (see
    :meth:`RSSEngine._check_consistent`)."""


_DIGEST_WORDS = 4  # a SHA-256 digest as int64 words


def _digest_words(t: torch.Tensor) -> torch.Tensor:
    """SHA-256 of a ring tensor's little-endian words, as 4 int64 words."""
    data = np.ascontiguousarray(t.numpy(), dtype="<i8").tobytes()
    return torch.from_numpy(np.frombuffer(hashlib.sha256(data).digest(), dtype="<i8").astype(np.int64))


class BoolShares(SharePair):
    """Party P_i's XOR-replicated shares of a bit tensor: ``a`` = b_i, ``b`` = b_{i+1}, each 0/1."""

    __slots__ = ()


_ZERO = torch.zeros((), dtype=torch.int64)
_MATRIX_CACHE = 256  # prepared weight forms kept per engine (ResNet-34: one per conv and the fc, 37)


def _slot_sum(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def public_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype != torch.int64:
            raise TypeError(f"public ring values are int64 tensors, got {x.dtype}")
        return x
    return torch.as_tensor(x, dtype=torch.int64)


class _Round:
    """Collects the messages of one round so that each peer gets exactly one tensor.

    Sender and receiver must add the parts for a link in the same order (they run the same code)."""

    __slots__ = ("_send", "_recv")

    def __init__(self) -> None:
        self._send: dict[int, list[torch.Tensor]] = {}
        self._recv: dict[int, list[tuple[int, ...]]] = {}

    def send(self, peer: int, tensor: torch.Tensor) -> None:
        self._send.setdefault(peer, []).append(tensor)

    def recv(self, peer: int, shape: Sequence[int]) -> tuple[int, int]:
        """Expect a part of ``shape`` from ``peer``; returns the handle for :meth:`run`'s result."""
        parts = self._recv.setdefault(peer, [])
        parts.append(tuple(shape))
        return peer, len(parts) - 1

    def run(self, transport: Transport) -> dict[tuple[int, int], torch.Tensor]:
        send = {
            peer: parts[0] if len(parts) == 1 else torch.cat([p.reshape(-1) for p in parts])
            for peer, parts in self._send.items()
        }
        recv = {
            peer: shapes[0] if len(shapes) == 1 else (sum(numel(s) for s in shapes),)
            for peer, shapes in self._recv.items()
        }
        got = transport.exchange(send, recv)
        out: dict[tuple[int, int], torch.Tensor] = {}
        for peer, shapes in self._recv.items():
            if len(shapes) == 1:
                out[(peer, 0)] = got[peer]
                continue
            pieces = torch.split(got[peer], [numel(s) for s in shapes])
            for k, (piece, shape) in enumerate(zip(pieces, shapes, strict=True)):
                out[(peer, k)] = piece.reshape(shape)
        return out


class RSSEngine(Engine):
    """The secure engine of server P_i (see the module docstring).

    ``party`` in {0, 1, 2}; ``transport`` its endpoint; ``randomness`` its per-session PRF
    streams (:meth:`siguard.runtime.mpc.prg.PartyKeys.session`); ``frac_bits`` the fixed-point scale the
    callers use (the engine itself does not track scales).
    """

    def __init__(self, party: int, transport: Transport, randomness: Randomness, frac_bits: int = 16):
        if party not in (0, 1, 2):
            raise ValueError(f"RSSEngine runs on servers 0, 1, 2, not {party}")
        if transport.party != party or randomness.party != party:
            raise ValueError("transport, randomness and engine must belong to the same party")
        self.party = party
        self.transport = transport
        self.rand = randomness
        self.frac_bits = frac_bits
        self.prev = (party - 1) % 3
        self.next = (party + 1) % 3
        self._matrices: dict[tuple[int, ...], tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
        self._runners: list[Any] = []  # idle branch greenlets of fork (see _run_branches)

    # ---- kinds and helpers ------------------------------------------------------------------
    def is_secret(self, x: Any) -> bool:
        return isinstance(x, Shares)

    def _public_shares(self, c: torch.Tensor) -> Shares:
        """The public c as a sharing with only component 0 set (P0 slot a, P2 slot b)."""
        zero = torch.zeros_like(c)
        return Shares(c if self.party == 0 else zero, c if self.party == 2 else zero)

    def _reshare(self, z: torch.Tensor) -> Shares:
        """3-of-3 -> replicated: send z_i (already masked by a zero share) to P_{i-1}, receive
        z_{i+1} from P_{i+1}. 1 round, 8 B per element from every party."""
        got = self.transport.exchange_words({self.prev: z.numpy()}, {self.next: tuple(z.shape)})
        return Shares(z, torch.from_numpy(got[self.next]))

    def _reshare_np(self, z: np.ndarray, shape: tuple[int, ...]) -> Shares:
        """:meth:`_reshare` of a numpy word array, sent and kept as a tensor of ``shape`` (the round of
        :meth:`_reshare_np_steps`, without a generator)."""
        z = z.reshape(shape)
        got = self.transport.exchange_words({self.prev: z}, {self.next: shape})
        return Shares(torch.from_numpy(z), torch.from_numpy(got[self.next]))

    def _reshare_np_steps(self, z: np.ndarray, shape: tuple[int, ...]) -> Any:
        """:meth:`_reshare_np` as one stepwise round (see :meth:`parallel`)."""
        z = z.reshape(shape)
        got = yield {self.prev: z}, {self.next: shape}
        return Shares(torch.from_numpy(z), torch.from_numpy(got[self.next]))

    def _rotate_np(self, z: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The reshare round on numpy words: z to P_{i-1}; returns z_{i+1} from P_{i+1} (flat)."""
        return self.transport.exchange_words({self.prev: z.reshape(shape)}, {self.next: shape})[self.next].reshape(-1)

    def parallel(self, *calls: tuple[Any, ...]) -> list[Any]:
        """Run independent primitive calls with their rounds merged (see Engine.parallel).

        Each call is ``(method, *args)`` with ``method`` this engine's ``msb`` or ``trunc``
        (:data:`siguard.runtime.kernels.engine.PARALLEL_PRIMITIVES`). Their stepwise forms (generators that yield one
        round's (send, recv) and receive what arrived) advance together: ONE exchange per round
        carries every live call's messages, per peer flattened and concatenated in call order, and
        the reply is split the same way.
        All servers make the same calls in the same order with the same message sizes (public), so
        the concatenations agree. The calls draw their PRF words in this interleaved order at every
        server: each protocol draws a key's words in the same round at both parties holding the
        key, so pairs stay in step. Overhead: a generator resume per call and round (~1 us)."""
        gens = [self._stepwise(c) for c in calls]
        results: list[Any] = [None] * len(gens)
        live: list[int] = []  # the calls that posted a round, in call order ...
        posted: list[tuple[Any, Any]] = []  # ... and their rounds' (send, recv)
        for i, g in enumerate(gens):
            try:
                posted.append(next(g))
                live.append(i)
            except StopIteration as stop:
                results[i] = stop.value
        transport = self.transport
        while posted:
            replies = _merged_exchange(transport, posted)
            was, live, posted = live, [], []
            for i, reply in zip(was, replies, strict=True):
                try:
                    posted.append(gens[i].send(reply))
                    live.append(i)
                except StopIteration as stop:
                    results[i] = stop.value
        return results

    def fork(self, *branches: Callable[[], Any]) -> list[Any]:
        """Run independent branches of protocol code with their rounds merged (see Engine.fork).

        Each branch runs in its own greenlet; while the fork is open, this engine's transport is a
        :class:`_ForkTransport` whose ``exchange`` (called from inside a branch) hands the round's
        (send, recv) to the branch's driver -- the greenlet that called ``fork`` -- and waits for the
        reply. The driver resumes the live branches in order, and once each has posted its round (or
        finished) sends them as ONE exchange (:func:`_merged_exchange`, messages per peer concatenated in
        branch order) through its own transport. Every server runs the same branches in the same order
        with the same message sizes, so the concatenations agree, and each branch draws its PRF words at
        the same point of the same round at both holders of a key, as it would alone. Nested forks work:
        an inner driver's merged exchange is itself a branch's round of the outer fork. The branch
        greenlets are kept by the engine and reused (:func:`_run_branches`): starting and ending a greenlet
        costs about 13 us, a switch about 0.3 us. Overhead: a switch per branch and round (~1 us)."""
        if len(branches) <= 1:
            return [b() for b in branches]
        outer = self.transport
        proxy = outer if isinstance(outer, _ForkTransport) else _ForkTransport(outer)
        driver = greenlet.getcurrent()
        results: list[Any] = [None] * len(branches)
        idle = self._runners
        lets = [idle.pop() if idle else greenlet.greenlet(_run_branches) for _ in branches]
        for g in lets:
            g.parent = driver  # where a branch that ends by GreenletExit returns (see _run_branches)
            proxy.drivers[g] = driver
        self.transport = proxy
        running: set[int] = set()  # branches started and not finished: suspended in a round
        live: list[int] = []  # the branches that posted a round, in branch order ...
        posted: list[tuple[Any, Any]] = []  # ... and their rounds' (send, recv)
        try:
            for i, (g, body) in enumerate(zip(lets, branches, strict=True)):
                running.add(i)
                _post(i, g.switch((driver, body, results, i)), live, posted, running)
            while posted:
                replies = _merged_exchange(proxy, posted)
                was, live, posted = live, [], []
                for i, reply in zip(was, replies, strict=True):
                    _post(i, lets[i].switch(reply), live, posted, running)
        except BaseException:
            for i in running:  # unwind the branches still suspended in a round, here rather than at collection
                if not lets[i].dead:
                    lets[i].throw(greenlet.GreenletExit)
            raise
        finally:
            for g in lets:
                proxy.drivers.pop(g, None)
            if proxy is not outer:
                self.transport = outer
        idle.extend(reversed(lets))  # every one waits for its next branch
        return results

    def _stepwise(self, call: tuple[Any, ...]) -> Any:
        return getattr(self, f"_{check_parallel_call(self, call).__name__}_steps")(*call[1:])

    def _drive(self, steps: Any) -> Any:
        """Run a stepwise protocol alone: one exchange per yielded round."""
        exchange = self.transport.exchange_words
        try:
            msg = next(steps)
            while True:
                msg = steps.send(exchange(*msg))
        except StopIteration as stop:
            return stop.value

    def _idle_round(self) -> None:
        """A round in which this server neither sends nor receives (keeps round counts equal)."""
        self.transport.exchange_words({}, {})

    # ---- input and output -------------------------------------------------------------------
    def input(self, owner: str, value: torch.Tensor | None, shape: Sequence[int]) -> Shares:
        """Share a ring tensor. 1 round (2 for the client's input).

        * ``owner="client"``: the :class:`Client` sends (x_i, x_{i+1}) to P_i (client: 48 B per
          element), then the servers check that the two copies of every component agree
          (:meth:`_check_consistent`: 1 more round, 32 B per party per input). 2 rounds in all.
        * ``owner="model"`` (= "P0"), or "P1"/"P2": input by server P_o with x_{o+1} = F_{k_{o+1}},
          x_{o+2} = 0, x_o = x - x_{o+1}; P_o sends x_o to P_{o+2}. Bytes: 8 from P_o only.
        """
        shape = tuple(int(s) for s in shape)
        if owner == "client":
            got = self.transport.exchange({}, {CLIENT: (2, *shape)})[CLIENT]
            x = Shares(got[0], got[1])
            self._check_consistent(x)
            return x
        owner_party = {"model": 0, "P0": 0, "P1": 1, "P2": 2}.get(owner)
        if owner_party is None:
            raise ValueError(f"unknown input owner {owner!r} (expected 'client', 'model', 'P0', 'P1' or 'P2')")
        rnd = _Round()
        finish = self._input_by_server(rnd, owner_party, value, shape)
        return finish(rnd.run(self.transport))

    def _check_consistent(self, x: Shares) -> None:
        """Abort unless the client gave both holders of every component the same copy.

        Component j is held by P_j (slot a) and P_{j-1} (slot b). Each P_i sends SHA-256 of its
        slot b (x_{i+1}) to P_{i+1}, which compares it with the digest of its own slot a. The
        receiver already holds that component, so the digest tells it nothing new. A client that
        adds delta to one copy (and so would get back products with single share components of
        the weights) is caught before the input is used. 1 round, 32 B per party (not per
        element); raises :class:`InconsistentInput` at the server that detects it."""
        got = self.transport.exchange({self.next: _digest_words(x.b)}, {self.prev: (_DIGEST_WORDS,)})[self.prev]
        if not torch.equal(got, _digest_words(x.a)):
            j, other = self.party, self.prev
            raise InconsistentInput(
                f"inconsistent client input: the client sent P{other} and P{j} different copies of share "
                f"component x{j} (P{j} detected it); the session is aborted"
            )

    def forget_prepared(self) -> None:
        """Drop the prepared weight matrices (and the shares they keep alive): called when fresh weight
        shares replace the old ones (:meth:`siguard.runtime.executor.Executor.use_weights`)."""
        self._matrices.clear()

    def rerandomise(self, x: Any) -> Any:
        """Fresh components for a server's input (the weights) at a session start: add the zero sharing
        (r, -r, 0), r from the common key (all three servers, never the client), to the components
        (zero+1, zero+2, zero); the zero component stays 0, so products keep their cheap split. Other
        values are returned as they are. 0 rounds, 0 bytes; one PRF word per element at each server."""
        if not isinstance(x, ServerInput):
            return x
        r = _tensor(self.rand.common_np(numel(x.shape)), x.shape)  # fresh words, ours to overwrite
        z, i = x.zero, self.party
        sign = {(z + 1) % 3: 1, (z + 2) % 3: -1}
        slots = [x.a, x.b]
        moved = [k for k in (0, 1) if (i + k) % 3 in sign]
        for n, k in enumerate(moved):  # the last shifted slot is written into r's memory (one allocation less)
            out = r if n == len(moved) - 1 else None
            op = torch.add if sign[(i + k) % 3] > 0 else torch.sub
            slots[k] = op(slots[k], r) if out is None else op(slots[k], r, out=out)
        return ServerInput(slots[0], slots[1], z)

    def _input_by_server(
        self, rnd: _Round, owner: int, value: torch.Tensor | None, shape: tuple[int, ...]
    ) -> Callable[[dict], Shares]:
        """Add server ``owner``'s input of ``value`` to round ``rnd``; returns the function that
        builds the shares from the round's result. Draws from k_{owner+1} (at its two holders)."""
        i, o = self.party, owner
        zero = _ZERO.expand(shape)  # component o+2: known to be zero, stored as one word
        if i == o:
            if value is None:
                raise ValueError(f"P{o} owns this input but was given no value")
            value = public_tensor(value)
            if tuple(value.shape) != shape:
                raise ValueError(f"input shape {tuple(value.shape)} != declared {shape}")
            x_next = _tensor(self.rand.key_stream_np(o + 1, numel(shape)), shape)
            x_own = value - x_next
            rnd.send((o + 2) % 3, x_own)
            return lambda got: ServerInput(x_own, x_next, (o + 2) % 3)
        if i == (o + 1) % 3:
            x_next = _tensor(self.rand.key_stream_np(o + 1, numel(shape)), shape)
            return lambda got: ServerInput(x_next, zero, (o + 2) % 3)
        handle = rnd.recv(o, shape)
        return lambda got: ServerInput(zero, got[handle], (o + 2) % 3)

    def reveal(self, x: Shares, to: str = "client") -> torch.Tensor | None:
        """Open x to one receiver; 1 round. Returns the value at a receiving server, else None.

        * ``to="client"``: every P_i sends x_i to the client (8 B per element each); the client
          reconstructs with :meth:`Client.receive_output`.
        * ``to="P<t>"``: P_{t+1} sends x_{t+2} (its slot b) to P_t (8 B from P_{t+1} only);
          the third server takes part in the round but sends and receives nothing.
        """
        if to == "client":
            self.transport.exchange({CLIENT: x.a}, {})
            return None
        target = {"P0": 0, "P1": 1, "P2": 2}.get(to)
        if target is None:
            raise ValueError(f"unknown receiver {to!r} (expected 'client', 'P0', 'P1' or 'P2')")
        if self.party == target:
            missing = self.transport.exchange({}, {(target + 1) % 3: tuple(x.shape)})[(target + 1) % 3]
            return x.a + x.b + missing
        if self.party == (target + 1) % 3:
            self.transport.exchange({target: x.b}, {})
        else:
            self._idle_round()
        return None

    # ---- local linear algebra ---------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Any:
        """a + b; public constants go into component 0. Local."""
        if isinstance(a, Shares) and isinstance(b, Shares):
            return Shares(a.a + b.a, a.b + b.b)
        if isinstance(a, Shares):
            return self._addpublic_tensor(a, public_tensor(b))
        if isinstance(b, Shares):
            return self._addpublic_tensor(b, public_tensor(a))
        return public_tensor(a) + public_tensor(b)

    def _addpublic_tensor(self, x: Shares, c: torch.Tensor) -> Shares:
        if c.dim() == 0 or c.shape == x.a.shape:  # no broadcasting beyond x: touch component 0 only
            if self.party == 0:
                return Shares(x.a + c, x.b)
            if self.party == 2:
                return Shares(x.a, x.b + c)
            return Shares(x.a, x.b)
        p = self._public_shares(c)
        return Shares(x.a + p.a, x.b + p.b)

    def sub(self, a: Any, b: Any) -> Any:
        """a - b. Local."""
        if isinstance(a, Shares) and isinstance(b, Shares):
            return Shares(a.a - b.a, a.b - b.b)
        if isinstance(a, Shares):
            return self._addpublic_tensor(a, -public_tensor(b))
        if isinstance(b, Shares):
            return self._addpublic_tensor(self.neg(b), public_tensor(a))
        return public_tensor(a) - public_tensor(b)

    def neg(self, a: Any) -> Any:
        """-a. Local."""
        if isinstance(a, Shares):
            return Shares(-a.a, -a.b)
        return -public_tensor(a)

    def local(self, fn: Callable[..., torch.Tensor], *xs: Any) -> Any:
        """fn applied to slot a of every secret argument, then to slot b (public arguments passed
        unchanged). fn must be linear and map 0 to 0 (see :meth:`Engine.local`). Local."""
        if len(xs) == 1:
            x = xs[0]
            if isinstance(x, ServerInput):  # fn(0) = 0: the zero component stays a broadcast zero
                a, b = fn(x.a), fn(x.b)
                if self.party == x.zero:
                    a = _ZERO.expand(a.shape)
                elif self.party == (x.zero + 2) % 3:
                    b = _ZERO.expand(b.shape)
                return ServerInput(a, b, x.zero)
            return Shares(fn(x.a), fn(x.b)) if isinstance(x, Shares) else fn(x)
        if not any(isinstance(x, Shares) for x in xs):
            return fn(*xs)
        return Shares(
            fn(*[x.a if isinstance(x, Shares) else x for x in xs]),
            fn(*[x.b if isinstance(x, Shares) else x for x in xs]),
        )

    def cat(self, xs: Sequence[Any], dim: int) -> Any:
        """Concatenate; public parts enter as sharings with only component 0 set. Local."""
        if not any(isinstance(x, Shares) for x in xs):
            return torch.cat([public_tensor(x) for x in xs], dim=dim)
        parts = [x if isinstance(x, Shares) else self._public_shares(public_tensor(x)) for x in xs]
        return Shares(torch.cat([p.a for p in parts], dim=dim), torch.cat([p.b for p in parts], dim=dim))

    # ---- products ---------------------------------------------------------------------------
    def _product(
        self,
        a: Any,
        b: Any,
        op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rhs: Callable[[tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
    ) -> Any:
        """op bilinear: public operand -> local; secret x secret -> cross terms + zero share, reshare:
        z_i = op(x_i, y_i + y_{i+1}) + op(x_{i+1}, y_i) + alpha_i. 1 round, 8 B per output element.

        When one operand is a :class:`ServerInput` y (e.g. the weights) its component c is 0, so the
        six remaining cross terms split as one product per party:
        z_c = x_c y_{c+1}, z_{c+2} = x_c y_{c+2}, z_{c+1} = (x_{c+1} + x_{c+2})(y_{c+1} + y_{c+2})
        (each party holds what it multiplies; sum = x y). Every party knows y's provenance, so the
        three use the same split; z_i + alpha_i is still a fresh replicated sharing (the zero share
        alpha masks every message as in the textbook split). Either way 1 round, 8 B per output
        element from every party. ``rhs`` (optional) turns the right operand's slots (a tuple to be
        summed) into the form ``op`` takes (e.g. a cached weight matrix)."""
        if isinstance(a, Shares) and isinstance(b, Shares):
            right = rhs if rhs is not None else _slot_sum
            i = self.party
            if isinstance(b, ServerInput):  # component c = b.zero of y is 0: one product per party
                c = b.zero
                if i == c:
                    z = op(a.a, right((b.b,)))  # x_c y_{c+1}
                elif i == (c + 2) % 3:
                    z = op(a.b, right((b.a,)))  # x_c y_{c+2}
                else:
                    z = op(a.a + a.b, right((b.a, b.b)))  # (x_{c+1} + x_{c+2}) (y_{c+1} + y_{c+2})
            elif isinstance(a, ServerInput):  # the same with the server's input on the left
                c = a.zero
                if i == c:
                    z = op(a.b, right((b.a,)))  # x_{c+1} y_c
                elif i == (c + 2) % 3:
                    z = op(a.a, right((b.b,)))  # x_{c+2} y_c
                else:
                    z = op(a.a + a.b, right((b.a, b.b)))
            else:
                z = op(a.a, right((b.a, b.b)))
                z += op(a.b, right((b.a,)))
            z += _tensor(self.rand.zero_share_np(z.numel()), z.shape)
            return self._reshare(z)
        if isinstance(a, Shares):
            c = public_tensor(b)
            return Shares(op(a.a, c), op(a.b, c))
        if isinstance(b, Shares):
            c = public_tensor(a)
            return Shares(op(c, b.a), op(c, b.b))
        return op(public_tensor(a), public_tensor(b))

    def _weight_sum(self, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The slot sum of a server's input (the weights' y_{c+1} + y_{c+2}), cached like :meth:`_prepared`."""
        return parts[0] if len(parts) == 1 else self._prepared(parts, _same)

    def _prepared(self, parts: tuple[torch.Tensor, ...], make: Callable[[torch.Tensor], Any] = prepare) -> Any:
        """``make`` (:func:`siguard.runtime.linalg.prepare` or ``prepare_conv``) of the sum of ``parts``, cached
        by the identity of the parts: weight shares live as long as a session (they are re-randomised at
        each, :meth:`rerandomise`), so the sum, the transposed copy and the float64 limbs are made once per
        session, not per use; :meth:`forget_prepared` drops the old ones."""
        key = (make, *(id(p) for p in parts))
        hit = self._matrices.get(key)
        if hit is not None and all(p is q for p, q in zip(hit[0], parts, strict=True)):
            return hit[1]
        m = make(_slot_sum(parts))
        if len(self._matrices) >= _MATRIX_CACHE:
            self._matrices.pop(next(iter(self._matrices)))
        self._matrices[key] = (parts, m)
        return m

    def _conv_matrix(self, parts: tuple[torch.Tensor, ...]) -> Prepared:
        return self._prepared(parts, prepare_conv)

    def mul(self, a: Any, b: Any) -> Any:
        """Elementwise a * b (broadcasting), no truncation. Secret x secret: 1 round, 8 B per output
        element from every party (z_i = x_i y_i + x_i y_{i+1} + x_{i+1} y_i + alpha_i, sent to
        P_{i-1}). With a public operand: local."""
        if isinstance(a, Shares) and isinstance(b, Shares):
            shape = broadcast_shape(tuple(a.shape), tuple(b.shape))
            xa, ya = _arr(a.a), _arr(b.a)
            z = xa * (ya + _arr(b.b))
            z += _arr(a.b) * ya
            z += self.rand.zero_share_np(numel(shape)).reshape(_nshape(shape))
            return self._reshare_np(z, shape)
        return self._product(a, b, torch.mul)

    def matmul(self, a: Any, b: Any) -> Any:
        """torch.matmul on ring elements: Z_i = X_i @ (Y_i + Y_{i+1}) + X_{i+1} @ Y_i + alpha_i.
        1 round, 8 B per output element from every party (any inner dimension). Public: local.
        Products run in :func:`siguard.runtime.linalg.ring_matmul`; a server's input on the right (the
        weights) is prepared once per engine (:meth:`_prepared`)."""
        if isinstance(b, ServerInput) and isinstance(a, Shares) and len(b.shape) == 2:
            return self._product(a, b, ring_matmul, self._prepared)
        return self._product(a, b, ring_matmul)

    def conv2d(
        self,
        x: Any,
        w: Any,
        stride: Sequence[int],
        padding: Sequence[int],
        dilation: Sequence[int],
        groups: int,
    ) -> Any:
        """conv2d (bilinear, so the matmul rule applies): conv(X_i, W_i + W_{i+1}) + conv(X_{i+1}, W_i)
        + alpha_i. 1 round, 8 B per output element from every party. Public operand: local.
        Products run in :func:`siguard.runtime.linalg.ring_conv2d`; where that is a matmul, the kernel's
        matrix (and limbs) are prepared once per engine (:meth:`_conv_matrix`)."""
        st, pad, dil = tuple(stride), tuple(padding), tuple(dilation)
        if isinstance(x, Shares) and isinstance(w, Shares) and conv_prepared(x.shape, w.shape, st, pad, dil, groups):
            kernel = tuple(w.shape[2:])
            return self._product(x, w, lambda u, m: ring_conv2d(u, m, st, pad, dil, 1, kernel), self._conv_matrix)
        conv = lambda u, v: ring_conv2d(u, v, st, pad, dil, groups)  # noqa: E731
        return self._product(x, w, conv, self._weight_sum if isinstance(w, ServerInput) else None)

    def trunc(self, x: Shares, bits: int) -> Shares:
        """floor(x / 2^d) or that minus 1, for |x| < 2^62. 2 rounds; bytes P0 16, P1 8, P2 8.

        Derivation (d = bits, 1 <= d <= 62; all arithmetic mod 2^64, ``lshr`` logical shift):

        1. x' = x + 2^62 (added to component 0) lies in [0, 2^63) as an unsigned number.
        2. Two-summand split: A = x0' + x1 (P0 holds both slots), B = x2 (P1 slot b, P2 slot a).
           As unsigned integers A + B = x' + w 2^64 with w in {0, 1}; since x' < 2^63, w = 1 iff
           A >= 2^63 or B >= 2^63, i.e. w = mA OR mB = mA + mB - mA mB (mA, mB the top bits).
        3. floor(x'/2^d) = lshr(A, d) + lshr(B, d) + c - w 2^(64-d) with carry c in {0, 1} from
           the two dropped fractions; c is ignored, hence the error of -1 at most.
           floor(x/2^d) = floor(x'/2^d) - 2^(62-d) exactly.
        4. The product mA mB: r = F_{k0} (known to P0 and P2); round 1: P0 sends u = mA + r to
           P1 (uniform to P1, which lacks k0). Then mA mB = u mB - r mB, a 2-of-2 sharing
           between P1 (u mB) and P2 (-r mB).
        5. Local 3-of-3 additive terms summing to the result:
           t0 = lshr(A, d) - mA 2^(64-d) - 2^(62-d)        (P0)
           t1 = lshr(B, d) - mB 2^(64-d) + u mB 2^(64-d)    (P1)
           t2 = -r mB 2^(64-d)                              (P2)
           Round 2: z_i = t_i + alpha_i to P_{i-1} (a fresh, uniformly random replicated sharing).
        """
        return self._drive(self._trunc_steps(x, bits))

    def _trunc_steps(self, x: Shares, bits: int) -> Any:
        """:meth:`trunc` as a stepwise protocol (yields each round's (send, recv))."""
        d = int(bits)
        if d == 0:
            return x
        if not 1 <= d <= 62:
            raise ValueError(f"truncation by {d} bits is outside 1..62")
        shape = tuple(x.shape)
        n, ns = numel(shape), _nshape(shape)
        wrap = _ring_int(1 << (64 - d))  # 2^(64-d) as an int64 (d = 1 gives -2^63)
        # With arithmetic shifts: lshr(v, d) - lshr(v, 63) 2^(64-d) = v >> d, and m v' = v' & (v >> 63)
        # for m = lshr(v, 63); so t0 = (A >> d) - 2^(62-d), u = r - (A >> 63),
        # t1 = (B >> d) + (u 2^(64-d) & (B >> 63)), t2 = -(r 2^(64-d) & (B >> 63)): the same words.
        i = self.party
        if i == 0:
            a_sum = _arr(x.a) + _arr(x.b)
            a_sum += _TWO_62
            r = self.rand.key_stream_np(0, n).reshape(ns)
            yield {1: (r - (a_sum >> 63)).reshape(shape)}, {}
            t = a_sum >> d
            t -= 1 << (62 - d)
        elif i == 1:
            xb = _arr(x.b)
            u = (yield {}, {0: shape})[0].reshape(ns)
            t = xb >> d
            t += (u * wrap) & (xb >> 63)
        else:
            r = self.rand.key_stream_np(0, n).reshape(ns)
            yield {}, {}
            t = (r * wrap) & (_arr(x.a) >> 63)
            np.negative(t, out=t)
        t += self.rand.zero_share_np(n).reshape(ns)
        return (yield from self._reshare_np_steps(t, shape))

    # ---- Boolean ----------------------------------------------------------------------------
    @staticmethod
    def _and_words(x: np.ndarray, y: np.ndarray, beta: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The local half of an AND of XOR-replicated words given as stacked numpy slots (2, n):
        z_i = x_i y_i ^ x_i y_{i+1} ^ x_{i+1} y_i ^ beta_i (= x_i (y_i ^ y_{i+1}) ^ x_{i+1} y_i ^ beta_i),
        written to ``out[0]`` (returned); its round sends z_i to P_{i-1}, whose z_{i+1} fills ``out[1]``.
        1 round, 8 B per word from every party."""
        z = out[0]
        np.bitwise_xor(y[0], y[1], out=z)
        z &= x[0]
        z ^= x[1] & y[0]
        z ^= beta
        return z

    def msb(self, x: Shares, bits: int | None = None, drop: int = 0) -> BoolShares:
        """The sign bit of x, XOR-shared in the LSB. 8 rounds, 64 B per element from every party.
        With a public bound -2^(bits-1) <= x < 2^(bits-1) and ``drop`` (:meth:`Engine.msb`,
        :func:`~siguard.runtime.kernels.engine.msb_layout`): 2 + ceil(log2 w) rounds on lanes of w <= 32 bits
        (:meth:`_msb_lanes_steps`).

        A2B-free carry-out (docs/protocols.md §5). Component x_j alone is a Boolean sharing of x_j with only
        component j non-zero, so P_i's slots (x_i, x_{i+1}) are also its Boolean shares of
        s = x0 ^ x1 ^ x2.

        1. Full adder (1 round): the carry word is maj(x0, x1, x2) = (x0 & x1) ^ (x1 & x2) ^ (x2 & x0),
           and P_i knows the term x_i & x_{i+1} (its two slots), so a reshare of these terms
           (masked by a zero XOR-sharing) is the AND round. Then x = s + c' mod 2^64, c' = carry << 1.
        2. g = s & c' (1 round), p = s ^ c'. The sign bit of x is p63 ^ (carry into bit 63). With
           g63 := 0 and p63 := 1 the generate signal of the whole 64-bit group *is* that carry.
        3. Carry-out tree, 6 levels (1 round each), in place: at distance d = 1, 2, ..., 32 the pairs
           (hi, lo) = (position k, position k - d) for k = 2d - 1 mod 2d combine as
           G_k = G_k ^ (P_k & G_{k-d}) (XOR replaces OR: G and P are exclusive), P_k = P_k & P_{k-d}.
           The two ANDs of a level share one word: P_k & G_{k-d} sits at position k, while
           P_k & P_{k-d} sits at the unused position k - d; the operand layout is a local
           XOR-linear map (shifts and masks) of each share. After the last level, bit 63 of G is
           the carry into bit 63.
        msb = p63 ^ G63.

        The local word arithmetic runs on stacked numpy slots (2, n) (see :func:`_arr`).
        """
        return self._drive(self._msb_steps(x, bits, drop))

    def _msb_steps(self, x: Shares, bits: int | None = None, drop: int = 0) -> Any:
        """:meth:`msb` as a stepwise protocol (yields each round's (send, recv)). Its eight rounds are
        written out (no nested generators) and the levels reuse three (2, n) buffers: the same words as
        the textbook form in the docstring, with fewer Python calls and allocations per round."""
        layout = msb_layout(bits, drop)
        if layout is not None:
            return (yield from self._msb_lanes_steps(x, int(drop), *layout))
        shape = tuple(x.shape)
        n = numel(shape)
        prev, nxt = self.prev, self.next
        recv = {nxt: shape}
        beta = self.rand.zero_share_xor_np(8 * n).reshape(8, n)  # one draw per key for the 8 AND rounds
        s = np.empty((2, n), dtype=np.int64)
        s[0] = _arr(x.a).reshape(-1)
        s[1] = _arr(x.b).reshape(-1)
        c_shift = np.empty_like(s)
        majority = c_shift[0]
        np.bitwise_and(s[0], s[1], out=majority)
        majority ^= beta[0]
        c_shift[1] = (yield {prev: majority.reshape(shape)}, recv)[nxt].reshape(-1)
        c_shift <<= 1
        gen = np.empty_like(s)
        z = self._and_words(s, c_shift, beta[1], gen)
        gen[1] = (yield {prev: z.reshape(shape)}, recv)[nxt].reshape(-1)
        gen &= _NP_LOW63
        prop = np.bitwise_xor(s, c_shift, out=s)  # s is not read again
        top = (prop.view(np.uint64) >> 63).view(np.int64)
        prop &= _NP_LOW63
        if self.party == 0:
            prop[0] ^= _NP_SIGN
        elif self.party == 2:
            prop[1] ^= _NP_SIGN
        yield from self._carry_levels(prop, gen, c_shift, beta, len(_NP_CARRY_TREE), shape)
        top ^= (gen.view(np.uint64) >> 63).view(np.int64)
        return BoolShares(_tensor(top[0], shape), _tensor(top[1], shape))

    def _carry_levels(self, prop: np.ndarray, gen: np.ndarray, spare: np.ndarray, beta: np.ndarray, levels: int,
                      shape: tuple[int, ...]) -> Any:
        """The carry-out tree's first ``levels`` levels (stepwise, one AND round each, words sent as ``shape``) on
        the (2, n) slots of P and G, with ``spare`` a (2, n) buffer it may overwrite and ``beta[2 + i]`` level i's
        zero XOR-sharing. G is updated in place (correct at the hi positions, the only ones read
        after); P's buffer is consumed."""
        prev, nxt = self.prev, self.next
        recv = {nxt: shape}
        lhs, rhs, tmp, out = spare, np.empty_like(prop), np.empty_like(prop), np.empty_like(prop)
        for level, (d, hi, lo) in enumerate(_NP_CARRY_TREE[:levels], start=2):
            np.bitwise_and(prop, hi, out=lhs)
            np.right_shift(prop, d, out=tmp)
            tmp &= lo
            lhs ^= tmp
            np.left_shift(gen, d, out=rhs)
            rhs &= hi
            np.bitwise_and(prop, lo, out=tmp)
            rhs ^= tmp
            z = self._and_words(lhs, rhs, beta[level], out)
            out[1] = (yield {prev: z.reshape(shape)}, recv)[nxt].reshape(-1)
            gen ^= out  # correct at the hi positions, the only ones read later
            out <<= d  # P_k & P_{k-d} moves up to position k
            prop, out = out, prop  # the old P is not read again: its buffer takes the next level's words

    def _msb_lanes_steps(self, x: Shares, drop: int, width: int, levels: int, lanes: int) -> Any:
        """The bounded sign test of :meth:`msb` (stepwise): 2 + ``levels`` rounds, 8 B per word per round,
        ``lanes`` elements per word.

        Local: every slot (a share component) becomes v_j = (lshr(x_j, drop) mod 2^w) << (L - w), the w low
        bits of y_j at the top of an L = 2^levels bit lane (docs/protocols.md §5a), and ``lanes`` = 64 / L
        elements share a word: with nw words, element t nw + i sits in lane t (bits tL .. tL + L - 1) of word i
        (the padding is 0). Then the rounds of :meth:`_msb_steps` lane by lane: the full adder (the shifted
        carry cleared at every lane's bit 0, so no carry crosses into the next lane), the generate round,
        and ``levels`` levels of the carry-out tree, whose blocks (2d <= L, aligned) never cross a lane;
        each lane's top bit plays the part of bit 63 (g := 0, p := 1). msb = p_top ^ G_top per lane."""
        shape = tuple(x.shape)
        n = numel(shape)
        L = 64 // lanes
        nw = -(-n // lanes)
        prev, nxt = self.prev, self.next
        recv = {nxt: (nw,)}
        lane_low, lane_top = _lane_masks(lanes)
        beta = self.rand.zero_share_xor_np((2 + levels) * nw).reshape(2 + levels, nw)
        u = np.empty((2, nw * lanes), dtype=np.uint64)
        u[0, :n] = _arr(x.a).reshape(-1).view(np.uint64)
        u[1, :n] = _arr(x.b).reshape(-1).view(np.uint64)
        u[:, n:] = 0
        if drop:
            u >>= np.uint64(drop)  # logical: y_j = lshr(x_j, drop)
        u <<= np.uint64(64 - width)  # y_j's w low bits at the top of the word, zeros below
        s = u[:, (lanes - 1) * nw:].copy()  # the top lane: already in place
        for t in range(lanes - 1):  # lane t: shifted down to bits tL + L - w .. tL + L - 1
            s |= u[:, t * nw:(t + 1) * nw] >> np.uint64(64 - L * (t + 1))
        s = s.view(np.int64)
        c_shift = np.empty_like(s)
        majority = c_shift[0]
        np.bitwise_and(s[0], s[1], out=majority)
        majority ^= beta[0]
        c_shift[1] = (yield {prev: majority}, recv)[nxt].reshape(-1)
        c_shift <<= 1
        c_shift &= ~lane_low
        gen = np.empty_like(s)
        z = self._and_words(s, c_shift, beta[1], gen)
        gen[1] = (yield {prev: z}, recv)[nxt].reshape(-1)
        gen &= ~lane_top
        prop = np.bitwise_xor(s, c_shift, out=s)
        top = prop & lane_top
        prop &= ~lane_top
        if self.party == 0:
            prop[0] ^= lane_top
        elif self.party == 2:
            prop[1] ^= lane_top
        yield from self._carry_levels(prop, gen, c_shift, beta, levels, (nw,))
        top ^= gen
        bits_ = np.empty((2, nw * lanes), dtype=np.int64)
        for t in range(lanes):
            np.right_shift(top, t * L + L - 1, out=bits_[:, t * nw:(t + 1) * nw])
        bits_ &= 1
        return BoolShares(_tensor(bits_[0, :n], shape), _tensor(bits_[1, :n], shape))

    def _xorpublic_tensor(self, b: BoolShares, c: torch.Tensor) -> BoolShares:
        if c.dim() == 0 or c.shape == b.a.shape:  # no broadcasting beyond b: touch component 0 only
            if self.party == 0:
                return BoolShares(b.a ^ c, b.b)
            if self.party == 2:
                return BoolShares(b.a, b.b ^ c)
            return BoolShares(b.a, b.b)
        zero = torch.zeros_like(c)
        return BoolShares(b.a ^ (c if self.party == 0 else zero), b.b ^ (c if self.party == 2 else zero))

    def bit_not(self, b: BoolShares) -> BoolShares:
        """1 - b: XOR 1 into component 0. Local."""
        return self._xorpublic_tensor(b, _ONE)

    def bit_xor(self, a: Any, b: Any) -> Any:
        """a xor b (either may be a public 0/1 int64 tensor). Local."""
        if isinstance(a, BoolShares) and isinstance(b, BoolShares):
            return BoolShares(a.a ^ b.a, a.b ^ b.b)
        if isinstance(a, BoolShares):
            return self._xorpublic_tensor(a, public_tensor(b))
        if isinstance(b, BoolShares):
            return self._xorpublic_tensor(b, public_tensor(a))
        return public_tensor(a) ^ public_tensor(b)

    def bit_and(self, a: Any, b: Any) -> Any:
        """a and b. Secret x secret: 1 round, 8 B per element from every party. Public: local."""
        if isinstance(a, BoolShares) and isinstance(b, BoolShares):
            # z_i = a_i b_i ^ a_i b_{i+1} ^ a_{i+1} b_i ^ beta_i = a_i (b_i ^ b_{i+1}) ^ a_{i+1} b_i ^ beta_i
            shape = broadcast_shape(tuple(a.shape), tuple(b.shape))
            ba = _arr(b.a)
            z = _arr(a.a) & (ba ^ _arr(b.b))
            z ^= _arr(a.b) & ba
            beta = self.rand.zero_share_xor_np(numel(shape))
            beta &= 1
            z ^= beta.reshape(_nshape(shape))
            s = self._reshare_np(z, shape)
            return BoolShares(s.a, s.b)
        if isinstance(a, BoolShares):
            c = public_tensor(b)
            return BoolShares(a.a & c, a.b & c)
        if isinstance(b, BoolShares):
            c = public_tensor(a)
            return BoolShares(b.a & c, b.b & c)
        return public_tensor(a) & public_tensor(b)

    def bit_cat(self, bs: Sequence[BoolShares], dim: int) -> BoolShares:
        """Concatenate bit tensors. Local."""
        return BoolShares(torch.cat([b.a for b in bs], dim=dim), torch.cat([b.b for b in bs], dim=dim))

    def bit_local(self, fn: Callable[[torch.Tensor], torch.Tensor], b: BoolShares) -> BoolShares:
        """A layout map applied to both shares. Local."""
        return BoolShares(fn(b.a), fn(b.b))

    # ---- Boolean to arithmetic --------------------------------------------------------------
    # b = t xor b2 with t = b0 xor b1 (known to P0) and b2 (component 2: P1 slot b, P2 slot a).
    # P0 inputs t (x_{o+1} = F_{k1} at P0 and P1, x_o = t - F_{k1} sent to P2), so the sharing of t
    # is (t - F, F) at P0, (F, 0) at P1, (0, t - F) at P2, and that of b2 is (0, 0), (0, b2), (b2, 0):
    # the protocols below are the RSS products of these sharings with their zero slots dropped.

    def b2a(self, b: BoolShares) -> Shares:
        """The bit as an arithmetic 0/1. 2 rounds; bytes P0 16, P1 8, P2 8 per element.

        Round A: P0 inputs t = b0 xor b1. Round B: [t][b2] by RSS mul; b = t + b2 - 2 t b2."""
        i = self.party
        shape = tuple(b.shape)
        n, ns = numel(shape), _nshape(shape)
        if i == 0:
            x_next = self.rand.key_stream_np(1, n).reshape(ns)
            t_own = (_arr(b.a) ^ _arr(b.b)) - x_next
            self.transport.exchange_words({2: t_own.reshape(shape)}, {})
            z = self.rand.zero_share_np(n).reshape(ns)  # t b2 has no local terms at P0
            got = self._rotate_np(z, shape).reshape(ns)
            out_a, out_b = t_own - (z << 1), x_next - (got << 1)
        elif i == 1:
            x_next = self.rand.key_stream_np(1, n).reshape(ns)
            self._idle_round()
            bb = _arr(b.b)
            z = x_next * bb
            z += self.rand.zero_share_np(n).reshape(ns)
            got = self._rotate_np(z, shape).reshape(ns)
            out_a, out_b = x_next - (z << 1), bb - (got << 1)
        else:
            t_in = self.transport.exchange_words({}, {0: shape})[0].reshape(ns)
            ba = _arr(b.a)
            z = t_in * ba
            z += self.rand.zero_share_np(n).reshape(ns)
            got = self._rotate_np(z, shape).reshape(ns)
            out_a, out_b = ba - (z << 1), t_in - (got << 1)
        return Shares(_tensor(out_a, shape), _tensor(out_b, shape))

    def mul_bit(self, x: Any, b: BoolShares) -> Shares:
        """x * b for an arithmetic x and a bit b (broadcasting), at x's scale.

        Secret x: 2 rounds; bytes P0 24, P1 16, P2 16 per element (when x and b have the same shape).
        x(t xor b2) = t (x - 2 x b2) + x b2. Round A carries P0's input of t together with the RSS
        product v = x [b2] (P0's two words for P2 travel as one message); u = x - 2v; round B:
        w = u t; result w + v. Public x: x * b2a(b), 2 rounds, bytes P0 16, P1 8, P2 8 (of b's size).
        """
        if not isinstance(x, Shares):
            return self.mul(public_tensor(x), self.b2a(b))
        i = self.party
        bshape = tuple(b.shape)
        shape = broadcast_shape(tuple(x.shape), bshape)
        nb, n, ns = numel(bshape), numel(shape), _nshape(shape)
        xa, xb = _arr(x.a), _arr(x.b)
        if i == 0:
            x_next = self.rand.key_stream_np(1, nb)
            t_own = (_arr(b.a) ^ _arr(b.b)).reshape(-1) - x_next
            va = self.rand.zero_share_np(n)  # x [b2] has no local terms at P0
            msg = np.concatenate((t_own, va))
            vb = self.transport.exchange_words({2: msg}, {1: shape})[1].reshape(ns)
            va = va.reshape(ns)
            ta, tb = t_own.reshape(_nshape(bshape)), x_next.reshape(_nshape(bshape))
            w = (xa - (va << 1)) * (ta + tb)  # u_a (t_a + t_b) + u_b t_a
            w += (xb - (vb << 1)) * ta
        elif i == 1:
            x_next = self.rand.key_stream_np(1, nb).reshape(_nshape(bshape))
            va = xa * _arr(b.b)
            va += self.rand.zero_share_np(n).reshape(ns)
            vb = self.transport.exchange_words({0: va.reshape(shape)}, {2: shape})[2].reshape(ns)
            w = (xa + xb) - ((va + vb) << 1)
            w *= x_next  # (u_a + u_b) t_a
        else:
            va = (xa + xb) * _arr(b.a)
            va += self.rand.zero_share_np(n).reshape(ns)
            msg = self.transport.exchange_words({1: va.reshape(shape)}, {0: (nb + n,)})[0]
            t_in, vb = msg[:nb].reshape(_nshape(bshape)), msg[nb:].reshape(ns)
            w = xa - (va << 1)
            w *= t_in  # u_a t_b
        w += self.rand.zero_share_np(n).reshape(ns)
        wb = self.transport.exchange_words({self.prev: w.reshape(shape)}, {self.next: shape})[self.next].reshape(ns)
        return Shares(_tensor(w + va, shape), _tensor(wb + vb, shape))


class _ForkTransport:
    """A server's transport while :meth:`RSSEngine.fork` runs: ``exchange`` from a branch greenlet goes to
    that branch's driver (see ``fork``); from any other greenlet (the outermost driver) to the real
    transport. Everything else (steps, statistics, the party) is the real transport's."""

    def __init__(self, real: Transport):
        self.real = real
        self.drivers: dict[Any, Any] = {}  # branch greenlet -> the greenlet that forked it

    def exchange_words(self, send: Mapping[int, np.ndarray],
                       recv: Mapping[int, tuple[int, ...]]) -> dict[int, np.ndarray]:
        driver = self.drivers.get(greenlet.getcurrent())
        if driver is None:
            return self.real.exchange_words(send, recv)
        return driver.switch((send, recv))  # a round: (send, recv); an end: (_DONE,) or (_FAILED, exc)

    def exchange_owned(self, send: Mapping[int, np.ndarray],
                       recv: Mapping[int, tuple[int, ...]]) -> dict[int, np.ndarray]:
        """:meth:`Transport.exchange_owned` (a branch's round is merged by its driver: the arrays are copied there)."""
        driver = self.drivers.get(greenlet.getcurrent())
        if driver is None:
            return self.real.exchange_owned(send, recv)
        return driver.switch((send, recv))

    def exchange(self, send: Mapping[int, torch.Tensor],
                 recv: Mapping[int, tuple[int, ...]]) -> dict[int, torch.Tensor]:
        """The torch face of :meth:`exchange_words` (as :meth:`Transport.exchange`)."""
        for tensor in send.values():
            if tensor.dtype != torch.int64:
                raise TypeError(f"party {self.real.party}: payloads are int64 tensors, got {tensor.dtype}")
        got = self.exchange_words({peer: t.numpy() for peer, t in send.items()}, recv)
        return {peer: torch.from_numpy(a) for peer, a in got.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


_DONE, _FAILED = object(), object()


_FINISHED = (_DONE,)


def _run_branches(task: tuple[Any, Callable[[], Any], list[Any], int]) -> None:
    """The body of a branch greenlet of :meth:`RSSEngine.fork`: runs branch after branch. ``task`` is
    (driver, branch, results, index): the branch's result goes to ``results[index]``, then the driver hears
    that it finished (or gets its exception) and its next switch here brings the next task. Nothing of a
    finished branch is kept while the greenlet waits. A GreenletExit thrown in (a failed fork unwinding
    its branches, or the collection of an idle greenlet) ends it; its parent is its last driver."""
    while True:
        driver, body, results, i = task
        del task
        try:
            results[i] = body()
            msg = _FINISHED
        except greenlet.GreenletExit:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by the driver (_post)
            msg = (_FAILED, exc)
        del body, results
        task = driver.switch(msg)


def _post(i: int, msg: tuple[Any, ...], live: list[int], posted: list[Any], running: set[int]) -> None:
    """Record what branch ``i`` handed its driver: a round to merge (appended to ``posted``, ``i`` to ``live``),
    or its end (forgotten; its error raised if it failed)."""
    if msg[0] is _DONE or msg[0] is _FAILED:
        running.discard(i)
        if msg[0] is _FAILED:
            raise msg[1]
    else:
        posted.append(msg)
        live.append(i)


def _merged_exchange(
    outer: Transport, posted: Sequence[tuple[Mapping[int, np.ndarray], Mapping[int, tuple[int, ...]]]]
) -> list[dict[int, np.ndarray]]:
    """One real round for the rounds ``(send, recv)`` that merged calls posted (in call order); returns
    each call's received messages, in the same order. Per peer, payloads go flattened and concatenated in
    call order, the order in which every server lists them."""
    if len(posted) == 1:
        send, recv = posted[0]
        return [outer.exchange_words(send, recv)]
    send_parts: dict[int, list[np.ndarray]] = {}
    recv_parts: dict[int, list[tuple[dict[int, np.ndarray], tuple[int, ...], int]]] = {}
    recv_total: dict[int, int] = {}
    replies: list[dict[int, np.ndarray]] = []
    for send, recv in posted:
        reply: dict[int, np.ndarray] = {}
        replies.append(reply)
        for peer, words in send.items():
            parts = send_parts.get(peer)
            if parts is None:
                send_parts[peer] = [words.reshape(-1)]
            else:
                parts.append(words.reshape(-1))
        for peer, shape in recv.items():
            n = numel(shape)
            parts = recv_parts.get(peer)
            if parts is None:
                recv_parts[peer] = [(reply, shape, n)]
                recv_total[peer] = n
            else:
                parts.append((reply, shape, n))
                recv_total[peer] += n
    # a concatenation is this round's own array: handed over without the link's copy when every message is one
    fresh = True
    merged_send = {}
    for peer, ws in send_parts.items():
        if len(ws) == 1:
            merged_send[peer], fresh = ws[0], False
        else:
            merged_send[peer] = np.concatenate(ws)
    exchange = outer.exchange_owned if fresh else outer.exchange_words
    got = exchange(merged_send, {peer: (n,) for peer, n in recv_total.items()})
    for peer, parts in recv_parts.items():
        flat, start = got[peer], 0
        for reply, shape, n in parts:
            reply[peer] = flat[start : start + n].reshape(shape)
            start += n
    return replies
