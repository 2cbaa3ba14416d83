"""Membership-inference attacks used to measure the guard: ML-Leaks' shadow-model neural attack and metric attacks.

Every attack is fitted on the attacker's own shadow data and only then evaluated on the target's outputs;
the API makes that structural: ``fit(shadow_probs, shadow_membership)`` learns everything (thresholds,
classifier weights) and ``evaluate(target_probs, membership)`` only reads the fitted state.

Shadow data (:func:`train_shadow`): the attacker trains a shadow model with the target's architecture
and training recipe on its own shadow members, and queries it on those members and on its own shadow
non-members. A non-adaptive attacker trains on the shadow model's plain softmax vectors
(:meth:`ShadowData.plain_outputs`): it does not know the defence, and nothing applies the owner's guard
to shadow data. An adaptive attacker knows the defence (:meth:`ShadowData.adaptive_outputs`): it trains its
own shadow defender and runs the public guard algorithm on its shadow logits, so its attack learns what
guarded outputs of members and non-members look like.

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
    "train_shadow",
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
    """The attacker's shadow world: its shadow model's logits on shadow members and non-members.

    logits: (N + M, k), members first; membership: (N + M,) bool; reference_logits: (R, k) outputs on a
    further set of the attacker's non-members (only an adaptive attacker needs them, to train its own
    shadow defender); input_shape, num_classes, seed: the recipe, for the record.
    """

    logits: np.ndarray
    membership: np.ndarray
    reference_logits: np.ndarray | None = None
    seed: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    _defender: Any = field(default=None, repr=False)

    def plain_outputs(self) -> np.ndarray:
        """(N + M, k) the shadow model's softmax outputs: what a non-adaptive attacker trains on."""
        from .memguard import softmax

        return softmax(np.asarray(self.logits, dtype=np.float64))

    def shadow_defender(self) -> Any:
        """The adaptive attacker's own defender (:class:`privacy.defender.DefenderWeights`), trained once on its
        shadow members against its reference non-members, as the owner trains the real one."""
        if self._defender is None:
            from .defender import DefenderWeights, train_defender
            from .memguard import softmax

            if self.reference_logits is None:
                raise ValueError("an adaptive attacker needs its own reference non-members (x_reference)")
            module, report = train_defender(softmax(self.logits[self.membership]), softmax(self.reference_logits),
                                            seed=self.seed)
            self._defender = DefenderWeights.from_module(module)
            self.info["shadow_defender_val_accuracy"] = report.val_accuracy
        return self._defender

    def adaptive_outputs(self, **guard_options: Any) -> Any:
        """An adaptive attacker's training outputs: the public guard algorithm run on its shadow logits with its
        own shadow defender (``guard_options`` as :func:`privacy.memguard.guard_reference` takes them).
        Returns the :class:`privacy.memguard.GuardResult`; its ``probs`` (N + M, k) are what the attack fits on."""
        from .memguard import guard_reference

        return guard_reference(self.logits, self.shadow_defender(), **guard_options)


def train_shadow(x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray, *, input_shape: tuple[int, ...],
                 num_classes: int, epochs: int = 150, seed: int = 1,
                 x_reference: np.ndarray | None = None) -> ShadowData:
    """Train a shadow model like the target (:func:`privacy.targets.make_mlp`, same recipe) and query it.

    Args:
        x_in, y_in: the attacker's shadow members (N, ...) and labels (N,): the shadow model's training set.
        x_out: the attacker's shadow non-members (M, ...), never seen by the shadow model.
        input_shape, num_classes, epochs, seed: the target's architecture and training recipe (ML-Leaks
            assumes the attacker knows them).
        x_reference: optional further non-members (R, ...) of the attacker, disjoint from ``x_out``, for an
            adaptive attacker's shadow defender.

    Returns:
        :class:`ShadowData` with logits (N + M, k) and membership (N + M,), members first.
    """
    import torch

    from .defender import single_threaded
    from .targets import make_mlp, train_classifier

    with single_threaded():
        torch.manual_seed(seed)  # train_classifier seeds after the model exists: seed its initialisation too
        model = train_classifier(make_mlp(input_shape, num_classes), x_in, y_in, epochs=epochs, seed=seed)

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).double().numpy()

    membership = np.concatenate([np.ones(len(x_in), bool), np.zeros(len(x_out), bool)])
    ref = None if x_reference is None else logits(x_reference)
    shadow = ShadowData(logits(np.concatenate([x_in, x_out])), membership, ref, seed)
    shadow.info["shadow_train_accuracy"] = float((shadow.logits[: len(x_in)].argmax(1) == np.asarray(y_in)).mean())
    return shadow
