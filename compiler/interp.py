"""The float interpreter: executes an IR graph in float64, per the semantics of :mod:`siguard.compiler.ops`.

It is the oracle of every pass (a pass must not change what :func:`run_float` computes, up to
float rounding) and the calibration engine (``keep_all=True`` returns every intermediate value).

Call tree: ``run_float -> _Interpreter.run -> _Interpreter.run_node -> _OPS[op](node, *args)``;
a handler takes the node and its input tensors (torch float64) and returns the output tensor.
Values are freed after their last use unless ``keep_all`` is set; an error is re-raised naming
the node that was executing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from siguard.compiler.ir import Graph, Node
from siguard.core.errors import InputError

__all__ = ["run_float", "OP_HANDLERS", "register_float"]

Tensor = torch.Tensor


def run_float(graph: Graph, inputs: dict[str, np.ndarray], *, keep_all: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``inputs`` (name -> array of exactly the input's declared shape).

    Returns ``{output name: float64 array}`` for the graph outputs, or for every value of the graph
    (inputs, constants and intermediates) when ``keep_all`` is True.
    Raises :class:`InputError` for missing inputs or wrong shapes, and ``RuntimeError`` naming the
    node if an op fails.
    """
    return _Interpreter(graph).run(inputs, keep_all=keep_all)


def _pad_nchw(x: Tensor, pads: list[int], value: float) -> Tensor:
    """pads = (top, left, bottom, right) on the last two axes."""
    top, left, bottom, right = (int(p) for p in pads)
    if top == left == bottom == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom), mode="constant", value=value)


def _conv(node: Node, x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    a = node.attrs
    x = _pad_nchw(x, a["pads"], 0.0)
    return F.conv2d(x, w, b, stride=tuple(a["strides"]), dilation=tuple(a["dilations"]), groups=int(a["group"]))


def _maxpool(node: Node, x: Tensor) -> Tensor:
    a = node.attrs
    x = _pad_nchw(x, a["pads"], -math.inf)
    return F.max_pool2d(x, tuple(a["kernel"]), tuple(a["strides"]), dilation=tuple(a.get("dilations", [1, 1])))


def _avgpool(node: Node, x: Tensor) -> Tensor:
    a = node.attrs
    kernel, strides = tuple(a["kernel"]), tuple(a["strides"])
    summed = F.avg_pool2d(_pad_nchw(x, a["pads"], 0.0), kernel, strides)  # mean over the whole window
    if a["count_include_pad"]:
        return summed
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    fraction = F.avg_pool2d(_pad_nchw(ones, a["pads"], 0.0), kernel, strides)  # share of real elements
    return summed / fraction


def _pad(node: Node, x: Tensor) -> Tensor:
    pads, rank = [int(p) for p in node.attrs["pads"]], x.dim()
    torch_pads: list[int] = []
    for axis in reversed(range(rank)):  # torch lists (begin, end) from the last axis backwards
        torch_pads += [pads[axis], pads[axis + rank]]
    return F.pad(x, torch_pads, mode="constant", value=float(node.attrs.get("value", 0.0)))


def _slice(node: Node, x: Tensor) -> Tensor:
    a = node.attrs
    index = [slice(None)] * x.dim()
    for s, e, axis, st in zip(a["starts"], a["ends"], a["axes"], a["steps"], strict=True):
        if st <= 0 or s < 0 or e < 0:
            raise ValueError(f"slice attributes must be resolved to non-negative values: {a}")
        index[int(axis)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _gather(node: Node, x: Tensor) -> Tensor:
    axis = int(node.attrs["axis"])
    idx = torch.as_tensor(np.asarray(node.attrs["indices"], dtype=np.int64))
    picked = x.index_select(axis, idx.reshape(-1))
    return picked.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :]))


def _channel(t: Tensor, rank: int) -> Tensor:
    """A per-channel vector (C,) shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    return t.reshape((-1,) + (1,) * (rank - 2))


def _batchnorm(node: Node, x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    r = x.dim()
    eps = float(node.attrs.get("epsilon", 1e-5))
    return (x - _channel(mean, r)) / torch.sqrt(_channel(var, r) + eps) * _channel(scale, r) + _channel(bias, r)


def _layer_norm(node: Node, x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    axes = tuple(range(int(node.attrs["axis"]), x.dim()))
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(node.attrs.get("epsilon", 1e-5))) * scale
    return y if bias is None else y + bias


def _lrn(node: Node, x: Tensor) -> Tensor:
    a = node.attrs
    size = int(a["size"])
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x * x
    channels = x.shape[1]
    padded = F.pad(sq.transpose(1, -1), (before, after)).transpose(1, -1)  # zero-pad the channel axis
    window = sum(padded.narrow(1, k, channels) for k in range(size))
    return x / (float(a["bias"]) + float(a["alpha"]) / size * window) ** float(a["beta"])


def _gelu(node: Node, x: Tensor) -> Tensor:
    if node.attrs.get("approximate", "none") == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _matmul(node: Node, a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    y = torch.matmul(a, b)
    return y if bias is None else y + bias


def _clip(node: Node, x: Tensor) -> Tensor:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
    return torch.clamp(x, min=None if lo is None else float(lo), max=None if hi is None else float(hi))


def _reduce(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    def handler(node: Node, x: Tensor) -> Tensor:
        axes = [int(a) for a in node.attrs["axes"]]
        if not axes:
            return x
        return fn(x, dim=axes, keepdim=bool(node.attrs["keepdims"]))

    return handler


OP_HANDLERS: dict[str, Callable[..., Tensor]] = {
    "add": lambda n, a, b: a + b,
    "sub": lambda n, a, b: a - b,
    "mul": lambda n, a, b: a * b,
    "div": lambda n, a, b: a / b,
    "neg": lambda n, a: -a,
    "matmul": _matmul,
    "conv": _conv,
    "avgpool": _avgpool,
    "reduce_sum": _reduce(torch.sum),
    "reduce_mean": _reduce(torch.mean),
    "batchnorm": _batchnorm,
    "reshape": lambda n, x: x.reshape(tuple(int(d) for d in n.attrs["shape"])),
    "transpose": lambda n, x: x.permute(*[int(p) for p in n.attrs["perm"]]),
    "concat": lambda n, *xs: torch.cat(xs, dim=int(n.attrs["axis"])),
    "pad": _pad,
    "slice": _slice,
    "gather": _gather,
    "identity": lambda n, x: x,
    "relu": lambda n, x: torch.clamp(x, min=0.0),
    "leaky_relu": lambda n, x: torch.where(x >= 0, x, float(n.attrs["alpha"]) * x),
    "prelu": lambda n, x, slope: torch.where(x >= 0, x, slope * x),
    "clip": _clip,
    "maxpool": _maxpool,
    "softmax": lambda n, x: torch.softmax(x, dim=int(n.attrs["axis"])),
    "log_softmax": lambda n, x: torch.log_softmax(x, dim=int(n.attrs["axis"])),
    "sigmoid": lambda n, x: torch.sigmoid(x),
    "tanh": lambda n, x: torch.tanh(x),
    "exp": lambda n, x: torch.exp(x),
    "sqrt": lambda n, x: torch.sqrt(x),
    "reciprocal": lambda n, x: 1.0 / x,
    "erf": lambda n, x: torch.erf(x),
    "gelu": _gelu,
    "softplus": lambda n, x: torch.logaddexp(x, torch.zeros_like(x)),
    "hard_sigmoid": lambda n, x: torch.clamp(float(n.attrs["alpha"]) * x + float(n.attrs["beta"]), 0.0, 1.0),
    "hard_swish": lambda n, x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0),
    "reduce_max": lambda n, x: torch.amax(x, dim=[int(a) for a in n.attrs["axes"]], keepdim=bool(n.attrs["keepdims"])),
    "lrn": _lrn,
    "layer_norm": _layer_norm,
    "truncate": lambda n, x: x,  # fixed-point rescaling only; identity on real numbers
}


def register_float(op: str, handler: Callable[..., Tensor]) -> None:
    """Give ``op`` its float meaning: ``handler(node, *input tensors) -> output tensor``.

    For ops whose meaning lives above the compiler: the guard's is MemGuard's plaintext reference, which
    :mod:`siguard.privacy.guard_float` registers. Registering an op twice with different handlers is an error.
    """
    known = OP_HANDLERS.get(op)
    if known is not None and known is not handler:
        raise ValueError(f"op {op!r} already has float semantics ({known.__module__}.{known.__qualname__})")
    OP_HANDLERS[op] = handler


class _Interpreter:
    """Walks the nodes in order, keeping a table of live float64 tensors."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.last_use: dict[str, int] = {}
        for k, node in enumerate(graph.nodes):
            for name in node.inputs:
                self.last_use[name] = k

    def run(self, inputs: dict[str, np.ndarray], *, keep_all: bool) -> dict[str, np.ndarray]:
        g = self.graph
        env: dict[str, Tensor] = {}
        for name in g.inputs:
            if name not in inputs:
                raise InputError(f"missing input {name!r} (graph inputs: {', '.join(g.inputs)})")
            arr = np.asarray(inputs[name], dtype=np.float64)
            expected = g.values[name].shape
            if tuple(arr.shape) != tuple(expected):
                raise InputError(f"input {name!r} has shape {tuple(arr.shape)}, expected {tuple(expected)}")
            env[name] = torch.from_numpy(arr.copy())
        kept = dict(env) if keep_all else {}
        outputs = set(g.outputs)
        for k, node in enumerate(g.nodes):
            result = self.run_node(node, [self._fetch(env, name, node) for name in node.inputs])
            env[node.outputs[0]] = result
            if keep_all:
                kept[node.outputs[0]] = result
            else:
                for name in set(node.inputs):
                    if self.last_use.get(name) == k and name not in outputs:
                        env.pop(name, None)
        if keep_all:
            for name, value in g.values.items():
                if value.is_const and name not in kept:
                    kept[name] = torch.from_numpy(np.asarray(value.data, dtype=np.float64))
            return {name: t.numpy() for name, t in kept.items()}
        missing = [o for o in g.outputs if o not in env]
        if missing:
            raise RuntimeError(f"graph outputs never computed: {missing}")
        return {name: env[name].numpy() for name in g.outputs}

    def _fetch(self, env: dict[str, Tensor], name: str, node: Node) -> Tensor:
        if name in env:
            return env[name]
        value = self.graph.values.get(name)
        if value is not None and value.is_const:
            return torch.from_numpy(np.asarray(value.data, dtype=np.float64))
        raise RuntimeError(f"node {node.name} ({node.op}) reads {name!r}, which is not computed yet")

    def run_node(self, node: Node, args: list[Tensor]) -> Tensor:
        """Execute one node on its input tensors; errors name the node."""
        handler = OP_HANDLERS.get(node.op)
        if handler is None:
            raise RuntimeError(f"node {node.name}: no float semantics for op {node.op!r}")
        try:
            return handler(node, *args)
        except Exception as e:
            shapes = [tuple(a.shape) for a in args]
            raise RuntimeError(f"node {node.name} ({node.op}, inputs {shapes}) failed: {e}") from e
