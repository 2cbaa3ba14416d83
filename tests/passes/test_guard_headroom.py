"""Rule 7 of the guard pass: a parallel-schedule guard whose ratio sum could overflow is refused at compile time."""

from __future__ import annotations

import math

import numpy as np
import pytest

from siguard.core.config import GuardConfig
from siguard.core.errors import ModelError
from siguard.passes.guard import RATIO_SUM_LIMIT, check_ratio_headroom
from siguard.runtime.kernels.guard import _ratio_sum_bound


def test_the_limit_is_the_runtime_bound_on_the_ratio_sum():
    """The pass checks the same D_max the secure guard's bounds use, against 2^62 / 2^56 (trunc's headroom at
    the ratio sum's scale qr + f = 56)."""
    cfg = GuardConfig()
    for k in (2, 10, 26, 27, 100):
        assert math.isclose(_ratio_sum_bound(cfg, k), 1.02 * k * math.exp(2 * cfg.lr_max))
    assert RATIO_SUM_LIMIT == 2.0**62 / 2.0**56


def test_default_guard_takes_up_to_26_classes_and_refuses_27_with_the_remedy():
    cfg = GuardConfig()
    check_ratio_headroom(cfg, 10)
    check_ratio_headroom(cfg, 26)
    with pytest.raises(ModelError, match=r"at most 26 classes .* this model has 27: .* fewer --guard-rounds"):
        check_ratio_headroom(cfg, 27)
    assert _ratio_sum_bound(cfg, 26) < RATIO_SUM_LIMIT <= _ratio_sum_bound(cfg, 27)


def test_a_smaller_largest_learning_rate_takes_more_classes_and_the_sequential_schedules_are_not_limited():
    small = GuardConfig(rounds=4)  # lr_max = 0.04 x 1.3^3
    k = int(np.floor(RATIO_SUM_LIMIT / (1.02 * math.exp(2 * small.lr_max))))
    check_ratio_headroom(small, k)
    with pytest.raises(ModelError):
        check_ratio_headroom(small, k + 1)
    check_ratio_headroom(GuardConfig.for_schedule(schedule="paper"), 1000)


def test_compiling_a_27_class_model_with_the_default_guard_fails_naming_the_limit(tmp_path):
    import torch

    from siguard.pipeline import CompileOptions, compile_model
    from siguard.privacy.defender import DefenderWeights, make_defender

    model = torch.nn.Sequential(torch.nn.Linear(4, 27))
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, torch.zeros(1, 4), path, dynamo=False)
    defender = DefenderWeights.from_module(make_defender(27))
    compile_model(path, CompileOptions(batch=1))  # the model itself compiles
    with pytest.raises(ModelError, match="at most 26 classes"):
        compile_model(path, CompileOptions(batch=1, guard=defender))


def test_guard_options_the_plan_cannot_honour_are_refused_in_one_line(tmp_path):
    """The guard's scales need 12 fractional bits, the release's grid must lie above the plan's ulp, and the
    sharpening round and the rounding belong to the parallel schedule: each refused with an InputError naming the
    option."""
    import torch

    from siguard.core.errors import InputError
    from siguard.pipeline import CompileOptions, compile_model
    from siguard.privacy.defender import DefenderWeights, make_defender

    path = tmp_path / "m.onnx"
    torch.onnx.export(torch.nn.Sequential(torch.nn.Linear(4, 10)), torch.zeros(1, 4), path, dynamo=False)
    defender = DefenderWeights.from_module(make_defender(10))
    with pytest.raises(InputError, match="the guard needs --frac-bits 12 or more"):
        compile_model(path, CompileOptions(batch=1, frac_bits=10, guard=defender))
    with pytest.raises(InputError, match="--guard-release-bits 12 needs --frac-bits above it"):
        compile_model(path, CompileOptions(batch=1, frac_bits=12, guard=defender, guard_config={"release_bits": 12}))
    with pytest.raises(InputError, match="need the parallel schedule"):
        compile_model(path, CompileOptions(batch=1, guard=defender, guard_config={"schedule": "paper",
                                                                                  "release_bits": 7}))
    plan = compile_model(path, CompileOptions(batch=1, frac_bits=12, guard=defender, guard_config={"release_bits": 8}))
    assert plan is not None
