"""Reading a user's array file: light on imports (numpy only), so that ``siguard run`` need not load the
compiler's dependencies to read its input."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from siguard.core.errors import InputError

__all__ = ["load_npy"]


def load_npy(path: str | Path, what: str = "input") -> np.ndarray:
    """An ``.npy`` array from a user's file, or one clear InputError (``what`` names the file's role)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    try:
        with open(p, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise InputError(f"{what} file {p} cannot be read ({exc.strerror or exc})") from None
    if magic != b"\x93NUMPY":  # np.load would try to unpickle it and say "pickled (object) data"
        kind = ("a zip archive (.npz?); save one array with np.save" if magic.startswith(b"PK")
                else "empty" if not magic else "not an .npy file (no NumPy header; a text file? save it with np.save)")
        raise InputError(f"{what} file {p} is {kind}")
    try:
        a = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"{p}: not a readable .npy array ({exc})") from None
    if a.dtype.hasobject:  # pragma: no cover - np.load refuses these without allow_pickle
        raise InputError(f"{p}: holds Python objects, not numbers")
    return a
