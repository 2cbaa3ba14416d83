"""Calibration pass: every value's range on calibration inputs."""

from __future__ import annotations

from typing import Any

import numpy as np

from siguard.compiler.calibrate import Calibration, calibrate, check_calibration_data
from siguard.compiler.ir import Graph
from siguard.compiler.ops import NONLINEAR_OPS

from .base import Pass, PassContext

__all__ = ["Calibrate"]


class Calibrate(Pass):
    """Records every value's range on calibration inputs (see :mod:`siguard.compiler.calibrate`).

    Rules:

    1. onnxruntime runs the ONNX model on the calibration inputs with every float intermediate
       exposed as an output; IR values it cannot see come from the float interpreter.
    2. Each computed value's ``range`` becomes its (min, max) over all inputs; the fixed-point
       pass checks headroom against it.
    3. The inputs of nonlinear nodes keep their float samples for the approximation pass, and the
       compiled output's onnxruntime values become the reference of the accuracy budget.
    """

    name = "calibrate"

    def __init__(self, model: Any, x: np.ndarray):
        self.model = model
        self.x = x
        self.result: Calibration | None = None

    def run(self, graph: Graph, ctx: PassContext) -> list[str]:
        if len(graph.inputs) == 1:
            self.x = check_calibration_data(self.x, graph.values[graph.inputs[0]].shape)
        keep = {n.inputs[0] for n in graph.nodes if n.op in NONLINEAR_OPS} | set(graph.outputs)
        cal = calibrate(self.model, graph, self.x, keep)
        for name, rng in cal.ranges.items():
            graph.values[name].range = rng
        self.result = cal
        n_ort = sum(1 for s in cal.sources.values() if s == "onnxruntime")
        n_interp = sum(1 for s in cal.sources.values() if s == "interpreter")
        return [f"{len(cal.ranges)} values calibrated on {cal.n} inputs ({n_ort} by onnxruntime, "
                f"{n_interp} by the float interpreter)"]
