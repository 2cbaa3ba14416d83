"""Exact ring linear algebra: matmul and convolution of int64 tensors modulo 2^64.

Every engine computes its products here: the secure engine (:mod:`runtime.rss`), the plaintext
reference engine (:mod:`runtime.plain`) and the cost model (:mod:`runtime.cost`, on meta tensors).
Two kernels compute the same exact result, so the choice between them changes speed, never bits:

* ``int64``: torch's int64 kernels (``torch.matmul``, ``conv2d``, or an explicit im2col and one
  matmul for small output planes, :func:`runtime.ring.conv2d_ring`). Wrap-around products and sums
  *are* arithmetic modulo 2^64. No BLAS behind them; their speed depends on the CPU.
* ``limbs``: float64 BLAS on 16-bit limbs. With a = sum_i a_i 2^(16 i) and b = sum_j b_j 2^(16 j)
  (a_i, b_j in [0, 2^16)), a b mod 2^64 = sum_s C_s 2^(16 s) over s = 0..3 where
  C_s = sum_{i+j=s} a_i b_j: ten limb products, not sixteen (terms with i + j > 3 vanish mod 2^64).
  The left operand's limbs are laid out along the inner dimension as [A_0 A_1 A_2 A_3] (M x 4K)
  and the right operand's as [B_3; B_2; B_1; B_0] (4K x N); then C_s is ONE float64 GEMM of the
  prefix A[:, :(s+1)K] with the suffix B[(3-s)K:, :] (A_0 B_s + A_1 B_{s-1} + ... + A_s B_0), four
  GEMMs in all, and one stored copy of the right operand's limbs serves all four. Every partial
  sum is an integer below (s+1) K 2^32 <= 2^53 for K <= 2^19 (longer inner dimensions are cut into
  chunks), so float64 holds it exactly; it is converted back to int64, shifted and added with
  wrap-around. A weight operand's limbs are made once (:class:`Prepared`) and cached by the engine.
  CrypTen's CUDA path (crypten/cuda/cuda_tensor.py) encodes the same 16-bit blocks but multiplies
  all sixteen block pairs; this layout multiplies only the ten that survive mod 2^64.

Which kernel runs is decided per CPU and per shape by :func:`backend` from measurements
(``benchmarks/ring_matmul.py`` writes them to ``benchmarks/results/ring_matmul.json``):

* per CPU: on first use, one probe times an int64 GEMM and a float64 GEMM of the same reference
  shape (a few ms, once per process). The limb kernel costs about ten float64 GEMMs plus the limb
  split, so it is chosen only where int64 is more than :data:`LIMB_RATIO` times slower than float64.
  Measured: on the 2-core AMD EPYC of issue 18 (AVX2, no AVX-512; torch capability ``AVX2``) int64
  GEMM runs at 0.34 GMAC/s, 60x slower than float64: limbs win there (the issue's prototype: 17 ms
  against 113 ms at 64x576x1024). On the 2-core AMD EPYC with AVX-512 where this was written, torch's
  int64 GEMM runs at about 15 GMAC/s per thread, as fast as MKL's float64 GEMM on that CPU, with the
  default capability ``AVX512`` and also with ``ATEN_CPU_CAPABILITY=avx2`` (which does not slow the
  int64 GEMM there): int64 wins by about 12x and is chosen.
  :data:`MEASURED` keeps these numbers next to the capability that torch reported.
* per shape: products below :data:`LIMB_MIN_MACS` multiply-adds stay on int64 (the limb split and
  four GEMM calls cost more than they save); grouped convolutions stay on int64 (no GEMM to batch).

``SIGUARD_RING_GEMM=int64|limbs|auto`` (default ``auto``) overrides the per-CPU choice (tests use it
to check both kernels; the benchmark uses it to time both).
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch

from compiler.errors import InputError

from .ring import conv2d_by_matmul, conv2d_ring, conv_uses_matmul, conv_weight_matrix

__all__ = [
    "Prepared",
    "prepare",
    "prepare_conv",
    "conv_prepared",
    "merge_pays",
    "ring_matmul",
    "ring_conv2d",
    "backend",
    "cpu_profile",
    "LIMB_RATIO",
    "LIMB_MIN_MACS",
    "MEASURED",
]

ENV = "SIGUARD_RING_GEMM"
LIMB_RATIO = 12.0  # limbs win when int64 GEMM time / float64 GEMM time exceeds this (10 GEMMs + split)
LIMB_MIN_MACS = 1 << 20  # smaller products stay on int64 (per-call overhead of the limb kernel)
_MAX_K = 1 << 19  # (s+1) K 2^32 < 2^53 for every s <= 3: chunks of the inner dimension at most this long
_PROBE = (128, 512, 128)  # reference GEMM shape of the per-CPU probe (8.4 M multiply-adds)

# Measured with benchmarks/ring_matmul.py and the probe (GEMM time int64 / float64, and the kernel
# :func:`backend` picks), keyed by the capability torch reported. The first row is the machine of
# issue 18 (its table: int64 112.7 ms, float64 1.83 ms at 64x576x1024, 2 threads); the others are
# the AVX-512 EPYC this was written on (probe shape, 1 thread, process CPU time: int64 0.49 ms,
# float64 0.41 ms; the limb kernel costs 10.5 float64 GEMMs: 29 ms against int64's 2.3 ms at
# 64x576x1024, benchmarks/results/ring_matmul.json and ring_matmul_avx2.json).
MEASURED = {
    "AVX2 (AMD EPYC, AVX2 only, issue 18)": {"int64_over_float64": 61.6, "backend": "limbs"},
    "AVX512 (AMD EPYC with AVX-512)": {"int64_over_float64": 1.19, "backend": "int64"},
    "AVX2 (ATEN_CPU_CAPABILITY=avx2 on the AVX-512 EPYC)": {"int64_over_float64": 1.20, "backend": "int64"},
}

_M16 = 0xFFFF


# ---- per-CPU choice -------------------------------------------------------------------------------
def _min_time(fn, reps: int = 3) -> float:
    """Least process CPU time of ``reps`` runs: unlike wall time, not inflated when other jobs
    preempt this one (the probe may run on a busy machine; both kernels use the same threads)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


@functools.lru_cache(maxsize=1)
def cpu_profile() -> dict:
    """The per-CPU measurement behind :func:`backend` (once per process): torch's CPU capability,
    the probe's int64 and float64 GEMM times and their ratio, and the kernel chosen for large
    products. The probe's operands are fixed constants (timing only; no secret passes through it)."""
    cap = torch.backends.cpu.get_cpu_capability()
    forced = _forced()
    m, k, n = _PROBE
    ai = torch.arange(m * k, dtype=torch.int64).reshape(m, k) * 0x9E3779B97F4A7C15 % (1 << 62)
    bi = torch.arange(k * n, dtype=torch.int64).reshape(k, n) * 0x632BE59BD9B4E019 % (1 << 62)
    af, bf = (ai & _M16).to(torch.float64), (bi & _M16).to(torch.float64)
    t_int = _min_time(lambda: ai @ bi)
    t_f64 = _min_time(lambda: af @ bf)
    ratio = t_int / max(t_f64, 1e-9)
    measured = "limbs" if ratio > LIMB_RATIO else "int64"
    return {
        "capability": cap,
        "probe_shape": list(_PROBE),
        "int64_ms": round(t_int * 1e3, 3),
        "float64_ms": round(t_f64 * 1e3, 3),
        "int64_over_float64": round(ratio, 2),
        "measured_choice": measured,
        "backend": measured if forced == "auto" else forced,
        "forced": forced != "auto",
    }


def _forced() -> str:
    forced = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if forced not in ("auto", "int64", "limbs"):
        raise InputError(f"{ENV}={forced!r}: choose int64, limbs or auto")
    return forced


def backend(macs: int) -> str:
    """``"int64"`` or ``"limbs"`` for a product of ``macs`` multiply-adds on this CPU."""
    forced = _forced()
    if forced != "auto":
        return forced
    if macs < LIMB_MIN_MACS:
        return "int64"
    return cpu_profile()["backend"]


def merge_pays(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> bool:
    """Whether a party's two products X_i @ (Y_i + Y_{i+1}) + X_{i+1} @ Y_i (a secret x secret matmul)
    should run as ONE product [X_i X_{i+1}] @ [Y_i + Y_{i+1}; Y_i] with the inner dimension doubled.
    Measured (benchmarks/ring_matmul.py, "merge", CPU time, 1 thread, AVX-512 EPYC): with the limb
    kernel the merged GEMM is faster (one limb split and recombination instead of two: 13.7 ms vs
    15.7 ms at 256x576x64); with int64 it is not (1.25 ms vs 1.17 ms: the concatenations cost what the one
    addition saves), so int64 keeps the two products. Needs both operands at least 2-D."""
    if len(a_shape) < 2 or len(b_shape) < 2:
        return False
    batch = 1
    for d in (a_shape[:-2] if len(a_shape) >= len(b_shape) else b_shape[:-2]):
        batch *= int(d)
    return backend(2 * batch * int(a_shape[-2]) * int(a_shape[-1]) * int(b_shape[-1])) == "limbs"


# ---- limbs ----------------------------------------------------------------------------------------
def _left_limbs(a: torch.Tensor) -> torch.Tensor:
    """(..., M, K) int64 -> (..., M, 4K) float64 [A_0 A_1 A_2 A_3] (A_i = bits 16i..16i+15).
    The little-endian uint16 view of the words holds the limbs; one strided copy converts them."""
    a = a.contiguous()
    *lead, k = a.shape
    v = a.numpy().view(np.uint16).reshape(*lead, k, 4)
    out = np.empty((*lead, 4, k), dtype=np.float64)
    np.copyto(out, np.swapaxes(v, -1, -2))
    return torch.from_numpy(out.reshape(*lead, 4 * k))


def _right_limbs(b: torch.Tensor) -> torch.Tensor:
    """(..., K, N) int64 -> (..., 4K, N) float64 [B_3; B_2; B_1; B_0]."""
    return torch.cat([((b >> (16 * j)) & _M16) for j in (3, 2, 1, 0)], dim=-2).to(torch.float64).contiguous()


def _limb_product(a4: torch.Tensor, b4: torch.Tensor, k: int) -> torch.Tensor:
    """sum_s C_s 2^(16 s) mod 2^64 from the limb layouts (inner dimension k <= _MAX_K)."""
    out = None
    for s in range(4):
        c = torch.matmul(a4[..., : (s + 1) * k], b4[..., (3 - s) * k :, :]).to(torch.int64)
        if s:
            c <<= 16 * s
            out += c
        else:
            out = c
    return out


def _limb_matmul(a: torch.Tensor, b4: torch.Tensor, k: int) -> torch.Tensor:
    """a (..., M, K) @ b (K, N) mod 2^64, b given by its limbs b4 = _right_limbs(b)."""
    if k <= _MAX_K:
        return _limb_product(_left_limbs(a), b4, k)
    out = None
    for lo in range(0, k, _MAX_K):
        hi = min(k, lo + _MAX_K)
        part = torch.cat([b4[..., j * k + lo : j * k + hi, :] for j in range(4)], dim=-2)
        z = _limb_product(_left_limbs(a[..., lo:hi]), part, hi - lo)
        out = z if out is None else out + z
    return out


# ---- prepared right operands ----------------------------------------------------------------------
class Prepared:
    """A right operand (K, N) in the forms the kernels take: the contiguous int64 matrix, and its
    float64 limbs [B_3; B_2; B_1; B_0] made on first use by the limb kernel and kept. Built once
    per weight share by the engines (:func:`prepare`, :func:`prepare_conv`)."""

    __slots__ = ("ring", "_limbs")

    def __init__(self, ring: torch.Tensor):
        self.ring = ring.contiguous()
        self._limbs: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.ring.shape

    def limbs(self) -> torch.Tensor:
        if self._limbs is None:
            self._limbs = _right_limbs(self.ring)
        return self._limbs


Operand = torch.Tensor | Prepared


def prepare(b: torch.Tensor) -> Prepared:
    """A matmul right operand prepared once (see :class:`Prepared`)."""
    return Prepared(b)


def prepare_conv(w: torch.Tensor) -> Prepared:
    """A convolution kernel (Cout, Cin/groups, kh, kw) prepared once as the (Cin·kh·kw, Cout)
    matrix of the im2col product (see :class:`Prepared`); :func:`ring_conv2d` takes it as ``w`` with
    ``kernel`` = (kh, kw)."""
    return Prepared(conv_weight_matrix(w))


# ---- entry points ---------------------------------------------------------------------------------
def ring_matmul(a: torch.Tensor, b: Operand) -> torch.Tensor:
    """``torch.matmul`` of int64 ring tensors, exact modulo 2^64 (``b`` may be :class:`Prepared`).
    Meta tensors (the cost model) go straight to torch."""
    if isinstance(b, Prepared):
        if a.is_meta:
            return torch.matmul(a, b.ring.to("meta"))
        k, n = b.ring.shape
        if a.dim() >= 2 and backend(a.numel() * n) == "limbs":
            return _limb_matmul(a, b.limbs(), k)
        return torch.matmul(a, b.ring)
    if a.is_meta or b.is_meta:
        return torch.matmul(a, b)
    if a.dim() >= 2 and b.dim() >= 2:
        m, k = a.shape[-2:]
        n = b.shape[-1]
        batch = max(a[..., 0, 0].numel(), b[..., 0, 0].numel())
        if backend(batch * m * k * n) == "limbs":
            return _limb_matmul(a, _right_limbs(b), k)
    return torch.matmul(a, b)


def _limb_cols(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """im2col of x's limbs: (N·Ho·Wo, 4·Cin·kh·kw) float64, laid out as [A_0 A_1 A_2 A_3] with each
    A_i in conv_weight_matrix's (Cin, kh, kw) order; one strided copy from x's uint16 view."""
    n, c, _, _ = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    x = x.contiguous()
    hp, wp = x.shape[2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    v = x.numpy().view(np.uint16)
    s0, s1, s2, _ = v.strides  # bytes; a word is 4 uint16 of 2 bytes
    view = np.lib.stride_tricks.as_strided(
        v, (n, ho, wo, 4, c, kh, kw), (s0, s2 * sh, 8 * sw, 2, s1, s2 * dh, 8 * dw), writeable=False
    )
    out = np.empty((n, ho, wo, 4, c, kh, kw), dtype=np.float64)
    np.copyto(out, view)
    return torch.from_numpy(out.reshape(n * ho * wo, 4 * c * kh * kw)), (n, ho, wo)


def ring_conv2d(
    x: torch.Tensor,
    w: Operand,
    stride: tuple[int, ...] = (1, 1),
    padding: tuple[int, ...] = (0, 0),
    dilation: tuple[int, ...] = (1, 1),
    groups: int = 1,
    kernel: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """``conv2d`` of int64 ring tensors (no bias, symmetric ``padding``), exact modulo 2^64.

    x: (N, Cin, H, W), or (N, Cin, L) for a 1-D convolution (then w is (Cout, Cin/groups, k) and
    stride, padding, dilation have one entry). ``w`` is the kernel, or a :class:`Prepared` from
    :func:`prepare_conv` together with ``kernel`` = (kh, kw). Meta tensors go straight to torch."""
    if x.dim() == 3:  # 1-D: the same convolution on a height-1 plane
        if isinstance(w, Prepared):
            kernel = (1, *tuple(kernel))
        else:
            w = w.unsqueeze(2)
        y = ring_conv2d(x.unsqueeze(2), w, (1, *stride), (0, *padding), (1, *dilation), groups, kernel)
        return y.squeeze(2)
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if isinstance(w, Prepared):
        if kernel is None:
            raise ValueError("a prepared kernel needs kernel=(kh, kw)")
        kh, kw = tuple(kernel)
        if groups != 1:
            raise ValueError("a prepared kernel serves groups=1 only")
        cout = w.ring.shape[1]
        wfull = None
    else:
        cout, _, kh, kw = w.shape
        wfull = w
    if x.is_meta or (wfull is not None and wfull.is_meta):
        wt = wfull if wfull is not None else w.ring.t().reshape(cout, -1, kh, kw)
        return torch.nn.functional.conv2d(x.to("meta"), wt.to("meta"), None, stride, padding, dilation, groups)
    n, cin, h, wd = x.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    macs = n * ho * wo * cout * (cin // groups) * kh * kw
    if groups == 1 and backend(macs) == "limbs":
        m = w if isinstance(w, Prepared) else prepare_conv(w)
        cols, (n, ho, wo) = _limb_cols(x, (kh, kw), stride, padding, dilation)
        out = _limb_product(cols, m.limbs(), cin * kh * kw) if cin * kh * kw <= _MAX_K else None
        if out is None:  # inner dimension beyond 2^19: the chunked matmul on int64 columns
            return _im2col_int64(x, m, (kh, kw), stride, padding, dilation)
        return out.reshape(n, ho, wo, cout).permute(0, 3, 1, 2).contiguous()
    if isinstance(w, Prepared):
        return _im2col_int64(x, w, (kh, kw), stride, padding, dilation)
    return conv2d_ring(x, wfull, stride, padding, dilation, groups)


def _im2col_int64(x, m: Prepared, kernel, stride, padding, dilation) -> torch.Tensor:
    """conv2d with a prepared kernel on int64: one im2col matmul (dilation 1), else torch's conv."""
    if tuple(dilation) == (1, 1):
        return conv2d_by_matmul(x, m.ring, tuple(kernel), stride, padding)
    kh, kw = kernel
    w = m.ring.t().reshape(m.ring.shape[1], -1, kh, kw)
    return torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, 1)


def conv_prepared(x_shape, w_shape, stride, padding, dilation, groups) -> bool:
    """Whether the engines should hand :func:`ring_conv2d` a prepared kernel for this convolution:
    wherever it runs as a matmul (the limb kernel, or int64 im2col for small output planes)."""
    if groups != 1 or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    if conv_uses_matmul(tuple(x_shape), tuple(w_shape), tuple(stride), tuple(padding), tuple(dilation), groups):
        return True
    ho = (x_shape[2] + 2 * padding[0] - dilation[0] * (w_shape[2] - 1) - 1) // stride[0] + 1
    wo = (x_shape[3] + 2 * padding[1] - dilation[1] * (w_shape[3] - 1) - 1) // stride[1] + 1
    macs = x_shape[0] * ho * wo * w_shape[0] * w_shape[1] * w_shape[2] * w_shape[3]
    return backend(macs) == "limbs"
