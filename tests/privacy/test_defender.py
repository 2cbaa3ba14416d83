"""The defender: training, ONNX export and read-back, probability handling, and ``siguard guard train``."""

from __future__ import annotations

import numpy as np
import pytest

from siguard.core.errors import InputError
from siguard.privacy.defender import DefenderWeights, export_defender, to_probabilities, train_defender
from siguard.privacy.memguard import softmax


@pytest.fixture(scope="module")
def target_outputs(digits):
    """Logits (members (300, 10), non-members (240, 10)) of a digits MLP trained to overfit on the members."""
    import torch

    from siguard.privacy.targets import make_mlp, train_classifier

    x_train, y_train, x_test, _ = digits
    model = train_classifier(make_mlp((64,), 10), x_train[:300], y_train[:300], epochs=40, seed=0)
    with torch.no_grad():
        z_in = model(torch.from_numpy(x_train[:300])).double().numpy()
        z_out = model(torch.from_numpy(x_test[:240])).double().numpy()
    return z_in, z_out


@pytest.fixture(scope="module")
def trained(target_outputs):
    z_in, z_out = target_outputs
    return train_defender(softmax(z_in), softmax(z_out), seed=0, epochs=40, patience=10)


def test_defender_trains_balanced_with_a_validation_split(trained):
    module, report = trained
    assert report.num_classes == 10
    assert report.members_used == report.nonmembers_used == 240  # the larger class is subsampled
    assert report.val_size == 2 * 48 and report.train_size == 2 * 192
    assert 1 <= report.best_epoch <= report.epochs_run
    assert report.val_accuracy * report.val_size == pytest.approx(round(report.val_accuracy * report.val_size))


def test_defender_separates_separable_members_and_reports_its_accuracy():
    """Members with peaked outputs (top-1 in [0.9, 1)), non-members with flat ones (top-1 in [0.2, 0.5)): a
    defender that learns anything separates them, on its validation split and on fresh records drawn the same
    way (the generating labels are the oracle)."""
    import torch

    rng = np.random.default_rng(0)

    def outputs(n: int, peaked: bool) -> np.ndarray:
        top = rng.uniform(0.9, 1.0, n) if peaked else rng.uniform(0.2, 0.5, n)
        rest = rng.dirichlet(np.ones(9), n) * (1.0 - top)[:, None]
        p = np.concatenate([top[:, None], rest], axis=1)
        return np.take_along_axis(p, rng.permuted(np.tile(np.arange(10), (n, 1)), axis=1), axis=1)

    module, report = train_defender(outputs(200, True), outputs(200, False), seed=0, epochs=60, patience=10)
    assert report.val_accuracy >= 0.9 and report.train_accuracy >= 0.9
    fresh_in, fresh_out = outputs(300, True), outputs(300, False)
    with torch.no_grad():
        said_in = module(torch.from_numpy(fresh_in).float())[:, 0] > 0
        said_out = module(torch.from_numpy(fresh_out).float())[:, 0] > 0
    accuracy = (float(said_in.float().mean()) + float(1 - said_out.float().mean())) / 2
    assert accuracy >= 0.9
    assert module(__import__("torch").zeros(3, 10)).shape == (3, 1)


def test_training_is_deterministic_for_a_seed(target_outputs):
    z_in, z_out = target_outputs
    runs = [DefenderWeights.from_module(train_defender(softmax(z_in), softmax(z_out), seed=3, epochs=3)[0])
            for _ in range(2)]
    np.testing.assert_array_equal(runs[0].W1, runs[1].W1)
    np.testing.assert_array_equal(runs[0].w3, runs[1].w3)


def test_onnx_export_reads_back_and_matches_onnxruntime(trained, target_outputs, tmp_path):
    import onnxruntime as ort

    module, _ = trained
    path = export_defender(module, tmp_path / "defender.onnx")
    weights = DefenderWeights.from_onnx(path)
    direct = DefenderWeights.from_module(module)
    for name in ("W1", "b1", "W2", "b2", "w3", "b3"):
        np.testing.assert_allclose(getattr(weights, name), getattr(direct, name), rtol=0, atol=0)
    assert weights.W1.shape == (128, 10) and weights.w3.shape == (1, 64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["probs"] and [o.name for o in sess.get_outputs()] == ["score"]
    probs = softmax(np.concatenate(target_outputs))
    onnx_score = sess.run(None, {"probs": probs.astype(np.float32)})[0]
    assert onnx_score.shape == (len(probs), 1)  # dynamic batch
    np.testing.assert_allclose(weights.score(probs), onnx_score[:, 0], atol=1e-5)


def test_input_gradient_matches_torch(trained):
    import torch

    module, _ = trained
    w = DefenderWeights.from_module(module)
    x = np.random.default_rng(0).dirichlet(np.ones(10), size=7)
    _, m1, m2 = w.forward(x)
    xt = torch.from_numpy(x).requires_grad_(True)
    module.double()(xt).sum().backward()
    module.float()
    np.testing.assert_allclose(w.input_gradient(m1, m2), xt.grad.numpy(), atol=1e-10)


def test_to_probabilities_detects_logits():
    p = np.array([[0.2, 0.8], [0.5, 0.5]])
    assert to_probabilities(p) is not None and np.array_equal(to_probabilities(p), p)
    z = np.array([[1.0, -2.0], [0.3, 0.1]])
    np.testing.assert_allclose(to_probabilities(z), softmax(z))
    np.testing.assert_allclose(to_probabilities(np.array([[0.9, 0.9]])), [[0.5, 0.5]])  # not a distribution
    with pytest.raises(InputError):
        to_probabilities(np.array([[np.nan, 1.0]]))


def test_bad_inputs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="classes"):
        train_defender(np.full((10, 3), 1 / 3), np.full((10, 4), 0.25))
    with pytest.raises(InputError, match="at least 5"):
        train_defender(np.full((3, 3), 1 / 3), np.full((10, 3), 1 / 3))
    with pytest.raises(InputError, match="does not exist"):
        DefenderWeights.from_onnx(tmp_path / "none.onnx")
    (tmp_path / "junk.onnx").write_text("junk")
    with pytest.raises(InputError, match="not a readable ONNX"):
        DefenderWeights.from_onnx(tmp_path / "junk.onnx")
    with pytest.raises(InputError, match="W2"):
        DefenderWeights(np.zeros((128, 3)), np.zeros(128), np.zeros((64, 100)), np.zeros(64), np.zeros((1, 64)),
                        np.zeros(1))


def test_cli_guard_train(digits, tmp_path, capsys):
    from siguard.cli import main
    from siguard.privacy.targets import export_onnx, make_mlp, train_classifier

    x_train, y_train, x_test, y_test = digits
    model = export_onnx(train_classifier(make_mlp((64,), 10), x_train[:200], y_train[:200], epochs=10),
                        tmp_path / "t.onnx", (64,))
    np.savez(tmp_path / "m.npz", x=x_train[:200], y=y_train[:200])
    np.savez(tmp_path / "n.npz", x=x_test[:200], y=y_test[:200])
    np.savez(tmp_path / "bad.npz", x=x_test[:200, :10], y=y_test[:200])
    out = tmp_path / "d.onnx"
    assert main(["guard", "train", str(model), "--members", str(tmp_path / "m.npz"), "--nonmembers",
                 str(tmp_path / "n.npz"), "-o", str(out), "--seed", "1", "--epochs", "10"]) == 0
    assert "validation accuracy" in capsys.readouterr().out
    assert DefenderWeights.from_onnx(out).num_classes == 10
    for members in ("bad.npz", "missing.npz"):
        assert main(["guard", "train", str(model), "--members", str(tmp_path / members), "--nonmembers",
                     str(tmp_path / "n.npz"), "-o", str(tmp_path / "x.onnx")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("siguard: error: ")
