"""Bring your own model and defender: a torch CNN of yours, guarded and audited with SIGuard's Python API.

    python examples/bring_your_own.py [--out byo-example] [--mode threads|lockstep|reference]

Replace the three marked parts with your own: the model (any torch module exported to ONNX, ending in
logits or a softmax), its training records (the members the guard protects) and records it never saw
(the owner's reference non-members, for the defender; further ones for the audit). The same steps on the
command line:

    siguard guard train model.onnx --members members.npz --nonmembers reference.npz -o defender.onnx
    siguard compile model.onnx -o plan --batch 64
    siguard compile model.onnx -o plan-guarded --batch 64 --guard defender.onnx
    siguard run plan-guarded --input x.npy --output y.npy
    siguard audit model.onnx --plan plan --guarded-plan plan-guarded --members members.npz \\
        --nonmembers nonmembers.npz --shadow shadow.npz --report report
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import siguard


def my_model() -> nn.Module:
    """(1) Your model: here a small CNN for 8x8 digits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def my_training(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 200) -> nn.Module:
    """(2) Your training loop (plain Adam here; a small training set and many epochs overfit, as real models
    do, which is what makes membership leak)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=g).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="byo-example")
    ap.add_argument("--mode", choices=("threads", "lockstep", "reference"), default="threads",
                    help="threads: the parties in threads; lockstep: in one thread, faster when rounds dominate; "
                         "reference: fixed-point cleartext, quick")
    ap.add_argument("--epochs", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # (3) Your data, as .npz files with x (N, ...) float32 and y (N,) labels
    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    parts = dict(zip(("members", "reference", "nonmembers", "shadow"), np.split(order[:1000], [200, 400, 600]),
                     strict=True))
    files = {}
    for name, idx in parts.items():
        files[name] = out / f"{name}.npz"
        np.savez(files[name], x=x[idx], y=y[idx])

    model = my_training(my_model(), x[parts["members"]], y[parts["members"]], args.epochs)
    onnx_path = out / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
                          opset_version=17, dynamo=False)

    report = siguard.train_defender(onnx_path, files["members"], files["reference"], out / "defender.onnx")
    print(f"defender: validation accuracy {report.val_accuracy:.3f}")
    batch = 400  # the audit's 200 members + 200 non-members in one batch: the guard's rounds are paid once
    plan = siguard.compile(onnx_path, out / "plan", batch=batch)
    guarded = siguard.compile(onnx_path, out / "plan-guarded", batch=batch, guard=out / "defender.onnx")
    print(f"plans: {plan.totals['rounds']} rounds without the guard, {guarded.totals['rounds']} with it")

    doc = siguard.audit(onnx_path, out / "plan", out / "plan-guarded", members=files["members"],
                        nonmembers=files["nonmembers"], shadow=files["shadow"], report_dir=out / "report",
                        mode=args.mode, shadow_epochs=args.epochs)
    print(siguard.format_audit(doc))
    print(f"report: {out / 'report' / 'index.html'}")


if __name__ == "__main__":
    main()
