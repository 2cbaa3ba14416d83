"""A server's warm-up: one session rehearsed locally at start-up, so that the first query runs warm.

Why. A server's first session pays for what later ones find ready: the pages of the memory a session
allocates (the re-randomised weight shares, the convolutions' buffers, the frames) are touched for the
first time, and the allocator keeps them afterwards for the next session's thread. Measured on ResNet-34
(CIFAR form, batch 1, fresh trios, medians of 3): the first query cost P0 0.24 s more CPU than its later
ones (145k page faults instead of 40-48k), P1 and P2 0.11-0.12 s more; with this rehearsal and the memory
kept (:func:`siguard.cli_net.keep_freed_memory`) it costs what later ones do (README, *A first networked query*).

What. :func:`rehearse_session` runs the executor of a whole session at this server alone, in a thread of
its own as a session does: the weights re-randomised for the session, then every plan step on the secure
engine, whose transport here sends nothing and receives zeros -- or, where this server sent a message of
the same shape in the same round, a copy of its own message (so the client input's consistency check,
which compares digests of two copies, passes on the zero input as it would on an honest client's). Every
step runs the same code on the same shapes (the protocols' control flow is data-independent), so its
kernels, allocations and lazily built tables are the session's.

Safety. Nothing leaves the process and nothing depends on data: the input is zeros, the received values are
zeros or this server's own messages, the output is dropped (the reveal sends nowhere). The weight shares are
re-randomised into throw-away copies from PRF keys derived for the session id ``warm-up``, which no query
uses (queries are ``q<n>``, the set-up ``setup``), so no stream of a real session is drawn from.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from siguard.compiler.plan import Plan
from siguard.runtime.executor import Executor
from siguard.runtime.mpc.prg import PartyKeys
from siguard.runtime.mpc.rss import RSSEngine
from siguard.runtime.mpc.transport import FrameHeader, Transport

__all__ = ["WARMUP_SESSION", "rehearse_session"]

#: the session id of the rehearsal (no query's: those are q<n>)
WARMUP_SESSION = "warm-up"


class _Rehearsal(Transport):
    """A server's transport in a rehearsal: sends go nowhere; a receive gets a copy of what this party sent
    in the same round if one message had that shape, else zeros."""

    def _exchange(self, send: Mapping[int, np.ndarray], recv: Mapping[int, tuple[int, ...]], owned: bool
                  ) -> dict[int, np.ndarray]:  # every round (exchange_words and exchange_owned) comes here
        out: dict[int, np.ndarray] = {}
        for peer, shape in recv.items():
            shape = tuple(shape)
            mine = next((w for w in send.values() if w.shape == shape), None)
            out[peer] = np.array(mine, dtype=np.int64) if mine is not None else np.zeros(shape, dtype=np.int64)
        return out

    def _send_words(self, peer: int, header: FrameHeader, words: np.ndarray) -> int:  # pragma: no cover
        raise NotImplementedError("a rehearsal sends nothing")

    def _recv_words(self, peer: int, deadline: float) -> tuple[FrameHeader, np.ndarray]:  # pragma: no cover
        raise NotImplementedError("a rehearsal receives nothing")


def rehearse_session(plan: Plan, party: int, keys: PartyKeys, weights: Mapping[str, Any]) -> float:
    """Rehearse one session of ``plan`` at server ``party`` (see the module docstring), with its long-term
    ``keys`` and its set-up weight ``shares`` (left as they are), in a thread that ends before this returns.
    Returns the seconds it took; raises what the rehearsal raised."""
    failure: list[BaseException] = []

    def session() -> None:
        try:
            engine = RSSEngine(party, _Rehearsal(party, WARMUP_SESSION), keys.session(WARMUP_SESSION),
                               plan.frac_bits)
            ex = Executor(plan, engine)
            ex.use_weights(weights)
            ex.run(None)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=session, name=f"siguard-P{party}-warm-up", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return time.monotonic() - t0
