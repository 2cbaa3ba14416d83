"""Models people actually have, compiled and run securely (three parties, threads) against onnxruntime:
MobileNetV3-small (torchvision's architecture rebuilt with torch.nn: HardSwish, HardSigmoid
squeeze-excitation, depthwise convolutions), a small HardSwish network, and a scikit-learn
MLPClassifier exported by skl2onnx with its default options (ZipMap output)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from siguard.pipeline import CompileOptions, compile_model
from siguard.runtime.local import run_threads
from tests import models

# (input, kernel, expanded, output, squeeze-excite, activation, stride): torchvision's
# mobilenet_v3_small configuration (torchvision/models/mobilenetv3.py, width 1.0)
SMALL = [
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
]  # fmt: skip


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, *([act()] if act else []))


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        s = _divisible(c // 4)
        self.fc1, self.fc2 = nn.Conv2d(c, s, 1), nn.Conv2d(s, c, 1)

    def forward(self, x):
        w = nn.functional.adaptive_avg_pool2d(x, 1)
        return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(w))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, cexp: int, cout: int, se: bool, act: str, stride: int):
        super().__init__()
        a = nn.Hardswish if act == "HS" else nn.ReLU
        layers = [] if cexp == cin else [_conv_bn(cin, cexp, 1, act=a)]
        layers.append(_conv_bn(cexp, cexp, k, stride, groups=cexp, act=a))
        if se:
            layers.append(_SqueezeExcite(cexp))
        layers.append(_conv_bn(cexp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


def mobilenet_v3_small(num_classes: int = 1000) -> nn.Module:
    """torchvision's MobileNetV3-small, layer for layer, with torch's default (random) initialisation."""
    blocks = [_conv_bn(3, 16, 3, 2, act=nn.Hardswish)] + [_InvertedResidual(*c) for c in SMALL]
    blocks.append(_conv_bn(96, 576, 1, act=nn.Hardswish))
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes),
    )  # fmt: skip


def _recalibrated(model: nn.Module, shape: tuple[int, ...], batches: int = 3) -> nn.Module:
    """Random weights, BatchNorm statistics measured on a few random batches (train mode), then eval."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, *shape[1:], generator=gen))
    return model.eval()


def _export(model: nn.Module, path, shape) -> str:
    torch.onnx.export(model, (torch.zeros(shape),), str(path), input_names=["input"], output_names=["output"],
                      opset_version=17, dynamo=False)  # fmt: skip
    return str(path)


def _ort(path: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _secure(path, x: np.ndarray, calibration: np.ndarray | None = None) -> np.ndarray:
    res = compile_model(path, CompileOptions(batch=x.shape[0], calibration=calibration))
    return run_threads(res.plan, x, res.weights, timeout=300).output


@pytest.mark.slow
def test_mobilenet_v3_small_secure(tmp_path):
    torch.manual_seed(0)
    shape = (1, 3, 224, 224)
    path = _export(_recalibrated(mobilenet_v3_small(), shape), tmp_path / "mnv3.onnx", shape)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"HardSwish", "HardSigmoid"} <= ops
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = _ort(path, x)
    got = _secure(path, x)
    assert got.shape == want.shape == (1, 1000)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-2 * scale  # logits: 1 % of their range (measured: 0.3 %)
    top2 = np.sort(want[0])[-2:]
    assert top2[1] - top2[0] > 1e-2 * scale  # not degenerate: the ranking is decided
    assert got.argmax() == want.argmax()


def test_hardswish_network_secure(tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(64, 32), nn.Hardswish(), nn.Linear(32, 16), nn.Hardswish(), nn.Linear(16, 10))
    path = _export(net.eval(), tmp_path / "hs.onnx", (1, 64))
    assert [n.op_type for n in onnx.load(path).graph.node].count("HardSwish") == 2
    x = (np.random.default_rng(1).standard_normal((17, 64)) * 2).astype(np.float32)
    want = _ort(path, x[:1])
    got = _secure(path, x[:1], calibration=x[1:])  # the calibrated pipeline (ranges, approximation pass)
    np.testing.assert_allclose(got, want, atol=2e-3)


@pytest.fixture(scope="module")
def default_sklearn_classifier(tmp_path_factory):
    from skl2onnx import to_onnx

    clf = models._sklearn_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = to_onnx(clf, models.digits()[0][:1].astype(np.float32))  # default options: ZipMap
    path = tmp_path_factory.mktemp("skl") / "mlp_default.onnx"
    onnx.save(model, path)
    return path


def test_default_sklearn_mlp_classifier_secure(default_sklearn_classifier):
    x = models.digits()[2][:32].astype(np.float32)
    sess = ort.InferenceSession(str(default_sklearn_classifier), providers=["CPUExecutionProvider"])
    labels, maps = sess.run(None, {sess.get_inputs()[0].name: x})
    want = np.array([[m[k] for k in sorted(m)] for m in maps])
    got = _secure(default_sklearn_classifier, x)
    assert got.shape == want.shape == (32, 10)
    assert np.abs(got - want).max() <= 1e-2  # the README's stated error of a revealed probability
    assert (got.argmax(1) == labels).mean() == 1.0


def _new_ops_model() -> onnx.ModelProto:
    """Reflect Pad -> Conv1d -> HardSwish -> Unsqueeze -> Resize (nearest, x2) -> ReduceMax -> Expand
    -> Where (constant condition) -> Mish: every op issue 17 added, in one graph."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    consts = {
        "pads": np.array([0, 0, 2, 0, 0, 1], np.int64), "w": rng.standard_normal((5, 4, 3)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float32), "ax": np.array([2], np.int64),
        "scales": np.array([1, 1, 2, 2], np.float32), "rax": np.array([3], np.int64),
        "shape": np.array([1, 5, 2, 3], np.int64), "cond": rng.random((2, 3)) > 0.5,
        "other": np.float32(0.25).reshape(()),
    }  # fmt: skip
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
        helper.make_node("Conv", ["p", "w", "b"], ["c"]),
        helper.make_node("HardSwish", ["c"], ["h"]),
        helper.make_node("Unsqueeze", ["h", "ax"], ["u"]),
        helper.make_node("Resize", ["u", "", "scales"], ["r"], mode="nearest"),
        helper.make_node("ReduceMax", ["r", "rax"], ["m"]),
        helper.make_node("Expand", ["m", "shape"], ["e"]),
        helper.make_node("Where", ["cond", "e", "other"], ["wh"]),
        helper.make_node("Mish", ["wh"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "new_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 2, 3])],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_new_ops_secure_and_their_cost_model(tmp_path):
    """The secure run agrees with onnxruntime, and every step's transport count (rounds, bytes per
    party) is exactly what the plan's cost model predicts."""
    path = tmp_path / "new_ops.onnx"
    onnx.save(_new_ops_model(), path)
    x = (np.random.default_rng(4).standard_normal((1, 4, 6)) * 2).astype(np.float32)
    res = compile_model(path, CompileOptions(batch=1))
    assert {"hard_swish", "reduce_max", "softplus", "tanh", "conv"} <= {s.op for s in res.plan.steps}
    run = run_threads(res.plan, x, res.weights, timeout=120)
    np.testing.assert_allclose(run.output, _ort(str(path), x), atol=1e-2)
    measured = {row["name"]: row for row in run.stats["steps"]}
    for step in res.plan.steps:
        row = measured.get(step.name, {"rounds": 0, "bytes_per_party": [0, 0, 0]})
        assert (row["rounds"], list(row["bytes_per_party"])) == (
            step.cost["rounds"], list(step.cost["bytes_per_party"])), step.name
