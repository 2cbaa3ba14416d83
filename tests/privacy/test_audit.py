"""The membership-inference audit on a small digits world: schema, report files, labels, and the rule that
attacks are fitted on the attacker's shadow data only (never on evaluation data)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tests.cli.test_cli import _assert_one_line_error, siguard
from tests.privacy.conftest import N_NON, N_SHADOW, N_TRAIN, _audit


def test_audit_json_follows_its_schema_and_the_report_files_exist(world, audited):
    from siguard.privacy.audit import validate_audit

    doc, _ = audited
    report = world["dir"] / "report"
    on_disk = json.loads((report / "audit.json").read_text())
    validate_audit(on_disk)
    assert on_disk["outputs"].keys() == {"plaintext", "secure", "guarded", "memguard"}
    assert on_disk["data"] == {"members": N_TRAIN, "nonmembers": N_NON, "shadow_members": N_SHADOW // 2,
                               "shadow_nonmembers": N_SHADOW // 2}
    html = (report / on_disk["files"]["html"]).read_text()
    pngs = list(on_disk["files"]["roc_by_attack"].values()) + list(on_disk["files"]["roc_by_output"].values())
    assert len(pngs) == 6 + 4
    for name in pngs:
        blob = (report / name).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", blob[16:24])
        assert width >= 300 and height >= 300
        assert f'src="{name}"' in html
    # a schema violation is caught
    bad = json.loads(json.dumps(on_disk))
    bad["outputs"]["guarded"]["attacks"]["neural"]["auc"] = 1.5
    with pytest.raises(Exception, match="1.5"):
        validate_audit(bad)


def test_plaintext_row_is_onnxruntimes_and_labels_survive_the_guard(world, audited):
    from tests.conftest import ort_run

    doc, _ = audited
    data = world["data"]
    x = np.concatenate([data.x[world["train"]], data.x[world["non"]]])
    y = np.concatenate([data.y[world["train"]], data.y[world["non"]]])
    ort = ort_run(world["onnx"], x)
    out = doc["outputs"]
    assert out["plaintext"]["label_accuracy"] == pytest.approx(float((ort.argmax(1) == y).mean()))
    assert out["secure"]["top1_agreement"] >= 0.99
    assert out["guarded"]["top1_agreement"] == 1.0  # the guard never changes a label
    assert out["plaintext"]["mean_l1"] == 0.0
    assert out["guarded"]["mean_l1"] > out["secure"]["mean_l1"]  # the guard did perturb
    # the revealed vectors are kept as probabilities (not re-softmaxed) and follow the float reference
    saved = np.load(world["dir"] / "report" / doc["files"]["outputs"])
    g, ref = saved["guarded"], saved["memguard"]
    assert g.min() >= 0 and np.allclose(g.sum(1), 1)
    assert np.median(np.abs(g - ref).sum(1)) < 0.01 and out["guarded"]["mean_l1"] < 0.2
    np.testing.assert_array_equal(saved["labels"], y)
    gap = doc["floor"]["label_only_gap"]
    members_right = (ort.argmax(1) == y)[:N_TRAIN].mean()
    non_right = (ort.argmax(1) == y)[N_TRAIN:].mean()
    assert gap["auc"] == pytest.approx(0.5 + 0.5 * (members_right - non_right))


def test_attacks_are_fitted_on_shadow_outputs_only(world, audited):
    doc, calls = audited
    assert len(calls) == 6  # each attack fitted once
    evaluation = []
    for kind in ("plaintext", "secure", "guarded", "memguard"):
        assert doc["outputs"][kind]["attacks"].keys() == {"neural", "max_prob", "entropy", "modified_entropy",
                                                          "confidence", "loss"}
    # rebuild the evaluation outputs independently (onnxruntime + softmax) and check no fit saw one of them
    from siguard.privacy.memguard import softmax
    from tests.conftest import ort_run

    data = world["data"]
    x = np.concatenate([data.x[world["train"]], data.x[world["non"]]])
    evaluation.append(softmax(ort_run(world["onnx"], x).astype(np.float64)))
    for _name, probs, membership in calls:
        assert probs.shape == (N_SHADOW, 10) and membership.sum() == N_SHADOW // 2
        for ev in evaluation:
            d = np.abs(probs[:, None, :] - ev[None, :, :]).max(axis=2)
            assert (d > 1e-9).all(), "an attack was fitted on an evaluation output"


def test_swapping_members_and_nonmembers_mirrors_every_auc(world, audited):
    """The fitted attacks depend on shadow data only: relabelling the evaluation set leaves their scores
    unchanged, so every AUC becomes 1 - AUC (and the advantage stays)."""
    doc, _ = audited
    swapped = _audit(world, swap=True)
    for kind in ("plaintext", "secure", "guarded", "memguard"):
        for key, row in doc["outputs"][kind]["attacks"].items():
            other = swapped["outputs"][kind]["attacks"][key]
            assert other["auc"] == pytest.approx(1 - row["auc"], abs=1e-9), (kind, key)
            assert other["advantage"] == pytest.approx(row["advantage"], abs=1e-9)


def test_terminal_table_shows_every_attack_and_output(audited):
    from siguard.privacy.audit import format_table

    doc, _ = audited
    table = format_table(doc)
    for row in doc["outputs"]["plaintext"]["attacks"].values():
        assert row["name"] in table
    for title in ("plaintext (onnxruntime)", "secure, no guard", "secure + guard", "plaintext MemGuard"):
        assert title in table
    assert "label-only gap" in table
    from siguard.privacy.audit import format_markdown

    md = format_markdown(doc).splitlines()
    assert len(md) == 2 + 6 + 1 + 5 and all(line.count("|") == 6 for line in md)
    best = doc["outputs"]["guarded"]["best_attack"]
    assert f"**{best['auc']:.3f} / {best['advantage']:.3f}**" in "\n".join(md)


def test_cli_audit_runs_and_rejects_mismatched_inputs(world, tmp_path):
    f = world["files"]
    args = ["audit", world["onnx"], "--plan", world["plan"], "--guarded-plan", world["gplan"], "--members",
            f["members"], "--nonmembers", f["nonmembers"], "--shadow", f["shadow"], "--mode", "reference",
            "--shadow-epochs", "20"]
    ok = siguard(*args, "--report", tmp_path / "r")
    assert ok.returncode == 0, ok.stderr
    assert "secure + guard" in ok.stdout and (tmp_path / "r" / "audit.json").exists()
    # the guarded plan passed as the plain one
    swapped = [a if a != world["plan"] else world["gplan"] for a in args]
    assert "has a guard" in _assert_one_line_error(siguard(*swapped))
    # a plan from another model
    other = tmp_path / "other.onnx"
    other.write_bytes(world["onnx"].read_bytes() + b"\0")
    assert "different model" in _assert_one_line_error(siguard(*[other if a == world["onnx"] else a for a in args]))
    # records of the wrong shape
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 3), np.float32), y=np.zeros(4, np.int64))
    assert "shape" in _assert_one_line_error(siguard(*[bad if a == f["members"] else a for a in args]))


def test_fixed_point_probabilities_are_not_mistaken_for_logits():
    """A softmax head's revealed vector can be an ulp below 0; it stays a probability vector (not softmaxed)."""
    from siguard.privacy.audit import _as_probabilities
    from siguard.privacy.defender import to_probabilities

    q = np.array([[0.7, 0.3 + 3e-5, -1.5e-5], [0.0, 0.0, 0.0]])
    got = _as_probabilities(q, True)
    np.testing.assert_allclose(got[0], [0.7, 0.3 + 3e-5, 0.0] / np.float64(1.00003), rtol=1e-12)
    np.testing.assert_allclose(got[1], [1 / 3] * 3)
    assert to_probabilities(q)[0, 0] < 0.5  # what treating it as logits would have done
    np.testing.assert_allclose(_as_probabilities(np.log([[0.2, 0.8]]), False), [[0.2, 0.8]])
