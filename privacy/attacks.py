"""Membership-inference attacks used to measure the guard: ML-Leaks' shadow-model neural attack and metric attacks.

Every attack is fitted on the attacker's own shadow data and only then evaluated on the target's outputs;
the API makes that structural: ``fit(shadow_probs, shadow_membership)`` learns everything (thresholds,
classifier weights) and ``evaluate(target_probs, membership)`` only reads the fitted state.

Shadow data (:func:`shadow_outputs`): the attacker trains a shadow model with the target's architecture
and training recipe on its own shadow members, and queries it on those members and on its own shadow
non-members. By default these outputs are the shadow model's plain softmax vectors: the attacker
does not know the defence. ``adaptive=True`` models an attacker that knows it: it trains its own shadow
defender and runs the public guard algorithm on its shadow logits, so its attack learns what guarded
outputs of members and non-members look like.

Reported per attack (:class:`AttackResult`): accuracy of its decision, AUC of its score, TPR at 1 % FPR,
and advantage = |AUC - 0.5| (an attacker may invert its decision, so an AUC far below 0.5 leaks too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "AttackResult",
    "membership_metrics",
    "ThresholdAttack",
    "MaxProbabilityAttack",
    "EntropyAttack",
    "NeuralAttack",
    "ShadowData",
    "shadow_outputs",
    "label_only_gap",
    "top_k_sorted",
]


@dataclass
class AttackResult:
    """One attack on one set of outputs: accuracy, AUC, TPR at 1 % FPR and advantage = |AUC - 0.5|."""

    name: str
    accuracy: float
    auc: float
    tpr_at_1pct_fpr: float
    advantage: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(probs: np.ndarray, membership: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(probs, dtype=np.float64)
    m = np.asarray(membership).astype(bool)
    if x.ndim != 2 or m.shape != (x.shape[0],):
        raise ValueError(f"expected probs (N, k) and membership (N,), got {list(x.shape)} and {list(m.shape)}")
    if m.all() or not m.any():
        raise ValueError("membership must contain both members and non-members")
    return x, m


def membership_metrics(name: str, score: np.ndarray, decision: np.ndarray, membership: np.ndarray) -> AttackResult:
    """Metrics of an attack from its score (N,) (higher = more likely member), its 0/1 decision (N,) and
    the true membership (N,)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    m = np.asarray(membership).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    auc = float(roc_auc_score(m, s))
    fpr, tpr, _ = roc_curve(m, s)
    tpr_low = float(tpr[fpr <= 0.01].max()) if np.any(fpr <= 0.01) else 0.0
    acc = float((np.asarray(decision).astype(bool) == m).mean())
    return AttackResult(name=name, accuracy=acc, auc=auc, tpr_at_1pct_fpr=tpr_low, advantage=abs(auc - 0.5))


def top_k_sorted(probs: np.ndarray, k: int = 3) -> np.ndarray:
    """(N, k) the k largest probabilities of each row, in descending order (ML-Leaks' attack features)."""
    return -np.sort(-np.asarray(probs, dtype=np.float64), axis=1)[:, :k]


def _entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-30, 1.0)
    return -(p * np.log(p)).sum(axis=1)


class ThresholdAttack:
    """A metric attack: member iff ``direction * statistic(probs) >= threshold``.

    :meth:`fit` chooses the threshold and the direction (+1 / -1) with the best accuracy on the shadow
    data; :meth:`evaluate` applies them unchanged (the AUC uses ``direction * statistic`` as the score).
    """

    name = "threshold"

    def __init__(self, statistic: Callable[[np.ndarray], np.ndarray], name: str | None = None,
                 allow_inversion: bool = True):
        self.statistic = statistic
        if name is not None:
            self.name = name
        self.allow_inversion = allow_inversion
        self.threshold: float | None = None
        self.direction: float = 1.0

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray) -> ThresholdAttack:
        """Fit on shadow outputs (N, k) and shadow membership (N,); returns self."""
        x, m = _check(shadow_probs, shadow_membership)
        stat = self.statistic(x)
        best = (-1.0, 0.0, 1.0)  # (accuracy, threshold, direction)
        for direction in (1.0, -1.0) if self.allow_inversion else (1.0,):
            s = direction * stat
            order = np.argsort(-s, kind="stable")
            s_sorted, m_sorted = s[order], m[order]
            # predicting "member" for the top i scores: correct = members among them + non-members below
            tp = np.concatenate([[0], np.cumsum(m_sorted)])
            fp = np.concatenate([[0], np.cumsum(~m_sorted)])
            correct = tp + ((~m).sum() - fp)
            # only cut between distinct scores
            cut_ok = np.concatenate([[True], s_sorted[:-1] != s_sorted[1:], [True]])
            correct = np.where(cut_ok, correct, -1)
            i = int(np.argmax(correct))
            if i == 0:
                thr = float(s_sorted[0]) + 1.0
            elif i == len(s_sorted):
                thr = float(s_sorted[-1])
            else:
                thr = float(0.5 * (s_sorted[i - 1] + s_sorted[i]))
            acc = correct[i] / len(m)
            if acc > best[0]:
                best = (acc, thr, direction)
        _, self.threshold, self.direction = best
        return self

    def evaluate(self, probs: np.ndarray, membership: np.ndarray) -> AttackResult:
        """Metrics on the target's outputs (N, k) with the true membership (N,); the fit is not touched."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name}: fit() on shadow data before evaluate()")
        x, m = _check(probs, membership)
        score = self.direction * self.statistic(x)
        return membership_metrics(self.name, score, score >= self.threshold, m)


class MaxProbabilityAttack(ThresholdAttack):
    """Member iff the top probability is high (Yeom et al.-style confidence threshold)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p: np.max(p, axis=1), "max-probability", allow_inversion)


class EntropyAttack(ThresholdAttack):
    """Member iff the prediction entropy is low (Salem et al., ML-Leaks adversary 3)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p: -_entropy(p), "entropy", allow_inversion)


class NeuralAttack:
    """ML-Leaks' attack classifier: an MLP on the sorted top-3 probabilities, trained on shadow outputs."""

    name = "neural (ML-Leaks)"

    def __init__(self, top_k: int = 3, hidden: tuple[int, ...] = (64,), seed: int = 0):
        self.top_k = top_k
        self.hidden = hidden
        self.seed = seed
        self.classifier: Any = None

    def _features(self, probs: np.ndarray) -> np.ndarray:
        return top_k_sorted(probs, self.top_k)

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray) -> NeuralAttack:
        """Train the classifier on shadow outputs (N, k) and shadow membership (N,); returns self."""
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, m = _check(shadow_probs, shadow_membership)
        clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=self.hidden, max_iter=500,
                                                            early_stopping=True, random_state=self.seed))
        self.classifier = clf.fit(self._features(x), m.astype(int))
        return self

    def evaluate(self, probs: np.ndarray, membership: np.ndarray) -> AttackResult:
        """Metrics on the target's outputs (N, k) with the true membership (N,); the classifier is not touched."""
        if self.classifier is None:
            raise RuntimeError(f"{self.name}: fit() on shadow data before evaluate()")
        x, m = _check(probs, membership)
        score = self.classifier.predict_proba(self._features(x))[:, 1]
        return membership_metrics(self.name, score, score >= 0.5, m)


def label_only_gap(probs: np.ndarray, labels: np.ndarray, membership: np.ndarray) -> AttackResult:
    """The gap attack (Yeom et al.): member iff the top-1 label is right. Needs no shadow data and sees only
    labels, so no label-preserving guard can lower it: it is the floor of what the guard can achieve."""
    x, m = _check(probs, membership)
    correct = (x.argmax(axis=1) == np.asarray(labels)).astype(np.float64)
    return membership_metrics("label-only gap", correct, correct > 0.5, m)


@dataclass
class ShadowData:
    """The attacker's training data for its attacks: outputs (N, k) of its shadow model and membership (N,).

    ``guarded`` says whether the outputs went through the attacker's own copy of the guard (adaptive).
    """

    probs: np.ndarray
    membership: np.ndarray
    guarded: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def shadow_outputs(x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray, *, input_shape: tuple[int, ...],
                   num_classes: int, epochs: int = 150, seed: int = 1, adaptive: bool = False,
                   x_reference: np.ndarray | None = None, guard_options: dict[str, Any] | None = None) -> ShadowData:
    """Train a shadow model like the target and collect the attacker's training data.

    Args:
        x_in, y_in: the attacker's shadow members (N, ...) and labels (N,): the shadow model's training set.
        x_out: the attacker's shadow non-members (M, ...), never seen by the shadow model.
        input_shape, num_classes: the target's architecture (:func:`privacy.targets.make_mlp`).
        epochs, seed: the training recipe (the same as the target's, as ML-Leaks assumes).
        adaptive: the attacker knows the defence: it trains a shadow defender on its shadow members against
            ``x_reference`` (its own reference non-members, disjoint from ``x_out``) and passes its shadow
            logits through :func:`privacy.memguard.guard_reference` with ``guard_options``.

    Returns:
        :class:`ShadowData` with probs (N + M, k) and membership (N + M,), members first.
    """
    import torch

    from .targets import make_mlp, train_classifier

    model = train_classifier(make_mlp(input_shape, num_classes), x_in, y_in, epochs=epochs, seed=seed)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.concatenate([x_in, x_out]).astype(np.float32))).double().numpy()
    membership = np.concatenate([np.ones(len(x_in), bool), np.zeros(len(x_out), bool)])
    from .memguard import softmax

    if not adaptive:
        return ShadowData(softmax(logits), membership, guarded=False)
    if x_reference is None:
        raise ValueError("an adaptive attacker needs its own reference non-members (x_reference)")
    from .defender import DefenderWeights, train_defender
    from .memguard import guard_reference

    with torch.no_grad():
        ref_logits = model(torch.from_numpy(np.asarray(x_reference, np.float32))).double().numpy()
    module, report = train_defender(softmax(logits[: len(x_in)]), softmax(ref_logits), seed=seed)
    guard = guard_reference(logits, DefenderWeights.from_module(module), **(guard_options or {}))
    return ShadowData(guard.probs, membership, guarded=True,
                      info={"shadow_defender_val_accuracy": report.val_accuracy, **guard.summary()})
