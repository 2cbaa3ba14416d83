"""Fuse a product's truncation into the comparison that follows it (rounds, not arithmetic)."""

from __future__ import annotations

from siguard.compiler.ir import Graph
from siguard.passes.base import Pass, PassContext

__all__ = ["FuseTruncation"]


class FuseTruncation(Pass):
    """``truncate(raw, d) -> relu`` (exact implementation) becomes ``relu(raw, shift=d)``, and the
    residual form ``truncate(raw, d) -> add(., r) -> relu`` becomes ``add(raw, r, shift_b=d) ->
    relu(shift=d)`` (r is brought to raw's scale by a local left shift: floor((raw + r 2^d) / 2^d)
    = floor(raw / 2^d) + r, so the sum is the same).

    The sign of a product does not need its truncation: ReLU can take the sign of the untruncated
    value while the truncation runs in the same rounds (``Engine.parallel``), then select. Every
    conv/matmul + ReLU pair goes from trunc 2 + msb 8 + select 2 = 12 rounds to 10 (ResNet-34: all
    33 ReLUs, 66 rounds of 445). Bytes do not change.

    Fused only when each intermediate value (the truncation's output, the sum) is read by the
    next node alone and is not a graph output, the residual r has the truncated value's scale, the
    ReLU's implementation is ``exact`` (a polynomial ReLU needs the truncated input) and it has no
    shift yet. Runs after the approximation pass (which chooses implementations on unfused graphs)
    and before the cost pass, which counts the fused form.
    """

    name = "fuse"

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        changes: list[str] = []
        outputs = set(graph.outputs)
        for t in list(graph.nodes):
            if t.op != "truncate" or t.outputs[0] in outputs:
                continue
            reader = self._only_reader(graph, t.outputs[0], outputs)
            if reader is None:
                continue
            bits = int(t.attrs["bits"])
            raw, tv = t.inputs[0], t.outputs[0]
            if self._fusable_relu(reader, tv):
                reader.inputs = [raw]
                reader.attrs = {**reader.attrs, "shift": bits}
                graph.nodes.remove(t)
                changes.append(f"{reader.name}: truncation {t.name} (by {bits}) fused; "
                               "sign and truncation share rounds")
                continue
            if reader.op != "add" or reader.attrs.get("shift_b") or reader.inputs.count(tv) != 1:
                continue
            other = reader.inputs[1 - reader.inputs.index(tv)]
            relu = self._only_reader(graph, reader.outputs[0], outputs)
            if relu is None or not self._fusable_relu(relu, reader.outputs[0]):
                continue
            if graph.values[other].scale != graph.values[tv].scale:
                continue
            reader.inputs = [raw, other]
            reader.attrs = {**reader.attrs, "shift_b": bits}
            graph.values[reader.outputs[0]].scale = graph.values[raw].scale
            relu.attrs = {**relu.attrs, "shift": bits}
            graph.nodes.remove(t)
            changes.append(f"{relu.name}: truncation {t.name} (by {bits}) moved after the residual add "
                           f"{reader.name} and fused; sign and truncation share rounds")
        graph.remove_unused()
        return changes

    @staticmethod
    def _only_reader(graph: Graph, value: str, outputs: set[str]):
        if value in outputs:
            return None
        readers = graph.consumers(value)
        return readers[0] if len(readers) == 1 else None

    @staticmethod
    def _fusable_relu(node, value: str) -> bool:
        return node.op == "relu" and node.impl == "exact" and not node.attrs.get("shift") and node.inputs == [value]
