"""Shared fixtures: trained digits models exported to ONNX once per session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def onnx_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def digits():
    from tests.models import digits as load

    return load()


@pytest.fixture(scope="session")
def mlp_onnx(onnx_dir):
    import torch

    from tests.models import export, train_digits_mlp

    path = onnx_dir / "mlp.onnx"
    export(train_digits_mlp(), path, torch.zeros(1, 64), opset=17, dynamic_batch=True)
    return path


@pytest.fixture(scope="session")
def cnn_onnx(onnx_dir):
    import torch

    from tests.models import export, train_digits_cnn

    path = onnx_dir / "cnn.onnx"
    export(train_digits_cnn(), path, torch.zeros(1, 1, 8, 8), opset=13, dynamic_batch=True, fold_constants=False)
    return path


@pytest.fixture(scope="session")
def resnet18_onnx(onnx_dir):
    import torch

    from tests.models import export, resnet_cifar

    path = onnx_dir / "resnet18.onnx"
    export(resnet_cifar(18), path, torch.zeros(1, 3, 32, 32), opset=17)
    return path


def ort_run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]
