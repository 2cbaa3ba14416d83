"""Real data that can be had offline: scikit-learn's digits (in the wheel) and Debian's Fashion-MNIST."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from siguard.core.errors import InputError

__all__ = ["Dataset", "load_dataset", "load_npz", "save_npz", "FASHION_MNIST_DIR", "DATASETS"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS = ("digits", "fashion-mnist")


@dataclass
class Dataset:
    """Images as float32 in [0, 1], shape (N, C, H, W), labels int64 (N,)."""

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return Dataset("digits", x, d.target.astype(np.int64), 10)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path | None:
    for cand in sorted(directory.rglob(f"{stem}*")):
        if cand.is_file():
            return cand
    return None


def _fashion_mnist(directory: Path = FASHION_MNIST_DIR) -> Dataset:
    if not directory.exists():
        raise InputError(
            f"Fashion-MNIST not found in {directory}: install Debian's package 'dataset-fashion-mnist' "
            "(apt-get install dataset-fashion-mnist) or use --dataset digits"
        )
    xs, ys = [], []
    for split in ("train", "t10k"):
        img, lab = _find(directory, f"{split}-images"), _find(directory, f"{split}-labels")
        if img is None or lab is None:
            raise InputError(f"Fashion-MNIST files for split {split!r} are missing in {directory}")
        xs.append(_read_idx(img))
        ys.append(_read_idx(lab))
    x = (np.concatenate(xs).astype(np.float32) / 255.0)[:, None, :, :]
    return Dataset("fashion-mnist", x, np.concatenate(ys).astype(np.int64), 10)


def load_dataset(name: str) -> Dataset:
    """``digits`` (1797 8x8 images) or ``fashion-mnist`` (70 000 28x28 images, from Debian)."""
    if name == "digits":
        return _digits()
    if name == "fashion-mnist":
        return _fashion_mnist()
    raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def load_npz(path: str | Path, what: str, labels: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of an ``.npz`` data file (arrays ``x`` (N, ...) and ``y`` (N,)), checked for presence, size,
    finiteness and, with ``labels``, integer labels. ``what`` names the file's role in error messages."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as npz:
            if "x" not in npz.files or "y" not in npz.files:
                raise InputError(f"{p}: a data file holds arrays 'x' and 'y', found {sorted(npz.files)}")
            x, y = npz["x"], npz["y"]
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npz file ({type(exc).__name__})") from None
    if x.ndim < 2 or len(x) == 0:
        raise InputError(f"{p}: 'x' must be a non-empty batch (N, ...), got shape {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise InputError(f"{p}: 'x' has {len(x)} rows but 'y' has shape {list(y.shape)} (expected ({len(x)},))")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise InputError(f"{p}: 'x' must be finite numbers (dtype {x.dtype})")
    if labels:
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and
                                                      np.all(np.isfinite(y)) and np.all(y == np.round(y)))):
            raise InputError(f"{p}: 'y' must hold integer class labels (dtype {y.dtype})")
        if y.min() < 0:
            raise InputError(f"{p}: 'y' holds a negative class label ({int(y.min())})")
        y = y.astype(np.int64)
    return x.astype(np.float32), y


def save_npz(path: str | Path, x: np.ndarray, y: np.ndarray) -> Path:
    """Write a data file that :func:`load_npz` reads (``x`` float32, ``y`` int64)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez(p, x=np.asarray(x, np.float32), y=np.asarray(y, np.int64))
    return p
