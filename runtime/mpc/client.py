"""The client's side of the secure protocol: it shares its input and reconstructs what is revealed to it."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from .prg import PartyKeys, Randomness
from .rss import public_tensor
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

    def share_input(self, x: torch.Tensor) -> None:
        """Send (x_i, x_{i+1}) to P_i with x0, x1 uniform and x2 = x - x0 - x1. 1 round; 48 B per
        element sent by the client (16 to each server)."""
        x = public_tensor(x)
        x0, x1 = self.rand.private(x.shape), self.rand.private(x.shape)
        comps = (x0, x1, x - x0 - x1)
        self.transport.exchange({i: torch.stack((comps[i], comps[(i + 1) % 3])) for i in range(3)}, {})

    def receive_output(self, shape: Sequence[int]) -> torch.Tensor:
        """Receive x_i from every P_i and return x0 + x1 + x2. 1 round; the client sends nothing."""
        shape = tuple(int(s) for s in shape)
        got = self.transport.exchange({}, {i: shape for i in range(3)})
        return got[0] + got[1] + got[2]
