"""Small real models for tests: digits MLP/CNN (trained in seconds), CIFAR ResNets, ONNX export helpers.

Everything expensive is cached (:func:`functools.cache`, an unbounded ``lru_cache``), so several
test modules share one trained model per process. Callers pass the path an ONNX file is written to
(usually under pytest's ``tmp_path``); :func:`sklearn_mlp_onnx` falls back to a :mod:`tempfile` dir.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "digits",
    "train_digits_mlp",
    "train_digits_cnn",
    "resnet_cifar",
    "export",
    "sklearn_mlp_onnx",
    "accuracy",
]

_SEED = 0


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1].

    Returns ``(x_train (1257, 64) float32, y_train (1257,) int64, x_test (540, 64) float32,
    y_test (540,) int64)``; a fixed stratified split (30 % test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=_SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on ``x`` (any shape the model takes) against labels ``y`` (N,)."""
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
    return float((logits.argmax(dim=1).numpy() == y).mean())


def _train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, batch: int, lr: float) -> None:
    """Adam on cross-entropy, shuffled mini-batches, deterministic for a fixed seed (the product's loop)."""
    from siguard.privacy.targets import train_classifier

    train_classifier(model, x, y, epochs=epochs, batch=batch, lr=lr, seed=_SEED)


@functools.cache
def train_digits_mlp() -> nn.Module:
    """A 64 -> 64 -> 32 -> 10 ReLU MLP trained on :func:`digits` (>= 90 % test accuracy).

    Takes (N, 64) float32, returns logits (N, 10). Returned in eval mode; shared (cached), do not train.
    """
    torch.manual_seed(_SEED)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x_train, y_train, x_test, y_test = digits()
    _train(model, x_train, y_train, epochs=20, batch=128, lr=1e-2)
    acc = accuracy(model, x_test, y_test)
    if acc < 0.9:
        raise RuntimeError(f"digits MLP reached only {acc:.3f} test accuracy")
    return model


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) -> conv3x3(8)+BN+ReLU+maxpool2 -> conv3x3(16)+BN+ReLU -> flatten (256) -> logits (N, 10).

    The flatten is written as ``x.reshape(x.shape[0], -1)`` on purpose: exported with a dynamic
    batch it becomes a Shape/Gather/Concat/Reshape subgraph that the frontend must fold.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.reshape(x.shape[0], -1))


@functools.cache
def train_digits_cnn() -> nn.Module:
    """:class:`DigitsCNN` trained on :func:`digits` images (N, 1, 8, 8); eval mode, BN statistics kept."""
    torch.manual_seed(_SEED)
    model = DigitsCNN()
    x_train, y_train, x_test, y_test = digits()
    _train(model, x_train.reshape(-1, 1, 8, 8), y_train, epochs=10, batch=128, lr=1e-2)
    acc = accuracy(model, x_test.reshape(-1, 1, 8, 8), y_test)
    if acc < 0.9:
        raise RuntimeError(f"digits CNN reached only {acc:.3f} test accuracy")
    return model


class BasicBlock(nn.Module):
    """ResNet basic block: two conv3x3+BN, identity or 1x1-conv+BN shortcut, residual Add, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet: conv3x3(64) stem (no max pool), four stages 64/128/256/512, global average pool,
    fc to 10. Takes (N, 3, 32, 32) (any H, W >= 8 works), returns logits (N, 10)."""

    def __init__(self, blocks: tuple[int, int, int, int], num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers: list[nn.Module] = []
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, width, stride))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


_RESNET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


@functools.cache
def resnet_cifar(depth: int) -> nn.Module:
    """ResNet-18 or -34 in CIFAR form, randomly initialised (fixed seed), eval mode.

    The BN running statistics are randomised too, so folding them is actually exercised.
    """
    if depth not in _RESNET_BLOCKS:
        raise ValueError(f"depth must be one of {sorted(_RESNET_BLOCKS)}, got {depth}")
    torch.manual_seed(_SEED + depth)
    model = ResNetCifar(_RESNET_BLOCKS[depth])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval()


def export(
    model: nn.Module,
    path: str | os.PathLike,
    example: torch.Tensor,
    *,
    opset: int = 17,
    dynamo: bool = False,
    dynamic_batch: bool = False,
    fold_constants: bool = True,
) -> Path:
    """Export ``model`` on ``example`` to ``path`` with input ``input`` and output ``output``.

    ``dynamo=False`` uses the TorchScript exporter at ``opset`` (with ``do_constant_folding =
    fold_constants``; ``dynamic_batch`` marks axis 0 as ``batch``). ``dynamo=True`` uses the default
    torch.export-based exporter (opset ``opset`` if >= 18, else the exporter's default; weights
    go to an external-data file beside ``path``); ``dynamic_batch`` gives it a dynamic dim 0.
    Returns ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=True,
                opset_version=opset if opset >= 18 else None,
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        else:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None,
                do_constant_folding=fold_constants,
            )
    return path


@functools.cache
def _sklearn_mlp():
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, _, _ = digits()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few hundred iterations are plenty here
        clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=_SEED)
        clf.fit(x_train, y_train)
    return clf


def sklearn_mlp_onnx(path: str | os.PathLike | None = None) -> Path:
    """A scikit-learn MLPClassifier on :func:`digits`, converted by skl2onnx (``zipmap`` off).

    The ONNX model takes ``input`` (N, 64) float32 and has two outputs: ``label`` (int64, through an
    ArgMax branch) and ``probabilities`` (N, 10) float32. Written to ``path`` (default: a file in a
    fresh temporary directory); returns the path.
    """
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    clf = _sklearn_mlp()
    if path is None:
        path = Path(tempfile.mkdtemp(prefix="siguard-models-")) / "sklearn_mlp.onnx"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onx = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, 64]))], options={id(clf): {"zipmap": False}}
    )
    path.write_bytes(onx.SerializeToString())
    return path
