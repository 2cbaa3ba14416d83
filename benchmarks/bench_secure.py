"""Alias of the unified runner for secure inference without the guard (threads mode).

    python benchmarks/bench_secure.py [--models mlp cnn resnet18] [--batches 1 8] [--repeat 3] [run.py options]

Equivalent to ``python benchmarks/run.py --guard off --models mlp cnn resnet18 ...``; see run.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--guard", "off", "--models", "mlp", "cnn", "resnet18", "--json",
                   str(Path(__file__).resolve().parent / "results" / "secure.json"), "--md",
                   str(Path(__file__).resolve().parent / "results" / "secure.md"), *sys.argv[1:]]))
