"""Calibration: run onnxruntime on calibration inputs and record the range of every value.

:func:`calibrate` exposes every float intermediate of the ONNX model as an extra graph output,
runs onnxruntime on the calibration inputs (in chunks of the model's fixed batch, if it has one)
and maps the results onto the IR's value names (``graph.meta["onnx_names"]`` for renamed ones).
IR values onnxruntime cannot see (values the canonicalize pass created, such as a Conv with a
folded BatchNorm that kept no ONNX name) are taken from the float interpreter
(:mod:`siguard.compiler.interp`) in chunks of the graph's batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx

from siguard.core.errors import InputError

from .interp import run_float
from .ir import Graph

__all__ = ["Calibration", "calibrate", "check_calibration_data", "DEFAULT_RANGE"]

#: The range assumed for a value when no calibration data is given (activations of a normalised
#: network rarely leave it); the approximation pass then keeps every op's default implementation.
DEFAULT_RANGE = (-8.0, 8.0)


@dataclass
class Calibration:
    """Ranges (min, max) by IR value name, the float samples of the values asked for, and
    onnxruntime's output (the reference of the accuracy budget) on the ``n`` calibration inputs."""

    n: int
    ranges: dict[str, tuple[float, float]]
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    output: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)  # value -> "onnxruntime" | "interpreter"


def check_calibration_data(x: np.ndarray, shape: tuple[int, ...], where: str = "calibration data") -> np.ndarray:
    """The calibration array as float32 (N, *shape[1:]), or InputError with one line."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":
        raise InputError(f"{where} has dtype {a.dtype}; expected a real numeric array")
    want = tuple(shape[1:])
    if a.ndim == len(want):  # a single sample
        a = a[None]
    if tuple(a.shape[1:]) != want:
        raise InputError(f"{where} has shape {list(a.shape)}; expected (N, {', '.join(str(d) for d in want)})")
    if a.shape[0] < 1:
        raise InputError(f"{where} holds no samples")
    if not np.all(np.isfinite(a)):
        raise InputError(f"{where} contains NaN or infinite values")
    return a.astype(np.float32)


def _chunks(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` with its last row repeated up to ``size`` rows (the fixed batch of a model)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)], axis=0)


def _ort_values(model: onnx.ModelProto, x: np.ndarray, wanted: set[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """onnxruntime values (ONNX names in ``wanted`` that are float node outputs) and the first
    graph output, each concatenated over all rows of ``x``."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        m = onnx.shape_inference.infer_shapes(m)
    except Exception:  # shape inference is a convenience here; ORT infers the rest
        pass
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.output)}
    have = {o.name for o in m.graph.output}
    first_output = m.graph.output[0].name
    extra = []
    for node in m.graph.node:
        for out in node.output:
            if out and out in wanted and out not in have and types.get(out, onnx.TensorProto.FLOAT) == 1:
                extra.append(onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None))
                have.add(out)
    m.graph.output.extend(extra)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dim0 = inp.shape[0] if inp.shape else None
    size = dim0 if isinstance(dim0, int) and dim0 > 0 else len(x)
    names = [o.name for o in sess.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for a, b in _chunks(len(x), size):
        outs = sess.run(None, {inp.name: _pad_rows(x[a:b], size)})
        for n, v in zip(names, outs, strict=True):
            v = np.asarray(v)
            parts[n].append(v[: b - a] if v.ndim and v.shape[0] == size else v)
    values = {}
    for n, vs in parts.items():
        try:
            values[n] = np.concatenate(vs, axis=0) if vs[0].ndim else vs[0]
        except ValueError:  # a value without a batch axis (shapes differ): keep the first chunk
            values[n] = vs[0]
    return values, values[first_output]


def _interp_values(graph: Graph, x: np.ndarray, names: set[str]) -> dict[str, np.ndarray]:
    """Float-interpreter values of ``names`` over all rows of ``x``, in chunks of the graph's batch."""

    batch = graph.values[graph.inputs[0]].shape[0]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for a, b in _chunks(len(x), batch):
        env = run_float(graph, {graph.inputs[0]: _pad_rows(x[a:b], batch)}, keep_all=True)
        for n in names:
            v = np.asarray(env[n])
            parts[n].append(v[: b - a] if v.ndim and v.shape[0] == batch else v)
    return {n: np.concatenate(vs, axis=0) for n, vs in parts.items()}


def calibrate(model: onnx.ModelProto, graph: Graph, x: np.ndarray, keep: Iterable[str] = ()) -> Calibration:
    """Ranges of every computed IR value of ``graph`` on the calibration inputs ``x`` (N, ...).

    ``model`` is the ONNX model ``graph`` was loaded from (one float input). ``keep`` names the IR
    values whose float samples are kept (the approximation pass keeps its nonlinear nodes' inputs).
    """
    if len(graph.inputs) != 1:
        raise InputError(f"calibration supports single-input models; this one has {len(graph.inputs)} inputs")
    x = check_calibration_data(x, graph.values[graph.inputs[0]].shape)
    onnx_names = graph.meta.get("onnx_names", {})
    computed = [n for n, v in graph.values.items() if not v.is_const]
    wanted = {onnx_names.get(n, n): n for n in computed}
    ort_vals, output = _ort_values(model, x, set(wanted))
    values: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for onnx_name, ir_name in wanted.items():
        v = ort_vals.get(onnx_name)
        if v is not None and tuple(v.shape[1:]) == tuple(graph.values[ir_name].shape[1:]):
            values[ir_name] = v
            sources[ir_name] = "onnxruntime"
    for name in graph.inputs:  # the calibration inputs themselves
        if name not in values:
            values[name] = x.reshape((len(x), *graph.values[name].shape[1:]))
            sources[name] = "input"
    missing = {n for n in computed if n not in values}
    if missing:
        values.update(_interp_values(graph, x, missing))
        sources.update({n: "interpreter" for n in missing})
    ranges = {n: (float(np.min(v)), float(np.max(v))) for n, v in values.items() if v.size}
    keep = set(keep)
    reference = values.get(graph.outputs[0], output)
    return Calibration(len(x), ranges, {n: values[n] for n in keep if n in values}, reference, sources)
