"""FuseTruncation: a product's truncation runs in the rounds of the ReLU's sign test.

The fused plan must compute exactly what the unfused plan computes on the reference executor
(plain engine: floor(raw / 2^d) clipped, and floor((raw + r 2^d) / 2^d) = floor(raw / 2^d) + r),
cost 2 rounds less per fused ReLU, and leave alone what it cannot fuse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from siguard.passes.fuse import FuseTruncation
from siguard.pipeline import CompileOptions, compile_model
from siguard.runtime.local import run_reference
from tests.conftest import ort_run
from tests.models import export


class _Residual(nn.Module):
    """conv -> relu -> conv (+ skip) -> relu -> linear, with a second reader of one truncated value."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h) + h)  # residual: fusable
        c3 = self.c3(h)
        h = torch.relu(c3) + c3  # the truncated c3 has two readers: not fusable
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def residual_onnx(tmp_path_factory):
    return export(_Residual(), tmp_path_factory.mktemp("fuse") / "res.onnx", torch.zeros(1, 1, 8, 8), opset=17,
                  dynamic_batch=True)


def _compile(path, fuse: bool, monkeypatch, **kw):
    if not fuse:
        monkeypatch.setattr(FuseTruncation, "run", lambda self, graph, ctx: [])
    res = compile_model(path, CompileOptions(batch=16, **kw))
    monkeypatch.undo()
    return res


def test_fused_plan_computes_exactly_the_unfused_plan_in_fewer_rounds(residual_onnx, monkeypatch, digits):
    fused = _compile(residual_onnx, True, monkeypatch)
    plain = _compile(residual_onnx, False, monkeypatch)
    steps = fused.plan.steps
    relus = [s for s in steps if s.op == "relu"]
    assert [bool(s.attrs.get("shift")) for s in relus] == [True, True, False]
    assert sum(1 for s in steps if s.op == "add" and s.attrs.get("shift_b")) == 1
    assert sum(1 for s in steps if s.op == "truncate") == \
        sum(1 for s in plain.plan.steps if s.op == "truncate") - 2
    assert fused.plan.totals["rounds"] == plain.plan.totals["rounds"] - 2 * 2
    assert fused.plan.totals["bytes_per_party"] == plain.plan.totals["bytes_per_party"]
    record = next(r for r in fused.plan.doc["passes"] if r["name"] == "fuse")
    assert len(record["changes"]) == 2 and "residual add" in record["changes"][1]

    x = digits[2][:16].reshape(-1, 1, 8, 8).astype(np.float32)
    a = run_reference(fused.plan, x, fused.weights).output
    b = run_reference(plain.plan, x, plain.weights).output
    assert np.array_equal(a, b)
    assert np.abs(a - ort_run(residual_onnx, x)).max() <= 1e-2


def test_polynomial_relu_keeps_its_truncation(residual_onnx):
    res = compile_model(residual_onnx, CompileOptions(batch=16, overrides={"Relu": "fit2"}))
    relus = [s for s in res.plan.steps if s.op == "relu"]
    assert relus[0]["impl"] != "exact" and not relus[0]["attrs"].get("shift")
    assert relus[1]["attrs"].get("shift")
