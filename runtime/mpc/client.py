"""The client's side of the secure protocol: it shares its input and reconstructs what is revealed to it.

numpy only (no torch): the networked query client runs this in a process that never loads torch. The
words it sends are the ones the servers' tensors would hold: int64 two's complement, so numpy's
wrapping ``+ -`` are arithmetic modulo 2^64 as torch's are.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from .prg import PartyKeys, Randomness
from .transport import CLIENT, Transport

__all__ = ["Client"]


class Client:
    """The client (party 3): shares its input and reconstructs the revealed output.

    Its randomness is private (a fresh OS key unless ``randomness`` is given)."""

    party = CLIENT

    def __init__(self, transport: Transport, randomness: Randomness | None = None):
        if transport.party != CLIENT:
            raise ValueError(f"the client is party {CLIENT}, got a transport for party {transport.party}")
        self.transport = transport
        self.rand = randomness if randomness is not None else PartyKeys(CLIENT).session(secrets.token_bytes(16))

    def input_shares(self, x: Any) -> dict[int, np.ndarray]:
        """What P_i receives for input x (int64 words: a numpy array, or anything numpy reads as one, e.g. a CPU
        tensor): the (2, *shape) stack (x_i, x_{i+1}) with x0, x1 drawn from the private PRF stream and
        x2 = x - x0 - x1 mod 2^64."""
        x = np.asarray(x)
        if x.dtype != np.int64:
            raise TypeError(f"the client shares int64 ring words, got {x.dtype}")
        n = x.size
        x0 = self.rand.private_np(n).reshape(x.shape)
        x1 = self.rand.private_np(n).reshape(x.shape)
        comps = (x0, x1, x - x0 - x1)
        return {i: np.stack((comps[i], comps[(i + 1) % 3])) for i in range(3)}

    def share_input(self, x: Any) -> None:
        """Send (x_i, x_{i+1}) to P_i (:meth:`input_shares`). 1 round; 48 B per element sent by the client
        (16 to each server)."""
        self.transport.exchange_words(self.input_shares(x), {})

    def receive_output(self, shape: Sequence[int]) -> np.ndarray:
        """Receive x_i from every P_i and return x0 + x1 + x2 (int64 words). 1 round; the client sends nothing."""
        shape = tuple(int(s) for s in shape)
        got = self.transport.exchange_words({}, {i: shape for i in range(3)})
        return got[0] + got[1] + got[2]
