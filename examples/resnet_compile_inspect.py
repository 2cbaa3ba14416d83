"""Compile and inspect a torch ResNet (CIFAR-10 form), then run it once between the three parties.

    python examples/resnet_compile_inspect.py [--depth 18|34] [--out resnet-example] [--no-run]

What it shows: torch -> ONNX export, `siguard compile`, the plan's per-step costs (`siguard inspect`
in text and HTML), and one secure inference compared with onnxruntime. The weights are random (no data
set can be downloaded here); compile and run do not care.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import siguard


class Block(nn.Module):
    """ResNet basic block: conv-BN-ReLU-conv-BN plus the (projected) shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + self.short(x))


def resnet(depth: int, classes: int = 10) -> nn.Module:
    """ResNet-18 / -34 for 32x32 inputs (3x3 stem, no max-pool), as in CIFAR-10 papers."""
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[depth]
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for stage, (n, cout) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
        for i in range(n):
            layers.append(Block(cin, cout, 2 if stage and i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, choices=(18, 34), default=18)
    ap.add_argument("--out", default="resnet-example")
    ap.add_argument("--no-run", action="store_true", help="compile and inspect only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = resnet(args.depth).eval()
    onnx_path = out / f"resnet{args.depth}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(onnx_path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False)

    plan = siguard.compile(onnx_path, out / "plan", batch=1)       # = siguard compile MODEL -o PLAN
    report = siguard.inspect(plan, "text")                          # = siguard inspect PLAN
    print("\n".join(report.splitlines()[:12]))                      # the summary; the full table follows it
    (out / "plan.html").write_text(siguard.inspect(plan, "html"))   # = siguard inspect PLAN --format html
    print(f"\nfull report: {out / 'plan' / 'report.txt'}   HTML: {out / 'plan.html'}")

    if not args.no_run:
        import onnxruntime as ort

        x = np.random.default_rng(0).normal(size=(1, 3, 32, 32)).astype(np.float32)  # a stand-in image
        result = siguard.run(plan, x)                               # = siguard run PLAN --input x.npy
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {"input": x})[0]
        t = result.stats["totals"]
        print(f"secure inference: {result.seconds:.2f} s, {t['rounds']} rounds, "
              f"{max(t['bytes_per_party']) / 1e6:.1f} MB per party; max |logit - onnxruntime| = "
              f"{np.abs(result.output - ref).max():.4f}; top-1 {int(result.output.argmax())} "
              f"(onnxruntime {int(ref.argmax())})")


if __name__ == "__main__":
    main()
