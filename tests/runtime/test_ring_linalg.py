"""runtime/linalg.py against Python big integers: both kernels (int64 and float64 limbs), prepared and
unprepared operands, edge values, long inner dimensions and every convolution variant; the engines
built on it give the same bits with either kernel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from siguard.core.errors import SiguardError
from siguard.runtime import linalg
from siguard.runtime.kernels.plain import Clear, PlainEngine
from siguard.runtime.linalg import prepare, prepare_conv, ring_conv2d, ring_matmul
from siguard.runtime.mpc import rss
from siguard.runtime.mpc.inprocess import run_threads

MASK = (1 << 64) - 1
EDGES = [2**63 - 1, -(2**63), -1, 0, 1, 2**62, -(2**62) + 1, 0xFFFF, -0x10000, 2**48 - 1]
KERNELS = ("int64", "limbs")


@pytest.fixture(params=KERNELS)
def kernel(request, monkeypatch):
    monkeypatch.setenv(linalg.ENV, request.param)
    return request.param


def words(shape, seed, edges: float = 0.0) -> torch.Tensor:
    """Uniform 64-bit words; a fraction ``edges`` of them replaced by the edge values (test data only)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-(2**63), 2**63 - 1, shape, generator=g, dtype=torch.int64)
    w |= torch.randint(0, 2, shape, generator=g, dtype=torch.int64) << 63  # reach the top word too
    if edges:
        pick = torch.rand(shape, generator=g) < edges
        vals = torch.tensor(EDGES, dtype=torch.int64)[torch.randint(0, len(EDGES), shape, generator=g)]
        w = torch.where(pick, vals, w)
    return w


def _signed(v: int) -> int:
    v &= MASK
    return v - (1 << 64) if v >> 63 else v


def _obj(t: torch.Tensor) -> np.ndarray:
    """Python integers in an object array (``astype(object)`` can keep numpy int64 scalars)."""
    return np.array(t.tolist(), dtype=object).reshape(tuple(t.shape))


def _to_ring(obj: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.vectorize(_signed, otypes=[object])(obj).astype(np.int64))


def mm_bigint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b mod 2^64 with Python integers (numpy object arrays; batch dims broadcast)."""
    return _to_ring(np.matmul(_obj(a), _obj(b)))


def conv_bigint(x, w, stride, padding, dilation, groups) -> torch.Tensor:
    """conv2d mod 2^64 with Python integers, from the definition (any stride, padding, dilation, groups)."""
    n, c, h, wdt = x.shape
    xo = np.full((n, c, h + 2 * padding[0], wdt + 2 * padding[1]), 0, dtype=object)
    xo[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wdt] = _obj(x)
    wo = _obj(w)
    hp, wp = xo.shape[2:]
    cout, cg, kh, kw = wo.shape
    og = cout // groups
    ho = (hp - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wd = (wp - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.empty((n, cout, ho, wd), dtype=object)
    for o in range(cout):
        g = o // og
        wrow = wo[o].ravel().tolist()
        for i in range(ho):
            for j in range(wd):
                r0, c0 = i * stride[0], j * stride[1]
                patch = xo[:, g * cg:(g + 1) * cg, r0:r0 + dilation[0] * (kh - 1) + 1:dilation[0],
                           c0:c0 + dilation[1] * (kw - 1) + 1:dilation[1]]
                for b in range(n):
                    out[b, o, i, j] = sum(p * q for p, q in zip(patch[b].ravel().tolist(), wrow, strict=True))
    return _to_ring(out)


# ---- matmul ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(3, 5, 4), (17, 64, 9), (2, 4608, 3), (40, 576, 33)])
def test_matmul_is_exact_mod_2_64(kernel, m, k, n):
    """Random words (a quarter of them edge values), inner dimension up to ResNet-34's 512·3·3."""
    a, b = words((m, k), 1, 0.25), words((k, n), 2, 0.25)
    want = mm_bigint(a, b)
    assert torch.equal(ring_matmul(a, b), want)
    assert torch.equal(ring_matmul(a, prepare(b)), want)


def test_matmul_of_edge_values_only(kernel):
    """All-edge operands: the sums hit every carry of the limb recombination."""
    for v in (2**63 - 1, -(2**63), -1):
        a = torch.full((4, 300), v, dtype=torch.int64)
        b = torch.tensor(EDGES * 30, dtype=torch.int64).reshape(300, 1).repeat(1, 5)
        assert torch.equal(ring_matmul(a, prepare(b)), mm_bigint(a, b))
    a = torch.full((2, 4608), 2**63 - 1, dtype=torch.int64)  # the largest limb sums: every limb 0xFFFF
    assert torch.equal(ring_matmul(a, a.t().contiguous()), mm_bigint(a, a.t()))


def test_batched_and_vector_matmul(kernel):
    a, b = words((2, 3, 6, 40), 3), words((3, 40, 5), 4)
    assert torch.equal(ring_matmul(a, b), mm_bigint(a, b))
    v = words((40,), 5)
    assert torch.equal(ring_matmul(a[0, 0], v), mm_bigint(a[0, 0], v))


def test_long_inner_dimension_is_cut_into_exact_chunks(monkeypatch):
    """Beyond _KC the digit sums could pass 2^53: the inner dimension is cut into chunks (uneven ones
    too: K = 200 in chunks of at most 64 gives 4 chunks of 50). Also K = 4608 at the real _KC (4 chunks)."""
    monkeypatch.setenv(linalg.ENV, "limbs")
    a, b = words((3, 4608), 22, 0.1), words((4608, 2), 23, 0.1)
    assert linalg._chunks(4608) == (4, 1152)
    assert torch.equal(ring_matmul(a, prepare(b)), mm_bigint(a, b))
    monkeypatch.setattr(linalg, "_KC", 64)
    for k in (200, 193, 64, 65):
        a, b = words((5, k), 6, 0.1), words((k, 7), 7, 0.1)
        assert torch.equal(ring_matmul(a, prepare(b)), mm_bigint(a, b))
        assert torch.equal(ring_matmul(a, b), mm_bigint(a, b))


def test_digits_and_their_sums_stay_exact():
    """The bounds the limb kernel relies on: digits recompose every edge word mod 2^64, and the largest
    float64 sum (3 _KC products of at most 2^41) stays below 2^53."""
    t = torch.tensor(EDGES + [2**21 - 1, 2**21, -(2**21), 2**43 - 1, 2**42 + 2**21], dtype=torch.int64)
    d0, d1, d2 = linalg._digits(t)
    for v, x, y, z in zip(t.tolist(), d0.tolist(), d1.tolist(), d2.tolist(), strict=True):
        assert _signed(x + y * 2**22 + z * 2**43) == v  # the same ring element
        assert abs(x) <= 2**21 and abs(y) <= 2**20 and abs(z) <= 2**20
    assert 3 * linalg._KC * 2**41 < 2**53


# ---- convolution ----------------------------------------------------------------------------------
CONVS = [
    # (N, Cin, H, W), (Cout, Cin/groups, kh, kw), stride, padding, dilation, groups
    ((1, 64, 4, 4), (8, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1),  # ResNet's last stage: small plane
    ((2, 5, 9, 7), (6, 5, 3, 3), (2, 2), (1, 1), (1, 1), 1),  # stride 2, odd sizes
    ((1, 4, 10, 10), (3, 4, 3, 3), (1, 1), (2, 2), (2, 2), 1),  # dilation
    ((1, 3, 8, 8), (4, 3, 5, 3), (3, 1), (2, 1), (1, 1), 1),  # rectangular kernel, mixed stride/padding
    ((1, 6, 7, 7), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 2),  # groups
    ((2, 8, 6, 6), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 8),  # depthwise
    ((1, 8, 6, 6), (16, 1, 3, 3), (2, 2), (0, 0), (1, 1), 8),  # depthwise with multiplier, stride
    ((1, 600, 3, 3), (4, 600, 1, 1), (1, 1), (0, 0), (1, 1), 1),  # 1x1, long inner dimension
]


@pytest.mark.parametrize("xs,ws,stride,padding,dilation,groups", CONVS)
def test_conv2d_is_exact_mod_2_64(kernel, xs, ws, stride, padding, dilation, groups):
    x, w = words(xs, 8, 0.2), words(ws, 9, 0.2)
    want = conv_bigint(x, w, stride, padding, dilation, groups)
    assert torch.equal(ring_conv2d(x, w, stride, padding, dilation, groups), want)
    if groups == 1:
        got = ring_conv2d(x, prepare_conv(w), stride, padding, dilation, 1, kernel=ws[2:])
        assert torch.equal(got, want)


def test_conv1d_is_exact_mod_2_64(kernel):
    x, w = words((2, 4, 19), 10, 0.2), words((5, 4, 3), 11, 0.2)
    want = conv_bigint(x.unsqueeze(2), w.unsqueeze(2), (1, 2), (0, 1), (1, 2), 1).squeeze(2)
    assert torch.equal(ring_conv2d(x, w, (2,), (1,), (2,)), want)
    assert torch.equal(ring_conv2d(x, prepare_conv(w), (2,), (1,), (2,), kernel=(3,)), want)
    xd, wd = words((1, 4, 12), 12), words((4, 1, 3), 13)  # depthwise 1-D
    got = ring_conv2d(xd, wd, (1,), (1,), (1,), 4)
    assert torch.equal(got, conv_bigint(xd.unsqueeze(2), wd.unsqueeze(2), (1, 1), (0, 1), (1, 1), 4).squeeze(2))


def test_meta_tensors_give_torch_shapes():
    """The cost model runs the same functions on meta tensors: shapes only, no kernel."""
    x, w = torch.empty((2, 3, 9, 9), device="meta", dtype=torch.int64), torch.empty((4, 3, 3, 3), dtype=torch.int64)
    assert ring_conv2d(x, w.to("meta"), (2, 2), (1, 1)).shape == (2, 4, 5, 5)
    assert ring_conv2d(x, prepare_conv(w), (2, 2), (1, 1), kernel=(3, 3)).shape == (2, 4, 5, 5)
    a = torch.empty((5, 7), device="meta", dtype=torch.int64)
    assert ring_matmul(a, prepare(torch.zeros(7, 2, dtype=torch.int64))).shape == (5, 2)


# ---- dispatch -------------------------------------------------------------------------------------
def test_dispatch_records_the_capability_and_obeys_the_override(monkeypatch):
    prof = linalg.cpu_profile()
    assert prof["capability"] == torch.backends.cpu.get_cpu_capability()
    assert prof["measured_choice"] in KERNELS
    assert prof["measured_choice"] == ("limbs" if prof["int64_over_float64"] > linalg.LIMB_RATIO else "int64")
    monkeypatch.setenv(linalg.ENV, "auto")
    assert linalg.backend(10) == "int64"  # small products never pay for the limb split
    assert linalg.backend(1 << 30) == prof["measured_choice"]
    for kind in KERNELS:
        monkeypatch.setenv(linalg.ENV, kind)
        assert linalg.backend(1 << 30) == kind == linalg.backend(10)


def test_bad_override_is_one_clear_error(monkeypatch):
    """A wrong SIGUARD_RING_GEMM is a SiguardError (the CLI prints it as one line), not a silent default."""
    monkeypatch.setenv(linalg.ENV, "fast")
    linalg.cpu_profile.cache_clear()
    try:
        for fn in (linalg.cpu_profile, lambda: linalg.backend(1 << 30), lambda: linalg.backend(1)):
            with pytest.raises(SiguardError, match="int64, limbs or auto"):
                fn()
    finally:
        monkeypatch.delenv(linalg.ENV)
        linalg.cpu_profile.cache_clear()


def test_probe_result_is_cached_per_machine_and_reprobed_when_the_key_changes(tmp_path, monkeypatch):
    """The per-CPU probe runs once per machine, torch version and thread count (a one-shot run does not pay
    for it), not once per process: a second process (here: a cleared in-process cache) reads the file;
    a different key (another CPU, thread count or torch), a corrupt file or no cache directory probe again.
    The override still applies to a cached result."""
    monkeypatch.setenv("SIGUARD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(linalg.ENV, raising=False)
    calls = []
    real = linalg.probe_cpu

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(linalg, "probe_cpu", counted)

    def fresh():
        linalg.cpu_profile.cache_clear()
        return linalg.cpu_profile()

    try:
        first = fresh()
        assert not first["cached"] and len(calls) == 1
        assert linalg.probe_cache_path() == tmp_path / "ring_gemm.json" and linalg.probe_cache_path().exists()
        second = fresh()
        assert second["cached"] and len(calls) == 1
        assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
        monkeypatch.setenv(linalg.ENV, "limbs")  # forced on top of the cached measurement
        assert fresh()["backend"] == "limbs" and len(calls) == 1
        monkeypatch.delenv(linalg.ENV)

        monkeypatch.setattr(torch, "get_num_threads", lambda: 97)  # another thread count: another entry
        assert not fresh()["cached"] and len(calls) == 2
        assert fresh()["cached"] and len(calls) == 2
        monkeypatch.undo()  # back to the first key (and the real probe and cache directory)
        monkeypatch.setenv("SIGUARD_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(linalg, "probe_cpu", counted)
        assert fresh()["cached"] and len(calls) == 2  # both entries kept
        monkeypatch.setattr(linalg, "_cpu_identity", lambda: "another CPU")
        assert not fresh()["cached"] and len(calls) == 3

        (tmp_path / "ring_gemm.json").write_text("{not json")
        assert not fresh()["cached"] and len(calls) == 4  # a corrupt cache is measured over, not trusted
        assert fresh()["cached"]
        doc = json.loads((tmp_path / "ring_gemm.json").read_text())
        (entry,) = doc["entries"].values()
        entry["key"]["torch"] = "0.0"  # an entry whose recorded key disagrees with its name is not used
        (tmp_path / "ring_gemm.json").write_text(json.dumps(doc))
        assert not fresh()["cached"] and len(calls) == 5

        monkeypatch.setenv("SIGUARD_CACHE_DIR", "")  # no cache: every process probes
        assert linalg.probe_cache_path() is None
        assert not fresh()["cached"] and not fresh()["cached"] and len(calls) == 7
    finally:
        linalg.cpu_profile.cache_clear()


# ---- engines --------------------------------------------------------------------------------------
def test_secure_products_on_owner_weights_are_exact_with_either_kernel(kernel):
    """The secure engine's conv (im2col form and torch form) and matmul with weights input by the model
    owner (one product per party, prepared weights), opened: equal to the big-integer products."""
    x, w = words((1, 64, 4, 4), 14, 0.1) >> 20, words((8, 64, 3, 3), 15, 0.1) >> 20
    x2, w2 = words((1, 3, 6, 6), 16) >> 20, words((4, 3, 3, 3), 17) >> 20
    a, b = words((3, 40), 18) >> 20, words((40, 6), 19) >> 20

    def party(e):
        out = []
        for xv, wv in ((x, w), (x2, w2)):
            ws = e.input("model", wv if e.party == 0 else None, wv.shape)
            xs = e.input("P1", xv if e.party == 1 else None, xv.shape)
            for _ in range(2):  # the second query reuses the prepared weight
                out.append(e.reveal(e.conv2d(xs, ws, (1, 1), (1, 1), (1, 1), 1), "P0"))
        bs = e.input("model", b if e.party == 0 else None, b.shape)
        as_ = e.input("P2", a if e.party == 2 else None, a.shape)
        out.append(e.reveal(e.matmul(as_, bs), "P0"))
        bz = e.input("P2", torch.zeros_like(b) if e.party == 2 else None, b.shape)
        bs2 = e.add(e.input("P1", b if e.party == 1 else None, b.shape), bz)  # every slot random
        assert not isinstance(bs2, rss.ServerInput)  # secret x secret: two products per party
        out.append(e.reveal(e.matmul(as_, bs2), "P0"))
        return out

    results, _, _ = run_threads(party, None, timeout=60)
    got = results[0]
    want_c = conv_bigint(x, w, (1, 1), (1, 1), (1, 1), 1)
    want_c2 = conv_bigint(x2, w2, (1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(got[0], want_c) and torch.equal(got[1], want_c)
    assert torch.equal(got[2], want_c2) and torch.equal(got[3], want_c2)
    assert torch.equal(got[4], mm_bigint(a, b)) and torch.equal(got[5], mm_bigint(a, b))


def test_reference_engine_is_bit_identical_with_either_kernel(monkeypatch, cnn_onnx, digits):
    """A compiled plan on the reference engine: the same output bits with int64 and with limbs."""
    from siguard.compiler.plan import Plan
    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from siguard.runtime.local import run_reference

    _, _, x_test, _ = digits
    xs = x_test[:16].reshape(-1, 1, 8, 8)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_plan(compile_model(cnn_onnx, CompileOptions(batch=len(xs))), Path(d) / "plan")
        plan = Plan.load(Path(d) / "plan")
        outs = {}
        for kind in KERNELS:
            monkeypatch.setenv(linalg.ENV, kind)
            outs[kind] = run_reference(plan, xs).output
    assert np.array_equal(outs["int64"], outs["limbs"])
    e = PlainEngine()
    a, b = words((4, 9), 20), words((9, 3), 21)
    assert torch.equal(e.matmul(Clear(a), b).v, mm_bigint(a, b))
