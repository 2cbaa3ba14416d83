"""Progress reporting that suits where stderr goes: a tqdm bar on a terminal, else a plain line every few seconds.

A run whose stderr is a file or a pipe (CI, ``nohup``, a log) gets lines such as
``guarded inference: 300/1000 it (30%), 41 s`` at most every ``interval`` seconds, never ``\\r`` redraws."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["PlainProgress", "progress_bar"]


class PlainProgress:
    """The part of tqdm's interface the CLI uses (``n``, ``update``, ``close``, context manager), printing
    one plain line per ``interval`` seconds (and one at the end if any was printed before)."""

    def __init__(self, total: int, desc: str = "", unit: str = "it", *, interval: float = 5.0,
                 file: TextIO | None = None, clock=time.monotonic):
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, float(interval)
        self.file = file if file is not None else sys.stderr
        self.n = 0
        self._clock = clock
        self._start = self._last = clock()
        self.lines = 0

    def _line(self) -> str:
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {self._clock() - self._start:.0f} s"

    def _print(self) -> None:
        print(self._line(), file=self.file, flush=True)
        self.lines += 1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._clock()
        if now - self._last >= self.interval:
            self._last = now
            self._print()

    def close(self) -> None:
        if self.lines:  # a run long enough to report gets its last state too
            self._print()
            self.lines = 0

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it", file: TextIO | None = None,
                 interval: float = 5.0) -> Any:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else :class:`PlainProgress`; disabled: a bar
    that prints nothing."""
    from tqdm import tqdm

    file = file if file is not None else sys.stderr
    if enabled and not (hasattr(file, "isatty") and file.isatty()):
        return PlainProgress(total, desc, unit, interval=interval, file=file)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=file, leave=False, mininterval=0.5)
