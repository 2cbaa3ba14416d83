"""The IR's op set: what each op computes on real numbers, its attributes and its implementations.

All tensors are NCHW; broadcasting follows numpy. Every attribute is fully resolved at lowering
time (no dynamic shapes, no negative axes, no "auto_pad"). The float semantics below are executed
by :mod:`siguard.compiler.interp`, the oracle of every pass.

==================  ============================================================================
op                  semantics (inputs; attrs)
==================  ============================================================================
add, sub, mul       elementwise a op b with broadcasting (a, b)
neg                 -a
div                 a / b; canonicalize turns it into mul (public b) or reciprocal + mul
matmul              np.matmul(a, b) (+ bias on the last axis if a third input is given)
conv                2-D convolution (x, w[, bias]; strides[2], pads[4]=(top, left, bottom, right),
                    dilations[2], group)
avgpool             2-D average pool (x; kernel[2], strides[2], pads[4], count_include_pad)
reduce_sum          sum over axes (x; axes, keepdims)
reduce_mean         mean over axes (x; axes, keepdims)
reshape             (x; shape) -- Flatten, Squeeze, Unsqueeze lower to this
transpose           (x; perm)
concat              (x1, x2, ...; axis)
pad                 constant pad (x; pads[2*rank] = begins then ends, as ONNX; value)
slice               (x; starts, ends, axes, steps) all resolved to non-negative, in range
gather              np.take(x, indices, axis) (x; indices (int list/array), axis)
identity            x (Identity, Dropout, Cast-to-float); removed by canonicalize
relu                max(x, 0)
leaky_relu          x if x >= 0 else alpha * x (x; alpha)
prelu               x if x >= 0 else slope * x (x, slope)
clip                min(max(x, min), max) (x; min, max -- either may be None)
maxpool             2-D max pool (x; kernel[2], strides[2], pads[4], dilations[2]); pads are -inf
softmax             exp(x - max) / sum along axis (x; axis)
log_softmax         log(softmax(x)) (x; axis)
sigmoid, tanh       the usual functions
exp, sqrt           e^x, sqrt(x)
reciprocal          1 / x
erf                 the error function
gelu                x * Phi(x) (x; approximate = "none" | "tanh")
softplus            log(1 + e^x)
hard_sigmoid        max(0, min(1, alpha * x + beta)) (x; alpha, beta)
hard_swish          x * max(0, min(1, x / 6 + 1 / 2)) (ONNX HardSwish, MobileNetV3)
reduce_max          maximum over axes (x; axes, keepdims)
lrn                 ONNX LRN across channels (x; size, alpha, beta, bias)
layer_norm          (x - mean) / sqrt(var + epsilon) * scale + bias over axes >= axis
                    (x, scale[, bias]; axis, epsilon)
batchnorm           (x - mean) / sqrt(var + eps) * scale + bias, per channel (axis 1)
                    (x, scale, bias, mean, var; epsilon); folded or lowered by canonicalize
guard               SIGuard: MemGuard noise on the logits with fixed counts, returns the guarded
                    probabilities (z, W1, b1, W2, b2, w3, b3; rounds, steps, c1, c2, c3, lr,
                    schedule, validator, margin); see runtime/kernels/guard.py
truncate            fixed-point only: divide by 2^bits (x; bits). Inserted by the fixed-point
                    pass; identity on real numbers.
==================  ============================================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["OpSpec", "OPS", "LINEAR_OPS", "NONLINEAR_OPS", "LAYOUT_OPS", "default_impl"]


@dataclass(frozen=True)
class OpSpec:
    """Static facts about an IR op.

    ``impls`` lists the implementation names a pass may choose; the first is the default.
    ``layout`` ops move or copy elements without arithmetic (free on shares).
    """

    name: str
    kind: str  # "linear", "layout", "nonlinear", "guard", "fixed-point"
    impls: tuple[str, ...] = ("local",)
    doc: str = ""
    attrs: tuple[str, ...] = field(default_factory=tuple)


def _spec(name, kind, impls=("local",), attrs=()):
    return OpSpec(name=name, kind=kind, impls=tuple(impls), attrs=tuple(attrs))


OPS: dict[str, OpSpec] = {
    s.name: s
    for s in [
        # linear: local on shares, except secret x secret products (one resharing round)
        _spec("add", "linear"),
        _spec("sub", "linear"),
        _spec("neg", "linear"),
        _spec("mul", "linear", ("auto",)),
        _spec("div", "linear", ("auto",)),
        _spec("matmul", "linear", ("auto",)),
        _spec("conv", "linear", ("auto",), ("strides", "pads", "dilations", "group")),
        _spec("avgpool", "linear", ("local",), ("kernel", "strides", "pads", "count_include_pad")),
        _spec("reduce_sum", "linear", ("local",), ("axes", "keepdims")),
        _spec("reduce_mean", "linear", ("local",), ("axes", "keepdims")),
        _spec("batchnorm", "linear", ("auto",), ("epsilon",)),
        # layout: free
        _spec("reshape", "layout", attrs=("shape",)),
        _spec("transpose", "layout", attrs=("perm",)),
        _spec("concat", "layout", attrs=("axis",)),
        _spec("pad", "layout", attrs=("pads", "value")),
        _spec("slice", "layout", attrs=("starts", "ends", "axes", "steps")),
        _spec("gather", "layout", attrs=("indices", "axis")),
        _spec("identity", "layout"),
        # nonlinear: the approximation pass chooses among impls (first = default)
        _spec("relu", "nonlinear", ("exact",)),
        _spec("leaky_relu", "nonlinear", ("exact",), ("alpha",)),
        _spec("prelu", "nonlinear", ("exact",)),
        _spec("clip", "nonlinear", ("exact",), ("min", "max")),
        _spec("maxpool", "nonlinear", ("tree",), ("kernel", "strides", "pads", "dilations")),
        _spec("softmax", "nonlinear", ("exp2", "max_exp_recip", "crypten", "piranha", "secureml"), ("axis",)),
        _spec("log_softmax", "nonlinear", ("max_exp_log",), ("axis",)),
        _spec("sigmoid", "nonlinear", ("exp_recip",)),
        _spec("tanh", "nonlinear", ("sigmoid",)),
        _spec("exp", "nonlinear", ("limit8",)),
        _spec("sqrt", "nonlinear", ("newton_rsqrt",)),
        _spec("reciprocal", "nonlinear", ("newton10",)),
        _spec("erf", "nonlinear", ("chebyshev",)),
        _spec("gelu", "nonlinear", ("erf",), ("approximate",)),
        _spec("softplus", "nonlinear", ("exp_log",)),
        _spec("hard_sigmoid", "nonlinear", ("exact",), ("alpha", "beta")),
        _spec("hard_swish", "nonlinear", ("exact",)),
        _spec("reduce_max", "nonlinear", ("tree",), ("axes", "keepdims")),
        _spec("lrn", "nonlinear", ("newton",), ("size", "alpha", "beta", "bias")),
        _spec("layer_norm", "nonlinear", ("newton_rsqrt",), ("axis", "epsilon")),
        # the SIGuard guard (inputs: logits, W1, b1, W2, b2, w3, b3 of the defender)
        _spec("guard", "guard", ("memguard-parallel", "memguard-freeze", "memguard-paper"),
              ("rounds", "steps", "c1", "c2", "c3", "lr", "schedule", "validator", "margin")),
        # fixed point
        _spec("truncate", "fixed-point", ("exact",), ("bits",)),
    ]
}

LINEAR_OPS = frozenset(n for n, s in OPS.items() if s.kind == "linear")
LAYOUT_OPS = frozenset(n for n, s in OPS.items() if s.kind == "layout")
NONLINEAR_OPS = frozenset(n for n, s in OPS.items() if s.kind == "nonlinear")


def default_impl(op: str) -> str:
    """The implementation an op gets until a pass chooses another."""
    return OPS[op].impls[0]
