"""One registry of op handlers, shared by the reference, secure and cost-counting engines.

A handler has the signature ``handler(ctx, step, args) -> list[outputs]`` where ``ctx`` is the
:class:`siguard.runtime.executor.StepContext` (engine, fixed-point bits, value metadata), ``step`` the
plan step (a :class:`siguard.compiler.step.PlanStep`: name, op, impl, inputs, outputs, attrs) and ``args``
the input values (secrets of the engine, or public ring tensors). Handlers call only the
:class:`siguard.runtime.kernels.engine.Engine` interface, so one handler serves every engine.

Scales: every secret activation is at ``frac_bits`` (f). Products (mul, matmul, conv) return
their raw product at the sum of their operands' scales; the fixed-point pass inserts the
``truncate`` step that follows. A bias meets the product at that scale (it is encoded at 2f).
Average pooling and means multiply by a public real and truncate inside their handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from siguard.compiler.step import PlanStep
from siguard.core.config import GuardConfig

from . import nonlinear
from .approx import ring_int
from .guard import secure_guard

__all__ = ["HANDLERS", "register", "handler_for"]

Handler = Callable[[Any, PlanStep, list], list]
HANDLERS: dict[str, Handler] = {}


def register(*ops: str):
    def deco(fn: Handler) -> Handler:
        for op in ops:
            HANDLERS[op] = fn
        return fn

    return deco


def handler_for(op: str) -> Handler:
    try:
        return HANDLERS[op]
    except KeyError:
        raise KeyError(f"no runtime handler for op {op!r}") from None


# ---- elementwise linear ------------------------------------------------------------------------
@register("add")
def _add(ctx, step, args):
    """a + b; with attribute ``shift_b`` d, a + b * 2^d (b brought to a's scale: a fused truncation's
    residual sum, see :class:`siguard.passes.fuse.FuseTruncation`). Local."""
    b = args[1]
    shift = int(step.attrs.get("shift_b", 0))
    if shift:
        b = ctx.e.mul(b, ring_int(1 << shift))
    return [ctx.e.add(args[0], b)]


@register("sub")
def _sub(ctx, step, args):
    return [ctx.e.sub(args[0], args[1])]


@register("neg")
def _neg(ctx, step, args):
    return [ctx.e.neg(args[0])]


@register("mul")
def _mul(ctx, step, args):
    return [ctx.e.mul(args[0], args[1])]


@register("identity")
def _identity(ctx, step, args):
    return [args[0]]


@register("truncate")
def _truncate(ctx, step, args):
    bits = int(step.attrs["bits"])
    x = args[0]
    return [ctx.e.trunc(x, bits) if ctx.e.is_secret(x) else x >> bits]


# ---- products ----------------------------------------------------------------------------------
@register("matmul")
def _matmul(ctx, step, args):
    y = ctx.e.matmul(args[0], args[1])
    if len(args) > 2:
        y = ctx.e.add(y, args[2])
    return [y]


def _pad_asymmetric(ctx, x, pads, value_ring: int = 0):
    """Zero-pad H, W by (top, left, bottom, right) share-wise, then add ``value_ring`` on the border."""
    t, l, b, r = (int(p) for p in pads)
    if not any((t, l, b, r)):
        return x
    y = ctx.e.local(lambda v: F.pad(v, (l, r, t, b)), x)
    if value_ring:
        border = torch.full(tuple(x.shape[-2:]), 0, dtype=torch.int64)
        border = F.pad(border, (l, r, t, b), value=1) * value_ring
        y = ctx.e.add(y, border)
    return y


@register("conv")
def _conv(ctx, step, args):
    a = step.attrs
    x, w = args[0], args[1]
    pads = a.get("pads", [0, 0, 0, 0])
    t, l, b, r = pads
    if t == b and l == r:
        padding = (t, l)
    else:
        x = _pad_asymmetric(ctx, x, pads)
        padding = (0, 0)
    y = ctx.e.conv2d(x, w, a.get("strides", [1, 1]), padding, a.get("dilations", [1, 1]), int(a.get("group", 1)))
    if len(args) > 2:
        y = ctx.e.add(y, ctx.e.local(lambda v: v.reshape(1, -1, 1, 1), args[2]))
    return [y]


@register("avgpool")
def _avgpool(ctx, step, args):
    a = step.attrs
    x = args[0]
    kh, kw = a["kernel"]
    pads = a.get("pads", [0, 0, 0, 0])
    channels = x.shape[1]
    xp = _pad_asymmetric(ctx, x, pads)
    ones = torch.ones((channels, 1, kh, kw), dtype=torch.int64)
    s = ctx.e.conv2d(xp, ones, a.get("strides", [kh, kw]), (0, 0), (1, 1), channels)
    if a.get("count_include_pad", False) or not any(pads):
        div = torch.tensor(1.0 / (kh * kw), dtype=torch.float64)
    else:
        # per-position divisor: how many real (unpadded) elements each window covers
        h, w = x.shape[-2:]
        mask = F.pad(torch.ones((1, 1, h, w), dtype=torch.float64), (pads[1], pads[3], pads[0], pads[2]))
        counts = F.conv2d(mask, torch.ones((1, 1, kh, kw), dtype=torch.float64), stride=tuple(a.get("strides")))
        div = (1.0 / counts)[0, 0]
    return [ctx.e.mul_public_real(s, div)]


@register("reduce_sum")
def _reduce_sum(ctx, step, args):
    a = step.attrs
    axes = tuple(a["axes"])
    keep = bool(a.get("keepdims", True))
    return [ctx.e.local(lambda v: v.sum(dim=axes, keepdim=keep), args[0])]


@register("reduce_mean")
def _reduce_mean(ctx, step, args):
    a = step.attrs
    axes = tuple(a["axes"])
    keep = bool(a.get("keepdims", True))
    n = 1
    for ax in axes:
        n *= int(args[0].shape[ax])
    s = ctx.e.local(lambda v: v.sum(dim=axes, keepdim=keep), args[0])
    return [ctx.e.mul_public_real(s, 1.0 / n)]


# ---- layout ------------------------------------------------------------------------------------
@register("reshape")
def _reshape(ctx, step, args):
    shape = tuple(int(s) for s in step.attrs["shape"])
    return [ctx.e.local(lambda v: v.reshape(shape), args[0])]


@register("transpose")
def _transpose(ctx, step, args):
    perm = tuple(int(p) for p in step.attrs["perm"])
    return [ctx.e.local(lambda v: v.permute(perm).contiguous(), args[0])]


@register("concat")
def _concat(ctx, step, args):
    return [ctx.e.cat(list(args), int(step.attrs["axis"]))]


@register("pad")
def _pad(ctx, step, args):
    a = step.attrs
    pads = [int(p) for p in a["pads"]]
    rank = len(pads) // 2
    torch_pads: list[int] = []
    for ax in reversed(range(rank)):
        torch_pads += [pads[ax], pads[ax + rank]]
    x = args[0]
    y = ctx.e.local(lambda v: F.pad(v, torch_pads), x)
    value = float(a.get("value", 0.0) or 0.0)
    if value:
        border = F.pad(torch.zeros(tuple(x.shape), dtype=torch.int64), torch_pads, value=1)
        y = ctx.e.add(y, border * ctx.e.public(value, ctx.scale_of(step.outputs[0])))
    return [y]


@register("slice")
def _slice(ctx, step, args):
    a = step.attrs

    def fn(v):
        idx = [slice(None)] * v.dim()
        for st, en, ax, sp in zip(a["starts"], a["ends"], a["axes"], a["steps"], strict=True):
            idx[int(ax)] = slice(int(st), int(en), int(sp))
        return v[tuple(idx)].contiguous()

    return [ctx.e.local(fn, args[0])]


@register("gather")
def _gather(ctx, step, args):
    a = step.attrs
    idx = torch.as_tensor(a["indices"], dtype=torch.int64)
    axis = int(a["axis"])

    def fn(v):
        out = torch.index_select(v, axis, idx.reshape(-1))
        return out.reshape(tuple(v.shape[:axis]) + tuple(idx.shape) + tuple(v.shape[axis + 1 :]))

    return [ctx.e.local(fn, args[0])]


# ---- nonlinear: dispatch on the chosen implementation ------------------------------------------
NONLINEAR = (
    "relu",
    "leaky_relu",
    "prelu",
    "clip",
    "maxpool",
    "softmax",
    "log_softmax",
    "sigmoid",
    "tanh",
    "exp",
    "sqrt",
    "reciprocal",
    "erf",
    "gelu",
    "softplus",
    "hard_sigmoid",
    "hard_swish",
    "reduce_max",
    "lrn",
    "layer_norm",
)


@register(*NONLINEAR)
def _nonlinear(ctx, step, args):
    fn = nonlinear.get_implementation(step.op, step.impl)
    return [fn(ctx.e, *args, **{**step.attrs, **step.impl.param_dict})]


# ---- the SIGuard guard ---------------------------------------------------------------------------
@register("guard")
def _guard(ctx, step, args):
    return [secure_guard(ctx.e, *args, config=GuardConfig.from_attrs(step.attrs))]
