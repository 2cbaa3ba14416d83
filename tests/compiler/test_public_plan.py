"""The public plan reveals only what the README's threat model lists.

Two models with the same architecture and different weights, compiled with calibration data: their
public ``plan.json`` files may differ only in the entries listed under "The public plan reveals"
(README, *Threat model*): the plan hash, the implementation chosen per nonlinear node with its
parameters (fitted ranges coarsened to signed powers of two), the costs that follow from those
choices, the passes' change notes that describe them, and public scalar constants. Everything
measured on the owner's data sits in ``owner.json`` instead.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from siguard.compiler.plan import OWNER_FILE, Plan
from siguard.compiler.report import render
from siguard.pipeline import CompileOptions, compile_model, write_plan

# paths (regular expressions over "/"-joined keys) whose values may differ between the two plans
ALLOWED = [
    r"/plan_hash",
    r"/steps/\d+/impl",
    r"/steps/\d+/impl_params(/.*)?",
    r"/steps/\d+/cost/.*",
    r"/steps/\d+/approx/(impl|how|degree|iterations|candidates|cost|most_accurate)(/.*)?",
    r"/totals/.*",
    r"/passes/\d+/changes(/.*)?",
    r"/constants/.*",
    r"/inputs/\d+/domain(/.*)?",  # the proven input domain: a power of two derived from the weights
]
README = Path(__file__).resolve().parents[2] / "README.md"


def _diffs(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                yield f"{path}/{k}"
            else:
                yield from _diffs(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            yield from _diffs(u, v, f"{path}/{i}")
    elif a != b:
        yield path


def _is_pow2_or_zero(v) -> bool:
    return v == 0 or (isinstance(v, float) and math.log2(abs(v)).is_integer())


@pytest.fixture(scope="module")
def twin_plans(tmp_path_factory, digits):
    import torch
    from torch import nn

    from tests.models import export

    d = tmp_path_factory.mktemp("twins")
    cal = digits[0][:64].astype(np.float32)
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # test data only: two different sets of weights
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.Sigmoid(), nn.Linear(10, 10),
                              nn.Softmax(-1))
        export(model, d / f"m{seed}.onnx", torch.zeros(1, 64), opset=17, dynamic_batch=True)
        write_plan(compile_model(d / f"m{seed}.onnx", CompileOptions(batch=1, calibration=cal)), d / f"p{seed}")
        out.append(d / f"p{seed}")
    return out


def test_public_plans_of_two_models_differ_only_in_what_the_readme_lists(twin_plans):
    a, b = (json.loads((p / "plan.json").read_text()) for p in twin_plans)
    diffs = list(_diffs(a, b))
    assert any(re.fullmatch(r"/(steps/\d+/impl_params|inputs/\d+/domain)/.*", p) for p in diffs)  # they differ
    bad = [p for p in diffs if not any(re.fullmatch(rx, p) for rx in ALLOWED)]
    assert not bad, bad
    for doc in (a, b):
        assert all(v["range"] is None for v in doc["values"].values())
        for step in doc["steps"]:
            if step.get("approx"):
                assert step["approx"].get("range") is None and step["approx"].get("error") is None
            for k, v in (step.get("impl_params") or {}).items():
                if k in ("lo", "hi", "exp_lo"):
                    assert _is_pow2_or_zero(v) or abs(v) == pytest.approx(16 * math.log(2), abs=1e-4), (k, v)
        assert "source_sha256" not in doc["model"] and "source" not in doc["model"]
        assert doc["approximation"]["measured"] is None and doc["warnings"] == []
        assert all("seconds" not in p for p in doc["passes"])
        # the passes' notes (allowed to differ) describe choices and costs, never a measured real number
        assert not [c for p in doc["passes"] for c in p["changes"] if re.search(r"\d\.\d", c)]


def test_the_readme_threat_model_lists_what_the_public_plan_reveals():
    text = README.read_text()
    section = text[text.index("## Threat model"):]
    section = " ".join(section[: section.index("\n## ", 5)].replace("**", "").split())
    for phrase in ("The public plan reveals", "implementation", "powers of two", "costs", "scalar constants",
                   "owner.json", "calibrated ranges", "measured errors"):
        assert phrase in section, phrase


def test_the_owner_keeps_the_facts_and_inspect_shows_them(twin_plans, tmp_path):
    p = twin_plans[0]
    owner = json.loads((p / OWNER_FILE).read_text())
    plan = Plan.load(p)
    assert owner["plan_hash"] == plan.plan_hash and plan.owner is not None
    assert owner["values"] and owner["model"]["source_sha256"]
    full = plan.with_owner_facts().doc
    assert all(full["values"][k]["range"] == v for k, v in owner["values"].items())
    text = render(plan, "text")
    sigmoid = next(s for s in full["steps"] if s.op == "sigmoid")
    assert sigmoid.approx["error"]["max_abs"] is not None
    assert f"{sigmoid.approx['error']['max_abs']:.3g}" in text
    # a server's copy (plan.json alone) loads, runs, and has none of the facts
    server = tmp_path / "server"
    server.mkdir()
    shutil.copy(p / "plan.json", server / "plan.json")
    public = Plan.load(server)
    assert public.owner is None and public.plan_hash == plan.plan_hash
    full_public = public.with_owner_facts().doc
    assert all(v["range"] is None for v in full_public["values"].values())
    assert next(s for s in full_public["steps"] if s.op == "sigmoid").approx["error"] is None
