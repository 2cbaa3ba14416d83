"""The guard's defender: MemGuard's membership classifier h (k -> 128 -> 64 -> 1, ReLU) on confidence vectors.

The model owner trains h on the softmax outputs of its own members (label 1) against a reference set of
non-members it holds (label 0); h returns a real score, ``> 0`` meaning "member". Like MemGuard's defender it
sees the probability vector as is (not sorted), so its gradient reaches every class. The guard needs h's
weights in float64 (:class:`DefenderWeights`), read back from the ONNX file the owner ships with the model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from siguard.core.errors import InputError

__all__ = [
    "HIDDEN",
    "DefenderReport",
    "DefenderWeights",
    "make_defender",
    "train_defender",
    "export_defender",
    "to_probabilities",
    "single_threaded",
]

#: hidden widths of the defender (fixed by the guard protocol: k -> 128 -> 64 -> 1)
HIDDEN: tuple[int, int] = (128, 64)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch and BLAS on one thread inside the block (restored after).

    The defender, the guard and the small targets multiply matrices of a few hundred columns thousands of
    times: extra threads only add synchronisation, and on a busy machine make it ~10x slower.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        threadpool_limits = None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if threadpool_limits is None:
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        torch.set_num_threads(before)


def make_defender(num_classes: int) -> nn.Sequential:
    """The defender network: Linear(k, 128) -> ReLU -> Linear(128, 64) -> ReLU -> Linear(64, 1)."""
    return nn.Sequential(nn.Linear(num_classes, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
                         nn.Linear(HIDDEN[1], 1))


@dataclass
class DefenderReport:
    """What :func:`train_defender` did: sample counts after balancing, epochs, and accuracies."""

    num_classes: int
    members_used: int
    nonmembers_used: int
    train_size: int
    val_size: int
    epochs_run: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    train_accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def to_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs (N, k) as probability vectors: kept if every row is already a distribution (entries
    in [0, 1], rows summing to 1 within 1e-3), otherwise treated as logits and passed through softmax."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2 or out.shape[1] < 2:
        raise InputError(f"model outputs must have shape (N, k) with k >= 2, got {list(out.shape)}")
    if not np.all(np.isfinite(out)):
        raise InputError("model outputs contain NaN or infinity")
    if out.min() >= 0.0 and out.max() <= 1.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        return out
    shifted = out - out.max(axis=1, keepdims=True)
    ex = np.exp(shifted)
    return ex / ex.sum(axis=1, keepdims=True)


def _check_probs(name: str, probs: np.ndarray) -> np.ndarray:
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] < 2:
        raise InputError(f"{name}: expected a (N, k) array of probability vectors, got shape {list(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name}: contains NaN or infinity")
    return arr


def train_defender(member_probs: np.ndarray, nonmember_probs: np.ndarray, *, seed: int = 0, epochs: int = 300,
                   patience: int = 30, min_epochs: int = 100, lr: float = 1e-3, batch: int = 64,
                   val_fraction: float = 0.2) -> tuple[nn.Sequential, DefenderReport]:
    """Train the defender on members (label 1) against non-members (label 0).

    Args:
        member_probs: (N, k) softmax outputs of the target on its training members.
        nonmember_probs: (M, k) softmax outputs on the owner's reference non-members.
        seed: seeds the class balancing, the split, the initialisation and the batch order.
        epochs, patience, min_epochs: at most ``epochs`` passes; after ``min_epochs`` passes, stop once
            ``patience`` epochs went by without a lower validation loss; the weights of the best epoch are
            restored. The warm-up matters: on near one-hot outputs the validation loss first rises (the
            network learns per-class priors) and only falls below chance after ~100 epochs.
        lr, batch: Adam's step size and the mini-batch size.
        val_fraction: share of each class held out for validation (stratified).

    Returns:
        ``(module, report)``: the defender in eval mode (input (B, k) probabilities, output (B, 1) score,
        ``> 0`` = member) and a :class:`DefenderReport` with its validation accuracy.

    The larger class is subsampled to the size of the smaller one, so a constant guess scores 50 %.
    """
    members = _check_probs("member outputs", member_probs)
    nonmembers = _check_probs("non-member outputs", nonmember_probs)
    if members.shape[1] != nonmembers.shape[1]:
        raise InputError(f"members have {members.shape[1]} classes but non-members {nonmembers.shape[1]}")
    rng = np.random.default_rng(seed)  # sampling and splitting only; never used for shares or masks
    n = min(len(members), len(nonmembers))
    if n < 5:
        raise InputError(f"need at least 5 members and 5 non-members to train a defender, got {n}")
    members = members[rng.permutation(len(members))[:n]]
    nonmembers = nonmembers[rng.permutation(len(nonmembers))[:n]]
    n_val = max(1, int(round(val_fraction * n)))
    x_train = np.concatenate([members[n_val:], nonmembers[n_val:]])
    y_train = np.concatenate([np.ones(n - n_val), np.zeros(n - n_val)])
    x_val = np.concatenate([members[:n_val], nonmembers[:n_val]])
    y_val = np.concatenate([np.ones(n_val), np.zeros(n_val)])

    with single_threaded():
        return _fit(x_train, y_train, x_val, y_val, n=n, seed=seed, epochs=epochs, patience=patience,
                    min_epochs=min_epochs, lr=lr, batch=batch)


def _fit(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *, n: int, seed: int,
         epochs: int, patience: int, min_epochs: int, lr: float,
         batch: int) -> tuple[nn.Sequential, DefenderReport]:
    """Adam with early stopping on the validation loss (the loop of :func:`train_defender`)."""
    k = x_train.shape[1]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = make_defender(k)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    xt, yt = torch.from_numpy(x_train.astype(np.float32)), torch.from_numpy(y_train.astype(np.float32))
    xv, yv = torch.from_numpy(x_val.astype(np.float32)), torch.from_numpy(y_val.astype(np.float32))
    best_loss, best_epoch, best_state, epoch = float("inf"), 0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss_fn(model(xt[idx])[:, 0], yt[idx]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model(xv)[:, 0], yv))
        if val_loss < best_loss - 1e-6:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(model.state_dict())
        elif epoch >= min_epochs and epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        val_acc = float(((model(xv)[:, 0] > 0).float() == yv).float().mean())
        train_acc = float(((model(xt)[:, 0] > 0).float() == yt).float().mean())
    report = DefenderReport(num_classes=k, members_used=n, nonmembers_used=n, train_size=len(x_train),
                            val_size=len(x_val), epochs_run=epoch, best_epoch=best_epoch, val_loss=best_loss,
                            val_accuracy=val_acc, train_accuracy=train_acc)
    return model, report


def export_defender(module: nn.Module, path: str | Path, opset: int = 17) -> Path:
    """Write the defender to ONNX: input ``probs`` (batch, k) float32, output ``score`` (batch, 1),
    symbolic batch axis. Returns the path."""
    weights = DefenderWeights.from_module(module)  # checks the architecture before writing anything
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(1, weights.num_classes),), str(path), input_names=["probs"],
                          output_names=["score"], dynamic_axes={"probs": {0: "batch"}, "score": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path


@dataclass
class DefenderWeights:
    """The defender's parameters in float64: ``h(x) = w3 relu(W2 relu(W1 x + b1) + b2) + b3``.

    Shapes: W1 (128, k), b1 (128,), W2 (64, 128), b2 (64,), w3 (1, 64), b3 (1,).
    """

    W1: np.ndarray
    b1: np.ndarray
    W2: np.ndarray
    b2: np.ndarray
    w3: np.ndarray
    b3: np.ndarray

    def __post_init__(self) -> None:
        for name in ("W1", "b1", "W2", "b2", "w3", "b3"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float64))
        k = self.W1.shape[1] if self.W1.ndim == 2 else -1
        expected = {"W1": (HIDDEN[0], k), "b1": (HIDDEN[0],), "W2": (HIDDEN[1], HIDDEN[0]), "b2": (HIDDEN[1],),
                    "w3": (1, HIDDEN[1]), "b3": (1,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape or k < 2:
                raise InputError(f"defender weight {name} has shape {list(getattr(self, name).shape)}, expected "
                                 f"{list(shape)} (architecture k -> {HIDDEN[0]} -> {HIDDEN[1]} -> 1)")
            if not np.all(np.isfinite(getattr(self, name))):
                raise InputError(f"defender weight {name} contains NaN or infinity")

    @property
    def num_classes(self) -> int:
        return int(self.W1.shape[1])

    def forward(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Scores and ReLU masks: ``(score (B,), mask1 (B, 128), mask2 (B, 64))`` for ``probs`` (B, k).

        The masks are ``[pre-activation >= 0]`` (ReLU'(0) taken as 1), as the guard's gradient uses them.
        """
        x = np.asarray(probs, dtype=np.float64)
        pre1 = x @ self.W1.T + self.b1
        pre2 = np.maximum(pre1, 0.0) @ self.W2.T + self.b2
        score = np.maximum(pre2, 0.0) @ self.w3[0] + self.b3[0]
        return score, pre1 >= 0.0, pre2 >= 0.0

    def score(self, probs: np.ndarray) -> np.ndarray:
        """h(probs): (B, k) -> (B,) real scores, ``> 0`` = member."""
        return self.forward(probs)[0]

    def input_gradient(self, mask1: np.ndarray, mask2: np.ndarray) -> np.ndarray:
        """dh/dx (B, k) given the ReLU masks (B, 128), (B, 64) of the forward pass at x."""
        d2 = mask2 * self.w3[0]  # (B, 64)
        d1 = mask1 * (d2 @ self.W2)  # (B, 128)
        return d1 @ self.W1  # (B, k)

    @classmethod
    def from_module(cls, module: nn.Module) -> DefenderWeights:
        """Read the three Linear layers of a torch defender (see :func:`make_defender`)."""
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if len(linears) != 3:
            raise InputError(f"a defender has 3 Linear layers, this module has {len(linears)}")
        p = [(lin.weight.detach().double().numpy(), lin.bias.detach().double().numpy()) for lin in linears]
        return cls(W1=p[0][0], b1=p[0][1], W2=p[1][0], b2=p[1][1], w3=p[2][0], b3=p[2][1])

    @classmethod
    def from_onnx(cls, path: str | Path) -> DefenderWeights:
        """Read the weights back from an ONNX defender (Gemm, or MatMul + Add, layers with ReLU between)."""
        import onnx
        from onnx import numpy_helper

        path = Path(path)
        if not path.exists():
            raise InputError(f"defender file {path} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise InputError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
        graph = model.graph
        consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        consts[node.output[0]] = numpy_helper.to_array(attr.t)
        layers: list[list[np.ndarray]] = []  # [W (out, in), b (out,)]
        relus = 0
        for node in graph.node:
            op = node.op_type
            if op == "Gemm":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    raise InputError(f"{path}: Gemm node {node.name!r} uses transA/alpha/beta, not a plain Linear")
                if node.input[1] not in consts or len(node.input) < 3 or node.input[2] not in consts:
                    raise InputError(f"{path}: Gemm node {node.name!r} has non-constant weights")
                w = consts[node.input[1]]
                layers.append([w if attrs.get("transB", 0) else w.T, consts[node.input[2]].reshape(-1)])
            elif op == "MatMul":
                if node.input[1] not in consts:
                    raise InputError(f"{path}: MatMul node {node.name!r} has non-constant weights")
                layers.append([consts[node.input[1]].T, None])
            elif op == "Add" and layers and layers[-1][1] is None:
                bias = next((consts[i] for i in node.input if i in consts), None)
                if bias is None:
                    raise InputError(f"{path}: Add node {node.name!r} has no constant bias")
                layers[-1][1] = bias.reshape(-1)
            elif op == "Relu":
                relus += 1
            elif op not in ("Constant", "Identity", "Flatten"):
                raise InputError(f"{path}: unexpected op {op} in a defender (Gemm/MatMul+Add layers with Relu)")
        if len(layers) != 3 or relus != 2 or any(b is None for _, b in layers):
            raise InputError(f"{path}: a defender is 3 linear layers with 2 ReLUs, found {len(layers)} layers and "
                             f"{relus} ReLUs")
        return cls(W1=layers[0][0], b1=layers[0][1], W2=layers[1][0], b2=layers[1][1], w3=layers[2][0],
                   b3=layers[2][1])
