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

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .defender import DefenderWeights, single_threaded, train_defender
from .memguard import guard_reference, softmax
from .targets import make_mlp, train_classifier

__all__ = [
    "AttackResult",
    "BaggedNeuralAttack",
    "BoostedAttack",
    "membership_metrics",
    "ThresholdAttack",
    "MaxProbabilityAttack",
    "EntropyAttack",
    "ModifiedEntropyAttack",
    "ConfidenceAttack",
    "LossAttack",
    "NeuralAttack",
    "standard_attacks",
    "ShadowData",
    "train_shadow",
    "label_only_gap",
    "top_k_sorted",
]


@dataclass
class AttackResult:
    """One attack on one set of outputs: accuracy, AUC, TPR at 1 % FPR and advantage = |AUC - 0.5|.

    ``roc``: the ROC curve (fpr, tpr) for plots; not part of :meth:`to_dict`."""

    name: str
    accuracy: float
    auc: float
    tpr_at_1pct_fpr: float
    advantage: float
    roc: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("roc")
        return d


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
    return AttackResult(name=name, accuracy=acc, auc=auc, tpr_at_1pct_fpr=tpr_low, advantage=abs(auc - 0.5),
                        roc=(fpr, tpr))


def top_k_sorted(probs: np.ndarray, k: int = 3) -> np.ndarray:
    """(N, k) the k largest probabilities of each row, in descending order (ML-Leaks' attack features)."""
    return -np.sort(-np.asarray(probs, dtype=np.float64), axis=1)[:, :k]


def _entropy(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-30, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def _labels(labels: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if labels is None:
        raise ValueError(f"{name} is label-aware: pass the true labels")
    y = np.asarray(labels).astype(np.int64)
    if y.shape != (n,):
        raise ValueError(f"{name}: expected labels ({n},), got {list(y.shape)}")
    return y


def _true_label_prob(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.take_along_axis(probs, labels[:, None], axis=1)[:, 0]


def _best_threshold(stat: np.ndarray, m: np.ndarray, directions: tuple[float, ...]) -> tuple[float, float, float]:
    """(accuracy, threshold, direction) of the best rule ``direction * stat >= threshold`` on (stat, m)."""
    best = (-1.0, 0.0, 1.0)
    for direction in directions:
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
    return best


class ThresholdAttack:
    """A metric attack: member iff ``direction * statistic(probs[, labels]) >= threshold``.

    :meth:`fit` chooses the threshold and the direction (+1 / -1) with the best accuracy on the shadow
    data; :meth:`evaluate` applies them unchanged (the AUC uses ``direction * statistic - threshold`` as the
    score). ``label_aware`` statistics take the true labels too; ``per_class`` fits one threshold per true
    label (Song & Mittal's class-dependent thresholds) in the globally chosen direction, falling back to the
    global threshold for a class with no shadow members or non-members.
    """

    name = "threshold"
    label_aware = False

    def __init__(self, statistic: Callable[..., np.ndarray], name: str | None = None,
                 allow_inversion: bool = True, label_aware: bool = False, per_class: bool = False):
        self.statistic = statistic
        if name is not None:
            self.name = name
        self.allow_inversion = allow_inversion
        self.label_aware = label_aware or per_class
        self.per_class = per_class
        self.threshold: float | None = None
        self.class_thresholds: dict[int, float] = {}
        self.direction: float = 1.0

    def _stat(self, x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        if not self.label_aware:
            return self.statistic(x), None
        y = _labels(labels, len(x), self.name)
        if y.min() < 0 or y.max() >= x.shape[1]:
            raise ValueError(f"{self.name}: labels must be in [0, {x.shape[1]})")
        return self.statistic(x, y), y

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray,
            shadow_labels: np.ndarray | None = None) -> ThresholdAttack:
        """Fit on shadow outputs (N, k), shadow membership (N,) and, for label-aware attacks, the shadow
        records' true labels (N,); returns self."""
        x, m = _check(shadow_probs, shadow_membership)
        stat, y = self._stat(x, shadow_labels)
        _, self.threshold, self.direction = _best_threshold(stat, m, (1.0, -1.0) if self.allow_inversion else (1.0,))
        self.class_thresholds = {}
        if self.per_class:
            assert y is not None
            for c in np.unique(y):
                sel = y == c
                if m[sel].any() and not m[sel].all():
                    self.class_thresholds[int(c)] = _best_threshold(stat[sel], m[sel], (self.direction,))[1]
        return self

    def _thresholds(self, y: np.ndarray | None, n: int) -> np.ndarray:
        assert self.threshold is not None
        thr = np.full(n, self.threshold)
        if self.per_class and y is not None:
            for c, t in self.class_thresholds.items():
                thr[y == c] = t
        return thr

    def evaluate(self, probs: np.ndarray, membership: np.ndarray, labels: np.ndarray | None = None) -> AttackResult:
        """Metrics on the target's outputs (N, k) with the true membership (N,) (and true labels (N,) for a
        label-aware attack); the fit is not touched."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name}: fit() on shadow data before evaluate()")
        x, m = _check(probs, membership)
        stat, y = self._stat(x, labels)
        score = self.direction * stat - self._thresholds(y, len(x))
        return membership_metrics(self.name, score, score >= 0, m)


class MaxProbabilityAttack(ThresholdAttack):
    """Member iff the top probability is high (Yeom et al.-style confidence threshold)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p: np.max(p, axis=1), "max-probability", allow_inversion)


class EntropyAttack(ThresholdAttack):
    """Member iff the prediction entropy is low (Salem et al., ML-Leaks adversary 3)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p: -_entropy(p), "entropy", allow_inversion)


def modified_entropy(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Song & Mittal's modified prediction entropy (N,): -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i).
    Low for a confident, correct prediction; high for a confident, wrong one."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-30, 1 - 1e-16)
    py = _true_label_prob(p, labels)
    others = -(p * np.log(1 - p)).sum(axis=1) + py * np.log(1 - py)
    return -(1 - py) * np.log(py) + others


class ModifiedEntropyAttack(ThresholdAttack):
    """Member iff the modified entropy is below its true class's threshold (Song & Mittal 2021)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p, y: -modified_entropy(p, y), "modified entropy", allow_inversion, per_class=True)


class ConfidenceAttack(ThresholdAttack):
    """Member iff the true label's probability is above its class's threshold (Song & Mittal 2021)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(_true_label_prob, "true-label confidence", allow_inversion, per_class=True)


class LossAttack(ThresholdAttack):
    """Member iff the cross-entropy loss -log p_y is below a global threshold (Yeom et al. 2018)."""

    def __init__(self, allow_inversion: bool = True):
        super().__init__(lambda p, y: np.log(np.clip(_true_label_prob(p, y), 1e-30, 1.0)), "loss", allow_inversion,
                         label_aware=True)


class _ClassifierAttack:
    """A label-free attack that fits a scikit-learn classifier on features of shadow outputs (``_features``) and
    scores the target's outputs by its membership probability."""

    name: str
    classifier: Any = None

    def _features(self, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def evaluate(self, probs: np.ndarray, membership: np.ndarray, labels: np.ndarray | None = None) -> AttackResult:
        """Metrics on the target's outputs (N, k) with the true membership (N,); the classifier is not touched."""
        if self.classifier is None:
            raise RuntimeError(f"{self.name}: fit() on shadow data before evaluate()")
        x, m = _check(probs, membership)
        score = self.classifier.predict_proba(self._features(x))[:, 1]
        return membership_metrics(self.name, score, score >= 0.5, m)


class NeuralAttack(_ClassifierAttack):
    """ML-Leaks' attack classifier: an MLP on the sorted top-3 probabilities, trained on shadow outputs."""

    name = "neural (ML-Leaks)"
    label_aware = False

    def __init__(self, top_k: int = 3, hidden: tuple[int, ...] = (64,), seed: int = 0):
        self.top_k = top_k
        self.hidden = hidden
        self.seed = seed
        self.classifier: Any = None

    def _features(self, probs: np.ndarray) -> np.ndarray:
        return top_k_sorted(probs, self.top_k)

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray,
            shadow_labels: np.ndarray | None = None) -> NeuralAttack:
        """Train the classifier on shadow outputs (N, k) and shadow membership (N,); returns self.
        (Labels are accepted for a uniform interface and not used: ML-Leaks' attack is label-free.)"""
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        x, m = _check(shadow_probs, shadow_membership)
        clf = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=self.hidden, max_iter=500,
                                                            early_stopping=True, random_state=self.seed))
        self.classifier = clf.fit(self._features(x), m.astype(int))
        return self



class BaggedNeuralAttack:
    """:class:`NeuralAttack` bagged over ``models`` initialisations (seeds ``seed``, ``seed + 1``, ...): the score is
    the mean of their membership probabilities. One model's AUC on a weak signal depends on its initialisation alone
    by up to +-0.03 (``benchmarks/guard_protection.py`` measures the spread), and an |AUC - 0.5| taken from one
    draw reports that noise as leakage, in either direction; the bagged attacker keeps the signal that every
    initialisation finds. It is a stronger attacker, not a weaker one: it only sees more of its own shadow models.
    :attr:`single` holds each model's result of the last :meth:`evaluate`."""

    name = "neural (ML-Leaks), bagged"
    label_aware = False

    def __init__(self, models: int = 5, top_k: int = 3, hidden: tuple[int, ...] = (64,), seed: int = 0,
                 seeds: Sequence[int] | None = None):
        """``seeds`` (optional) names the initialisations instead of ``seed .. seed + models - 1``."""
        seeds = list(range(seed, seed + models)) if seeds is None else list(seeds)
        if not seeds:
            raise ValueError("models must be >= 1")
        self.members = [NeuralAttack(top_k=top_k, hidden=hidden, seed=s) for s in seeds]
        self.single: list[AttackResult] = []

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray,
            shadow_labels: np.ndarray | None = None) -> BaggedNeuralAttack:
        for m in self.members:
            m.fit(shadow_probs, shadow_membership)
        return self

    def evaluate(self, probs: np.ndarray, membership: np.ndarray, labels: np.ndarray | None = None) -> AttackResult:
        x, m = _check(probs, membership)
        scores = []
        self.single = []
        for a in self.members:
            if a.classifier is None:
                raise RuntimeError(f"{self.name}: fit() on shadow data before evaluate()")
            s = a.classifier.predict_proba(a._features(x))[:, 1]
            scores.append(s)
            self.single.append(membership_metrics(a.name, s, s >= 0.5, m))
        score = np.mean(scores, axis=0)
        return membership_metrics(self.name, score, score >= 0.5, m)


class BoostedAttack(_ClassifierAttack):
    """Gradient-boosted trees (scikit-learn's HistGradientBoostingClassifier) on the logarithms of the sorted top-k
    probabilities, trained on shadow outputs: the same label-free features as ML-Leaks' attack, on a log scale
    where a guard that keeps the ratio of the second and third probability leaves it as visible as the top one,
    and without an initialisation to draw (the neural attack's AUC moves by up to +-0.035 with its seed alone; this
    one is deterministic given its data). Used as a second adaptive attacker by ``benchmarks/guard_protection.py``."""

    name = "boosted trees on log top-3"
    label_aware = False

    def __init__(self, top_k: int = 3, max_iter: int = 200, learning_rate: float = 0.05, floor: float = 1e-30):
        self.top_k = top_k
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.floor = floor
        self.classifier: Any = None

    def _features(self, probs: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(top_k_sorted(probs, self.top_k), self.floor))

    def fit(self, shadow_probs: np.ndarray, shadow_membership: np.ndarray,
            shadow_labels: np.ndarray | None = None) -> BoostedAttack:
        """Fit on shadow outputs (N, k) and membership (N,); returns self (labels unused: a label-free attack)."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        x, m = _check(shadow_probs, shadow_membership)
        clf = HistGradientBoostingClassifier(max_iter=self.max_iter, learning_rate=self.learning_rate, random_state=0)
        self.classifier = clf.fit(self._features(x), m.astype(int))
        return self



def standard_attacks(seed: int = 0) -> dict[str, ThresholdAttack | NeuralAttack]:
    """The audit's attacks, keyed by a short id: ML-Leaks' shadow neural attack, the label-free metric attacks
    (max probability, entropy) and the label-aware ones (modified entropy and true-label confidence with
    class-dependent thresholds, loss). All unfitted; the label-only gap attack needs no fitting and is
    reported separately as the floor (:func:`label_only_gap`)."""
    return {
        "neural": NeuralAttack(seed=seed),
        "max_prob": MaxProbabilityAttack(),
        "entropy": EntropyAttack(),
        "modified_entropy": ModifiedEntropyAttack(),
        "confidence": ConfidenceAttack(),
        "loss": LossAttack(),
    }


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
    shadow defender); labels: (N + M,) the shadow records' true labels (label-aware attacks fit on them,
    None if the attacker did not pass ``y_out``); seed, info: the recipe and its measurements, for the record.
    """

    logits: np.ndarray
    membership: np.ndarray
    reference_logits: np.ndarray | None = None
    labels: np.ndarray | None = None
    seed: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    _defender: Any = field(default=None, repr=False)

    def plain_outputs(self) -> np.ndarray:
        """(N + M, k) the shadow model's softmax outputs: what a non-adaptive attacker trains on."""

        return softmax(np.asarray(self.logits, dtype=np.float64))

    def shadow_defender(self) -> Any:
        """The adaptive attacker's own defender (:class:`siguard.privacy.defender.DefenderWeights`), trained once on its
        shadow members against its reference non-members, as the owner trains the real one."""
        if self._defender is None:

            if self.reference_logits is None:
                raise ValueError("an adaptive attacker needs its own reference non-members (x_reference)")
            module, report = train_defender(softmax(self.logits[self.membership]), softmax(self.reference_logits),
                                            seed=self.seed)
            self._defender = DefenderWeights.from_module(module)
            self.info["shadow_defender_val_accuracy"] = report.val_accuracy
        return self._defender

    def adaptive_outputs(self, **guard_options: Any) -> Any:
        """An adaptive attacker's training outputs: the public guard algorithm run on its shadow logits with its
        own shadow defender (``guard_options`` as :func:`siguard.privacy.memguard.guard_reference` takes them).
        Returns the :class:`siguard.privacy.memguard.GuardResult`; its ``probs`` (N + M, k) are what the attack fits
        on."""

        return guard_reference(self.logits, self.shadow_defender(), **guard_options)


def train_shadow(x_in: np.ndarray, y_in: np.ndarray, x_out: np.ndarray, *, input_shape: tuple[int, ...],
                 num_classes: int, epochs: int = 150, seed: int = 1,
                 x_reference: np.ndarray | None = None, y_out: np.ndarray | None = None,
                 hidden: tuple[int, ...] = (128, 64)) -> ShadowData:
    """Train a shadow model like the target (:func:`siguard.privacy.targets.make_mlp`, same recipe) and query it.

    Args:
        x_in, y_in: the attacker's shadow members (N, ...) and labels (N,): the shadow model's training set.
        x_out: the attacker's shadow non-members (M, ...), never seen by the shadow model.
        input_shape, num_classes, epochs, seed: the target's architecture and training recipe (ML-Leaks
            assumes the attacker knows them).
        x_reference: optional further non-members (R, ...) of the attacker, disjoint from ``x_out``, for an
            adaptive attacker's shadow defender.
        y_out: optional labels (M,) of the shadow non-members; with them the shadow data carries labels for
            the label-aware attacks.
        hidden: the hidden widths of the MLP (the target's, which the attacker knows).

    Returns:
        :class:`ShadowData` with logits (N + M, k) and membership (N + M,), members first.
    """
    import torch

    with single_threaded():
        torch.manual_seed(seed)  # train_classifier seeds after the model exists: seed its initialisation too
        model = train_classifier(make_mlp(input_shape, num_classes, hidden), x_in, y_in, epochs=epochs, seed=seed)

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).double().numpy()

    membership = np.concatenate([np.ones(len(x_in), bool), np.zeros(len(x_out), bool)])
    ref = None if x_reference is None else logits(x_reference)
    labels = None if y_out is None else np.concatenate([np.asarray(y_in), np.asarray(y_out)]).astype(np.int64)
    shadow = ShadowData(logits(np.concatenate([x_in, x_out])), membership, ref, labels, seed)
    shadow.info["shadow_train_accuracy"] = float((shadow.logits[: len(x_in)].argmax(1) == np.asarray(y_in)).mean())
    if y_out is not None:
        shadow.info["shadow_test_accuracy"] = float((shadow.logits[len(x_in):].argmax(1) == np.asarray(y_out)).mean())
    return shadow
