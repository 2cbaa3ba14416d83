"""Frontend on graphs nobody here wrote: IR-version-3 conventions, weights computed by
ConstantOfShape chains, untyped values, skl2onnx's default ZipMap output, constant-condition Where,
and the README's list of supported ops. Oracles: onnxruntime and numpy."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from siguard.compiler import frontend
from siguard.compiler.frontend import SUPPORTED_ONNX_OPS, load_model, select_output
from siguard.compiler.interp import run_float
from siguard.core.errors import ModelError
from tests import models

RNG = np.random.default_rng(17)
README = Path(__file__).resolve().parents[2] / "README.md"


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], output: str | None = None) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([output] if output else None, feeds)[0]


def _ir3_gemm(ir_version: int = 3) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """x (2, 4) @ W (4, 3) + b, with W and b initializers that are also listed as graph inputs."""
    w, b = RNG.standard_normal((4, 3)).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", [2, 4]), ("W", [4, 3]),
                                                                                   ("b", [3]))]  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc")], "ir3", inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = ir_version
    return model, w, b


def test_ir3_initializers_listed_as_inputs_are_constants():
    model, w, b = _ir3_gemm()
    onnx.checker.check_model(model)
    g = load_model(model, batch=2)
    assert g.inputs == ["x"]
    weights = {v.name: v for v in g.values.values() if v.data is not None}
    assert {"W", "b"} <= set(weights) and weights["W"].owner == "model"
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    np.testing.assert_allclose(run_float(g, {"x": x})[g.outputs[0]], x @ w + b, atol=1e-5)


def test_ir3_initializer_named_as_input_stays_an_input():
    model, _, b = _ir3_gemm()
    g = load_model(model, inputs=["W"])  # batch 1: the fixed first dimensions stay
    assert g.inputs == ["x", "W"] and g.values["W"].owner == "client"
    x = RNG.standard_normal((2, 4)).astype(np.float32)
    w2 = RNG.standard_normal((4, 3)).astype(np.float32)
    np.testing.assert_allclose(run_float(g, {"x": x, "W": w2})[g.outputs[0]], x @ w2 + b, atol=1e-5)
    with pytest.raises(ModelError, match="unknown input 'V'"):
        load_model(model, inputs=["V"])


def test_weights_from_constant_of_shape_and_unsqueeze_are_folded_into_initializers():
    """As in the light model zoo: Conv weight = ConstantOfShape(shape initializer), BatchNorm-free
    scale = Unsqueeze(Unsqueeze(ConstantOfShape)) feeding a Mul; IR version 3, everything listed as inputs."""
    inits = [numpy_helper.from_array(np.array([4, 2, 3, 3], np.int64), "w_shape"),
             numpy_helper.from_array(np.array([4], np.int64), "s_shape")]  # fmt: skip
    quarter = numpy_helper.from_array(np.array([0.25], np.float32))
    one_and_half = numpy_helper.from_array(np.array([1.5], np.float32))
    nodes = [
        helper.make_node("ConstantOfShape", ["w_shape"], ["w"], value=quarter),
        helper.make_node("ConstantOfShape", ["s_shape"], ["s0"], value=one_and_half),
        helper.make_node("Unsqueeze", ["s0"], ["s1"], axes=[1]),
        helper.make_node("Unsqueeze", ["s1"], ["s"], axes=[2]),
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["c", "s"], ["y"], name="scale"),
    ]  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 5, 5])]
    inputs += [helper.make_tensor_value_info(t.name, TensorProto.INT64, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "zoo_like", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                                                          [1, 4, 5, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    g = load_model(model)
    assert g.inputs == ["x"] and [n.op for n in g.nodes] == ["conv", "mul"]
    assert g.values["w"].owner == "model" and g.values["w"].data.shape == (4, 2, 3, 3)
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_float(g, {"x": x})[g.outputs[0]], _ort(model, {"x": x}), atol=1e-5)


def test_untyped_value_is_named_in_the_shape_inference_error():
    """IR version 3 ignores initializers that are not graph inputs: the Unsqueeze reads an untyped value."""
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    nodes = [helper.make_node("Unsqueeze", ["w"], ["w2"], name="unsq", axes=[0]),
             helper.make_node("Add", ["x", "w2"], ["y"], name="add")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 3
    where = frontend._untyped_value(model)
    assert "value 'w2' read by Add node 'add'" in where and "output of Unsqueeze node 'unsq'" in where
    assert frontend._untyped_value(_ir3_gemm(ir_version=4)[0]) == ""


# ---- skl2onnx's default export: ZipMap --------------------------------------------------------------


def _default_sklearn_classifier() -> onnx.ModelProto:
    from skl2onnx import to_onnx

    clf = models._sklearn_mlp()
    x = models.digits()[0][:1].astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_onnx(clf, x)  # default options: int64 label + ZipMap(probabilities)


def _zipmap_probabilities(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    maps = sess.run(["output_probability"], {sess.get_inputs()[0].name: x})[0]
    return np.array([[m[k] for k in sorted(m)] for m in maps])


def test_zipmap_classifier_compiles_its_probabilities():
    model = _default_sklearn_classifier()
    assert [o.name for o in model.graph.output] == ["output_label", "output_probability"]
    g = load_model(model, batch=6)
    zipmap = next(n for n in model.graph.node if n.op_type == "ZipMap")
    assert g.meta["onnx_output"] == zipmap.input[0]
    assert any("ZipMap" in w for w in g.meta["warnings"])
    x = models.digits()[2][:6].astype(np.float32)
    got = run_float(g, {g.inputs[0]: x})[g.outputs[0]]
    np.testing.assert_allclose(got, _zipmap_probabilities(model, x), atol=1e-5)


def test_guard_train_and_audit_read_the_same_probabilities(tmp_path):
    from siguard.privacy.targets import model_outputs

    model = _default_sklearn_classifier()
    path = tmp_path / "clf.onnx"
    onnx.save(model, path)
    x = models.digits()[2][:20].astype(np.float32)
    np.testing.assert_allclose(model_outputs(path, x, "test"), _zipmap_probabilities(model, x), atol=1e-6)
    assert select_output(model) == load_model(model).meta["onnx_output"]


def test_guard_train_on_a_default_sklearn_classifier(tmp_path):
    from siguard.api_guard import train_defender

    path = tmp_path / "clf.onnx"
    onnx.save(_default_sklearn_classifier(), path)
    x_train, y_train, x_test, y_test = models.digits()
    np.savez(tmp_path / "m.npz", x=x_train[:100], y=y_train[:100])
    np.savez(tmp_path / "n.npz", x=x_test[:100], y=y_test[:100])
    report = train_defender(path, tmp_path / "m.npz", tmp_path / "n.npz", tmp_path / "d.onnx", epochs=2)
    assert report.num_classes == 10 and (tmp_path / "d.onnx").exists()


def test_no_float_output_says_how_to_re_export():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [1])
    graph = helper.make_graph([helper.make_node("ArgMax", ["x"], ["label"], keepdims=0)], "g", [x], [label])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ModelError) as err:
        load_model(model)
    msg = str(err.value)
    assert "\n" not in msg and "label (int64)" in msg and "--output" in msg and "zipmap" not in msg
    # an ML-domain classifier whose ZipMap output is not recognised (its probabilities are not a graph
    # output here) gets the re-export hint
    zm = helper.make_node("ZipMap", ["x"], ["probs"], domain="ai.onnx.ml", classlabels_int64s=[0, 1, 2])
    seq = helper.make_tensor_sequence_value_info("unrelated", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("ArgMax", ["x"], ["label"], keepdims=0),
                               helper.make_node("SequenceConstruct", ["x"], ["unrelated"]), zm],
                              "g", [x], [label, seq])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 1)])
    with pytest.raises(ModelError, match="'zipmap': False"):
        load_model(model)


def test_where_with_a_constant_condition():
    cond = RNG.random((3, 4)) > 0.5
    inits = [numpy_helper.from_array(cond, "c"), numpy_helper.from_array(np.float32(-2.0).reshape(()), "z")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])
    graph = helper.make_graph([helper.make_node("Where", ["c", "x", "z"], ["y"], name="w")], "g", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    g = load_model(model, batch=2)
    xv = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(run_float(g, {"x": xv})[g.outputs[0]], np.where(cond, xv, -2.0), atol=1e-6)


def test_where_with_a_secret_condition_is_reported():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Greater", ["x", "zero"], ["c"], name="gt"),
             helper.make_node("Where", ["c", "x", "zero"], ["y"], name="w")]  # fmt: skip
    zero = numpy_helper.from_array(np.float32(0).reshape(()), "zero")
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [zero]),
                              opset_imports=[helper.make_opsetid("", 18)])  # fmt: skip
    with pytest.raises(ModelError, match="Greater"):
        load_model(model)


def test_swish_op():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])
    graph = helper.make_graph([helper.make_node("Swish", ["x"], ["y"], name="sw", alpha=0.5)], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)])
    g = load_model(model, batch=2)
    xv = RNG.standard_normal((2, 5)) * 3
    np.testing.assert_allclose(run_float(g, {"x": xv})[g.outputs[0]], xv / (1 + np.exp(-0.5 * xv)), atol=1e-9)


def test_readme_lists_exactly_the_supported_ops():
    text = README.read_text()
    section = text.split("## Supported ONNX ops", 1)[1].split("Shape-computing subgraphs", 1)[0]
    listed = set(re.findall(r"\b([A-Z][A-Za-z]+)\b", section))
    onnx_ops = {s.name for s in onnx.defs.get_all_schemas()}
    assert listed & onnx_ops == set(SUPPORTED_ONNX_OPS), (
        sorted(set(SUPPORTED_ONNX_OPS) - listed), sorted((listed & onnx_ops) - set(SUPPORTED_ONNX_OPS)))
