"""Numerical safety end to end (issue 14): a plan either answers within 1e-2 of onnxruntime or refuses
the input with one line -- never exit 0 with a wrong answer.

Models: torch's TransformerEncoderLayer (d_model 64, TorchScript exporter, opset 17), whose
LayerNorm overflowed silently for inputs of magnitude 1e4 before, and the digits CNN. Inputs are a
normal sample scaled by 1, 1e2, 1e4 and 1e6, and the corners of the plan's own domain (the worst
inputs it accepts). Oracle: onnxruntime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from siguard.cli import main
from siguard.compiler.plan import Plan
from siguard.core.errors import InputError
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.local import run_reference, run_threads
from tests.conftest import ort_run

SCALES = (1.0, 1e2, 1e4, 1e6)
REL_TOL = 1e-2  # of the output's scale (max |onnxruntime output|)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.0,
                                                      batch_first=True)

    def forward(self, x):
        return self.layer(x)


@pytest.fixture(scope="module")
def encoder_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.onnx"
    with warnings.catch_warnings():  # the legacy TorchScript exporter, on purpose, and its tracer's notes
        warnings.simplefilter("ignore")
        torch.onnx.export(_Encoder().eval(), (torch.randn(1, 8, 64),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return path


@pytest.fixture(scope="module")
def encoder_plan(encoder_onnx, tmp_path_factory) -> Plan:
    d = tmp_path_factory.mktemp("encoder-plan") / "plan"
    write_plan(compile_model(encoder_onnx, CompileOptions()), d)
    return Plan.load(d)


@pytest.fixture(scope="module")
def encoder_plan_calibrated(encoder_onnx, tmp_path_factory) -> Plan:
    """Compiled with --calibration: the approximation pass picks cheaper exp/reciprocal settings on
    normal inputs, which the bounds pass must make valid for the whole domain."""
    d = tmp_path_factory.mktemp("encoder-plan-cal") / "plan"
    x = np.random.default_rng(5).standard_normal((16, 8, 64)).astype(np.float32)
    write_plan(compile_model(encoder_onnx, CompileOptions(calibration=x)), d)
    return Plan.load(d)


def _outcome(run, plan: Plan, model, x: np.ndarray) -> str:
    """'ok' (within REL_TOL of onnxruntime) or 'refused' (one-line InputError naming the domain);
    anything else fails the test."""
    want = ort_run(model, x.astype(np.float32))
    try:
        y = run(plan, x)
    except InputError as exc:
        assert "outside the plan's input domain" in str(exc) and "\n" not in str(exc), str(exc)
        return "refused"
    err = np.abs(y - want).max() / np.abs(want).max()
    assert err <= REL_TOL, f"wrong answer: relative error {err:.3g}"
    return "ok"


def _reference(plan, x):
    return run_reference(plan, x).output


def _lockstep(plan, x):
    return run_threads(plan, x, scheduler="lockstep").output


@pytest.mark.parametrize("run", [_reference, _lockstep], ids=["reference", "lockstep"])
def test_encoder_layer_answers_right_or_refuses_at_every_scale(encoder_plan, encoder_onnx, run):
    x0 = np.random.default_rng(1).standard_normal((1, 8, 64))
    outcomes = {s: _outcome(run, encoder_plan, encoder_onnx, x0 * s) for s in SCALES}
    lo, hi = encoder_plan.inputs[0]["domain"]
    assert encoder_plan.inputs[0]["domain_source"] == "derived" and lo == -hi and np.log2(hi).is_integer()
    for s, got in outcomes.items():  # exactly the inputs inside the domain are answered
        assert got == ("ok" if np.abs(x0 * s).max() <= hi else "refused"), (s, outcomes)
    assert outcomes[1.0] == "ok" and outcomes[1e4] == outcomes[1e6] == "refused"


def test_calibrated_encoder_layer_answers_right_or_refuses_at_every_scale(encoder_plan_calibrated, encoder_onnx):
    x0 = np.random.default_rng(1).standard_normal((1, 8, 64))
    plan = encoder_plan_calibrated
    outcomes = {s: _outcome(_reference, plan, encoder_onnx, x0 * s) for s in SCALES}
    assert outcomes[1.0] == "ok" and outcomes[1e4] == outcomes[1e6] == "refused"
    lo, hi = plan.inputs[0]["domain"]
    x = np.random.default_rng(2).choice([lo, hi], (1, 8, 64))  # a corner: the softmax sees a huge spread
    assert _outcome(_reference, plan, encoder_onnx, x) == "ok"


def test_encoder_layer_is_right_at_the_corners_of_its_domain(encoder_plan, encoder_onnx):
    lo, hi = encoder_plan.inputs[0]["domain"]
    rng = np.random.default_rng(2)
    corners = [rng.choice([lo, hi], (1, 8, 64)), np.tile([lo, hi], (1, 8, 32)), np.full((1, 8, 64), hi),
               rng.uniform(lo, hi, (1, 8, 64))]
    for x in corners:
        assert _outcome(_reference, encoder_plan, encoder_onnx, x) == "ok"


def test_cli_refuses_the_scaled_input_in_a_secure_mode(encoder_plan, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.default_rng(1).standard_normal((1, 8, 64)).astype(np.float32) * 1e4)
    rc = main(["run", str(encoder_plan.directory), "--input", str(tmp_path / "x.npy"), "--mode", "threads",
               "--output", str(tmp_path / "y.npy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("siguard: error: input 'x' holds ")
    assert "outside the plan's input domain" in err[0]
    assert not (tmp_path / "y.npy").exists()


def test_declared_range_the_layer_norm_cannot_take_fails_compile_naming_it(encoder_onnx, tmp_path, capsys):
    rc = main(["compile", str(encoder_onnx), "-o", str(tmp_path / "p"), "--input-range=-1000,1000"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("siguard: error:")]
    assert rc == 2 and len(err) == 1, err
    assert "layer_norm1_LayerNormalization (layer_norm): the sum of squared deviations" in err[0]
    assert not (tmp_path / "p" / "plan.json").exists()


def test_declared_range_is_enforced_as_given(encoder_onnx, tmp_path):
    d = tmp_path / "p"
    assert main(["compile", str(encoder_onnx), "-o", str(d), "--input-range=-100,100"]) == 0
    plan = Plan.load(d)
    assert plan.inputs[0]["domain"] == [-100.0, 100.0] and plan.inputs[0]["domain_source"] == "declared"
    x = np.random.default_rng(1).standard_normal((1, 8, 64))
    assert _outcome(_reference, plan, encoder_onnx, np.clip(x * 100, -100, 100)) == "ok"
    assert _outcome(_reference, plan, encoder_onnx, x * 100) == "refused"  # max |x| is about 350


def test_convolution_network_answers_right_or_refuses(cnn_onnx, digits):
    result = compile_model(cnn_onnx, CompileOptions(calibration=digits[0][:64].reshape(-1, 1, 8, 8)))
    plan, weights = result.plan, result.weights
    lo, hi = plan.inputs[0]["domain"]
    assert plan.inputs[0]["domain_source"] == "derived" and lo <= 0.0 and hi >= 1.0
    assert not any("does not cover" in w for w in result.warnings)  # the digits' [0, 1] is inside

    def run(p, x):
        return run_reference(p, x, weights).output

    x0 = digits[2][:1].reshape(1, 1, 8, 8).astype(np.float64)
    outcomes = {s: _outcome(run, plan, cnn_onnx, x0 * s) for s in SCALES}
    for s, got in outcomes.items():
        assert got == ("ok" if np.abs(x0 * s).max() <= hi else "refused"), (s, outcomes)
    rng = np.random.default_rng(3)
    for x in (rng.choice([lo, hi], (1, 1, 8, 8)), np.full((1, 1, 8, 8), hi), np.full((1, 1, 8, 8), lo)):
        assert _outcome(run, plan, cnn_onnx, x) == "ok"


def test_networked_client_refuses_outside_the_domain_and_answers_inside(encoder_plan, encoder_onnx, tmp_path):
    from siguard.runtime.net.certs import make_certs
    from siguard.runtime.net.client import QueryClient
    from siguard.runtime.net.config import load_config
    from siguard.runtime.net.processes import Trio, write_loopback_config

    make_certs(tmp_path / "certs", write_config=False)
    config = write_loopback_config(tmp_path, cert_dir=tmp_path / "certs")
    x0 = np.random.default_rng(1).standard_normal((1, 8, 64))
    with Trio(encoder_plan.directory, config, tmp_path / "logs", timeout=20) as trio:
        trio.wait_ready()

        def hosts(plan, x):
            return QueryClient(load_config(config), timeout=20).run(x).output

        assert _outcome(hosts, encoder_plan, encoder_onnx, x0) == "ok"
        assert _outcome(hosts, encoder_plan, encoder_onnx, x0 * 1e4) == "refused"
        assert _outcome(hosts, encoder_plan, encoder_onnx, x0) == "ok"  # the servers stayed up
