"""The guard op's float meaning: MemGuard's plaintext reference, registered with the float interpreter.

The compiler does not know the guard (it sits below privacy); this module gives the ``guard`` node the
meaning :func:`siguard.compiler.interp.run_float` evaluates (phase I, no random release), and
``siguard.privacy`` imports it, so any process that can build a guarded graph (which needs
:class:`~siguard.privacy.defender.DefenderWeights`) has it registered.
"""

from __future__ import annotations

import torch

from siguard.compiler.interp import register_float
from siguard.compiler.ir import Node
from siguard.privacy.defender import DefenderWeights
from siguard.privacy.memguard import guard_reference

__all__ = ["guard_float"]

_OPTIONS = ("rounds", "steps", "c1", "c2", "c3", "lr", "schedule", "validator", "margin", "c3_max")


def guard_float(node: Node, z: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor, W2: torch.Tensor, b2: torch.Tensor,
                w3: torch.Tensor, b3: torch.Tensor) -> torch.Tensor:
    """Guarded probabilities (B, k) float64 of logits ``z`` (B, k) and the defender's weights (IR layout)."""
    opts = {k: node.attrs[k] for k in _OPTIONS if k in node.attrs}
    weights = DefenderWeights(W1=W1.numpy().T, b1=b1.numpy(), W2=W2.numpy().T, b2=b2.numpy(), w3=w3.numpy().T,
                              b3=b3.numpy())
    return torch.from_numpy(guard_reference(z.numpy(), weights, **opts).guarded)


register_float("guard", guard_float)
