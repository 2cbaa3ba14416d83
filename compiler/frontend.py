"""ONNX frontend: read, check, convert, shape-infer, prune, fold and lower an ONNX model to the IR.

Pipeline of :func:`load_model` (each step fails with one clear :class:`~siguard.core.errors.ModelError` line):

1. read the file (external-data files beside it are loaded too, as torch's dynamo exporter writes
   them) or take a ``ModelProto``; run ``onnx.checker.check_model``; inline local functions;
   IR-version-3 conventions: initializers listed among the graph inputs are constants unless the
   caller names them in ``inputs`` (the model moves to IR version 4 so the tools below accept it);
2. choose the output (:func:`select_output`: ``output``, else the first float tensor output, else
   the probabilities feeding a skl2onnx classifier's ZipMap) and prune every node that does not
   feed it -- so a classifier's ArgMax/label branch never has to be supported;
3. reject op types that cannot be lowered, all of them in one :class:`UnsupportedOpsError`;
4. convert to opset :data:`TARGET_OPSET` (18) with ``onnx.version_converter``. 18 is the first opset
   in which every op we lower takes its axes/pads/split as *inputs* (ReduceMean & co. moved in 18),
   it is the oldest opset torch's dynamo exporter writes, and all tools here run it. A model the
   converter cannot take there (e.g. opset 20 with ``Gelu``, which has no down-adapter) is kept at
   its own opset; the lowering below reads both the attribute and the input forms;
5. fix the symbolic batch dimension (first dim of each graph input) to ``batch``; any other symbolic
   dimension is an error; fold weight-producing subgraphs (nodes whose inputs are all initializers:
   the model zoo's ConstantOfShape weights, constant Unsqueeze/Concat chains) into initializers;
   then strict ``onnx.shape_inference`` (with data propagation), whose failure names the first
   value it could not type and what produces it;
6. fold at compile time every node whose inputs are all constant (plus ``Shape``/``Size`` of a value
   with a static shape) with ``onnx.reference.ReferenceEvaluator`` -- this removes the
   Shape/Gather/Concat/Unsqueeze/ConstantOfShape/Cast/Range chains that feed Reshape and Expand;
7. lower each remaining ONNX node to IR ops per :mod:`siguard.compiler.ops`, with every attribute resolved
   (explicit pads, non-negative axes, static shapes).

Visibility rule:

* graph inputs are secret, owner ``"client"``;
* float constants (initializers or folded ``Constant`` tensors) that feed a *parameter slot* (Conv
  W/B, Gemm/MatMul weight and bias, BatchNormalization scale/bias/mean/var, PRelu slope,
  LayerNormalization scale/bias) or that have >= 2 elements are the model owner's secret weights
  (owner ``"model"``);
* scalar float constants elsewhere (0.5 and sqrt(2) of a decomposed GELU, a division by 255) are
  public architecture constants (owner None);
* integer tensors are public and must have been folded into attributes (shapes, indices, pads).

Initializers that are also listed as graph inputs (old exporters) are treated as constants. Graph
inputs the chosen output does not depend on are dropped. Value names keep the ONNX names where they
are made of ``[A-Za-z0-9_.-]`` (others are sanitized and made unique; ``graph.meta["onnx_names"]``
maps the changed ones back); ``Node.source`` is the ONNX node name (``OpType_<index>`` if empty).
"""

from __future__ import annotations

import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from siguard.compiler.ir import Graph, Node, Value
from siguard.compiler.ops import default_impl
from siguard.core.errors import InputError, ModelError, SiguardError, UnsupportedOpsError
from siguard.core.shapes import normalize_axis

__all__ = ["load_model", "select_output", "with_output", "SUPPORTED_ONNX_OPS", "CONSTANT_ONLY_ONNX_OPS", "TARGET_OPSET"]

TARGET_OPSET = 18

#: ONNX ops (default domain) that lower to IR ops, or are always evaluated at compile time.
SUPPORTED_ONNX_OPS: list[str] = sorted(
    [
        "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
        "ConstantOfShape", "Conv", "Div", "Dropout", "Erf", "Exp", "Flatten", "Gather", "Gelu", "Gemm",
        "Expand", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "LRN",
        "LayerNormalization", "LeakyRelu", "LogSoftmax", "MatMul", "MaxPool", "Mish", "Mul", "Neg", "PRelu",
        "Pad", "Pow", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize",
        "Shape", "Sigmoid", "Size", "Slice", "Softmax", "Softplus", "Split", "Sqrt", "Squeeze", "Sub", "Sum",
        "Swish", "Tanh", "Transpose", "Unsqueeze", "Where",
    ]
)  # fmt: skip

#: ONNX ops accepted only when all their inputs are constant (shape arithmetic, masks).
CONSTANT_ONLY_ONNX_OPS: list[str] = sorted(
    [
        "Abs", "And", "CastLike", "Ceil", "Equal", "Floor", "Greater", "GreaterOrEqual",
        "Less", "LessOrEqual", "Max", "Min", "Mod", "Not", "Or", "Range",
        "ReduceMin", "ReduceProd", "Tile",
    ]
)  # fmt: skip

_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
}
_DEFAULT_DOMAINS = ("", "ai.onnx")
_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")

# Input slots holding the model owner's parameters (secret whatever their size).
_PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2, 3, 4),
    "PRelu": (1,),
    "LayerNormalization": (1, 2),
}


def load_model(
    src: str | os.PathLike | onnx.ModelProto,
    *,
    batch: int = 1,
    output: str | None = None,
    inputs: list[str] | tuple[str, ...] | None = None,
) -> Graph:
    """Compile an ONNX model (path or ``ModelProto``) to an IR :class:`~siguard.compiler.ir.Graph`.

    ``batch`` replaces the symbolic first dimension of every graph input (a fixed first dimension
    is kept; asking for another batch than a fixed one is an error unless ``batch`` is 1).
    ``output`` names the ONNX value to compute (a graph output or any node output); by default the
    first float tensor graph output. ``inputs`` names graph inputs that stay the client's inputs
    even though an initializer of the same name gives them a default (IR version 3 lists every
    initializer among the graph inputs; by default such inputs are constants). The returned graph
    has one output, static shapes everywhere, and weights as float32/float64 arrays in ``Value.data``.

    Raises :class:`ModelError` (one line) for unreadable, invalid or un-inferable models,
    :class:`UnsupportedOpsError` listing every unsupported op type with all its nodes, and
    :class:`InputError` for a bad ``batch``.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise InputError(f"batch must be a positive integer, got {batch!r}")
    model, label, path = _read(src)
    try:
        return _Frontend(model, label, path, int(batch), output, tuple(inputs or ())).run()
    except SiguardError:
        raise
    except Exception as e:  # never a raw traceback for a bad model; the cause stays chained
        raise ModelError(f"{label}: cannot compile model: {type(e).__name__}: {_one_line(e)}") from e


# ---- which output: shared by compile, calibration, ``guard train`` and the audit -------------------

#: how to get a plain probability tensor out of skl2onnx (said when a classifier's outputs cannot be used)
REEXPORT_HINT = (
    "re-export with skl2onnx's options={id(model): {'zipmap': False}} (or to_onnx(..., options={'zipmap': False})), "
    "or name a float tensor with --output"
)
_OUTPUT_HINT = "name a float tensor with --output"


def _is_float_tensor(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type in _FLOAT_TYPES


def select_output(model: onnx.ModelProto, output: str | None = None, label: str = "model") -> str:
    """The ONNX value that ``compile`` computes (and that ``guard train`` and the audit read).

    1. ``output`` if given (any graph output or node output);
    2. else the first float tensor graph output;
    3. else, for a classifier exported by skl2onnx with its default ZipMap (outputs: an int64 label
       and a sequence of maps), the float tensor feeding the ZipMap node -- the probabilities;
    4. else a :class:`ModelError` listing the outputs and saying how to re-export.
    """
    if output is not None:
        return output
    g = model.graph
    for o in g.output:
        if _is_float_tensor(o):
            return o.name
    outputs = {o.name for o in g.output}
    for node in g.node:
        if node.op_type == "ZipMap" and node.domain == "ai.onnx.ml" and node.output[0] in outputs:
            return node.input[0]
    listing = ", ".join(f"{o.name} ({_type_name(o)})" for o in g.output)
    ml = any(n.domain == "ai.onnx.ml" for n in g.node) or any(not o.type.HasField("tensor_type") for o in g.output)
    raise ModelError(f"{label}: no float tensor output to compile (outputs: {listing}); "
                     f"{REEXPORT_HINT if ml else _OUTPUT_HINT}")  # fmt: skip


def with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose only graph output is ``name`` (a float tensor, e.g. what
    :func:`select_output` chose), so onnxruntime returns exactly the value compile computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    found = [o for o in g.output if o.name == name]
    vi = onnx.ValueInfoProto()
    if found:
        vi.CopyFrom(found[0])
    else:
        vi.name = name
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    g.ClearField("output")
    g.output.append(vi)
    return out


# ---- reading and checking ------------------------------------------------------------------------


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read(src: Any) -> tuple[onnx.ModelProto, str, Path | None]:
    if isinstance(src, onnx.ModelProto):
        return src, f"model {src.graph.name or '<unnamed>'}", None
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"expected a path or an onnx.ModelProto, got {type(src).__name__}")
    path = Path(src)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelError(f"model path is not a file: {path}")
    try:
        model = onnx.load(str(path))
    except FileNotFoundError as e:
        raise ModelError(f"{path}: external data file missing: {_one_line(e)}") from e
    except Exception as e:
        raise ModelError(f"{path}: not a valid ONNX model ({_one_line(e)})") from e
    return model, str(path), path


def _check(model: onnx.ModelProto, label: str, path: Path | None) -> None:
    if len(model.graph.node) == 0 and len(model.graph.output) == 0:
        raise ModelError(f"{label}: not a valid ONNX model (empty graph)")
    try:
        try:
            onnx.checker.check_model(model)
        except ValueError:
            if path is None:
                raise
            onnx.checker.check_model(str(path))  # > 2 GB: the checker must read the file itself
    except Exception as e:
        raise ModelError(f"{label}: ONNX checker failed: {_one_line(e)}") from e


def _sanitize(name: str) -> str:
    if _NAME_OK.match(name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_.\-]", "_", name).strip("_")
    return cleaned or "v"


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    """Attribute name -> Python value; strings decoded, float32 attributes as their shortest repr (1e-05)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, float):
            v = float(str(np.float32(v)))
        out[a.name] = v
    return out


def _subgraph_refs(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names that the subgraphs of ``node`` (If/Loop/Scan bodies) read."""
    refs: set[str] = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                refs.update(i for i in n.input if i)
                refs |= _subgraph_refs(n)
    return refs


def _default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in _DEFAULT_DOMAINS:
            return int(o.version)
    return 1


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


class _Unsupported(Exception):
    """Raised inside a lowering rule: this node (with this reason) cannot be compiled."""


# ---- the frontend --------------------------------------------------------------------------------


class _Frontend:
    """One compilation: ``run`` walks the numbered steps of the module docstring."""

    def __init__(
        self,
        model: onnx.ModelProto,
        label: str,
        path: Path | None,
        batch: int,
        output: str | None,
        inputs: tuple[str, ...] = (),
    ):
        self.model = model
        self.inputs = inputs
        self.label = label
        self.path = path
        self.batch = batch
        self.output = output
        self.warnings: list[str] = []

    def run(self) -> Graph:
        _check(self.model, self.label, self.path)
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        if model.functions:
            model = onnx.inliner.inline_local_functions(model)
        self.source_opset = _default_opset(model)
        for i, n in enumerate(model.graph.node):
            if not n.name:
                n.name = f"{n.op_type}_{i}"
        self._initializer_inputs(model)
        out_name, out_vi = self._choose_output(model)
        self._prune(model, out_name, out_vi)
        self._reject_unknown_ops(model)
        model = self._convert(model)
        self.opset = _default_opset(model)
        self._fix_batch(model)
        model, nodes, consts, info = self._fold(model, out_name)
        return _Lowering(self, model, nodes, consts, info, out_name).run()

    # -- 1b. IR-version-3 conventions --
    def _initializer_inputs(self, model: onnx.ModelProto) -> None:
        """Initializers listed as graph inputs are constants, except the inputs the user names.

        IR version 3 requires every initializer to be a graph input too (the value is the input's
        default); from IR version 4 on they need not be. The model is moved to IR version >= 4 with
        the defaults kept as constants, so the version converter and shape inference accept it.
        """
        g = model.graph
        inputs = {i.name for i in g.input}
        unknown = [n for n in self.inputs if n not in inputs]
        if unknown:
            listing = ", ".join(i.name for i in g.input) or "none"
            raise ModelError(f"{self.label}: unknown input {unknown[0]!r} (graph inputs: {listing})")
        named = set(self.inputs)
        if named:
            kept = [t for t in g.initializer if t.name not in named]
            g.ClearField("initializer")
            g.initializer.extend(kept)
        if model.ir_version < 4:
            model.ir_version = 4

    # -- 2. output choice and pruning --
    def _choose_output(self, model: onnx.ModelProto) -> tuple[str, onnx.ValueInfoProto]:
        outputs = {o.name: o for o in model.graph.output}
        listing = ", ".join(f"{o.name} ({_type_name(o)})" for o in model.graph.output)
        name = select_output(model, self.output, self.label)
        if self.output is None and name not in outputs:
            self.warnings.append(f"compiling {name!r}, the probabilities feeding the classifier's ZipMap")
        if name in outputs:
            vi = outputs[name]
        else:
            produced = {o for n in model.graph.node for o in n.output if o}
            if name not in produced:
                raise ModelError(f"{self.label}: unknown output {name!r} (graph outputs: {listing})")
            try:
                inferred = onnx.shape_inference.infer_shapes(model)
            except Exception:
                inferred = model
            found = [v for v in inferred.graph.value_info if v.name == name]
            vi = found[0] if found else helper.make_value_info(name, onnx.TypeProto())
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type not in _FLOAT_TYPES:
            raise ModelError(f"{self.label}: output {name!r} is a {_type_name(vi)} tensor; only float outputs compile")
        return name, vi

    def _prune(self, model: onnx.ModelProto, out_name: str, out_vi: onnx.ValueInfoProto) -> None:
        g = model.graph
        needed = {out_name}
        keep: list[onnx.NodeProto] = []
        for node in reversed(list(g.node)):
            if any(o in needed for o in node.output if o):
                keep.append(node)
                needed.update(i for i in node.input if i)
                needed |= _subgraph_refs(node)
        keep.reverse()
        inits = [t for t in g.initializer if t.name in needed]
        init_names = {t.name for t in inits}
        inputs = [i for i in g.input if i.name in needed and i.name not in init_names]
        vi = onnx.ValueInfoProto()
        vi.CopyFrom(out_vi)
        for field in ("node", "initializer", "input", "output", "value_info"):
            g.ClearField(field)
        g.node.extend(keep)
        g.initializer.extend(inits)
        g.input.extend(inputs)
        g.output.append(vi)

    # -- 3. op support, first pass (op types) --
    def _reject_unknown_ops(self, model: onnx.ModelProto) -> None:
        unsupported: dict[str, list[str]] = defaultdict(list)
        constish = {t.name for t in model.graph.initializer}
        for node in model.graph.node:
            key = _op_key(node)
            ins = [i for i in node.input if i]
            if node.domain not in _DEFAULT_DOMAINS:
                unsupported[key].append(node.name)
            elif node.op_type in ("Shape", "Size", "Constant"):
                constish.update(node.output)
            elif node.op_type in CONSTANT_ONLY_ONNX_OPS:
                if all(i in constish for i in ins):
                    constish.update(node.output)
                else:
                    unsupported[key].append(f"{node.name} (needs constant inputs)")
            elif node.op_type in SUPPORTED_ONNX_OPS:
                if all(i in constish for i in ins):
                    constish.update(node.output)
            else:
                unsupported[key].append(node.name)
        if unsupported:
            raise UnsupportedOpsError(dict(unsupported), SUPPORTED_ONNX_OPS)

    # -- 4. opset conversion --
    def _convert(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if self.source_opset == TARGET_OPSET:
            return model
        try:
            converted = onnx.version_converter.convert_version(model, TARGET_OPSET)
        except Exception as e:
            self.warnings.append(
                f"kept opset {self.source_opset}: version converter to {TARGET_OPSET} failed ({_one_line(e, 120)})"
            )
            return model
        for i, n in enumerate(converted.graph.node):  # adapters may add unnamed nodes
            if not n.name:
                n.name = f"{n.op_type}_converted_{i}"
        return converted

    # -- 5. batch dimension and shape inference --
    def _fix_batch(self, model: onnx.ModelProto) -> None:
        for inp in model.graph.input:
            if not inp.type.HasField("tensor_type"):
                raise ModelError(f"{self.label}: input {inp.name!r} is not a tensor")
            tt = inp.type.tensor_type
            if tt.elem_type not in _FLOAT_TYPES:
                raise ModelError(
                    f"{self.label}: input {inp.name!r} is {_type_name(inp)}; only float inputs can be secret-shared"
                )
            if not tt.HasField("shape"):
                raise ModelError(f"{self.label}: input {inp.name!r} has no shape; re-export with static shapes")
            for axis, dim in enumerate(tt.shape.dim):
                symbolic = not dim.HasField("dim_value")
                if axis == 0:
                    if symbolic:
                        dim.Clear()
                        dim.dim_value = self.batch
                    elif self.batch != 1 and dim.dim_value != self.batch:
                        raise ModelError(
                            f"{self.label}: input {inp.name!r} has a fixed batch dimension {dim.dim_value}; "
                            f"cannot compile for batch {self.batch} (re-export with a dynamic batch axis)"
                        )
                elif symbolic:
                    what = repr(dim.dim_param) if dim.dim_param else "an unknown dimension"
                    raise ModelError(
                        f"{self.label}: input {inp.name!r} has symbolic dimension {what} at axis {axis}; "
                        "only the first (batch) dimension may be symbolic"
                    )
        model.graph.ClearField("value_info")
        for out in model.graph.output:  # re-inferred from the fixed inputs
            if out.type.HasField("tensor_type"):
                out.type.tensor_type.ClearField("shape")

    def _infer(self, model: onnx.ModelProto) -> onnx.ModelProto:
        try:
            return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except Exception as e:
            where = _untyped_value(model)
            raise ModelError(f"{self.label}: shape inference failed: {where}{_one_line(e, 200)}") from e

    # -- 6. compile-time evaluation --
    def _prefold(self, model: onnx.ModelProto, consts: dict[str, np.ndarray]) -> onnx.ModelProto:
        """Evaluate weight-producing subgraphs (nodes whose inputs are all constants: ConstantOfShape
        of an initializer shape, constant Unsqueeze/Concat chains, ...) into initializers *before*
        the first shape inference, which then sees plain initializers instead of computed values."""
        remaining: list[onnx.NodeProto] = []
        folded = 0
        for node in model.graph.node:
            ins = [i for i in node.input if i]
            if (
                node.domain in _DEFAULT_DOMAINS
                and node.op_type not in ("Shape", "Size")
                and (node.op_type in SUPPORTED_ONNX_OPS or node.op_type in CONSTANT_ONLY_ONNX_OPS)
                and all(i in consts for i in ins)
                and not _subgraph_refs(node)
            ):
                values = self._evaluate(node, consts, None)
                if values is not None:
                    folded += 1
                    for name, arr in zip(node.output, values, strict=True):
                        if name:
                            consts[name] = arr
                    continue
            remaining.append(node)
        return self._rebuild(model, remaining, consts) if folded else model

    def _fold(
        self, model: onnx.ModelProto, out_name: str
    ) -> tuple[onnx.ModelProto, list[onnx.NodeProto], dict[str, np.ndarray], _Info]:
        """Fold constant nodes; returns the inferred model, its remaining nodes, constants, shapes."""
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        model = self._prefold(model, consts)
        nodes = list(model.graph.node)
        for _ in range(8):
            model = self._infer(model)
            info = _Info(model, consts)
            remaining: list[onnx.NodeProto] = []
            folded = 0
            for node in nodes:
                values = self._evaluate(node, consts, info)
                if values is None:
                    remaining.append(node)
                    continue
                folded += 1
                for name, arr in zip(node.output, values, strict=True):
                    if name:
                        consts[name] = arr
            nodes = remaining
            if folded == 0 or info.all_static(nodes, consts):
                break
            model = self._rebuild(model, nodes, consts)
        if out_name in consts:
            raise ModelError(f"{self.label}: output {out_name!r} is a constant; there is nothing to compute")
        return model, nodes, consts, info

    def _rebuild(self, model: onnx.ModelProto, nodes: list[onnx.NodeProto], consts: dict) -> onnx.ModelProto:
        used = {i for n in nodes for i in n.input if i} | {o.name for o in model.graph.output}
        for n in nodes:
            used |= _subgraph_refs(n)
        new = onnx.ModelProto()
        new.CopyFrom(model)
        g = new.graph
        g.ClearField("node")
        g.ClearField("initializer")
        g.ClearField("value_info")
        g.node.extend(nodes)
        for name in sorted(used & consts.keys()):
            g.initializer.append(numpy_helper.from_array(np.asarray(consts[name]), name))
        return new

    def _evaluate(self, node: onnx.NodeProto, consts: dict, info: _Info | None) -> list[np.ndarray] | None:
        """The outputs of ``node`` if they can be computed now, else None."""
        if node.domain not in _DEFAULT_DOMAINS:
            return None
        op = node.op_type
        ins = [i for i in node.input if i]
        if op in ("Shape", "Size") and ins[0] not in consts:
            shape = None if info is None else info.static_shape(ins[0])
            if shape is None:
                return None
            if op == "Size":
                return [np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)]
            a = _attrs(node)
            rank = len(shape)
            start, end = a.get("start", 0), a.get("end", rank)
            start = min(max(start + rank if start < 0 else start, 0), rank)
            end = min(max(end + rank if end < 0 else end, 0), rank)
            return [np.array(shape[start:end], dtype=np.int64)]
        if op not in SUPPORTED_ONNX_OPS and op not in CONSTANT_ONLY_ONNX_OPS:
            return None
        if not all(i in consts for i in ins) or _subgraph_refs(node):
            return None
        feeds = {i: np.asarray(consts[i]) for i in ins}
        try:
            results = _run_reference(node, feeds, self.opset)
        except Exception as e:
            raise ModelError(
                f"{self.label}: cannot evaluate constant node {node.name} ({op}): {_one_line(e, 150)}"
            ) from e
        return [np.asarray(r) for r in results]


def _untyped_value(model: onnx.ModelProto) -> str:
    """Where shape inference loses a type: the first value a node reads that has no type after a
    lenient inference, with what produces it ("" if every read value is typed)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        inferred = model
    g = inferred.graph
    typed = {vi.name for vi in list(g.input) + list(g.value_info) + list(g.output) if vi.type.HasField("tensor_type")}
    typed |= {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    for node in g.node:
        for v in node.input:
            if v and v not in typed:
                src = producer.get(v)
                origin = (
                    f"output of {src.op_type} node {src.name!r}, whose type could not be inferred"
                    if src is not None
                    else "neither a graph input, an initializer nor a node output"
                )
                return f"value {v!r} read by {node.op_type} node {node.name!r} has no type ({origin}); "
    return ""


def _type_name(vi: onnx.ValueInfoProto) -> str:
    if not vi.type.HasField("tensor_type"):
        return vi.type.WhichOneof("value") or "untyped"
    return onnx.TensorProto.DataType.Name(vi.type.tensor_type.elem_type).lower()


def _run_reference(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape)
        for name, arr in feeds.items()
    ]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in node.output if o]
    graph = helper.make_graph([node], "fold", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    results = ReferenceEvaluator(model).run(None, feeds)
    named = dict(zip([o for o in node.output if o], results, strict=False))
    return [named.get(o) for o in node.output]


class _Info:
    """Static shapes and element types from an inferred model (plus the constants' own)."""

    def __init__(self, model: onnx.ModelProto, consts: dict[str, np.ndarray]):
        self.consts = consts
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.types: dict[str, int] = {}
        g = model.graph
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            self.types[vi.name] = tt.elem_type
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                self.shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
            else:
                self.shapes.setdefault(vi.name, None)

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        if name in self.consts:
            return tuple(np.shape(self.consts[name]))
        return self.shapes.get(name)

    def is_float(self, name: str) -> bool:
        if name in self.consts:
            return np.issubdtype(np.asarray(self.consts[name]).dtype, np.floating)
        return self.types.get(name, onnx.TensorProto.FLOAT) in _FLOAT_TYPES

    def all_static(self, nodes: list[onnx.NodeProto], consts: dict) -> bool:
        """True if every value the remaining nodes read or write has a static shape."""
        return all(self.static_shape(v) is not None for n in nodes for v in list(n.input) + list(n.output) if v)


# ---- lowering ------------------------------------------------------------------------------------


def _norm_axis(axis: int, rank: int) -> int:
    try:
        return normalize_axis(axis, rank)
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None


def _ints(values: Any) -> list[int]:
    return [int(v) for v in np.asarray(values).reshape(-1)]


class _Lowering:
    """Step 7: ONNX nodes (all shapes static, constants folded) -> IR nodes."""

    def __init__(self, fe: _Frontend, model: onnx.ModelProto, nodes: list, consts: dict, info: _Info, out_name: str):
        self.fe = fe
        self.label = fe.label
        self.opset = fe.opset
        self.model = model
        self.consts = consts
        self.info = info
        self.out_name = out_name
        self.graph = Graph(_sanitize(model.graph.name or (fe.path.stem if fe.path else "model")))
        self.ir_names: dict[str, str] = {}  # onnx value name -> IR value name
        self.node_names: set[str] = set()
        self.unsupported: dict[str, list[str]] = defaultdict(list)
        self.nodes = nodes
        self.uses = Counter(i for n in nodes for i in n.input if i)
        self.uses[out_name] += 1
        self.param_consts = {
            n.input[k]
            for n in nodes
            if n.domain in _DEFAULT_DOMAINS
            for k in _PARAM_SLOTS.get(n.op_type, ())
            if k < len(n.input) and n.input[k] in consts
        }

    # -- naming and values --
    def _unique_value_name(self, onnx_name: str) -> str:
        base = _sanitize(onnx_name)
        name = base
        k = 1
        while name in self.graph.values:
            k += 1
            name = f"{base}_{k}"
        return name

    def ir(self, onnx_name: str) -> str:
        """IR name of an ONNX value that is already defined (input, node output or constant)."""
        if onnx_name in self.ir_names:
            return self.ir_names[onnx_name]
        if onnx_name in self.consts:
            arr = np.asarray(self.consts[onnx_name])
            if not np.issubdtype(arr.dtype, np.floating):
                raise _Unsupported(f"integer tensor {onnx_name!r} used as data")
            return self._add_const(onnx_name, arr)
        raise _Unsupported(f"value {onnx_name!r} is not available")

    def _add_const(self, onnx_name: str, arr: np.ndarray, *, secret: bool | None = None) -> str:
        arr = np.asarray(arr)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float32)
        if secret is None:
            secret = onnx_name in self.param_consts or arr.size >= 2
        name = self._unique_value_name(onnx_name)
        self.graph.add_value(
            Value(
                name,
                tuple(int(d) for d in arr.shape),
                visibility="secret" if secret else "public",
                owner="model" if secret else None,
                data=arr,
            )
        )
        if onnx_name not in self.ir_names:
            self.ir_names[onnx_name] = name
        if name != onnx_name:
            self.graph.meta.setdefault("onnx_names", {})[name] = onnx_name
        return name

    def derived_const(self, onnx_name: str, arr: np.ndarray) -> str:
        """A transformed copy of a constant (transposed/scaled weight), reusing the name if unshared."""
        secret = onnx_name in self.param_consts or np.asarray(self.consts[onnx_name]).size >= 2
        if self.uses[onnx_name] == 1 and onnx_name not in self.ir_names:
            return self._add_const(onnx_name, arr, secret=secret)
        return self._add_const(f"{onnx_name}_{self.base}", arr, secret=secret)

    def public_scalar(self, value: float) -> str:
        return self._add_const(f"{self.base}_const", np.array(value, dtype=np.float32), secret=False)

    def emit(self, op: str, inputs: list[str], attrs: dict[str, Any], shape, out: str | None = None) -> str:
        """Append one IR node; ``out`` is the ONNX output it defines (else a fresh intermediate)."""
        if out is not None:
            name = self._unique_value_name(out)
            self.ir_names[out] = name
            if name != out:
                self.graph.meta.setdefault("onnx_names", {})[name] = out
        else:
            name = self.graph.fresh_name(self.base)
        self.graph.add_value(Value(name, tuple(int(d) for d in shape)))
        node_name = self.base
        k = 1
        while node_name in self.node_names:
            k += 1
            node_name = f"{self.base}_{k}"
        self.node_names.add(node_name)
        self.graph.add_node(Node(node_name, op, list(inputs), [name], attrs, impl=default_impl(op), source=self.source))
        return name

    # -- inputs of the node being lowered --
    def inp(self, k: int) -> str | None:
        n = self.node
        return n.input[k] if k < len(n.input) and n.input[k] else None

    def shape(self, onnx_name: str) -> tuple[int, ...]:
        s = self.info.static_shape(onnx_name)
        if s is None:
            raise _Unsupported(f"shape of {onnx_name!r} is not static")
        return s

    def out_shape(self, k: int = 0) -> tuple[int, ...]:
        return self.shape(self.node.output[k])

    def const_input(self, k: int, what: str) -> np.ndarray | None:
        name = self.inp(k)
        if name is None:
            return None
        if name not in self.consts:
            raise _Unsupported(f"{what} is not a constant")
        return np.asarray(self.consts[name])

    def require_unused_outputs(self, first: int, what: str) -> None:
        for o in self.node.output[first:]:
            if o and self.uses[o]:
                raise _Unsupported(f"output {what} is used")

    # -- driver --
    def run(self) -> Graph:
        g = self.graph
        for inp in self.model.graph.input:
            name = self._unique_value_name(inp.name)
            self.ir_names[inp.name] = name
            shape = self.info.static_shape(inp.name)
            g.add_value(Value(name, tuple(shape or ()), visibility="secret", owner="client"))
            g.inputs.append(name)
            if name != inp.name:
                g.meta.setdefault("onnx_names", {})[name] = inp.name
        for node in self.nodes:
            self.node = node
            self.source = node.name
            self.base = _sanitize(node.name)
            self.attrs = _attrs(node)
            try:
                for o in node.output:
                    if o and (self.uses[o] or o == node.output[0]) and self.info.static_shape(o) is None:
                        raise _Unsupported(f"shape of {o!r} is not static")
                rule = getattr(self, f"_lower_{node.op_type}", None)
                if rule is None:
                    raise _Unsupported("not lowerable")
                rule()
            except _Unsupported as e:
                self.unsupported[_op_key(node)].append(f"{node.name} ({e})")
                for o in node.output:  # placeholders so later nodes still lower and report
                    if o and o not in self.ir_names:
                        self.ir_names[o] = self._unique_value_name(o)
                        g.add_value(Value(self.ir_names[o], tuple(self.info.static_shape(o) or ())))
        if self.unsupported:
            raise UnsupportedOpsError(dict(self.unsupported), SUPPORTED_ONNX_OPS)
        g.outputs = [self.ir_names[self.out_name]]
        g.remove_unused()
        g.meta.update(
            {
                "source": self.label,
                "onnx_opset": self.fe.source_opset,
                "opset": self.opset,
                "producer": f"{self.model.producer_name} {self.model.producer_version}".strip(),
                "batch": self.fe.batch,
                "onnx_output": self.out_name,
                "warnings": list(self.fe.warnings),
            }
        )
        return g

    # -- elementwise --
    def _unary(self, op: str, attrs: dict[str, Any] | None = None) -> None:
        self.emit(op, [self.ir(self.node.input[0])], attrs or {}, self.out_shape(), self.node.output[0])

    def _binary(self, op: str) -> None:
        a, b = self.node.input[0], self.node.input[1]
        for v in (a, b):
            if not self.info.is_float(v):
                raise _Unsupported(f"integer operand {v!r}")
        self.emit(op, [self.ir(a), self.ir(b)], {}, self.out_shape(), self.node.output[0])

    def _lower_Add(self) -> None:
        self._binary("add")

    def _lower_Sub(self) -> None:
        self._binary("sub")

    def _lower_Mul(self) -> None:
        self._binary("mul")

    def _lower_Div(self) -> None:
        self._binary("div")

    def _lower_Sum(self) -> None:
        ins = [i for i in self.node.input if i]
        if len(ins) == 1:
            self._unary("identity")
            return
        acc = self.ir(ins[0])
        for k, other in enumerate(ins[1:], start=1):
            last = k == len(ins) - 1
            shape = self.out_shape() if last else np.broadcast_shapes(self.graph.values[acc].shape, self.shape(other))
            acc = self.emit("add", [acc, self.ir(other)], {}, shape, self.node.output[0] if last else None)

    def _lower_Neg(self) -> None:
        self._unary("neg")

    def _lower_Relu(self) -> None:
        self._unary("relu")

    def _lower_Sigmoid(self) -> None:
        self._unary("sigmoid")

    def _lower_Tanh(self) -> None:
        self._unary("tanh")

    def _lower_Exp(self) -> None:
        self._unary("exp")

    def _lower_Sqrt(self) -> None:
        self._unary("sqrt")

    def _lower_Reciprocal(self) -> None:
        self._unary("reciprocal")

    def _lower_Erf(self) -> None:
        self._unary("erf")

    def _lower_Softplus(self) -> None:
        self._unary("softplus")

    def _lower_Identity(self) -> None:
        self._unary("identity")

    def _lower_Dropout(self) -> None:
        self.require_unused_outputs(1, "mask")
        self._unary("identity")

    def _lower_Cast(self) -> None:
        to = int(self.attrs.get("to", 0))
        if to not in _FLOAT_TYPES or not self.info.is_float(self.node.input[0]):
            raise _Unsupported(
                f"cast to {onnx.TensorProto.DataType.Name(to).lower()} of a non-constant value"
                if to not in _FLOAT_TYPES
                else "cast of an integer value to float"
            )
        self._unary("identity")

    def _lower_Pow(self) -> None:
        """x ** c for a constant c: an integer 1 <= |c| <= 16 by square-and-multiply (floor(log2 |c|)
        squarings and popcount(|c|) - 1 more products; a negative c then takes the reciprocal), or
        0.5, -0.5 (decomposed norms write x ** 2, x ** 0.5)."""
        x = self.node.input[0]
        c = self.const_input(1, "exponent")
        if c is None or c.size != 1:
            raise _Unsupported("exponent is not a constant scalar")
        e = float(c.reshape(-1)[0])
        shape, out = self.out_shape(), self.node.output[0]
        ref = self.ir(x)
        if e in (0.5, -0.5):
            root = self.emit("sqrt", [ref], {}, shape, out if e == 0.5 else None)
            if e == -0.5:
                self.emit("reciprocal", [root], {}, shape, out)
            return
        if e != int(e) or not 1 <= abs(e) <= 16:
            raise _Unsupported(f"exponent {e:g} (supported: integers 1 to 16 and their negatives, 0.5, -0.5)")
        n = abs(int(e))
        final = out if e > 0 else None  # the last product is the output, unless a reciprocal follows
        if n == 1:
            power = self.emit("identity", [ref], {}, shape, out) if e > 0 else ref
        else:
            m = n.bit_length() - 1
            squares = [ref]
            for k in range(1, m + 1):  # x^(2^k)
                name = final if (k == m and n == 1 << m) else None
                squares.append(self.emit("mul", [squares[-1], squares[-1]], {}, shape, name))
            factors = [squares[k] for k in range(m + 1) if n >> k & 1]
            power = factors[0]
            for k, f in enumerate(factors[1:], start=2):
                power = self.emit("mul", [power, f], {}, shape, final if k == len(factors) else None)
        if e < 0:
            self.emit("reciprocal", [power], {}, shape, out)

    def _lower_LeakyRelu(self) -> None:
        self._unary("leaky_relu", {"alpha": float(self.attrs.get("alpha", 0.01))})

    def _lower_PRelu(self) -> None:
        x, slope = self.node.input[0], self.node.input[1]
        x_shape = self.shape(x)
        s_shape = self.shape(slope)
        if self.fe.source_opset < 7 and len(s_shape) == 1 and len(x_shape) > 2 and s_shape[0] == x_shape[1] > 1:
            # PRelu-6 applies a 1-D slope per channel (axis 1); from opset 7 it broadcasts from the
            # right, and the version converter leaves the slope as it is.
            c_shape = (s_shape[0],) + (1,) * (len(x_shape) - 2)
            if slope not in self.consts:
                raise _Unsupported("per-channel slope of PRelu-6 is not a constant")
            ref = self.derived_const(slope, np.asarray(self.consts[slope]).reshape(c_shape))
        else:
            ref = self.ir(slope)
        self.emit("prelu", [self.ir(x), ref], {}, self.out_shape(), self.node.output[0])

    def _lower_HardSigmoid(self) -> None:
        self._unary(
            "hard_sigmoid", {"alpha": float(self.attrs.get("alpha", 0.2)), "beta": float(self.attrs.get("beta", 0.5))}
        )

    def _lower_HardSwish(self) -> None:
        self._unary("hard_swish")

    def _lower_Mish(self) -> None:
        """x * tanh(softplus(x)), composed from the softplus and tanh implementations."""
        x, shape = self.ir(self.node.input[0]), self.out_shape()
        sp = self.emit("softplus", [x], {}, shape)
        th = self.emit("tanh", [sp], {}, shape)
        self.emit("mul", [x, th], {}, shape, self.node.output[0])

    def _lower_Swish(self) -> None:
        """x * sigmoid(alpha * x) (opset 24's Swish; older exports write Sigmoid and Mul)."""
        alpha = float(self.attrs.get("alpha", 1.0))
        x, shape = self.ir(self.node.input[0]), self.out_shape()
        scaled = x if alpha == 1.0 else self.emit("mul", [x, self.public_scalar(alpha)], {}, shape)
        s = self.emit("sigmoid", [scaled], {}, shape)
        self.emit("mul", [x, s], {}, shape, self.node.output[0])

    def _lower_Gelu(self) -> None:
        approx = self.attrs.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise _Unsupported(f"approximate={approx!r}")
        self._unary("gelu", {"approximate": approx})

    def _lower_Clip(self) -> None:
        if self.opset < 11:
            lo = self.attrs.get("min")
            hi = self.attrs.get("max")
        else:
            lo_a = self.const_input(1, "min")
            hi_a = self.const_input(2, "max")
            lo = None if lo_a is None else float(lo_a.reshape(-1)[0])
            hi = None if hi_a is None else float(hi_a.reshape(-1)[0])
        if lo is None and hi is None:
            self._unary("identity")
        else:
            self._unary("clip", {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)})

    def _lower_LRN(self) -> None:
        if "size" not in self.attrs:
            raise _Unsupported("missing size")
        self._unary(
            "lrn",
            {
                "size": int(self.attrs["size"]),
                "alpha": float(self.attrs.get("alpha", 1e-4)),
                "beta": float(self.attrs.get("beta", 0.75)),
                "bias": float(self.attrs.get("bias", 1.0)),
            },
        )

    def _softmax(self, op: str) -> None:
        x = self.node.input[0]
        shape = self.shape(x)
        rank = len(shape)
        if self.opset >= 13:
            self._unary(op, {"axis": _norm_axis(self.attrs.get("axis", -1), rank)})
            return
        axis = _norm_axis(self.attrs.get("axis", 1), rank)  # opset < 13: coerce to 2-D at ``axis``
        if int(np.prod(shape[axis + 1 :], dtype=np.int64)) == 1:
            self._unary(op, {"axis": axis})
            return
        flat = (int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64)))
        t = self.emit("reshape", [self.ir(x)], {"shape": list(flat)}, flat)
        t = self.emit(op, [t], {"axis": 1}, flat)
        self.emit("reshape", [t], {"shape": list(shape)}, shape, self.node.output[0])

    def _lower_Softmax(self) -> None:
        self._softmax("softmax")

    def _lower_LogSoftmax(self) -> None:
        self._softmax("log_softmax")

    # -- linear algebra --
    def _lower_MatMul(self) -> None:
        a, b = self.node.input[0], self.node.input[1]
        self.emit("matmul", [self.ir(a), self.ir(b)], {}, self.out_shape(), self.node.output[0])

    def _lower_Gemm(self) -> None:
        a_name, b_name, c_name = self.inp(0), self.inp(1), self.inp(2)
        alpha = float(self.attrs.get("alpha", 1.0))
        beta = float(self.attrs.get("beta", 1.0))
        trans_a, trans_b = int(self.attrs.get("transA", 0)), int(self.attrs.get("transB", 0))
        out_shape = self.out_shape()
        n_out = out_shape[-1]

        def operand(name: str, trans: int, scale: float) -> str:
            if name in self.consts:
                arr = np.asarray(self.consts[name])
                if trans or scale != 1.0:
                    arr = (arr.T if trans else arr) * np.asarray(scale, dtype=arr.dtype)
                    return self.derived_const(name, arr)
                return self.ir(name)
            ref = self.ir(name)
            if trans:
                s = self.shape(name)
                ref = self.emit("transpose", [ref], {"perm": [1, 0]}, (s[1], s[0]))
            return ref

        a = operand(a_name, trans_a, 1.0)
        b = operand(b_name, trans_b, alpha if b_name in self.consts else 1.0)
        if alpha != 1.0 and b_name not in self.consts:
            if a_name in self.consts:
                a = self.derived_const(a_name, np.asarray(self.graph.values[a].data) * alpha)
            else:
                a = self.emit("mul", [a, self.public_scalar(alpha)], {}, self.graph.values[a].shape)
        if c_name is None or beta == 0.0:
            self.emit("matmul", [a, b], {}, out_shape, self.node.output[0])
            return
        if c_name in self.consts:
            c = np.asarray(self.consts[c_name])
            c = c * np.asarray(beta, dtype=c.dtype) if beta != 1.0 else c
            if c.size == n_out and c.ndim >= 1 and c.shape[-1] == n_out:
                bias = self.derived_const(c_name, c.reshape(n_out)) if c.ndim != 1 or beta != 1.0 else self.ir(c_name)
                self.emit("matmul", [a, b, bias], {}, out_shape, self.node.output[0])
                return
            c_ref = self.derived_const(c_name, c) if beta != 1.0 else self.ir(c_name)
        else:
            c_ref = self.ir(c_name)
            if beta != 1.0:
                c_ref = self.emit("mul", [c_ref, self.public_scalar(beta)], {}, self.shape(c_name))
        t = self.emit("matmul", [a, b], {}, out_shape)
        self.emit("add", [t, c_ref], {}, out_shape, self.node.output[0])

    # -- convolution and pooling --
    def _spatial(self, x: str, what: str) -> tuple[int, ...]:
        shape = self.shape(x)
        if len(shape) != 4:
            raise _Unsupported(f"{what} on a rank-{len(shape)} input (only 2-D, NCHW)")
        return shape

    def _pads(
        self, in_hw: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int], ceil_mode: bool
    ) -> tuple[list[int], list[int]]:
        """Explicit (top, left, bottom, right) pads, and the extra end padding ceil_mode adds."""
        auto_pad = self.attrs.get("auto_pad", "NOTSET")
        eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begins, ends = [], []
            for size, s, e in zip(in_hw, strides, eff, strict=True):
                total = max(0, (-(-size // s) - 1) * s + e - size)
                small = total // 2
                begins.append(small if auto_pad == "SAME_UPPER" else total - small)
                ends.append(total - small if auto_pad == "SAME_UPPER" else small)
            return begins + ends, [0, 0]
        if auto_pad == "VALID":
            pads = [0, 0, 0, 0]
        elif auto_pad in ("NOTSET", ""):
            pads = [int(p) for p in self.attrs.get("pads", [0, 0, 0, 0])]
        else:
            raise _Unsupported(f"auto_pad={auto_pad!r}")
        extra = [0, 0]
        if ceil_mode:
            for i, (size, s, e) in enumerate(zip(in_hw, strides, eff, strict=True)):
                padded = size + pads[i] + pads[i + 2]
                out = -(-(padded - e) // s) + 1
                if (out - 1) * s >= size + pads[i]:  # the last window may not start in the end padding
                    out -= 1
                extra[i] = max(0, (out - 1) * s + e - padded)
        return pads, extra

    def _spatial_input(self, x: str, what: str) -> tuple[str, tuple[int, ...], bool]:
        """IR ref and NCHW shape of a Conv/pool input; a 1-D (NCL) input is lifted to (N, C, 1, L).

        Lifting rewrites ``self.attrs`` into the 2-D form (a leading kernel/stride/dilation of 1,
        no padding on the new axis); :meth:`_spatial_output` reshapes the result back.
        """
        shape = self.shape(x)
        if len(shape) != 3:
            return self.ir(x), self._spatial(x, what), False
        s4 = (shape[0], shape[1], 1, shape[2])
        ref = self.emit("reshape", [self.ir(x)], {"shape": list(s4)}, s4)
        a = self.attrs
        for key in ("kernel_shape", "strides", "dilations"):
            if key in a:
                a[key] = [1] + [int(v) for v in a[key]]
        if "pads" in a:
            begin, end = (int(v) for v in a["pads"])
            a["pads"] = [0, begin, 0, end]
        return ref, s4, True

    def _spatial_output(self, op: str, inputs: list[str], attrs: dict[str, Any], lifted: bool) -> None:
        out = self.out_shape()
        if not lifted:
            self.emit(op, inputs, attrs, out, self.node.output[0])
            return
        t = self.emit(op, inputs, attrs, (out[0], out[1], 1, out[2]))
        self.emit("reshape", [t], {"shape": list(out)}, out, self.node.output[0])

    def _lower_Conv(self) -> None:
        x, w, b = self.inp(0), self.inp(1), self.inp(2)
        ref, shape, lifted = self._spatial_input(x, "Conv")
        w_shape = self.shape(w)
        w_ref = self.ir(w)
        if lifted:
            w4 = (w_shape[0], w_shape[1], 1, w_shape[2])
            if w in self.consts:
                w_ref = self.derived_const(w, np.asarray(self.consts[w]).reshape(w4))
            else:
                w_ref = self.emit("reshape", [w_ref], {"shape": list(w4)}, w4)
            w_shape = w4
        kernel = [int(k) for k in self.attrs.get("kernel_shape", w_shape[2:])]
        strides = [int(s) for s in self.attrs.get("strides", [1, 1])]
        dilations = [int(d) for d in self.attrs.get("dilations", [1, 1])]
        pads, _ = self._pads(shape[2:], kernel, strides, dilations, False)
        inputs = [ref, w_ref] + ([self.ir(b)] if b else [])
        attrs = {"strides": strides, "pads": pads, "dilations": dilations, "group": int(self.attrs.get("group", 1))}
        self._spatial_output("conv", inputs, attrs, lifted)

    def _lower_MaxPool(self) -> None:
        self.require_unused_outputs(1, "Indices")
        ref, shape, lifted = self._spatial_input(self.node.input[0], "MaxPool")
        kernel = [int(k) for k in self.attrs["kernel_shape"]]
        strides = [int(s) for s in self.attrs.get("strides", [1, 1])]
        dilations = [int(d) for d in self.attrs.get("dilations", [1, 1])]
        pads, extra = self._pads(shape[2:], kernel, strides, dilations, bool(self.attrs.get("ceil_mode", 0)))
        pads = [pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1]]
        attrs = {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dilations}
        self._spatial_output("maxpool", [ref], attrs, lifted)

    def _lower_AveragePool(self) -> None:
        ref, shape, lifted = self._spatial_input(self.node.input[0], "AveragePool")
        kernel = [int(k) for k in self.attrs["kernel_shape"]]
        strides = [int(s) for s in self.attrs.get("strides", [1, 1])]
        dilations = [int(d) for d in self.attrs.get("dilations", [1, 1])]
        if dilations != [1, 1]:
            raise _Unsupported("dilated average pooling")
        include = bool(self.attrs.get("count_include_pad", 0))
        pads, extra = self._pads(shape[2:], kernel, strides, dilations, bool(self.attrs.get("ceil_mode", 0)))
        if include and any(extra) and any(pads):
            # The explicit pads count in the divisor, ceil_mode's extra end padding does not:
            # pad explicitly with zeros, then pool counting only the (now real) elements.
            padded = (shape[0], shape[1], shape[2] + pads[0] + pads[2], shape[3] + pads[1] + pads[3])
            ref = self.emit(
                "pad", [ref], {"pads": [0, 0, pads[0], pads[1], 0, 0, pads[2], pads[3]], "value": 0.0}, padded
            )
            pads, include = [0, 0, 0, 0], False
        elif include and any(extra):
            include = False  # no explicit pads: only the ceil overhang, which is never counted
        pads = [pads[0], pads[1], pads[2] + extra[0], pads[3] + extra[1]]
        attrs = {"kernel": kernel, "strides": strides, "pads": pads, "count_include_pad": include}
        self._spatial_output("avgpool", [ref], attrs, lifted)

    def _lower_GlobalAveragePool(self) -> None:
        rank = len(self.shape(self.node.input[0]))
        self._unary("reduce_mean", {"axes": list(range(2, rank)), "keepdims": True})

    def _lower_GlobalMaxPool(self) -> None:
        shape = self._spatial(self.node.input[0], "GlobalMaxPool")
        attrs = {"kernel": [shape[2], shape[3]], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1]}
        self._unary("maxpool", attrs)

    # -- normalisation --
    def _lower_BatchNormalization(self) -> None:
        self.require_unused_outputs(1, "running statistics (training mode)")
        if int(self.attrs.get("training_mode", 0)):
            raise _Unsupported("training_mode=1")
        if self.opset < 9 and not int(self.attrs.get("spatial", 1)):
            raise _Unsupported("spatial=0")
        x = self.node.input[0]
        if len(self.shape(x)) < 2:
            raise _Unsupported("input of rank < 2")
        inputs = [self.ir(i) for i in self.node.input[:5]]
        self.emit("batchnorm", inputs, {"epsilon": float(self.attrs.get("epsilon", 1e-5))}, self.out_shape(),
                  self.node.output[0])  # fmt: skip

    def _lower_LayerNormalization(self) -> None:
        self.require_unused_outputs(1, "Mean/InvStdDev")
        x, scale, bias = self.inp(0), self.inp(1), self.inp(2)
        rank = len(self.shape(x))
        inputs = [self.ir(x), self.ir(scale)] + ([self.ir(bias)] if bias else [])
        attrs = {
            "axis": _norm_axis(self.attrs.get("axis", -1), rank),
            "epsilon": float(self.attrs.get("epsilon", 1e-5)),
        }
        self.emit("layer_norm", inputs, attrs, self.out_shape(), self.node.output[0])

    # -- reductions --
    def _reduce(self, op: str, axes_as_input: bool) -> None:
        x = self.node.input[0]
        rank = len(self.shape(x))
        if axes_as_input:
            arr = self.const_input(1, "axes")
            axes = None if arr is None else _ints(arr)
        else:
            axes = self.attrs.get("axes")
        if not axes:
            if axes_as_input and int(self.attrs.get("noop_with_empty_axes", 0)):
                self._unary("identity")
                return
            axes = list(range(rank))
        axes = sorted({_norm_axis(a, rank) for a in axes})
        self._unary(op, {"axes": axes, "keepdims": bool(self.attrs.get("keepdims", 1))})

    def _lower_ReduceMax(self) -> None:
        self._reduce("reduce_max", self.opset >= 18)

    def _lower_ReduceMean(self) -> None:
        self._reduce("reduce_mean", self.opset >= 18)

    def _lower_ReduceSum(self) -> None:
        self._reduce("reduce_sum", self.opset >= 13)

    # -- layout --
    def _reshape_to(self, shape: tuple[int, ...]) -> None:
        self._unary("reshape", {"shape": [int(d) for d in shape]})

    def _lower_Reshape(self) -> None:
        x = self.node.input[0]
        in_shape = self.shape(x)
        target = _ints(self.const_input(1, "shape"))
        allowzero = int(self.attrs.get("allowzero", 0))
        resolved = [in_shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
        if -1 in resolved:
            known = int(np.prod([d for d in resolved if d != -1], dtype=np.int64))
            total = int(np.prod(in_shape, dtype=np.int64))
            resolved[resolved.index(-1)] = total // known if known else 0
        if int(np.prod(resolved, dtype=np.int64)) != int(np.prod(in_shape, dtype=np.int64)):
            raise _Unsupported(f"cannot reshape {in_shape} to {target}")
        self._reshape_to(tuple(resolved))

    def _lower_Flatten(self) -> None:
        shape = self.shape(self.node.input[0])
        axis = int(self.attrs.get("axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        self._reshape_to((int(np.prod(shape[:axis], dtype=np.int64)), int(np.prod(shape[axis:], dtype=np.int64))))

    def _lower_Squeeze(self) -> None:
        shape = self.shape(self.node.input[0])
        if self.opset >= 13:
            arr = self.const_input(1, "axes")
            axes = None if arr is None else _ints(arr)
        else:
            axes = self.attrs.get("axes")
        if axes is None or len(axes) == 0:
            drop = {i for i, d in enumerate(shape) if d == 1}
        else:
            drop = {_norm_axis(a, len(shape)) for a in axes}
        self._reshape_to(tuple(d for i, d in enumerate(shape) if i not in drop))

    def _lower_Unsqueeze(self) -> None:
        shape = list(self.shape(self.node.input[0]))
        axes = _ints(self.const_input(1, "axes")) if self.opset >= 13 else list(self.attrs.get("axes", []))
        rank = len(shape) + len(axes)
        for a in sorted(_norm_axis(a, rank) for a in axes):
            shape.insert(a, 1)
        self._reshape_to(tuple(shape))

    def _lower_Transpose(self) -> None:
        rank = len(self.shape(self.node.input[0]))
        perm = [int(p) for p in self.attrs.get("perm", list(reversed(range(rank))))]
        self._unary("transpose", {"perm": [_norm_axis(p, rank) for p in perm]})

    def _lower_Concat(self) -> None:
        ins = [i for i in self.node.input if i]
        rank = len(self.out_shape())
        for v in ins:
            if not self.info.is_float(v):
                raise _Unsupported(f"integer operand {v!r}")
        axis = _norm_axis(self.attrs["axis"], rank)
        self.emit("concat", [self.ir(i) for i in ins], {"axis": axis}, self.out_shape(), self.node.output[0])

    def _lower_Split(self) -> None:
        x = self.node.input[0]
        shape = self.shape(x)
        axis = _norm_axis(self.attrs.get("axis", 0), len(shape))
        if self.opset >= 13:
            arr = self.const_input(1, "split")
            sizes = None if arr is None else _ints(arr)
        else:
            sizes = list(self.attrs["split"]) if "split" in self.attrs else None
        if sizes is None:
            sizes = [self.shape(o)[axis] for o in self.node.output]
        start = 0
        for o, size in zip(self.node.output, sizes, strict=False):
            if o:
                attrs = {"starts": [start], "ends": [start + int(size)], "axes": [axis], "steps": [1]}
                self.emit("slice", [self.ir(x)], attrs, self.shape(o), o)
            start += int(size)

    def _lower_Pad(self) -> None:
        mode = self.attrs.get("mode", "constant")
        if mode not in ("constant", "reflect", "edge"):
            raise _Unsupported(f"mode {mode!r} (constant, reflect and edge padding only)")
        x = self.node.input[0]
        shape = self.shape(x)
        rank = len(shape)
        if self.opset >= 11:
            pads = _ints(self.const_input(1, "pads"))
            value_arr = self.const_input(2, "constant_value")
            value = 0.0 if value_arr is None or value_arr.size == 0 else float(value_arr.reshape(-1)[0])
            axes_arr = self.const_input(3, "axes")
        else:
            pads = [int(p) for p in self.attrs.get("pads", self.attrs.get("paddings", []))]
            value, axes_arr = float(self.attrs.get("value", 0.0)), None
        if axes_arr is not None:
            axes = [_norm_axis(a, rank) for a in _ints(axes_arr)]
            full = [0] * (2 * rank)
            for j, a in enumerate(axes):
                full[a], full[a + rank] = pads[j], pads[j + len(axes)]
            pads = full
        if len(pads) != 2 * rank:
            raise _Unsupported(f"{len(pads)} pads for rank {rank}")
        if mode != "constant":
            self._pad_by_gather(x, shape, pads, mode)
            return
        grow = [max(p, 0) for p in pads]
        crop = [min(p, 0) for p in pads]
        ref = self.ir(x)
        padded = tuple(shape[i] + grow[i] + grow[i + rank] for i in range(rank))
        if not any(crop):
            self.emit("pad", [ref], {"pads": grow, "value": value}, padded, self.node.output[0])
            return
        if any(grow):
            ref = self.emit("pad", [ref], {"pads": grow, "value": value}, padded)
        axes = [i for i in range(rank) if crop[i] or crop[i + rank]]
        attrs = {
            "starts": [-crop[i] for i in axes],
            "ends": [padded[i] + crop[i + rank] for i in axes],
            "axes": axes,
            "steps": [1] * len(axes),
        }
        self.emit("slice", [ref], attrs, self.out_shape(), self.node.output[0])

    def _pad_by_gather(self, x: str, shape: tuple[int, ...], pads: list[int], mode: str) -> None:
        """Reflect/edge padding (and negative pads, which crop) as one gather per padded axis:
        the index pattern is public, so it costs nothing on shares."""
        rank = len(shape)
        axes = [a for a in range(rank) if pads[a] or pads[a + rank]]
        if not axes:
            self._unary("identity")
            return
        ref, cur = self.ir(x), list(shape)
        for j, a in enumerate(axes):
            begin, end = pads[a], pads[a + rank]
            n = cur[a]
            if mode == "reflect" and (n < 2 or max(begin, end) >= n):
                raise _Unsupported(f"reflect padding of {max(begin, end)} on an axis of size {n}")
            idx = np.pad(np.arange(n), (max(begin, 0), max(end, 0)), mode="reflect" if mode == "reflect" else "edge")
            idx = idx[-min(begin, 0) : len(idx) + min(end, 0)]
            cur[a] = len(idx)
            last = j == len(axes) - 1
            ref = self.emit(
                "gather", [ref], {"indices": idx.tolist(), "axis": a}, tuple(cur), self.node.output[0] if last else None
            )

    def _lower_Slice(self) -> None:
        x = self.node.input[0]
        shape = self.shape(x)
        rank = len(shape)
        if self.opset >= 10:
            starts = _ints(self.const_input(1, "starts"))
            ends = _ints(self.const_input(2, "ends"))
            axes_arr, steps_arr = self.const_input(3, "axes"), self.const_input(4, "steps")
            axes = _ints(axes_arr) if axes_arr is not None else list(range(len(starts)))
            steps = _ints(steps_arr) if steps_arr is not None else [1] * len(starts)
        else:
            starts, ends = list(self.attrs["starts"]), list(self.attrs["ends"])
            axes = list(self.attrs.get("axes", range(len(starts))))
            steps = [1] * len(starts)
        forward: dict[str, list[int]] = {"starts": [], "ends": [], "axes": [], "steps": []}
        backward: list[tuple[int, list[int]]] = []
        out = list(shape)
        for s, e, a, st in zip(starts, ends, axes, steps, strict=False):
            a = _norm_axis(a, rank)
            dim = shape[a]
            if st == 0:
                raise _Unsupported("step 0")
            s = s + dim if s < 0 else s
            e = e + dim if e < 0 else e
            if st > 0:
                s, e = min(max(s, 0), dim), min(max(e, 0), dim)
                e = max(e, s)
                out[a] = len(range(s, e, st))
                if (s, e, st) != (0, dim, 1):
                    for key, v in zip(("starts", "ends", "axes", "steps"), (s, e, a, st), strict=True):
                        forward[key].append(int(v))
            else:
                s, e = min(max(s, 0), dim - 1), min(max(e, -1), dim - 1)
                idx = list(range(s, e, st))
                out[a] = len(idx)
                backward.append((a, idx))
        ref = self.ir(x)
        cur = list(shape)
        steps_left = (1 if forward["axes"] else 0) + len(backward)
        if steps_left == 0:
            self._unary("identity")
            return
        if forward["axes"]:
            for a in forward["axes"]:
                cur[a] = out[a]
            steps_left -= 1
            ref = self.emit("slice", [ref], forward, cur, None if steps_left else self.node.output[0])
        for a, idx in backward:  # negative steps: a gather with the explicit (descending) indices
            cur[a] = len(idx)
            steps_left -= 1
            ref = self.emit(
                "gather", [ref], {"indices": idx, "axis": a}, cur, None if steps_left else self.node.output[0]
            )

    def _lower_Gather(self) -> None:
        data, idx_name = self.node.input[0], self.node.input[1]
        if idx_name not in self.consts:
            raise _Unsupported("indices are not constant")
        if data in self.consts:
            raise _Unsupported("gather from a constant table")  # unreachable: folded
        shape = self.shape(data)
        axis = _norm_axis(self.attrs.get("axis", 0), len(shape))
        idx = np.asarray(self.consts[idx_name]).astype(np.int64)
        idx = np.where(idx < 0, idx + shape[axis], idx)
        if idx.size and (idx.min() < 0 or idx.max() >= shape[axis]):
            raise _Unsupported("indices out of range")
        self._unary("gather", {"indices": idx.tolist(), "axis": axis})

    def _broadcast_to(self, ref: str, shape: tuple[int, ...], target: tuple[int, ...], out: str | None) -> str:
        """numpy broadcasting of a secret as layout steps: a reshape adding leading 1s, then one
        gather of repeated index 0 per broadcast axis (free on shares)."""
        shape = tuple(shape)
        if len(shape) < len(target):
            shape = (1,) * (len(target) - len(shape)) + shape
            ref = self.emit("reshape", [ref], {"shape": list(shape)}, shape, None)
        axes = [a for a, (s, t) in enumerate(zip(shape, target, strict=True)) if s != t]
        if not axes:
            return self.emit("identity", [ref], {}, shape, out) if out else ref
        cur = list(shape)
        for j, a in enumerate(axes):
            if cur[a] != 1:
                raise _Unsupported(f"cannot broadcast {shape} to {target}")
            cur[a] = target[a]
            last = j == len(axes) - 1
            ref = self.emit("gather", [ref], {"indices": [0] * target[a], "axis": a}, tuple(cur), out if last else None)
        return ref

    def _lower_Expand(self) -> None:
        x = self.node.input[0]
        self.const_input(1, "shape")
        self._broadcast_to(self.ir(x), self.shape(x), self.out_shape(), self.node.output[0])

    def _lower_Where(self) -> None:
        """Where(c, a, b) for a constant condition: b + c * (a - b) with c a public 0/1 mask (a
        product by an integer constant: no truncation). Both branches must be finite."""
        cond = self.const_input(0, "condition")
        a, b = self.node.input[1], self.node.input[2]
        for v in (a, b):
            if not self.info.is_float(v):
                raise _Unsupported(f"integer operand {v!r}")
            if v in self.consts and not np.all(np.abs(np.asarray(self.consts[v], dtype=np.float64)) < 2.0**20):
                raise _Unsupported(f"branch {v!r} holds values beyond the fixed-point range (e.g. -inf masks)")
        out_shape, out = self.out_shape(), self.node.output[0]
        mask = np.broadcast_to(np.asarray(cond, dtype=bool), out_shape)
        if mask.all() or not mask.any():
            keep = a if mask.all() else b
            self._broadcast_to(self.ir(keep), self.shape(keep), out_shape, out)
            return
        diff = self.emit("sub", [self.ir(a), self.ir(b)], {}, out_shape)
        m = self._add_const(f"{self.base}_mask", np.asarray(cond, dtype=np.float32), secret=False)
        sel = self.emit("mul", [diff, m], {}, out_shape)
        self.emit("add", [sel, self.ir(b)], {}, out_shape, out)

    def _lower_Resize(self) -> None:
        """Nearest-neighbour Resize with constant scales/sizes: one gather per resized axis. The
        source index of every output position is taken from onnx's reference Resize run on the
        public index grid, so every coordinate_transformation_mode and nearest_mode is honoured."""
        mode = self.attrs.get("mode", "nearest")
        if mode != "nearest":
            raise _Unsupported(f"mode {mode!r} (nearest only)")
        x = self.node.input[0]
        shape, out_shape = self.shape(x), self.out_shape()
        feeds: dict[str, np.ndarray] = {}
        for k in range(1, len(self.node.input)):
            name = self.inp(k)
            if name is not None:
                feeds[name] = np.asarray(self.const_input(k, "roi/scales/sizes"))
        ref = self.ir(x)
        axes = [a for a in range(len(shape)) if shape[a] != out_shape[a]]
        if not axes:
            self._unary("identity")
            return
        rank = len(shape)
        scales = self.const_input(2, "scales")
        # With full-rank scales >= 1 the other axes of the probe can be 1 (the index map of one axis
        # does not depend on them): small probes for big feature maps. Otherwise the full grid.
        small = (
            self.inp(3) is None and "axes" not in self.attrs and scales is not None and scales.size == rank
        )  # fmt: skip
        cur = list(shape)
        for j, a in enumerate(axes):
            thin = small and all(float(scales[i]) >= 1.0 for i in range(rank) if i != a)
            probe = [shape[i] if (i == a or not thin) else 1 for i in range(rank)]
            grid = np.broadcast_to(
                np.arange(shape[a], dtype=np.float32).reshape([-1 if i == a else 1 for i in range(rank)]), probe
            )
            res = _run_reference(self.node, {x: np.ascontiguousarray(grid), **feeds}, self.opset)[0]
            line = np.asarray(res)[tuple(slice(None) if i == a else 0 for i in range(len(shape)))].astype(np.int64)
            cur[a] = out_shape[a]
            last = j == len(axes) - 1
            ref = self.emit("gather", [ref], {"indices": line.tolist(), "axis": a}, tuple(cur),
                            self.node.output[0] if last else None)  # fmt: skip

    def _lower_ConstantOfShape(self) -> None:
        raise _Unsupported("shape is not constant")

    def _lower_Constant(self) -> None:  # pragma: no cover - always folded
        raise _Unsupported("not folded")
