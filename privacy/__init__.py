"""The guard's plaintext side (defender, MemGuard reference) and the membership audit built on it."""

from . import guard_float  # noqa: F401  (registers the guard op's float meaning with the compiler's interpreter)
