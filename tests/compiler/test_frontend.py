"""Frontend tests: real exported models and single-op ONNX models against onnxruntime, and errors."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from siguard.compiler.frontend import SUPPORTED_ONNX_OPS, load_model
from siguard.compiler.interp import run_float
from siguard.compiler.ops import OPS
from siguard.core.errors import InputError, ModelError, UnsupportedOpsError
from siguard.passes.base import PassContext
from siguard.passes.canonicalize import Canonicalize
from tests import models

ATOL = 1e-4
RNG = np.random.default_rng(0)


def _make_model(nodes, inputs, outputs: list[str], inits=(), opset: int = 18, extra_opsets=()) -> onnx.ModelProto:
    """A checked model; output shapes are left to shape inference (the checker wants them set)."""
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "test", inputs, outs, list(inits))
    opsets = [helper.make_opsetid("", opset), *[helper.make_opsetid(d, v) for d, v in extra_opsets]]
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=opsets))


def _ort(model_or_path, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run([output], feeds)[0]


def _compile_and_compare(src, x: np.ndarray, *, batch: int = 1, output: str | None = None, canonicalize=True):
    """load_model (+ Canonicalize) and run_float on ``x``; returns (graph, max abs error vs onnxruntime)."""
    graph = load_model(src, batch=batch, output=output)
    for v in graph.values.values():  # the IR contract of the frontend
        assert v.dtype == "float"
        assert v.data is None or v.data.dtype in (np.float32, np.float64)
    for n in graph.nodes:
        assert n.op in OPS and n.impl is not None and n.source
    if canonicalize:
        Canonicalize()(graph, PassContext())
    onnx_in = (onnx.load(str(src)) if not isinstance(src, onnx.ModelProto) else src).graph.input[0].name
    ref = _ort(src, {onnx_in: x}, graph.meta["onnx_output"])
    got = run_float(graph, {graph.inputs[0]: x})[graph.outputs[0]]
    assert got.shape == ref.shape
    return graph, float(np.abs(got - ref).max())


# ---- real models ---------------------------------------------------------------------------------


def _digits_x(n: int, image: bool = False) -> np.ndarray:
    x = models.digits()[2][:n]
    return x.reshape(n, 1, 8, 8) if image else x


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("dynamic", [False, True])
def test_digits_mlp_torchscript(tmp_path, opset, dynamic):
    path = models.export(
        models.train_digits_mlp(), tmp_path / "mlp.onnx", torch.zeros(1, 64), opset=opset, dynamic_batch=dynamic
    )
    batch = 4 if dynamic else 1
    graph, err = _compile_and_compare(path, _digits_x(batch), batch=batch)
    assert err <= ATOL
    assert [n.op for n in graph.nodes] == ["matmul", "relu", "matmul", "relu", "matmul"]
    assert all(len(n.inputs) == 3 for n in graph.nodes if n.op == "matmul")  # Gemm bias in the matmul
    assert {w.owner for w in graph.weights()} == {"model"}
    assert graph.values[graph.inputs[0]].owner == "client"


def test_digits_cnn_keeps_batchnorm_then_folds(tmp_path):
    path = models.export(
        models.train_digits_cnn(), tmp_path / "cnn.onnx", torch.zeros(1, 1, 8, 8), dynamic_batch=True,
        fold_constants=False,
    )  # fmt: skip
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(path)).graph.node}
    raw = load_model(path, batch=2)
    assert sum(n.op == "batchnorm" for n in raw.nodes) == 2
    graph, err = _compile_and_compare(path, _digits_x(2, image=True), batch=2)
    assert err <= ATOL
    assert not any(n.op == "batchnorm" for n in graph.nodes)


@pytest.mark.parametrize("depth", [18, 34])
def test_resnet_cifar(tmp_path, depth):
    path = models.export(models.resnet_cifar(depth), tmp_path / f"r{depth}.onnx", torch.zeros(1, 3, 32, 32))
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    graph, err = _compile_and_compare(path, x)
    assert err <= ATOL
    n_add = sum(n.op == "add" for n in graph.nodes)
    assert n_add == (8 if depth == 18 else 16)  # one residual Add per basic block


@pytest.mark.parametrize("which", ["mlp", "cnn"])
def test_dynamo_exporter_small(tmp_path, which):
    if which == "mlp":
        model, example, x = models.train_digits_mlp(), torch.zeros(2, 64), _digits_x(3)
    else:
        model, example, x = models.train_digits_cnn(), torch.zeros(2, 1, 8, 8), _digits_x(3, image=True)
    path = models.export(model, tmp_path / f"{which}.onnx", example, dynamo=True, dynamic_batch=True)
    assert onnx.load(str(path), load_external_data=False).opset_import[0].version >= 18
    graph, err = _compile_and_compare(path, x, batch=3)
    assert err <= ATOL


def test_dynamo_exporter_resnet18_external_data(tmp_path):
    path = models.export(models.resnet_cifar(18), tmp_path / "r18.onnx", torch.zeros(1, 3, 32, 32), dynamo=True)
    assert any(p.name != "r18.onnx" for p in tmp_path.iterdir())  # weights in an external-data file
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    _, err = _compile_and_compare(path, x)
    assert err <= ATOL


def test_sklearn_mlp_probabilities(tmp_path):
    path = models.sklearn_mlp_onnx(tmp_path / "sk.onnx")
    graph, err = _compile_and_compare(path, _digits_x(5), batch=5)
    assert err <= ATOL
    assert graph.meta["onnx_output"] == "probabilities"
    assert graph.nodes[-1].op == "softmax"


def test_two_outputs_compiles_the_named_one():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Sigmoid", ["x"], ["b"], name="s")]
    model = _make_model(nodes, [x], ["a", "b"])
    g = load_model(model, output="b")
    assert g.outputs == ["b"] and [n.op for n in g.nodes] == ["sigmoid"]
    g = load_model(model)
    assert g.outputs == ["a"] and [n.op for n in g.nodes] == ["relu"]


def test_batch_fixes_symbolic_batch_dim(tmp_path):
    path = models.export(models.train_digits_mlp(), tmp_path / "m.onnx", torch.zeros(1, 64), dynamic_batch=True)
    g = load_model(path, batch=4)
    assert g.values[g.inputs[0]].shape == (4, 64)
    assert g.values[g.outputs[0]].shape == (4, 10)
    with pytest.raises(InputError):
        load_model(path, batch=0)


# ---- errors --------------------------------------------------------------------------------------


def _unsupported_model() -> onnx.ModelProto:
    """TopK x2, NonZero, Hardmax x2, Loop and a custom-domain op, all feeding the output."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    k = numpy_helper.from_array(np.array([3], dtype=np.int64), "k")
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Relu", ["acc"], ["acc_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1, 3]),
        ],
    )
    trip = numpy_helper.from_array(np.array(2, dtype=np.int64), "trip")
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["t1", "i1"], name="topk_a"),
        helper.make_node("TopK", ["x", "k"], ["t2", "i2"], name="topk_b"),
        helper.make_node("Hardmax", ["t1"], ["h1"], name="hardmax_a"),
        helper.make_node("Hardmax", ["t2"], ["h2"], name="hardmax_b"),
        helper.make_node("Add", ["h1", "h2"], ["s"], name="add"),
        helper.make_node("Loop", ["trip", "", "s"], ["l"], name="loop", body=body),
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("Cast", ["nz"], ["nzf"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["nzf"], ["nzs"], name="rsum", keepdims=0),
        helper.make_node("Add", ["l", "nzs"], ["y0"], name="add2"),
        helper.make_node("Swish", ["y0"], ["y"], name="custom", domain="my.domain"),
    ]
    model = _make_model(nodes, [x], ["y"], [k, trip], extra_opsets=[("my.domain", 1)])
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1  # Swish is unknown to inference
    model.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 3
    return model


def test_unsupported_ops_are_all_listed():
    with pytest.raises(UnsupportedOpsError) as info:
        load_model(_unsupported_model())
    err = info.value
    assert set(err.unsupported) == {"TopK", "Hardmax", "Loop", "NonZero", "my.domain.Swish"}
    assert err.unsupported["TopK"] == ["topk_a", "topk_b"]
    assert err.unsupported["Hardmax"] == ["hardmax_a", "hardmax_b"]
    msg = str(err)
    assert "\n" not in msg
    for name in ["topk_a", "topk_b", "hardmax_a", "hardmax_b", "loop", "nonzero", "custom"]:
        assert name in msg
    for op in SUPPORTED_ONNX_OPS:
        assert op in msg
    assert err.supported == SUPPORTED_ONNX_OPS


def test_unsupported_attribute_forms_are_collected():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64), "pads")
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], name="wrap_pad", mode="wrap"),
        helper.make_node("Cast", ["p"], ["c"], name="to_int", to=TensorProto.INT64),
        helper.make_node("Cast", ["c"], ["y"], name="back", to=TensorProto.FLOAT),
    ]
    model = _make_model(nodes, [x], ["y"], [pads], opset=19)
    with pytest.raises(UnsupportedOpsError) as info:
        load_model(model)
    assert "wrap_pad" in " ".join(info.value.unsupported["Pad"])
    assert "to_int" in " ".join(info.value.unsupported["Cast"])


def _one_line_model_error(fn) -> str:
    with pytest.raises(ModelError) as info:
        fn()
    msg = str(info.value)
    assert msg and "\n" not in msg and not isinstance(info.value, UnsupportedOpsError)
    return msg


def test_malformed_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(1).bytes(4096))
    assert "junk.onnx" in _one_line_model_error(lambda: load_model(path))


def test_missing_file(tmp_path):
    assert "not found" in _one_line_model_error(lambda: load_model(tmp_path / "nope.onnx"))


def test_checker_failure():
    node = helper.make_node("Relu", ["missing"], ["y"], name="r")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    assert "checker" in _one_line_model_error(lambda: load_model(model))


def test_unfixable_symbolic_dim():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "features"])
    model = _make_model([helper.make_node("Relu", ["x"], ["y"])], [x], ["y"])
    assert "features" in _one_line_model_error(lambda: load_model(model))


def test_shape_inference_failure():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    c = numpy_helper.from_array(np.zeros((4, 5), np.float32), "c")
    graph = helper.make_graph([helper.make_node("Add", ["x", "c"], ["y"], name="bad_add")], "g", [x], [y], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert "shape inference" in _one_line_model_error(lambda: load_model(model))


def test_missing_external_data(tmp_path):
    path = models.export(models.train_digits_mlp(), tmp_path / "m.onnx", torch.zeros(1, 64), dynamo=True)
    for p in tmp_path.iterdir():
        if p.name != "m.onnx":
            p.unlink()
    assert "m.onnx" in _one_line_model_error(lambda: load_model(path))


def test_unsupported_pow_exponent_is_reported():
    model, _ = _op_case("Pow", (2, 3), {}, [np.float32(1.7)])
    with pytest.raises(UnsupportedOpsError, match="pow_node"):
        load_model(model)


def test_intermediate_output_by_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    g = load_model(_make_model(nodes, [x], ["y"]), output="r")
    assert g.outputs == ["r"] and [n.op for n in g.nodes] == ["relu"]


def test_unknown_output_name(tmp_path):
    path = models.sklearn_mlp_onnx(tmp_path / "sk.onnx")
    msg = _one_line_model_error(lambda: load_model(path, output="logits"))
    assert "logits" in msg and "probabilities" in msg
    assert "label" in _one_line_model_error(lambda: load_model(path, output="label"))  # int64 output


# ---- single ops against onnxruntime --------------------------------------------------------------


def _op_case(
    op: str,
    x_shape: tuple[int, ...],
    attrs: dict | None = None,
    consts: list | None = None,
    *,
    opset: int = 18,
    positive: bool = False,
    n_out: int = 1,
):
    """(model, x): one ``op`` node reading x then the given constants ('' = absent optional input)."""
    inits, names = [], ["x"]
    for k, c in enumerate(consts or []):
        if isinstance(c, str) and c == "":
            names.append("")
            continue
        name = f"c{k}"
        inits.append(numpy_helper.from_array(np.asarray(c), name))
        names.append(name)
    outs = [f"y{k}" for k in range(n_out)]
    node = helper.make_node(op, names, outs, name=f"{op.lower()}_node", **(attrs or {}))
    model = _make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))], outs, inits,
                        opset=opset)  # fmt: skip
    x = RNG.standard_normal(x_shape).astype(np.float32)
    if positive:
        x = np.abs(x) + 0.1
    return model, x


def f32(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


CONV_W = f32(4, 2, 3, 3)
OP_CASES = {
    "conv": ("Conv", (1, 2, 7, 7), {"pads": [1, 1, 1, 1]}, [CONV_W, f32(4)]),
    "conv_nobias": ("Conv", (1, 2, 7, 7), {}, [CONV_W]),
    "conv_group_stride": ("Conv", (1, 4, 8, 8), {"group": 2, "strides": [2, 2], "pads": [0, 1, 1, 0]},
                          [f32(6, 2, 3, 3), f32(6)]),
    "conv_depthwise_dilation": ("Conv", (1, 3, 9, 9), {"group": 3, "dilations": [2, 2]}, [f32(3, 1, 3, 3)]),
    "conv_same_upper": ("Conv", (1, 2, 7, 8), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, [f32(3, 2, 4, 4)]),
    "conv_same_lower": ("Conv", (1, 2, 7, 8), {"auto_pad": "SAME_LOWER", "strides": [2, 3]}, [f32(3, 2, 4, 3)]),
    "conv_valid": ("Conv", (1, 2, 7, 8), {"auto_pad": "VALID"}, [f32(3, 2, 3, 3)]),
    "gemm_transb_alpha_beta": ("Gemm", (3, 5), {"transB": 1, "alpha": 0.5, "beta": 2.0}, [f32(4, 5), f32(4)]),
    "gemm_transa_c_row": ("Gemm", (5, 3), {"transA": 1}, [f32(5, 4), f32(1, 4)]),
    "gemm_c_matrix": ("Gemm", (3, 5), {"beta": 0.5}, [f32(5, 4), f32(3, 4)]),
    "gemm_c_scalar": ("Gemm", (3, 5), {}, [f32(5, 4), f32(1)]),
    "gemm_no_c": ("Gemm", (3, 5), {"alpha": 3.0}, [f32(5, 4)]),
    "matmul_3d": ("MatMul", (2, 3, 4), {}, [f32(4, 5)]),
    "add": ("Add", (2, 3, 4), {}, [f32(3, 4)]),
    "sub_scalar": ("Sub", (2, 3), {}, [np.float32(1.5)]),
    "mul": ("Mul", (2, 3, 4), {}, [f32(4)]),
    "div_255": ("Div", (2, 3), {}, [np.float32(255.0)]),
    "div_tensor": ("Div", (2, 3), {}, [np.abs(f32(3)) + 0.5]),
    "sum": ("Sum", (2, 3), {}, [f32(2, 3), f32(3)]),
    "neg": ("Neg", (2, 3), {}, []),
    "relu": ("Relu", (2, 3), {}, []),
    "leaky_relu": ("LeakyRelu", (2, 3), {"alpha": 0.2}, []),
    "prelu": ("PRelu", (1, 3, 4, 4), {}, [f32(3, 1, 1)]),
    "clip_inputs": ("Clip", (2, 5), {}, [np.float32(-0.5), np.float32(0.7)]),
    "clip_min_only": ("Clip", (2, 5), {}, [np.float32(0.1)]),
    "clip_max_only": ("Clip", (2, 5), {}, ["", np.float32(0.2)]),
    "clip_unbounded": ("Clip", (2, 5), {}, []),
    "maxpool": ("MaxPool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, []),
    "maxpool_ceil": ("MaxPool", (1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, []),
    "maxpool_ceil_pads": ("MaxPool", (1, 2, 9, 8),
                          {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1]}, []),
    "maxpool_dilation": ("MaxPool", (1, 2, 9, 9), {"kernel_shape": [2, 2], "dilations": [2, 2]}, []),
    "maxpool_same": ("MaxPool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
                     []),
    "avgpool_exclude_pad": ("AveragePool", (1, 2, 7, 7), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, []),
    "avgpool_include_pad": ("AveragePool", (1, 2, 7, 7),
                            {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, []),
    "avgpool_ceil": ("AveragePool", (1, 2, 8, 8), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, []),
    "avgpool_ceil_include_pad": ("AveragePool", (1, 2, 8, 8),
                                 {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1],
                                  "count_include_pad": 1}, []),
    "avgpool_ceil_include_nopad": ("AveragePool", (1, 2, 8, 8),
                                   {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1,
                                    "count_include_pad": 1}, []),
    "global_avgpool": ("GlobalAveragePool", (2, 3, 4, 5), {}, []),
    "global_maxpool": ("GlobalMaxPool", (2, 3, 4, 5), {}, []),
    "batchnorm": ("BatchNormalization", (2, 3, 4, 4), {"epsilon": 1e-3},
                  [f32(3), f32(3), f32(3), np.abs(f32(3)) + 0.5]),
    "batchnorm_2d": ("BatchNormalization", (4, 3), {}, [f32(3), f32(3), f32(3), np.abs(f32(3)) + 0.5]),
    "lrn": ("LRN", (1, 5, 3, 3), {"size": 3, "alpha": 1e-2, "beta": 0.75, "bias": 2.0}, []),
    "flatten": ("Flatten", (2, 3, 4, 5), {}, []),
    "flatten_axis2": ("Flatten", (2, 3, 4, 5), {"axis": 2}, []),
    "reshape": ("Reshape", (2, 3, 4), {}, [i64(0, -1, 2)]),
    "squeeze": ("Squeeze", (2, 1, 4, 1), {}, [i64(-1)]),
    "squeeze_all": ("Squeeze", (2, 1, 4, 1), {}, []),
    "unsqueeze": ("Unsqueeze", (2, 3), {}, [i64(0, -1)]),
    "transpose": ("Transpose", (2, 3, 4), {"perm": [2, 0, 1]}, []),
    "transpose_default": ("Transpose", (2, 3, 4), {}, []),
    "concat": ("Concat", (2, 3), {"axis": -1}, [f32(2, 2)]),
    "pad": ("Pad", (1, 2, 3, 3), {}, [i64(0, 0, 1, 2, 0, 0, 2, 1), np.float32(0.5)]),
    "pad_axes_negative": ("Pad", (1, 2, 5, 5), {}, [i64(1, -1, -2, 2), "", i64(2, 3)]),
    "slice": ("Slice", (3, 10), {}, [i64(1, -8), i64(100, -1), i64(0, 1), i64(1, 2)]),
    "slice_negative_steps": ("Slice", (3, 10), {}, [i64(-1, 8), i64(-100, 1), i64(0, 1), i64(-1, -3)]),
    "gather_vector": ("Gather", (3, 5), {"axis": 1}, [i64(0, -1, 2)]),
    "gather_scalar": ("Gather", (3, 5), {"axis": 0}, [np.array(-2, dtype=np.int64)]),
    "gather_matrix": ("Gather", (4, 3), {}, [np.array([[0, 1], [3, 2]], dtype=np.int64)]),
    "identity": ("Identity", (2, 3), {}, []),
    "dropout": ("Dropout", (2, 3), {}, []),
    "cast_float": ("Cast", (2, 3), {"to": TensorProto.FLOAT}, []),
    "reduce_mean_keep": ("ReduceMean", (2, 3, 4), {}, [i64(-1, 1)]),
    "reduce_mean_drop": ("ReduceMean", (2, 3, 4), {"keepdims": 0}, [i64(0)]),
    "reduce_sum_all": ("ReduceSum", (2, 3, 4), {"keepdims": 0}, []),
    "reduce_sum_noop": ("ReduceSum", (2, 3, 4), {"noop_with_empty_axes": 1}, []),
    "softmax": ("Softmax", (2, 3, 4), {"axis": 1}, []),
    "log_softmax": ("LogSoftmax", (2, 5), {}, []),
    "sigmoid": ("Sigmoid", (2, 3), {}, []),
    "tanh": ("Tanh", (2, 3), {}, []),
    "exp": ("Exp", (2, 3), {}, []),
    "erf": ("Erf", (2, 3), {}, []),
    "softplus": ("Softplus", (2, 3), {}, []),
    "hard_sigmoid": ("HardSigmoid", (2, 3), {"alpha": 0.3, "beta": 0.4}, []),
    "layer_norm": ("LayerNormalization", (2, 3, 4), {"epsilon": 1e-3}, [f32(4), f32(4)]),
    "layer_norm_axis1": ("LayerNormalization", (2, 3, 4), {"axis": 1}, [f32(3, 4)]),
    # issue 17: 1-D conv/pool (lifted to 2-D), reflect/edge padding, modern activations, layout ops
    "conv1d": ("Conv", (2, 3, 9), {"pads": [1, 2], "strides": [2], "dilations": [2]}, [f32(4, 3, 3), f32(4)]),
    "conv1d_groups_same": ("Conv", (1, 4, 8), {"group": 2, "auto_pad": "SAME_UPPER"}, [f32(6, 2, 4)]),
    "maxpool1d": ("MaxPool", (2, 3, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, []),
    "avgpool1d_ceil": ("AveragePool", (2, 3, 8), {"kernel_shape": [3], "strides": [2], "ceil_mode": 1}, []),
    "pad_reflect": ("Pad", (1, 2, 4, 5), {"mode": "reflect"}, [i64(0, 0, 1, 3, 0, 0, 2, 1)]),
    "pad_edge_crop": ("Pad", (1, 2, 4, 5), {"mode": "edge"}, [i64(0, 0, 2, -1, 0, 0, -1, 3)]),
    "hard_swish": ("HardSwish", (2, 3, 5), {}, []),
    "mish": ("Mish", (2, 7), {}, []),
    "reduce_max_keep": ("ReduceMax", (2, 3, 4, 5), {}, [i64(2, -1)]),
    "reduce_max_drop": ("ReduceMax", (2, 3, 4), {"keepdims": 0}, [i64(1)]),
    "expand": ("Expand", (3, 1, 4), {}, [i64(2, 3, 5, 4)]),
    "resize_nearest_scales": ("Resize", (1, 2, 3, 4), {}, ["", np.array([1, 1, 2, 1.5], np.float32)]),
    "resize_nearest_down_up": ("Resize", (1, 2, 6, 4), {"nearest_mode": "ceil"},
                               ["", np.array([1, 1, 0.5, 2], np.float32)]),
    "resize_nearest_sizes_half_pixel": ("Resize", (1, 2, 5, 4),
                                        {"coordinate_transformation_mode": "half_pixel", "nearest_mode": "floor"},
                                        ["", "", i64(1, 2, 3, 7)]),
}  # fmt: skip
POSITIVE_CASES = {
    "sqrt": ("Sqrt", (2, 3), {}, []),
    "reciprocal": ("Reciprocal", (2, 3), {}, []),
    **{f"pow_{e:g}": ("Pow", (2, 3), {}, [np.float32(e)]) for e in (1, 2, 3, 0.5, -1, -0.5, 4, 7, 8, -3)},
}
OPSET_CASES = {  # (opset, case): attribute forms and old semantics
    "softmax_v11_coerce": (11, ("Softmax", (2, 3, 4), {"axis": 1}, [])),
    "logsoftmax_v11_default": (11, ("LogSoftmax", (2, 3, 4), {}, [])),
    "reduce_mean_v13_attr": (13, ("ReduceMean", (2, 3, 4), {"axes": [1, 2]}, [])),
    "squeeze_v11_attr": (11, ("Squeeze", (2, 1, 4), {"axes": [1]}, [])),
    "clip_v6_attrs": (6, ("Clip", (2, 5), {"min": -0.3, "max": 0.4}, [])),
    "reduce_max_v13_attr": (13, ("ReduceMax", (2, 3, 4), {"axes": [0, 2]}, [])),
    "pad_v2_attrs": (2, ("Pad", (1, 2, 3), {"pads": [0, 1, 2, 0, 2, 1], "value": 1.5}, [])),
    "slice_v9_attrs": (9, ("Slice", (3, 10), {"starts": [1], "ends": [-2], "axes": [1]}, [])),
    "gelu_v20": (20, ("Gelu", (2, 7), {}, [])),
    "gelu_v20_tanh": (20, ("Gelu", (2, 7), {"approximate": "tanh"}, [])),
    "layer_norm_v17": (17, ("LayerNormalization", (2, 3, 4), {}, [f32(4)])),
    "split_v18_num_outputs": (18, ("Split", (2, 6), {"axis": 1, "num_outputs": 3}, [])),
    "split_v13_sizes": (13, ("Split", (2, 6), {"axis": 1}, [i64(2, 4)])),
    "split_v11_attr": (11, ("Split", (2, 6), {"axis": 1, "split": [4, 2]}, [])),
}


def _check_op_model(model: onnx.ModelProto, x: np.ndarray, output: str | None = None) -> None:
    graph = load_model(model, output=output)
    name = output or model.graph.output[0].name
    ref = _ort(model, {"x": x}, name)
    got = run_float(graph, {graph.inputs[0]: x})[graph.outputs[0]]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-4)
    canon = graph.copy()
    Canonicalize()(canon, PassContext())
    np.testing.assert_allclose(run_float(canon, {canon.inputs[0]: x})[canon.outputs[0]], ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_single_op(case):
    op, shape, attrs, consts = OP_CASES[case]
    _check_op_model(*_op_case(op, shape, attrs, consts))


@pytest.mark.parametrize("case", sorted(POSITIVE_CASES))
def test_single_op_positive_input(case):
    op, shape, attrs, consts = POSITIVE_CASES[case]
    _check_op_model(*_op_case(op, shape, attrs, consts, positive=True))


@pytest.mark.parametrize("convert", [True, False], ids=["converted", "kept"])
@pytest.mark.parametrize("case", sorted(OPSET_CASES))
def test_single_op_other_opsets(case, convert, monkeypatch):
    """Both through the version converter and, with it failing, lowered from the model's own opset."""
    if not convert:

        def refuse(model, target):
            raise RuntimeError("no adapter")

        monkeypatch.setattr(onnx.version_converter, "convert_version", refuse)
    opset, (op, shape, attrs, consts) = OPSET_CASES[case]
    n_out = 3 if "num_outputs" in attrs else (2 if op == "Split" else 1)
    model, x = _op_case(op, shape, attrs, consts, opset=opset, n_out=n_out)
    for k in range(n_out):
        _check_op_model(model, x, output=f"y{k}" if n_out > 1 else None)


def test_lrn_even_size_against_the_spec():
    """onnxruntime only runs odd LRN sizes (and onnx.reference's LRN loops over the batch, not the
    channels), so an even size is checked against the ONNX spec's formula written out."""
    model, x = _op_case("LRN", (2, 6, 3, 3), {"size": 4, "alpha": 0.1, "beta": 0.6, "bias": 1.5})
    graph = load_model(model)
    square_sum = np.zeros_like(x, dtype=np.float64)
    for c in range(6):
        lo, hi = max(0, c - 1), min(5, c + 2)  # floor((4-1)/2) before, ceil((4-1)/2) after
        square_sum[:, c] = (x[:, lo : hi + 1].astype(np.float64) ** 2).sum(axis=1)
    expected = x / (1.5 + 0.1 / 4 * square_sum) ** 0.6
    np.testing.assert_allclose(run_float(graph, {"x": x})[graph.outputs[0]], expected, atol=1e-9)


def test_required_ops_are_supported():
    required = """Conv Gemm MatMul Add Sub Mul Div Sum Neg Relu LeakyRelu PRelu Clip MaxPool AveragePool
        GlobalAveragePool BatchNormalization LRN Flatten Reshape Squeeze Unsqueeze Transpose Concat Pad Slice
        Gather Identity Dropout Constant ConstantOfShape Shape Cast ReduceMean ReduceSum Softmax LogSoftmax
        Sigmoid Tanh Exp Sqrt Reciprocal Erf Gelu LayerNormalization HardSigmoid Softplus""".split()
    assert set(required) <= set(SUPPORTED_ONNX_OPS)


def test_shape_subgraph_is_folded():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape, ConstantOfShape -> Expand, Range, int Cast."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])
    inits = [
        numpy_helper.from_array(i64(0), "zero"),
        numpy_helper.from_array(i64(-1), "minus1"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "zero_s"),
        numpy_helper.from_array(np.array(6, dtype=np.int64), "six"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "one_s"),
    ]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero_s"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Range", ["zero_s", "six", "one_s"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["flat"], ["fshape"]),
        helper.make_node("ConstantOfShape", ["fshape"], ["ones"],
                         value=numpy_helper.from_array(np.array([2.0], dtype=np.float32))),
        helper.make_node("Mul", ["ones", "rf"], ["w"]),
        helper.make_node("Expand", ["w", "fshape"], ["we"]),
        helper.make_node("Add", ["flat", "we"], ["y"]),
    ]  # fmt: skip
    model = _make_model(nodes, [x], ["y"], inits)
    graph = load_model(model, batch=3)
    assert [n.op for n in graph.nodes] == ["reshape", "add"]
    assert graph.nodes[0].attrs["shape"] == [3, 6]
    weight = graph.values[graph.nodes[1].inputs[1]]
    assert weight.visibility == "secret" and weight.owner == "model"  # >= 2 elements
    xv = RNG.standard_normal((3, 2, 3)).astype(np.float32)
    np.testing.assert_allclose(run_float(graph, {"x": xv})["y"], _ort(model, {"x": xv}, "y"), atol=1e-6)


def test_visibility_of_constants():
    """Scalar constants outside parameter slots are public; weights are secret even when scalar."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    inits = [
        numpy_helper.from_array(np.array(255.0, dtype=np.float32), "d"),
        numpy_helper.from_array(np.array([0.25], dtype=np.float32), "slope"),
    ]
    nodes = [helper.make_node("Div", ["x", "d"], ["a"]), helper.make_node("PRelu", ["a", "slope"], ["y"])]
    model = _make_model(nodes, [x], ["y"], inits)
    g = load_model(model)
    assert (g.values["d"].visibility, g.values["d"].owner) == ("public", None)
    assert (g.values["slope"].visibility, g.values["slope"].owner) == ("secret", "model")
    assert (g.values["x"].visibility, g.values["x"].owner) == ("secret", "client")
    assert [n.source for n in g.nodes] == ["Div_0", "PRelu_1"]
