"""The speed paths of the runtime against independent oracles: the im2col convolution, products on
weights input by a server (known-zero slot), the prepared weight matrices, multi-query runs and the
per-op breakdown."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siguard.runtime.mpc import rss
from siguard.runtime.mpc.inprocess import run_threads
from siguard.runtime.mpc.rss import RSSEngine, Shares
from siguard.runtime.ring import conv2d_by_matmul, conv2d_ring, conv_uses_matmul, conv_weight_matrix

MASK = (1 << 64) - 1


def rand_words(shape, seed, bound=2**63 - 1):
    g = torch.Generator().manual_seed(seed)  # test data only
    return torch.randint(-bound, bound, shape, generator=g, dtype=torch.int64)


def _signed(v: int) -> int:
    v &= MASK
    return v - (1 << 64) if v >> 63 else v


def conv_bigint(x: torch.Tensor, w: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """conv2d mod 2^64 with Python integers: the oracle."""
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, wd = xp.shape
    co, _, kh, kw = w.shape
    ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
    wrows = [[int(v) for v in w[o].reshape(-1).tolist()] for o in range(co)]
    out = np.zeros((n, co, ho, wo), dtype=np.int64)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                window = xp[b, :, i * stride : i * stride + kh, j * stride : j * stride + kw]
                patch = [int(v) for v in window.reshape(-1)]
                for o in range(co):
                    out[b, o, i, j] = _signed(sum(p * q for p, q in zip(patch, wrows[o], strict=True)))
    return torch.from_numpy(out)


@pytest.mark.parametrize(
    "n,cin,cout,hw,k,stride,pad",
    [
        (1, 64, 8, 4, 3, 1, 1),  # 4x4 plane, inner 576: the matmul form
        (2, 64, 8, 8, 3, 2, 1),  # stride 2 to a 4x4 plane: the matmul form
        (1, 3, 5, 6, 3, 1, 1),  # torch's convolution
        (1, 600, 4, 3, 1, 1, 0),  # 1x1 kernel, inner 600: the matmul form
    ],
)
def test_conv2d_ring_is_exact_mod_2_64(n, cin, cout, hw, k, stride, pad):
    x, w = rand_words((n, cin, hw, hw), 1), rand_words((cout, cin, k, k), 2)
    got = conv2d_ring(x, w, (stride, stride), (pad, pad))
    assert torch.equal(got, conv_bigint(x, w, stride, pad))


def test_matmul_form_is_chosen_only_for_small_planes():
    assert conv_uses_matmul((1, 512, 4, 4), (512, 512, 3, 3), (1, 1), (1, 1))
    assert conv_uses_matmul((1, 256, 8, 8), (512, 256, 3, 3), (2, 2), (1, 1))
    assert not conv_uses_matmul((1, 64, 32, 32), (64, 64, 3, 3), (1, 1), (1, 1))
    assert not conv_uses_matmul((1, 512, 4, 4), (512, 1, 3, 3), (1, 1), (1, 1), groups=512)
    x, w = rand_words((1, 64, 4, 4), 3), rand_words((8, 64, 3, 3), 4)
    assert torch.equal(conv2d_by_matmul(x, conv_weight_matrix(w), (3, 3), (1, 1), (1, 1)),
                       conv_bigint(x, w, 1, 1))


def _open(e: RSSEngine, v: Shares):
    return e.reveal(v, "P0")


@pytest.mark.parametrize("x_shape,w_shape", [((1, 64, 4, 4), (16, 64, 3, 3)), ((2, 4, 6, 6), (3, 4, 3, 3))])
def test_secure_conv_with_owner_weights_matches_the_oracle(x_shape, w_shape):
    """Weights input by P0 have a known-zero component: every party computes one product instead of two.
    The opened result is exactly the ring convolution (activations with all three components random)."""
    x, w = rand_words(x_shape, 5, 2**40), rand_words(w_shape, 6, 2**20)
    calls = {0: 0, 1: 0, 2: 0}
    real = rss.ring_conv2d

    def party(e):
        ws = e.input("model", w if e.party == 0 else None, w.shape)
        xs = e.input("P1", x if e.party == 1 else None, x.shape)
        xs = e.add(xs, e.input("P2", torch.zeros_like(x) if e.party == 2 else None, x.shape))  # all slots random
        assert isinstance(ws, rss.ServerInput)  # the owner's component is P0's alone: P1's slot b, P2's slot a are 0
        assert (not ws.b.any()) == (e.party == 1) and (not ws.a.any()) == (e.party == 2)
        before = calls[e.party]
        y = e.conv2d(xs, ws, (1, 1), (1, 1), (1, 1), 1)
        products = calls[e.party] - before
        return _open(e, y), products

    def counting(fn):
        def wrapped(*a, **k):
            import threading

            calls[int(threading.current_thread().name[-1])] += 1
            return fn(*a, **k)

        return wrapped

    rss.ring_conv2d = counting(real)
    try:
        results, _, _ = run_threads(party, None, timeout=30)
    finally:
        rss.ring_conv2d = real
    assert torch.equal(results[0][0], conv_bigint(x, w, 1, 1))
    assert [r[1] for r in results] == [1, 1, 1]  # one product per party on a server's input


def test_matmul_with_owner_weights_and_prepared_matrices_are_reused():
    x, w = rand_words((3, 7), 7, 2**30), rand_words((7, 5), 8, 2**30)
    xc, wc = rand_words((1, 64, 4, 4), 9, 2**30), rand_words((8, 64, 3, 3), 10, 2**20)

    def party(e):
        ws = e.input("model", w if e.party == 0 else None, w.shape)
        xs = e.input("P1", x if e.party == 1 else None, x.shape)
        wcs = e.input("model", wc if e.party == 0 else None, wc.shape)
        xcs = e.input("P2", xc if e.party == 2 else None, xc.shape)
        y1 = e.conv2d(xcs, wcs, (1, 1), (1, 1), (1, 1), 1)
        left = e.matmul(e.local(lambda v: v.t(), ws), e.input("P1", xt if e.party == 1 else None, xt.shape))
        assert isinstance(e.local(lambda v: v.t(), ws), rss.ServerInput)  # a local map keeps the provenance
        cached = len(e._matrices)
        y2 = e.conv2d(xcs, wcs, (1, 1), (1, 1), (1, 1), 1)
        assert len(e._matrices) == cached > 0  # the second query reuses the prepared matrices
        return _open(e, e.matmul(xs, ws)), _open(e, y1), _open(e, y2), _open(e, left)

    xt = rand_words((7, 2), 11, 2**30)
    results, _, _ = run_threads(party, None, timeout=30)
    mm, y1, y2, left = results[0]
    want_left = [[_signed(sum(int(w[k, i]) * int(xt[k, j]) for k in range(7))) for j in range(2)] for i in range(5)]
    assert torch.equal(left, torch.tensor(want_left))
    want = [[_signed(sum(int(x[i, k]) * int(w[k, j]) for k in range(7))) for j in range(5)] for i in range(3)]
    assert torch.equal(mm, torch.tensor(want))
    assert torch.equal(y1, conv_bigint(xc, wc, 1, 1)) and torch.equal(y2, y1)


def test_run_threads_queries_and_breakdown(mlp_onnx, tmp_path):
    from siguard.compiler.plan import Plan
    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from siguard.runtime.local import run_reference
    from siguard.runtime.local import run_threads as run_plan
    from siguard.runtime.stats import op_breakdown

    write_plan(compile_model(mlp_onnx, CompileOptions(batch=2)), tmp_path / "plan")
    plan = Plan.load(tmp_path / "plan")
    x = np.random.default_rng(0).uniform(0, 1, (2, 64)).astype(np.float32)
    one = run_plan(plan, x, timeout=60)
    many = run_plan(plan, x, timeout=60, queries=3)
    ref = run_reference(plan, x).output
    assert np.abs(many.output - ref).max() < 1e-2
    assert len(many.stats["query_seconds_all"]) == 3 and many.stats["query_seconds"] > 0
    assert many.stats["totals"] == one.stats["totals"]  # the last query's counts, not the sum
    assert many.stats["setup"]["rounds"] == one.stats["setup"]["rounds"]
    rows = op_breakdown(plan, many.stats)
    assert sum(r["steps"] for r in rows) == len(plan.steps)  # local steps included
    assert set(many.stats["step_seconds"]) == {s.name for s in plan.steps}
    step_rounds = {r["name"]: r["rounds"] for r in many.stats["steps"]}
    assert sum(r["rounds"] for r in rows) == sum(step_rounds.get(s.name, 0) for s in plan.steps)
    assert abs(sum(r["share"] for r in rows) - 1) < 1e-9
    with pytest.raises(ValueError):
        run_plan(plan, x, queries=0)
