"""Property-based fuzzing (hypothesis) of what a party parses from outside: the plan loader and the
frame parser. A few thousand cases each; every malformed input must end in the one error type the
caller turns into a clear line (PlanError; LinkError/ValueError for frames), never another exception,
an allocation beyond the declared limit, or a silently accepted frame of the wrong size."""

from __future__ import annotations

import copy
import json
import struct
from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siguard.compiler.plan import Plan, compute_hash
from siguard.compiler.report import render
from siguard.core.errors import PlanError
from siguard.runtime.mpc.transport import FrameHeader
from siguard.runtime.net.tls import KIND_CONTROL, KIND_DATA, LinkError, TLSLink, _words

PLAN_CASES = 1000
FRAME_CASES = 1500
_BASE = settings(deadline=None, database=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.function_scoped_fixture])


def fuzz(n: int) -> settings:
    """n cases, no deadline, reproducible (derandomized: CI runs the same cases every time)."""
    return settings(_BASE, max_examples=n)


@lru_cache(maxsize=1)
def _base_doc() -> dict:
    """A real compiled plan (a small MLP), as the JSON document plan.json holds."""
    import tempfile
    from pathlib import Path

    import torch.nn as nn

    from siguard.pipeline import CompileOptions, compile_model, write_plan
    from tests.models import export

    torch.manual_seed(0)  # test data only
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Softmax(-1))
    d = Path(tempfile.mkdtemp(prefix="siguard-fuzz-"))
    export(model, d / "m.onnx", torch.zeros(1, 6), opset=17, dynamic_batch=True)
    write_plan(compile_model(d / "m.onnx", CompileOptions(batch=1)), d / "plan")
    return json.loads((d / "plan" / "plan.json").read_text())


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_docs(draw):
    doc = copy.deepcopy(_base_doc())
    paths = [p for p in _paths(doc) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    if draw(st.booleans()) and isinstance(doc, dict):
        try:
            doc["plan_hash"] = compute_hash(doc)  # past the hash check: the schema and references must hold
        except (TypeError, ValueError):
            pass
    return doc


COUNTS = {"plan": 0, "plan_loaded": 0, "frame": 0, "frame_ok": 0}


@fuzz(PLAN_CASES)
@given(mutated_docs())
def test_plan_loader_refuses_every_malformed_plan_with_a_plan_error(tmp_path, doc):
    COUNTS["plan"] += 1
    d = tmp_path
    (d / "plan.json").write_text(json.dumps(doc))
    try:
        plan = Plan.load(d)
    except PlanError as exc:
        assert "\n" not in str(exc)
        return
    COUNTS["plan_loaded"] += 1
    render(plan, "text")  # a plan that loads can be inspected


@fuzz(300)
@given(st.binary(max_size=200))
def test_plan_loader_refuses_arbitrary_bytes(tmp_path, data):
    (tmp_path / "plan.json").write_bytes(data)
    d = tmp_path
    with pytest.raises(PlanError):
        Plan.load(d)


class _BufferLink(TLSLink):
    """A TLSLink whose decrypted stream is a fixed buffer (no socket): read_frame parses it."""

    def __init__(self, data: bytes, max_payload: int):  # noqa: D107 - test double
        self._plain = bytearray(data)
        self._ppos = 0
        self.max_payload = max_payload
        self.local, self.peer = 0, 3

    def _fill(self, n, deadline):
        if len(self._plain) - self._ppos < n:
            raise LinkError("connection closed")

    def _read_large(self, n, deadline):
        self._fill(n, deadline)
        out = self._plain[self._ppos : self._ppos + n]
        self._ppos += n
        return out


headers = st.builds(
    FrameHeader,
    st.text(max_size=12),
    st.text(max_size=12),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 6), max_size=4).map(tuple),
)


@st.composite
def frames(draw):
    """A well-formed data frame, then possibly corrupted: bytes flipped, cut, or lengths lied about."""
    h = draw(headers)
    n = 1
    for s in h.shape:
        n *= s
    hdr = h.encode()
    payload = bytes(8 * n)
    kind, hlen, plen = KIND_DATA, len(hdr), len(payload)
    how = draw(st.sampled_from(["ok", "flip", "cut", "plen", "hlen", "kind", "garbage"]))
    if how == "plen":
        plen = draw(st.integers(0, 2**64 - 1))
    elif how == "hlen":
        hlen = draw(st.integers(0, 2**32 - 1))
    elif how == "kind":
        kind = draw(st.integers(0, 255))
    data = struct.pack("<BIQ", kind, hlen, plen) + hdr + payload
    if how == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    elif how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "garbage":
        data = draw(st.binary(max_size=300))
    return h, how, data


@fuzz(FRAME_CASES)
@given(frames(), st.integers(0, 4096))
def test_frame_parser_accepts_only_frames_within_limits(frame, limit):
    COUNTS["frame"] += 1
    h, how, data = frame
    link = _BufferLink(data, max_payload=limit)
    try:
        kind, header, payload = link.read_frame(None)
    except LinkError:
        return
    assert kind in (KIND_DATA, KIND_CONTROL)
    assert len(payload) <= (limit if kind == KIND_DATA else 1 << 20)  # never more than the declared limit
    if kind != KIND_DATA:
        return
    try:
        hdr = FrameHeader.decode(bytes(header))
        t = _words(hdr, payload)
    except (LinkError, ValueError, struct.error, UnicodeDecodeError):
        return
    COUNTS["frame_ok"] += 1
    n = 1
    for s in hdr.shape:
        n *= s
    assert t.shape == hdr.shape and t.size == n and 8 * n == len(payload)
    if how == "ok":
        assert hdr == h


@fuzz(FRAME_CASES)
@given(headers)
def test_frame_header_round_trips(h):
    assert FrameHeader.decode(h.encode()) == h


@fuzz(FRAME_CASES)
@given(st.binary(max_size=120))
def test_frame_header_decode_of_garbage_raises_or_is_self_consistent(data):
    try:
        h = FrameHeader.decode(data)
    except (ValueError, struct.error, UnicodeDecodeError):
        return
    assert h.encode() == data  # anything accepted is exactly a well-formed header


def test_fuzz_counts_reported():
    """Prints how many cases ran (pytest -s shows it); run last in this file."""
    print(f"fuzz cases: {COUNTS}")
