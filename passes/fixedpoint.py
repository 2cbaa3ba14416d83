"""Fixed-point pass: assign every value a scale and place the truncations."""

from __future__ import annotations

import numpy as np

from siguard.compiler.ir import Graph, Node, Value

from .base import Pass, PassContext

__all__ = ["FixedPoint"]

_PRODUCTS = ("mul", "matmul", "conv")


def _is_small_integer(data: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(data)) and np.all(data == np.round(data)) and np.all(np.abs(data) < 2**20))


class FixedPoint(Pass):
    """Assigns fixed-point scales (fractional bits) and inserts truncations.

    Rules:

    1. Client inputs, secret weights and every activation are at scale f (``--frac-bits``).
    2. A public constant multiplied into a value is at scale 0 if all its entries are small
       integers (no truncation follows: a product by an integer constant keeps the scale),
       otherwise at scale f. A public constant added to a value takes that value's scale.
    3. A product (mul, matmul, conv) of operands at scales s1 and s2 is at s1 + s2; when that
       exceeds f, ONE ``truncate`` by s1 + s2 - f follows it (after the bias is added and
       after summation, so each output element is truncated once).
    4. The bias of a matmul/conv is encoded at the product's scale (2f), so it meets the
       un-truncated sum without rounding.
    5. Nonlinear ops and layout ops take and return scale f (their implementations truncate
       internally). Average pooling and means rescale inside their handler.
    6. Headroom is not checked here: a calibrated range is a maximum over samples, not a bound.
       The bounds pass (:mod:`siguard.passes.bounds`) checks every value, and each product before its
       truncation, against sound bounds from the input domain.

    It refuses to change a graph whose adds mix scales it cannot reconcile (raises).
    """

    name = "fixed-point"

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        f = ctx.frac_bits
        changes: list[str] = []
        for name in graph.inputs:
            graph.values[name].scale = f
        # scales of constants are decided per use below (a bias meets its product at 2f)
        new_nodes: list[Node] = []
        for node in graph.nodes:
            new_nodes.append(node)
            outs = [graph.values[o] for o in node.outputs]
            if node.op in _PRODUCTS:
                s0 = self._operand_scale(graph, node, 0, f)
                s1 = self._operand_scale(graph, node, 1, f)
                prod = s0 + s1
                if len(node.inputs) > 2:
                    self._set_const_scale(graph, node, 2, prod)
                if prod > f and any(graph.values[i].visibility == "secret" for i in node.inputs[:2]):
                    out = outs[0]
                    raw = Value(graph.fresh_name(out.name + "_raw"), out.shape, visibility=out.visibility, scale=prod,
                                range=out.range)
                    graph.add_value(raw)
                    node.outputs = [raw.name]
                    t = Node(graph.fresh_name(node.name + "_trunc"), "truncate", [raw.name], [out.name],
                             {"bits": prod - f}, impl="exact", source=node.source)
                    new_nodes.append(t)
                    out.scale = f
                    changes.append(f"{node.name}: product at scale {prod}, truncate by {prod - f} -> {out.name}")
                else:
                    outs[0].scale = prod
            elif node.op in ("add", "sub"):
                sa = self._scale_or_none(graph, node.inputs[0])
                sb = self._scale_or_none(graph, node.inputs[1])
                target = sa if sa is not None else (sb if sb is not None else f)
                for k, s in enumerate((sa, sb)):
                    if s is None:
                        self._set_const_scale(graph, node, k, target)
                    elif s != target:
                        raise ValueError(f"{node.name}: adds values at scales {sa} and {sb}")
                outs[0].scale = target
            elif node.op in ("reshape", "transpose", "concat", "pad", "slice", "gather", "identity", "neg",
                             "reduce_sum"):
                s = self._scale_or_none(graph, node.inputs[0])
                for k in range(len(node.inputs)):
                    if self._scale_or_none(graph, node.inputs[k]) is None:
                        self._set_const_scale(graph, node, k, s if s is not None else f)
                for o in outs:
                    o.scale = s if s is not None else f
            else:
                for k in range(len(node.inputs)):
                    if self._scale_or_none(graph, node.inputs[k]) is None:
                        self._set_const_scale(graph, node, k, f)
                for o in outs:
                    o.scale = f
        graph.nodes = new_nodes
        graph.remove_unused()
        for v in graph.values.values():
            if v.scale is None:
                v.scale = f
        return changes

    # ---- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _scale_or_none(graph: Graph, name: str) -> int | None:
        v = graph.values[name]
        if v.is_const and v.scale is None:
            return None
        return v.scale

    def _operand_scale(self, graph: Graph, node: Node, k: int, f: int) -> int:
        v = graph.values[node.inputs[k]]
        if v.is_const:
            if v.visibility == "public":
                want = v.scale if v.scale is not None else (0 if _is_small_integer(v.data) else f)
            else:
                want = f
            self._set_const_scale(graph, node, k, want)
            return graph.values[node.inputs[k]].scale
        return f if v.scale is None else v.scale

    @staticmethod
    def _set_const_scale(graph: Graph, node: Node, k: int, scale: int) -> None:
        """Give the constant feeding input ``k`` of ``node`` a scale; clone it if another use
        already fixed a different scale."""
        v = graph.values[node.inputs[k]]
        if v.scale is None or v.scale == scale:
            v.scale = scale
            return
        clone = Value(graph.fresh_name(v.name), v.shape, v.dtype, v.visibility, v.owner, v.data, scale, v.range)
        graph.add_value(clone)
        node.inputs[k] = clone.name
