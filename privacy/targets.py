"""Target models of the demo and the audit: small torch networks trained here and exported to ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from siguard.compiler.frontend import select_output, with_output
from siguard.core.errors import InputError, SiguardError

__all__ = ["make_mlp", "train_classifier", "export_onnx", "predict_onnx", "model_outputs"]


def make_mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (128, 64),
             seed: int = 0) -> nn.Module:
    """Flatten -> (Linear -> ReLU)* -> Linear producing logits, initialised from ``seed``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = int(np.prod(input_shape))
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int = 30, batch: int = 64,
                     lr: float = 1e-3, seed: int = 0, weight_decay: float = 0.0) -> nn.Module:
    """Adam on cross-entropy with shuffled mini-batches (deterministic for a seed). Returns the model
    in eval mode. Few samples and many epochs make it overfit, as deployed models do."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


def export_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...], opset: int = 17) -> Path:
    """Export with torch's TorchScript-based exporter, with a symbolic batch axis."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, *input_shape),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path


def predict_onnx(path: str | Path, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The model's outputs through onnxruntime (the plaintext oracle), in batches: the value that
    ``siguard compile`` computes (:func:`siguard.compiler.frontend.select_output`; for a default skl2onnx
    classifier, the probabilities feeding its ZipMap)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    name = select_output(model, label=str(path))
    if name == model.graph.output[0].name:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    else:
        sess = ort.InferenceSession(with_output(model, name).SerializeToString(), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0].name
    outs = [sess.run(None, {inp: x[i : i + batch].astype(np.float32)})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def model_outputs(model: str | Path, x: np.ndarray, what: str) -> np.ndarray:
    """The model's outputs on ``x`` through onnxruntime, with a clear error when the model does not load or
    ``x``'s per-sample shape does not fit the model's input. ``what`` names ``x``'s source in messages."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"{model}: onnxruntime cannot load the model ({type(exc).__name__})") from None
    expected = sess.get_inputs()[0].shape
    fixed = [d if isinstance(d, int) else None for d in expected[1:]]
    if len(fixed) != x.ndim - 1 or any(f is not None and f != s for f, s in zip(fixed, x.shape[1:], strict=True)):
        raise InputError(f"{what}: 'x' has per-sample shape {list(x.shape[1:])} but the model takes "
                         f"{['?' if f is None else f for f in fixed]}")
    try:
        return predict_onnx(model, x)
    except SiguardError:
        raise  # already one clear line (e.g. no output to read, and how to re-export)
    except Exception as exc:
        raise InputError(f"{what}: the model fails on 'x' ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
