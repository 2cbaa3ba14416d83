"""Fixtures for the networked runtime: compiled digits-MLP plans, certificates, server trios."""

from __future__ import annotations

import numpy as np
import pytest

from siguard.compiler.plan import Plan
from siguard.pipeline import CompileOptions, compile_model, write_plan
from siguard.runtime.net.certs import make_certs
from siguard.runtime.net.processes import Trio, write_loopback_config


@pytest.fixture(scope="session")
def net_plans(mlp_onnx, tmp_path_factory) -> dict[int, Plan]:
    """The trained digits MLP compiled for batch 1 and batch 8 (plan directories with weights)."""
    out = {}
    for batch in (1, 8):
        d = tmp_path_factory.mktemp(f"net-plan-{batch}") / "plan"
        write_plan(compile_model(mlp_onnx, CompileOptions(batch=batch)), d)
        out[batch] = Plan.load(d)
    return out


@pytest.fixture(scope="session")
def net_certs(tmp_path_factory):
    """One CA and certificates for P0, P1, P2 and the client, shared by the tests."""
    d = tmp_path_factory.mktemp("net-certs")
    make_certs(d, write_config=False)
    return d


@pytest.fixture(scope="session")
def digit_inputs(digits) -> np.ndarray:
    """Held-out digits (540, 64) float32."""
    return digits[2]


@pytest.fixture
def start_trio(tmp_path, net_certs):
    """Factory ``start_trio(plans, config=None, **Trio kwargs) -> Trio`` on fresh loopback ports
    (or ``config``'s); not yet ready: call ``wait_ready``. Every trio started is stopped at teardown."""
    trios: list[Trio] = []

    def start(plans, *, name: str = "trio", config=None, **kwargs) -> Trio:
        work = tmp_path / f"{name}-{len(trios)}"
        if config is None:
            config = write_loopback_config(work, cert_dir=net_certs)
        trio = Trio(plans, config, work / "logs", **kwargs)
        trios.append(trio)
        return trio.start()

    yield start
    for trio in trios:
        trio.stop(grace=5)
