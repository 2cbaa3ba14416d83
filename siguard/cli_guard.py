"""``siguard guard train``: train the guard's defender on a model's outputs and export it to ONNX."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from compiler.errors import InputError

__all__ = ["register", "cmd_guard_train"]

#: a defender whose validation accuracy is below this is reported as (nearly) useless
CHANCE_LEVEL = 0.55


def _load_npz_x(path: str, what: str) -> np.ndarray:
    """The ``x`` array of an ``.npz`` data file (``x`` and ``y``), checked for presence, size and finiteness."""
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
    if len(y) != len(x):
        raise InputError(f"{p}: 'x' has {len(x)} rows but 'y' has {len(y)}")
    if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
        raise InputError(f"{p}: 'x' must be finite numbers (dtype {x.dtype})")
    return x


def _model_outputs(model: str, x: np.ndarray, what: str) -> np.ndarray:
    """The model's outputs on ``x`` through onnxruntime, with a shape check against the model's input."""
    import onnxruntime as ort

    from privacy.targets import predict_onnx

    try:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"{model}: onnxruntime cannot load the model ({type(exc).__name__})") from None
    expected = sess.get_inputs()[0].shape
    fixed = [d if isinstance(d, int) else None for d in expected[1:]]
    if len(fixed) != x.ndim - 1 or any(f is not None and f != s for f, s in zip(fixed, x.shape[1:], strict=True)):
        raise InputError(f"{what}: 'x' has per-sample shape {list(x.shape[1:])} but the model takes "
                         f"{['?' if f is None else f for f in fixed]}")
    try:
        return predict_onnx(model, x)
    except Exception as exc:
        raise InputError(f"{what}: the model fails on 'x' ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def cmd_guard_train(args: argparse.Namespace) -> int:
    """Outputs of MODEL on members and non-members -> softmax -> defender -> ONNX file; prints its accuracy."""
    from privacy.defender import export_defender, to_probabilities, train_defender

    if not Path(args.model).exists():
        raise InputError(f"model file {args.model} does not exist")
    if args.epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {args.epochs}")
    x_in = _load_npz_x(args.members, "members")
    x_out = _load_npz_x(args.nonmembers, "non-members")
    p_in = to_probabilities(_model_outputs(args.model, x_in, args.members))
    p_out = to_probabilities(_model_outputs(args.model, x_out, args.nonmembers))
    module, report = train_defender(p_in, p_out, seed=args.seed, epochs=args.epochs)
    out = export_defender(module, args.o)
    print(f"defender trained on {report.members_used} members and {report.nonmembers_used} non-members "
          f"({report.num_classes} classes, best epoch {report.best_epoch}/{report.epochs_run}): validation accuracy "
          f"{report.val_accuracy:.3f}, training accuracy {report.train_accuracy:.3f} -> {out}")
    if report.val_accuracy < CHANCE_LEVEL:
        print(f"warning: the defender is barely better than chance ({report.val_accuracy:.3f}): the model's outputs "
              "reveal little membership, or there are too few samples; the guard will accept few queries",
              file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``siguard guard {train}`` to the main parser's subcommands."""
    g = subparsers.add_parser("guard", help="the output guard: train its defender")
    gsub = g.add_subparsers(dest="guard_command", required=True)
    t = gsub.add_parser("train", help="train the defender h (k -> 128 -> 64 -> 1) on members vs non-members")
    t.add_argument("model", help="target ONNX model (outputs logits or probabilities)")
    t.add_argument("--members", required=True, help=".npz with x (the model's training inputs) and y")
    t.add_argument("--nonmembers", required=True, help=".npz with x, y the owner holds out (reference non-members)")
    t.add_argument("-o", required=True, metavar="DEFENDER.onnx",
                   help="output ONNX file (input 'probs' (batch, k), output 'score' (batch, 1))")
    t.add_argument("--seed", type=int, default=0, help="seed for balancing, split and training (default 0)")
    t.add_argument("--epochs", type=int, default=300, help="at most this many epochs; early stopping on the "
                   "validation loss (default 300)")
    t.set_defaults(func=cmd_guard_train)
