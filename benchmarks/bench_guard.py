"""Alias of the unified runner for the guard's share: ResNet-34 (CIFAR-10 form) with and without the guard.

    python benchmarks/bench_guard.py [--batches 1] [--repeat 1] [--guard-rounds 6 --guard-steps 49]
        [--guard-batch 32] [run.py options]

Equivalent to ``python benchmarks/run.py --models resnet34 --batches 1 --guard both ...``: the plain and
the guarded plan on the same input in one run, the guard's share of the total next to the paper's
(1.1 s of 4.39 s, 25 %), and the guard alone at batch 32 (its cost per query). See run.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main  # noqa: E402

if __name__ == "__main__":
    res = Path(__file__).resolve().parent / "results"
    sys.exit(main(["--models", "resnet34", "--batches", "1", "--guard", "both", "--repeat", "1",
                   "--json", str(res / "guard.json"), "--md", str(res / "guard.md"), *sys.argv[1:]]))
