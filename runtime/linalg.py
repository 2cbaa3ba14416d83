"""Exact ring linear algebra: matmul and convolution of int64 tensors modulo 2^64.

Every engine computes its products here: the secure engine (:mod:`siguard.runtime.mpc.rss`), the plaintext
reference engine (:mod:`siguard.runtime.kernels.plain`) and the cost model (:mod:`siguard.runtime.kernels.cost`, on meta
tensors).
Two kernels compute the same exact result, so the choice between them changes speed, never bits:

* ``int64``: torch's int64 kernels (``torch.matmul``, ``conv2d``, or an explicit im2col and one
  matmul for small output planes, :func:`siguard.runtime.ring.conv2d_ring`). Wrap-around products and sums
  *are* arithmetic modulo 2^64. No BLAS behind them; their speed depends on the CPU.
* ``limbs``: float64 BLAS on balanced digits. A word t is split (mod 2^64, which is all a
  ring product needs) into t = t0 + t1 2^22 + t2 2^43 with |t0| <= 2^21 and |t1|, |t2| <= 2^20. Of the nine digit
  products only those below 2^64 survive: a b mod 2^64 = C0 + C1 2^22 + G 2^43 with C0 = a0 b0,
  C1 = a0 b1 + a1 b0 and G = a0 b2 + 2 a1 b1 + a2 b0 (a1 b1 sits at 2^44 = 2 * 2^43): six products
  in three GEMMs. The right operand's digits are stacked along the inner dimension as
  [B1; B0; B2] (made once for a weight: 3 float64 words per element) and the left operand's as
  [A0 A1 2A1 A2 A0], so that C0 = [A0] [B0], C1 = [A0 A1] [B1; B0] and G = [2A1 A2 A0] [B1; B0; B2]
  are GEMMs of slices of the two layouts, no copies. Each term is at most 2^41 in magnitude (2^42 for a0 b0),
  so with the inner dimension cut into chunks of at most :data:`_KC` = 1365 every partial sum of G
  (3 terms per index) stays below 3 * 1365 * 2^41 < 2^53: float64 holds every sum exactly, whatever
  order BLAS adds in. Each chunk's three results are converted back to int64 and combined with
  wrap-around. A weight operand's digit stacks are made once (:class:`Prepared`) and cached by the
  engine. CrypTen's CUDA path (crypten/cuda/cuda_tensor.py) encodes words as four 16-bit blocks and
  multiplies all sixteen block pairs; this layout needs six digit products (ten with 16-bit limbs).

Which kernel runs is decided per CPU and per shape by :func:`backend` from measurements
(``benchmarks/ring_matmul.py`` writes them to ``benchmarks/results/ring_matmul.json``):

* per CPU: on first use, one probe times an int64 GEMM and a float64 GEMM of the same reference
  shape (a few ms of GEMMs, but 0.01-0.15 s of a fresh process: MKL's first calls, measured on this
  2-core EPYC). Its result is kept on disk (:func:`cpu_profile`, keyed by the CPU, torch's version and
  capability and the thread count), so that it is not a cost of every one-shot ``siguard run``. The
  limb kernel costs about six float64 GEMMs plus the digit split, so it is chosen only where int64
  is more than :data:`LIMB_RATIO` times slower than float64.
  Measured: on the 2-core AMD EPYC of issue 18 (AVX2, no AVX-512; torch capability ``AVX2``) int64
  GEMM runs at 0.34 GMAC/s, 60x slower than float64: limbs win there (the issue's prototype: 17 ms
  against 113 ms at 64x576x1024). On the 2-core AMD EPYC with AVX-512 where this was written, torch's
  int64 GEMM runs at about 15 GMAC/s per thread, as fast as MKL's float64 GEMM on that CPU, with the
  default capability ``AVX512`` and also with ``ATEN_CPU_CAPABILITY=avx2`` (which does not slow the
  int64 GEMM there): int64 wins by 7-10x and is chosen.
  :data:`MEASURED` keeps these numbers next to the capability that torch reported.
* merging: a secret x secret matmul costs each party two products, X_i (Y_i + Y_{i+1}) + X_{i+1} Y_i.
  As one GEMM with the inner dimension doubled it was not faster with either kernel where that
  kernel runs (benchmarks/ring_matmul.py, "merge", CPU time, 1 thread, 256x576x64: int64 1.24 ms
  merged vs 1.16 ms; digits 13.3 vs 11.8 ms, the concatenations cost more than the one split and
  recombination saved), so the engine keeps two products.
* per shape: products below :data:`LIMB_MIN_MACS` multiply-adds stay on int64 (the digit split and
  three GEMM calls per chunk cost more than they save); grouped convolutions and batched right
  operands stay on int64.

``SIGUARD_RING_GEMM=int64|limbs|auto`` (default ``auto``) overrides the per-CPU choice (tests use it
to check both kernels; the benchmark uses it to time both). ``SIGUARD_CACHE_DIR`` is where the probe's
result is kept (default ``$XDG_CACHE_HOME/siguard`` or ``~/.cache/siguard``; empty: no cache, probe in
every process). A stale or edited cache can only change which kernel runs, that is speed, never bits.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from siguard.core.errors import InputError

from .ring import conv2d_by_matmul, conv2d_ring, conv_uses_matmul, conv_weight_matrix

__all__ = [
    "Prepared",
    "prepare",
    "prepare_conv",
    "conv_prepared",
    "ring_matmul",
    "ring_conv2d",
    "backend",
    "cpu_profile",
    "probe_cpu",
    "probe_cache_path",
    "LIMB_RATIO",
    "LIMB_MIN_MACS",
    "MEASURED",
]

ENV = "SIGUARD_RING_GEMM"
LIMB_RATIO = 8.0  # limbs win when int64 GEMM time / float64 GEMM time exceeds this (6 GEMMs + split)
LIMB_MIN_MACS = 1 << 20  # smaller products stay on int64 (per-call overhead of the limb kernel)
_KC = 1365  # chunk of the inner dimension: 3 _KC 2^41 < 2^53 keeps every float64 sum exact
_PROBE = (128, 512, 128)  # reference GEMM shape of the per-CPU probe (8.4 M multiply-adds)

# Measured with benchmarks/ring_matmul.py and the probe (GEMM time int64 / float64, and the kernel
# :func:`backend` picks), keyed by the capability torch reported. The first row is the machine of
# issue 18 (its table: int64 112.7 ms, float64 1.83 ms at 64x576x1024, 2 threads); the others are
# the AVX-512 EPYC this was written on (probe shape, 1 thread, process CPU time: int64 0.49-0.51 ms,
# float64 0.41-0.47 ms; the digit kernel: 24.6 ms against int64's 2.2 ms at 64x576x1024,
# benchmarks/results/ring_matmul.json and ring_matmul_avx2.json).
MEASURED = {
    "AVX2 (AMD EPYC, AVX2 only, issue 18)": {"int64_over_float64": 61.6, "backend": "limbs"},
    "AVX512 (AMD EPYC with AVX-512)": {"int64_over_float64": 1.19, "backend": "int64"},
    "AVX2 (ATEN_CPU_CAPABILITY=avx2 on the AVX-512 EPYC)": {"int64_over_float64": 1.20, "backend": "int64"},
}

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


def probe_cpu() -> dict:
    """Measure this CPU now (what :func:`cpu_profile` caches): torch's CPU capability, the probe's int64
    and float64 GEMM times and their ratio. The probe's operands are fixed constants (timing only; no
    secret passes through it)."""
    m, k, n = _PROBE
    ai = torch.arange(m * k, dtype=torch.int64).reshape(m, k) * 0x9E3779B1 % (1 << 62)
    bi = torch.arange(k * n, dtype=torch.int64).reshape(k, n) * 0x632BE5AB % (1 << 62)
    af, bf = (ai & 0xFFFF).to(torch.float64), (bi & 0xFFFF).to(torch.float64)
    t_int = _min_time(lambda: ai @ bi)
    t_f64 = _min_time(lambda: af @ bf)
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "probe_shape": list(_PROBE),
        "int64_ms": round(t_int * 1e3, 3),
        "float64_ms": round(t_f64 * 1e3, 3),
        "int64_over_float64": round(t_int / max(t_f64, 1e-9), 2),
    }


# ---- the probe's cache ----------------------------------------------------------------------------
_CACHE_FORMAT = 1
_CACHE_FILE = "ring_gemm.json"
_CACHE_ENTRIES = 16  # machines x torch versions x thread counts kept in one file (a shared home directory)


def probe_cache_path() -> Path | None:
    """Where :func:`cpu_profile` keeps the probe's result: ``$SIGUARD_CACHE_DIR`` (empty: nowhere), else
    ``$XDG_CACHE_HOME/siguard``, else ``~/.cache/siguard``."""
    d = os.environ.get("SIGUARD_CACHE_DIR")
    if d is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "siguard")
    return Path(d) / _CACHE_FILE if d else None


def _cpu_identity() -> str:
    """The CPU as the OS describes it: model name and feature flags (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields: dict[str, str] = {}
    for line in info.splitlines():
        if not line.strip():
            break  # the first processor's block
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return " | ".join(fields.get(k, "") for k in ("vendor_id", "model name", "flags"))


def _cache_key() -> tuple[str, dict]:
    """(entry name, what it stands for): what the probe's result depends on, the CPU, torch (version,
    capability) and its thread count (and the probe itself). Any change re-runs the probe."""
    key = {"machine": platform.machine(), "cpu": _cpu_identity(), "torch": torch.__version__,
           "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "probe_shape": list(_PROBE)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32], key


def _read_cache(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(doc, dict) or doc.get("format") != _CACHE_FORMAT or not isinstance(doc.get("entries"), dict):
        return {}
    return doc["entries"]


def _valid_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("int64_over_float64"), (int, float))
            and isinstance(entry.get("capability"), str))


def _cached_probe() -> tuple[dict, bool]:
    """(the probe's result, whether it came from the cache): from the cache file when it holds an entry
    for this machine's key, else measured now and stored (best effort: an unwritable cache only means
    probing again next time)."""
    path = probe_cache_path()
    if path is None:
        return probe_cpu(), False
    name, key = _cache_key()
    entries = _read_cache(path)
    entry = entries.get(name)
    if _valid_entry(entry) and entry.get("key") == key:
        return {k: v for k, v in entry.items() if k != "key"}, True
    measured = probe_cpu()
    entries = {k: v for k, v in entries.items() if k != name}
    entries = dict(list(entries.items())[-(_CACHE_ENTRIES - 1):])
    entries[name] = {**measured, "key": key}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _CACHE_FORMAT, "entries": entries}, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass
    return measured, False


@functools.lru_cache(maxsize=1)
def cpu_profile() -> dict:
    """The per-CPU measurement behind :func:`backend` (once per process; the probe itself once per
    machine, torch version and thread count: :func:`probe_cache_path`): :func:`probe_cpu`'s fields,
    the kernel chosen for large products, whether it was forced, and whether the probe came from the
    cache."""
    forced = _forced()
    measured, cached = _cached_probe()
    choice = "limbs" if measured["int64_over_float64"] > LIMB_RATIO else "int64"
    return {
        **measured,
        "measured_choice": choice,
        "backend": choice if forced == "auto" else forced,
        "forced": forced != "auto",
        "cached": cached,
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


# ---- limbs ----------------------------------------------------------------------------------------
def _digits(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Balanced digits of int64 words: t = d0 + d1 2^22 + d2 2^43 (mod 2^64), with |d0| <= 2^21,
    |d1| <= 2^20, |d2| <= 2^20. (t + 2^21 may wrap around; the congruence and the bounds still hold.)"""
    u = t + (1 << 21)
    d0 = (u & ((1 << 22) - 1)) - (1 << 21)
    v = (u >> 22) + (1 << 20)  # (u >> 22) = (t - d0) / 2^22 mod 2^42, in [-2^41, 2^41)
    d1 = (v & ((1 << 21) - 1)) - (1 << 20)
    return d0, d1, v >> 21


def _chunks(k: int) -> tuple[int, int]:
    """(number of chunks, chunk length) cutting an inner dimension k into near-equal chunks <= _KC."""
    nc = max(1, -(-k // _KC))
    return nc, -(-k // nc)


def _right_limbs(b: torch.Tensor) -> torch.Tensor:
    """(K, N) int64 -> (nc, 3kc, N) float64: per chunk of the inner dimension the digit stack
    [B1; B0; B2] (zero rows pad K to nc·kc). Stored once per weight: 3 float64 words per element."""
    k, n = b.shape
    nc, kc = _chunks(k)

    def chunked(d: torch.Tensor) -> torch.Tensor:
        d = d.to(torch.float64)
        if nc * kc != k:
            d = torch.cat([d, d.new_zeros(nc * kc - k, n)])
        return d.reshape(nc, kc, n)

    d0, d1, d2 = (chunked(d) for d in _digits(b))
    return torch.cat([d1, d0, d2], 1).contiguous()


def _left_limbs(a: torch.Tensor, nc: int, kc: int) -> torch.Tensor:
    """(M, K) int64 -> (M, nc, 5, kc) float64: per chunk of the inner dimension [A0 A1 2A1 A2 A0]."""
    m, k = a.shape
    out = (torch.empty if nc * kc == k else torch.zeros)((m, nc, 5, kc), dtype=torch.float64)
    d0, d1, d2 = _digits(a)
    for i, d, scale in ((0, d0, 1), (1, d1, 1), (2, d1, 2), (3, d2, 1), (4, d0, 1)):
        if nc * kc == k:
            out[:, :, i, :] = d.view(m, nc, kc)
        else:
            for j in range(nc):
                lo, hi = j * kc, min(k, (j + 1) * kc)
                out[:, j, i, : hi - lo] = d[:, lo:hi]
        if scale != 1:
            out[:, :, i, :] *= scale
    return out


def _limb_matmul(a: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """a (..., M, K) @ b (K, N) mod 2^64 with b given by ``_right_limbs(b)``. Per chunk three float64
    GEMMs of slices of the layouts, each sum an exact integer below 2^53 (module docstring):
    C0 = [A0] [B0], C1 = [A0 A1] [B1; B0], G = [2A1 A2 A0] [B1; B0; B2]; then C0 + C1 2^22 + G 2^43."""
    nc, kc3, n = right.shape
    kc = kc3 // 3
    *lead, k = a.shape
    a2 = a.reshape(-1, k)
    m = a2.shape[0]
    left = _left_limbs(a2, nc, kc)
    out = None
    for j in range(nc):
        lj, rj = left[:, j].reshape(m, 5 * kc), right[j]
        z = torch.matmul(lj[:, :kc], rj[kc : 2 * kc]).to(torch.int64)
        z += torch.matmul(lj[:, : 2 * kc], rj[: 2 * kc]).to(torch.int64).mul_(1 << 22)
        z += torch.matmul(lj[:, 2 * kc :], rj).to(torch.int64).mul_(1 << 43)
        out = z if out is None else out.add_(z)
    return out.reshape(*lead, n)


# ---- prepared right operands ----------------------------------------------------------------------
class Prepared:
    """A right operand (K, N) in the forms the kernels take: the contiguous int64 matrix, and its
    float64 digit stacks (:func:`_right_limbs`) made on first use by the limb kernel and kept. Built once
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
        n = b.ring.shape[1]
        if a.dim() >= 2 and backend(a.numel() * n) == "limbs":
            return _limb_matmul(a, b.limbs())
        return torch.matmul(a, b.ring)
    if a.is_meta or b.is_meta:
        return torch.matmul(a, b)
    if a.dim() >= 2 and b.dim() == 2 and backend(a.numel() * b.shape[1]) == "limbs":
        return _limb_matmul(a, _right_limbs(b))
    return torch.matmul(a, b)  # (a batched right operand stays on int64)


def _im2col(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(N·Ho·Wo, Cin·kh·kw) int64 columns in conv_weight_matrix's (Cin, kh, kw) order: one strided copy."""
    n, c, _, _ = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    x = x.contiguous()
    hp, wp = x.shape[2:]
    ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
    s0, s1, s2, s3 = x.stride()
    cols = x.as_strided((n, ho, wo, c, kh, kw), (s0, s2 * sh, s3 * sw, s1, s2 * dh, s3 * dw))
    return cols.reshape(n * ho * wo, c * kh * kw), (n, ho, wo)


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
        cols, (n, ho, wo) = _im2col(x, (kh, kw), stride, padding, dilation)
        out = _limb_matmul(cols, m.limbs())
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
