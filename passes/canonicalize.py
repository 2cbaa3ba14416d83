"""Canonicalize: one form per computation, so later passes match a small set of patterns."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from siguard.compiler.interp import run_float
from siguard.compiler.ir import Graph, Node, Value
from siguard.compiler.ops import default_impl
from siguard.passes.base import Pass, PassContext

__all__ = ["Canonicalize"]


class Canonicalize(Pass):
    """Simplify the frontend's IR without changing what it computes (checked with ``run_float``).

    Rules, applied in this order:

    1. ``identity`` nodes, and ``reshape`` nodes to the shape they already have, are removed; their
       readers read the input. When the removed output is a graph output, the producer of the
       input is renamed to it instead, so the output keeps its name. Refused: an identity from a
       graph input or constant straight to a graph output (nothing would be left to compute it).
    2. Constant folding: a node whose inputs are all constants is evaluated with ``run_float`` and
       replaced by a constant value -- secret, owner ``"model"``, if any input was a model weight,
       else public. Refused: a node whose output is a graph output.
    3. ``batchnorm`` directly after a ``conv`` or a rank-2 ``matmul`` (``x @ W``, channels on the
       last axis) with constant weight, whose output nothing else reads, is folded into that
       weight and bias. Any other batchnorm with constant parameters becomes ``mul`` by a secret
       per-channel scale (C, 1, ..., 1) then ``add`` of a secret per-channel shift. Refused: a
       batchnorm with non-constant parameters (left as is).
    4. ``matmul`` (two inputs) whose output only feeds an ``add`` of a constant vector along the
       last axis ((N,) or (1, ..., 1, N), not widening the result) becomes a matmul with that
       bias as third input.
    5. ``div`` by a constant becomes ``mul`` by its reciprocal (public if the divisor was public,
       else a secret model weight); ``div`` by a computed value becomes ``reciprocal`` then ``mul``.
    6. ``sum`` needs nothing: the frontend already lowers ONNX Sum to a chain of ``add``.
    7. The decomposed exact GELU that torch's TorchScript exporter writes,
       ``x * (erf(x / sqrt(2)) + 1) * 0.5`` (any association and operand order of the two
       multiplications, the division possibly already rewritten to ``* (1/sqrt(2))`` by rule 5),
       becomes one ``gelu`` node. Refused unless it matches exactly: public scalar constants
       0.5, 1 and sqrt(2) (or 1/sqrt(2)), the same ``x`` in both places, and no intermediate
       value read by anything else.
    8. Nodes and values that no longer contribute to the outputs are removed.

    ``run`` returns one line per change.
    """

    name = "canonicalize"

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        changes: list[str] = []
        changes += _remove_identities(graph)
        changes += _fold_constants(graph)
        changes += _fold_batchnorms(graph)
        changes += _fuse_matmul_bias(graph)
        changes += _rewrite_divisions(graph)
        changes += _fuse_gelu(graph)
        removed = graph.remove_unused()
        if removed:
            changes.append(f"removed {removed} unused node(s)")
        return changes


# ---- helpers -------------------------------------------------------------------------------------


def _uses(graph: Graph) -> Counter:
    """How many times each value is read (graph outputs count as a read)."""
    uses: Counter = Counter(graph.outputs)
    for n in graph.nodes:
        uses.update(n.inputs)
    return uses


def _producers(graph: Graph) -> dict[str, Node]:
    return {o: n for n in graph.nodes for o in n.outputs}


def _const(graph: Graph, name: str) -> np.ndarray | None:
    v = graph.values.get(name)
    return None if v is None or v.data is None else np.asarray(v.data)


def _new_const(graph: Graph, base: str, data: np.ndarray, *, secret: bool) -> str:
    name = graph.fresh_name(base)
    graph.add_value(
        Value(
            name,
            tuple(int(d) for d in data.shape),
            visibility="secret" if secret else "public",
            owner="model" if secret else None,
            data=data,
        )
    )
    return name


def _set_const(graph: Graph, name: str, data: np.ndarray, uses: Counter, *, secret: bool = True) -> str:
    """Give constant ``name`` new data in place if only one node reads it, else make a new constant."""
    if uses[name] <= 1:
        v = graph.values[name]
        v.data, v.shape = data, tuple(int(d) for d in data.shape)
        v.visibility, v.owner = ("secret", "model") if secret else ("public", None)
        return name
    return _new_const(graph, name, data, secret=secret)


def _is_scalar(graph: Graph, name: str, target: float, rtol: float = 1e-5) -> bool:
    v = graph.values.get(name)
    if v is None or v.data is None or v.visibility != "public" or np.asarray(v.data).size != 1:
        return False
    return math.isclose(float(np.asarray(v.data).reshape(-1)[0]), target, rel_tol=rtol)


# ---- 1. identities -------------------------------------------------------------------------------


def _remove_identities(graph: Graph) -> list[str]:
    changes = []
    for node in list(graph.nodes):
        src, out = node.inputs[0] if node.inputs else None, node.outputs[0]
        if node.op == "reshape":
            if tuple(graph.values[src].shape) != tuple(graph.values[out].shape):
                continue
        elif node.op != "identity":
            continue
        if out in graph.outputs:
            producer = graph.producer(src)
            if producer is None or src in graph.outputs:
                continue  # refused: input or constant straight to an output
            producer.outputs = [out if o == src else o for o in producer.outputs]
            graph.nodes.remove(node)
            graph.replace_uses(src, out)
            del graph.values[src]
        else:
            graph.nodes.remove(node)
            graph.replace_uses(out, src)
            del graph.values[out]
        changes.append(f"removed {node.op} {node.name} ({out} -> {src})")
    return changes


# ---- 2. constant folding -------------------------------------------------------------------------


def _fold_constants(graph: Graph) -> list[str]:
    changes = []
    for node in list(graph.nodes):
        if not node.inputs or not all(graph.values[i].is_const for i in node.inputs):
            continue
        if any(o in graph.outputs for o in node.outputs):
            continue
        single = Graph("fold")
        for name in node.inputs:
            single.values[name] = graph.values[name]
        out = node.outputs[0]
        single.values[out] = graph.values[out]
        single.nodes = [node]
        single.outputs = [out]
        result = run_float(single, {})[out]
        dtypes = [np.asarray(graph.values[i].data).dtype for i in node.inputs]
        secret = any(graph.values[i].owner == "model" for i in node.inputs)
        v = graph.values[out]
        v.data = result.astype(np.result_type(*dtypes))
        v.shape = tuple(int(d) for d in result.shape)
        v.visibility, v.owner = ("secret", "model") if secret else ("public", None)
        graph.nodes.remove(node)
        changes.append(f"folded constant {node.op} {node.name} into {out} ({v.visibility})")
    return changes


# ---- 3. batchnorm --------------------------------------------------------------------------------


def _bn_params(graph: Graph, node: Node) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel (scale, shift) with batchnorm(x) = x * scale + shift, if the parameters are constant."""
    params = [_const(graph, name) for name in node.inputs[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
    scale = gamma / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    return scale, beta - mean * scale


def _fold_batchnorms(graph: Graph) -> list[str]:
    changes = []
    for bn in [n for n in graph.nodes if n.op == "batchnorm"]:
        params = _bn_params(graph, bn)
        if params is None:
            continue
        scale, shift = params
        x, out = bn.inputs[0], bn.outputs[0]
        uses = _uses(graph)
        producer = graph.producer(x)
        if producer is not None and uses[x] == 1 and _fold_into(graph, producer, scale, shift, uses):
            producer.outputs = [out]
            graph.nodes.remove(bn)
            del graph.values[x]
            changes.append(f"folded batchnorm {bn.name} into {producer.op} {producer.name}")
            continue
        rank = len(graph.values[x].shape)
        dtype = np.asarray(graph.values[bn.inputs[1]].data).dtype
        shape = (scale.size,) + (1,) * (rank - 2)
        s = _new_const(graph, f"{bn.name}_scale", scale.reshape(shape).astype(dtype), secret=True)
        t = _new_const(graph, f"{bn.name}_shift", shift.reshape(shape).astype(dtype), secret=True)
        mid = graph.fresh_name(f"{bn.name}_scaled")
        graph.add_value(Value(mid, graph.values[x].shape))
        k = graph.nodes.index(bn)
        graph.nodes[k : k + 1] = [
            Node(bn.name, "mul", [x, s], [mid], impl=default_impl("mul"), source=bn.source),
            Node(f"{bn.name}_shift", "add", [mid, t], [out], impl=default_impl("add"), source=bn.source),
        ]
        changes.append(f"lowered batchnorm {bn.name} to mul + add by per-channel weights")
    return changes


def _fold_into(graph: Graph, producer: Node, scale: np.ndarray, shift: np.ndarray, uses: Counter) -> bool:
    """Scale the producer's weight and bias by a following batchnorm. False if it does not apply."""
    if producer.op not in ("conv", "matmul") or len(producer.inputs) < 2:
        return False
    w = _const(graph, producer.inputs[1])
    if w is None or producer.outputs[0] in graph.outputs:
        return False
    if producer.op == "conv":
        if w.ndim != 4 or w.shape[0] != scale.size:
            return False
        new_w = w * scale.reshape(-1, 1, 1, 1)
    else:
        if len(graph.values[producer.outputs[0]].shape) != 2 or w.ndim != 2 or w.shape[1] != scale.size:
            return False
        new_w = w * scale.reshape(1, -1)
    old_b = _const(graph, producer.inputs[2]) if len(producer.inputs) > 2 else np.zeros(scale.size)
    if old_b is None:
        return False
    new_b = old_b.reshape(-1) * scale + shift
    producer.inputs[1] = _set_const(graph, producer.inputs[1], new_w.astype(w.dtype), uses)
    bias = new_b.astype(w.dtype)
    if len(producer.inputs) > 2:
        producer.inputs[2] = _set_const(graph, producer.inputs[2], bias, uses)
    else:
        producer.inputs.append(_new_const(graph, f"{producer.name}_bias", bias, secret=True))
    return True


# ---- 4. matmul + bias ----------------------------------------------------------------------------


def _fuse_matmul_bias(graph: Graph) -> list[str]:
    changes = []
    for mm in [n for n in graph.nodes if n.op == "matmul" and len(n.inputs) == 2]:
        y = mm.outputs[0]
        uses = _uses(graph)
        if uses[y] != 1 or y in graph.outputs:
            continue
        consumers = graph.consumers(y)
        add = consumers[0]
        if add.op != "add" or len(consumers) != 1 or add.inputs.count(y) != 1:
            continue
        other = add.inputs[1] if add.inputs[0] == y else add.inputs[0]
        bias = _const(graph, other)
        y_shape = graph.values[y].shape
        if bias is None or not y_shape or graph.values[add.outputs[0]].shape != y_shape:
            continue
        n = y_shape[-1]
        if bias.size != n or bias.ndim == 0 or bias.shape[-1] != n:
            continue
        v = graph.values[other]
        b = (
            other
            if bias.ndim == 1
            else _set_const(graph, other, bias.reshape(n), uses, secret=v.visibility == "secret")
        )
        mm.inputs.append(b)
        graph.nodes.remove(add)
        del graph.values[y]
        mm.outputs = [add.outputs[0]]
        changes.append(f"fused add {add.name} into matmul {mm.name} as bias {b}")
    return changes


# ---- 5. division ---------------------------------------------------------------------------------


def _rewrite_divisions(graph: Graph) -> list[str]:
    changes = []
    for div in [n for n in graph.nodes if n.op == "div"]:
        a, b = div.inputs
        divisor = graph.values[b]
        if divisor.is_const:
            data = np.asarray(divisor.data)
            recip = (1.0 / data.astype(np.float64)).astype(data.dtype)
            secret = divisor.visibility == "secret"
            r = _new_const(graph, f"{b}_reciprocal", recip, secret=secret)
            div.op, div.inputs, div.impl = "mul", [a, r], default_impl("mul")
            changes.append(f"div {div.name} -> mul by the {divisor.visibility} reciprocal of {b}")
        else:
            r = graph.fresh_name(f"{b}_reciprocal")
            graph.add_value(Value(r, divisor.shape))
            k = graph.nodes.index(div)
            graph.nodes.insert(
                k, Node(f"{div.name}_reciprocal", "reciprocal", [b], [r], impl=default_impl("reciprocal"),
                        source=div.source)
            )  # fmt: skip
            div.op, div.inputs, div.impl = "mul", [a, r], default_impl("mul")
            changes.append(f"div {div.name} -> reciprocal of {b} then mul")
    return changes


# ---- 7. GELU -------------------------------------------------------------------------------------

_SQRT2 = math.sqrt(2.0)


def _fuse_gelu(graph: Graph) -> list[str]:
    changes = []
    for root in [n for n in graph.nodes if n.op == "mul"]:
        if root not in graph.nodes:
            continue  # consumed by an earlier match
        match = _match_gelu(graph, root)
        if match is None:
            continue
        x, inner = match
        for n in inner:
            graph.nodes.remove(n)
            for o in n.outputs:
                del graph.values[o]
        root.op, root.inputs, root.attrs = "gelu", [x], {"approximate": "none"}
        root.impl = default_impl("gelu")
        changes.append(f"fused GELU pattern ({len(inner) + 1} nodes) at {root.name} into gelu")
    return changes


def _match_gelu(graph: Graph, root: Node) -> tuple[str, list[Node]] | None:
    """(x, the nodes to delete) if ``root`` computes x * (erf(x / sqrt 2) + 1) * 0.5 exactly."""
    producers, uses = _producers(graph), _uses(graph)

    def private(name: str) -> Node | None:
        """The producer of ``name`` if nothing but its one consumer reads it."""
        node = producers.get(name)
        return node if node is not None and uses[name] == 1 and name not in graph.outputs else None

    # The product root = f1 * f2 with one factor an inner mul: three leaves in total.
    for k in (0, 1):
        inner = private(root.inputs[k])
        if inner is None or inner.op != "mul":
            continue
        leaves = inner.inputs + [root.inputs[1 - k]]
        halves = [i for i, v in enumerate(leaves) if _is_scalar(graph, v, 0.5)]
        for h in halves:
            rest = [v for i, v in enumerate(leaves) if i != h]
            for j in (0, 1):
                x, one_plus = rest[j], rest[1 - j]
                matched = _match_one_plus_erf(graph, private, one_plus, x)
                if matched is not None:
                    return x, [inner, *matched]
    return None


def _match_one_plus_erf(graph: Graph, private, name: str, x: str) -> list[Node] | None:
    add = private(name)
    if add is None or add.op != "add":
        return None
    for k in (0, 1):
        if not _is_scalar(graph, add.inputs[1 - k], 1.0):
            continue
        erf = private(add.inputs[k])
        if erf is None or erf.op != "erf":
            continue
        scaled = private(erf.inputs[0])
        if scaled is None:
            continue
        if scaled.op == "div" and scaled.inputs[0] == x and _is_scalar(graph, scaled.inputs[1], _SQRT2):
            return [add, erf, scaled]
        if scaled.op == "mul":
            for m in (0, 1):
                if scaled.inputs[m] == x and _is_scalar(graph, scaled.inputs[1 - m], 1.0 / _SQRT2):
                    return [add, erf, scaled]
    return None
