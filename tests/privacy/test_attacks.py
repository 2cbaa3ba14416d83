"""Membership-inference attacks: metrics, inverted signals, and fitting on shadow data only."""

from __future__ import annotations

import numpy as np
import pytest

from siguard.privacy.attacks import (
    BaggedNeuralAttack,
    BoostedAttack,
    EntropyAttack,
    MaxProbabilityAttack,
    NeuralAttack,
    label_only_gap,
    membership_metrics,
    top_k_sorted,
    train_shadow,
)


def outputs(n: int, confident: bool, rng: np.random.Generator, k: int = 10) -> np.ndarray:
    """(n, k) probability vectors: peaked (top-1 in [0.9, 1)) or flat (top-1 in [0.2, 0.5))."""
    top = rng.uniform(0.9, 0.999, n) if confident else rng.uniform(0.2, 0.5, n)
    rest = rng.dirichlet(np.ones(k - 1), n) * (1 - top)[:, None]
    out = np.concatenate([top[:, None], rest], axis=1)
    return np.take_along_axis(out, rng.permuted(np.tile(np.arange(k), (n, 1)), axis=1), axis=1)


def separable(n: int, seed: int, inverted: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Members confident and non-members flat (or the other way round): a perfectly separating signal."""
    rng = np.random.default_rng(seed)
    probs = np.concatenate([outputs(n, not inverted, rng), outputs(n, inverted, rng)])
    return probs, np.concatenate([np.ones(n, bool), np.zeros(n, bool)])


ATTACKS = [MaxProbabilityAttack, EntropyAttack, NeuralAttack]


@pytest.mark.parametrize("attack_cls", ATTACKS)
def test_perfect_signal_gives_auc_one(attack_cls):
    attack = attack_cls().fit(*separable(200, 0))
    res = attack.evaluate(*separable(200, 1))
    assert res.auc > 0.99 and res.advantage > 0.49 and res.accuracy > 0.97 and res.tpr_at_1pct_fpr > 0.95


@pytest.mark.parametrize("attack_cls", ATTACKS)
def test_inverted_signal_still_has_full_advantage(attack_cls):
    attack = attack_cls().fit(*separable(200, 0))  # the attacker learned "confident = member"
    res = attack.evaluate(*separable(200, 1, inverted=True))
    assert res.auc < 0.01 and res.advantage > 0.49 and res.accuracy < 0.03


def test_no_signal_has_no_advantage():
    rng = np.random.default_rng(3)
    probs = outputs(2000, True, rng)
    membership = rng.random(2000) < 0.5
    res = MaxProbabilityAttack().fit(*separable(200, 0)).evaluate(probs, membership)
    assert res.advantage < 0.05


def test_threshold_inversion_is_learned_on_shadow_data():
    attack = MaxProbabilityAttack().fit(*separable(200, 0, inverted=True))
    assert attack.direction == -1.0
    assert attack.evaluate(*separable(200, 1, inverted=True)).auc > 0.99
    assert MaxProbabilityAttack(allow_inversion=False).fit(*separable(200, 0, inverted=True)).direction == 1.0


@pytest.mark.parametrize("attack_cls", [MaxProbabilityAttack, EntropyAttack])
def test_thresholds_are_fitted_on_shadow_data_only(attack_cls):
    attack = attack_cls().fit(*separable(200, 0))
    threshold, direction = attack.threshold, attack.direction
    probs, membership = separable(200, 1)
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(membership)
        attack.evaluate(probs, shuffled)
        assert attack.threshold == threshold and attack.direction == direction
    # and a fresh fit on other shadow data does move it: the threshold really comes from fit()
    assert attack_cls().fit(*separable(200, 0, inverted=True)).direction != direction


def test_neural_classifier_is_not_refitted_by_evaluate():
    attack = NeuralAttack().fit(*separable(200, 0))
    probe = separable(50, 5)[0]
    before = attack.classifier.predict_proba(top_k_sorted(probe))
    probs, membership = separable(200, 1)
    attack.evaluate(probs, np.random.default_rng(0).permutation(membership))
    np.testing.assert_array_equal(attack.classifier.predict_proba(top_k_sorted(probe)), before)


def test_evaluate_before_fit_and_one_class_fail():
    with pytest.raises(RuntimeError, match="fit"):
        MaxProbabilityAttack().evaluate(*separable(10, 0))
    with pytest.raises(ValueError, match="both"):
        MaxProbabilityAttack().fit(np.full((4, 3), 1 / 3), np.ones(4, bool))


def test_metrics_and_features():
    res = membership_metrics("x", np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0]), np.array([1, 1, 0, 0]))
    assert (res.auc, res.accuracy, res.tpr_at_1pct_fpr, res.advantage) == (1.0, 1.0, 1.0, 0.5)
    np.testing.assert_array_equal(top_k_sorted(np.array([[0.1, 0.6, 0.3, 0.0]])), [[0.6, 0.3, 0.1]])
    gap = label_only_gap(np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 0, 1]), np.array([1, 1, 0, 0]))
    assert gap.accuracy == 1.0 and gap.auc == 1.0


def test_shadow_models_and_the_adaptive_attacker(digits):
    x_train, y_train, x_test, _ = digits
    shadow = train_shadow(x_train[:200], y_train[:200], x_test[:200], input_shape=(64,), num_classes=10, epochs=30,
                          seed=1, x_reference=x_test[200:400])
    assert shadow.logits.shape == (400, 10) and shadow.membership.sum() == 200
    plain = shadow.plain_outputs()
    np.testing.assert_allclose(plain.sum(1), 1.0)
    assert shadow.info["shadow_train_accuracy"] > 0.8
    guarded = shadow.adaptive_outputs(rounds=1, steps=20)  # its own defender, the public algorithm
    assert "shadow_defender_val_accuracy" in shadow.info
    assert guarded.label_preserved.all() and guarded.probs.shape == plain.shape
    attack = NeuralAttack().fit(guarded.probs, shadow.membership)
    res = attack.evaluate(plain, shadow.membership)
    # the metrics against their definitions on the attack's own scores: AUC = P(member scores higher), ties half
    m = shadow.membership.astype(bool)
    score = attack.classifier.predict_proba(top_k_sorted(plain, 3))[:, 1]
    pairs = score[m][:, None] - score[~m][None, :]
    auc = float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
    assert res.auc == pytest.approx(auc, abs=1e-12) and res.advantage == pytest.approx(abs(auc - 0.5), abs=1e-12)
    assert res.accuracy == pytest.approx(float(((score >= 0.5) == m).mean()))
    no_ref = train_shadow(x_train[:50], y_train[:50], x_test[:50], input_shape=(64,), num_classes=10, epochs=1)
    with pytest.raises(ValueError, match="reference"):
        no_ref.adaptive_outputs()


def test_bagged_neural_attack_is_the_mean_of_its_models():
    shadow_probs, shadow_m = separable(300, 0)
    probs, membership = separable(200, 1)
    bag = BaggedNeuralAttack(models=3, seed=7).fit(shadow_probs, shadow_m)
    res = bag.evaluate(probs, membership)
    singles = [NeuralAttack(seed=7 + i).fit(shadow_probs, shadow_m) for i in range(3)]  # the same models, refitted
    score = np.mean([a.classifier.predict_proba(top_k_sorted(probs))[:, 1] for a in singles], axis=0)
    m = membership.astype(bool)
    pairs = score[m][:, None] - score[~m][None, :]
    auc = float((pairs > 0).mean() + 0.5 * (pairs == 0).mean())
    assert res.auc == pytest.approx(auc, abs=1e-12)
    assert [r.auc for r in bag.single] == pytest.approx([a.evaluate(probs, membership).auc for a in singles], abs=1e-12)
    assert res.auc > 0.9  # separable data: the bag finds the signal every member finds
    with pytest.raises(RuntimeError, match="fit"):
        BaggedNeuralAttack(models=2).evaluate(probs, membership)
    with pytest.raises(ValueError, match="models"):
        BaggedNeuralAttack(models=0)


def tail_signal(n: int, seed: int, gap_in: float, gap_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Confident outputs (top-1 = 1 - 1e-3 (1 + U)) whose only difference between members and non-members is
    log(q2 / q3) (gap_in, gap_out, each +- 0.5): a signal a guard that keeps the tail's shape leaves intact."""
    rng = np.random.default_rng(seed)

    def rows(gap: float) -> np.ndarray:
        rest = 1e-3 * (1 + rng.uniform(size=n))
        w = np.exp(-rng.uniform(0.0, 1.0, size=(n, 9)) * 6)  # the tail below q3
        w[:, 0] = np.exp(gap + rng.uniform(-0.5, 0.5, n))  # q2 / q3 = e^gap
        w[:, 1] = 1.0  # q3
        w[:, 2:] = np.minimum(w[:, 2:], 0.9)
        out = np.concatenate([(1 - rest)[:, None], w / w.sum(1, keepdims=True) * rest[:, None]], axis=1)
        return out

    probs = np.concatenate([rows(gap_in), rows(gap_out)])
    return probs, np.concatenate([np.ones(n, bool), np.zeros(n, bool)])


def test_boosted_attack_finds_a_tail_ratio_the_top_probability_hides():
    shadow = tail_signal(400, 0, 3.0, 1.0)
    target, membership = tail_signal(400, 1, 3.0, 1.0)
    res = BoostedAttack().fit(*shadow).evaluate(target, membership)
    score = BoostedAttack().fit(*shadow).classifier.predict_proba(
        np.log(np.maximum(top_k_sorted(target), 1e-30)))[:, 1]
    m = membership.astype(bool)
    pairs = score[m][:, None] - score[~m][None, :]
    assert res.auc == pytest.approx(float((pairs > 0).mean() + 0.5 * (pairs == 0).mean()), abs=1e-12)  # deterministic
    assert res.auc > 0.95
    # the top probability carries nothing here: the threshold attack on it stays at chance (AUC sd ~0.02 at n = 400)
    assert abs(MaxProbabilityAttack().fit(*shadow).evaluate(target, membership).auc - 0.5) < 0.1
    null_shadow, null_target = tail_signal(400, 2, 2.0, 2.0), tail_signal(400, 3, 2.0, 2.0)
    assert abs(BoostedAttack().fit(*null_shadow).evaluate(*null_target).auc - 0.5) < 0.1  # no signal: chance
    with pytest.raises(RuntimeError, match="fit"):
        BoostedAttack().evaluate(target, membership)
