"""Z_2^64 on torch int64: wrap-around of +, *, matmul, conv2d against Python integers; encoding."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siguard.runtime.ring import SIGN_BIT, decode, encode, rshift_logical, to_ring

MOD = 1 << 64


def signed(v: int) -> int:
    v %= MOD
    return v - MOD if v >> 63 else v


def words(n, seed):
    g = torch.Generator().manual_seed(seed)  # test data only
    return torch.randint(-(2**63), 2**63 - 1, (n,), generator=g, dtype=torch.int64)


def test_add_mul_wrap_like_python_integers():
    a, b = words(500, 1), words(500, 2)
    edges = torch.tensor([0, -1, 1, 2**63 - 1, -(2**63), 2**62, -(2**62)], dtype=torch.int64)
    a, b = torch.cat([a, edges, edges]), torch.cat([b, edges, edges.flip(0)])
    for x, y, s, p, d in zip(a.tolist(), b.tolist(), (a + b).tolist(), (a * b).tolist(), (a - b).tolist(), strict=True):
        assert s == signed(x + y)
        assert p == signed(x * y)
        assert d == signed(x - y)


def test_matmul_wraps_exactly():
    a, b = words(17 * 33, 3).reshape(17, 33), words(33 * 9, 4).reshape(33, 9)
    got = (a @ b).tolist()
    al, bl = a.tolist(), b.tolist()
    for i in range(17):
        for j in range(9):
            assert got[i][j] == signed(sum(al[i][k] * bl[k][j] for k in range(33)))


def test_conv2d_wraps_exactly():
    x, w = words(2 * 3 * 7 * 7, 5).reshape(2, 3, 7, 7), words(4 * 3 * 3 * 3, 6).reshape(4, 3, 3, 3)
    got = F.conv2d(x, w, None, 1, 1).tolist()
    xl, wl = x.tolist(), w.tolist()
    for n in range(2):
        for o in range(4):
            for i in range(7):
                for j in range(7):
                    acc = 0
                    for c in range(3):
                        for di in range(3):
                            for dj in range(3):
                                ii, jj = i + di - 1, j + dj - 1
                                if 0 <= ii < 7 and 0 <= jj < 7:
                                    acc += xl[n][c][ii][jj] * wl[o][c][di][dj]
                    assert got[n][o][i][j] == signed(acc)


def test_rshift_logical_matches_unsigned_shift():
    x = torch.cat([words(300, 7), torch.tensor([0, -1, SIGN_BIT, 2**63 - 1], dtype=torch.int64)])
    for k in (0, 1, 2, 16, 31, 62, 63):
        got = rshift_logical(x, k).tolist()
        assert got == [signed((v % MOD) >> k) for v in x.tolist()]
    with pytest.raises(ValueError):
        rshift_logical(x, 64)


def test_encode_decode_round_trip():
    vals = np.array([0.0, 1.0, -1.0, 0.5, -3.25, 1234.5678, -(2.0**40)])
    enc = encode(vals, 16)
    assert enc.dtype == torch.int64
    assert enc.tolist() == [round(v * 2**16) for v in vals]
    assert np.allclose(decode(enc, 16), vals, atol=2**-17)


def test_encode_rejects_nan_inf_and_overflow():
    for bad in (math.nan, math.inf, -math.inf, 2.0**46):
        with pytest.raises(ValueError):
            encode(np.array([bad]), 16)


def test_to_ring_keeps_uint64_bits():
    arr = np.array([0, 2**63, 2**64 - 1], dtype=np.uint64)
    assert to_ring(arr).tolist() == [0, -(2**63), -1]
