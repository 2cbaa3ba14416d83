"""Fixtures of the audit tests: a small digits world (target, defender, both plans, data files) and one
audit of it with every attack's ``fit`` spied on."""

from __future__ import annotations

import numpy as np
import pytest

N_TRAIN, N_NON, N_REF, N_SHADOW, EPOCHS = 120, 120, 150, 200, 120
GUARD = {"rounds": 2, "steps": 8}  # a short guard: the audit's logic, not the guard's strength, is tested here


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Target, defender, both plans and the data files, built with the product's own training and compile."""
    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from siguard.privacy.datasets import load_dataset, save_npz
    from siguard.privacy.defender import export_defender, train_defender
    from siguard.privacy.memguard import softmax
    from siguard.privacy.targets import export_onnx, make_mlp, predict_onnx, train_classifier

    d = tmp_path_factory.mktemp("audit")
    data = load_dataset("digits")
    order = np.random.default_rng(5).permutation(len(data.x))
    cuts = np.cumsum([N_TRAIN, N_NON, N_REF, N_SHADOW])
    train, non, ref, shadow = np.split(order[: cuts[-1]], cuts[:-1])
    model = train_classifier(make_mlp(data.input_shape, 10), data.x[train], data.y[train], epochs=EPOCHS)
    onnx_path = export_onnx(model, d / "target.onnx", data.input_shape)
    z_train, z_ref = predict_onnx(onnx_path, data.x[train]), predict_onnx(onnx_path, data.x[ref])
    module, _ = train_defender(softmax(z_train.astype(np.float64)), softmax(z_ref.astype(np.float64)), epochs=60)
    defender = export_defender(module, d / "defender.onnx")
    batch = N_TRAIN + N_NON
    plan = write_plan(compile_model(onnx_path, CompileOptions(batch=batch)), d / "plan")
    gplan = write_plan(compile_model(onnx_path, CompileOptions(batch=batch, guard=defender, guard_config=GUARD)),
                       d / "gplan")
    files = {name: save_npz(d / f"{name}.npz", data.x[idx], data.y[idx])
             for name, idx in (("members", train), ("nonmembers", non), ("shadow", shadow))}
    return {"dir": d, "onnx": onnx_path, "plan": plan, "gplan": gplan, "files": files, "data": data,
            "train": train, "non": non, "shadow": shadow}


def _audit(world, report=None, swap=False, mode="reference"):
    from siguard.privacy.audit import AuditData, run_audit

    f = world["files"]
    m, n = (f["nonmembers"], f["members"]) if swap else (f["members"], f["nonmembers"])
    data = AuditData.from_files(m, n, f["shadow"])
    return run_audit(world["onnx"], world["plan"], world["gplan"], data, report_dir=report, mode=mode,
                     shadow_epochs=EPOCHS, progress=False, log=lambda _m: None)


@pytest.fixture(scope="module")
def audited(world):
    import siguard.privacy.attacks as attacks

    calls = []
    originals = {}
    for cls in (attacks.ThresholdAttack, attacks.NeuralAttack):
        originals[cls] = cls.fit

        def spy(self, probs, membership, labels=None, _orig=originals[cls]):
            calls.append((type(self).__name__, np.array(probs, copy=True), np.array(membership, copy=True)))
            return _orig(self, probs, membership, labels)

        cls.fit = spy
    try:
        doc = _audit(world, report=world["dir"] / "report")
    finally:
        for cls, fn in originals.items():
            cls.fit = fn
    return doc, calls
