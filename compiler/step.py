"""One plan step as a dataclass: :class:`PlanStep`, read from and written to the plan's ``steps`` entries.

A step's JSON entry (``schema/plan.schema.json``, ``$defs/step``) is, in this order::

    {"name", "op", "impl", "inputs", "outputs", "attrs", "source", "cost"[, "impl_params"][, "approx"]}

:meth:`PlanStep.from_dict` and :meth:`PlanStep.to_dict` convert without loss: ``to_dict(from_dict(d))``
has the same keys in the same order as ``d`` whenever ``d`` came from the backend, so a plan read
into steps and written back has the same bytes and the same ``plan_hash``. Keys this class does not know
are kept in ``extra`` and written back after the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .impl import Impl

__all__ = ["PlanStep"]

_KNOWN = ("name", "op", "impl", "inputs", "outputs", "attrs", "source", "cost", "impl_params", "approx")


@dataclass(eq=True)
class PlanStep:
    """A plan step: the op ``op`` computed by ``impl`` (:class:`siguard.compiler.impl.Impl`, tuning
    keywords included) from the values ``inputs`` into the values ``outputs``.

    * ``attrs`` -- the op's attributes (IR attribute names, :mod:`siguard.compiler.ops`);
    * ``cost`` -- ``{rounds, bytes, bytes_per_party[, phases]}`` from the cost pass;
    * ``source`` -- the ONNX node it came from (None for input and reveal steps);
    * ``approx`` -- the approximation pass's record of how ``impl`` was chosen (None if it chose nothing);
    * ``extra`` -- entries of the JSON step this class does not know, kept for the round trip.
    """

    name: str
    op: str
    impl: Impl
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, Any] = field(default_factory=dict)
    source: str | None = None
    approx: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlanStep:
        """The step of a plan's JSON entry (the entry is not copied: lists and dicts are shared)."""
        return cls(name=d["name"], op=d["op"], impl=Impl.parse(d["impl"], d["op"], d.get("impl_params")),
                   inputs=d["inputs"], outputs=d["outputs"], attrs=d["attrs"], cost=d["cost"],
                   source=d.get("source"), approx=d.get("approx"),
                   extra={k: v for k, v in d.items() if k not in _KNOWN})

    def to_dict(self) -> dict[str, Any]:
        """The JSON entry (see the module docstring for its key order)."""
        d: dict[str, Any] = {"name": self.name, "op": self.op, "impl": self.impl.name, "inputs": self.inputs,
                             "outputs": self.outputs, "attrs": self.attrs, "source": self.source, "cost": self.cost}
        if self.impl.params:
            d["impl_params"] = self.impl.param_dict
        if self.approx is not None:
            d["approx"] = self.approx
        d.update(self.extra)
        return d

    @property
    def impl_params(self) -> dict[str, Any]:
        """The implementation's tuning keywords (the plan's ``impl_params``; empty if none)."""
        return self.impl.param_dict

    def set_impl(self, impl: str | Impl, params: dict[str, Any] | None = None) -> None:
        """Run ``impl`` with tuning ``params`` (none if not given) from now on."""
        self.impl = Impl.parse(impl, self.op).with_params(params)

    # ---- read-only compatibility with the dict steps of before ---------------------------------------
    def __getitem__(self, key: str) -> Any:
        """``step["op"]`` as ``step.op`` (and ``"impl"`` as the plan's string), for code not yet moved to
        attributes; new code uses the attributes."""
        d = self.to_dict()
        return d[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)
