"""bias_act: add a bias, apply an activation, scale by a gain and clamp; a reference path and a fused kernel."""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ops import dispatch
from ops._fused import dense, empty, like, sum_except


@dataclass(frozen=True)
class Activation:
    """One activation: its function, the default alpha (for lrelu), and the gain that keeps unit variance."""
    func: Callable
    def_alpha: float
    def_gain: float


# The supported activations; `def_gain` is sqrt(2) for the rectifier family, as in StyleGAN2-ADA.
activation_funcs = {
    "linear": Activation(lambda x, a: x, 0.0, 1.0),
    "relu": Activation(lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": Activation(lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
    "tanh": Activation(lambda x, a: torch.tanh(x), 0.0, 1.0),
    "sigmoid": Activation(lambda x, a: torch.sigmoid(x), 0.0, 1.0),
    "elu": Activation(lambda x, a: F.elu(x), 0.0, 1.0),
    "selu": Activation(lambda x, a: F.selu(x), 0.0, 1.0),
    "softplus": Activation(lambda x, a: F.softplus(x), 0.0, 1.0),
    "swish": Activation(lambda x, a: torch.sigmoid(x) * x, 0.0, math.sqrt(2)),
}

# Activation ids as in bias_act.h (GfAct), and the kernel modes (GfBiasActMode).
ACT_IDS = {n: i for i, n in enumerate(["linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus",
                                       "swish"])}
_FWD, _GRAD_X, _GRAD2_X, _GRAD_Y = 0, 1, 2, 3


def bias_act(x: torch.Tensor, b: Optional[torch.Tensor] = None, dim: int = 1, act: str = "linear",
             alpha: Optional[float] = None, gain: Optional[float] = None, clamp: Optional[float] = None,
             impl: Optional[str] = None) -> torch.Tensor:
    """y = clamp(act(x + b) * gain, -clamp, clamp), with b broadcast along `dim` and cast to x's dtype; impl is
    'auto', 'fused' or 'ref' (None: ops.dispatch's default)."""
    if act not in activation_funcs:
        raise ValueError(f"bias_act: unknown activation {act!r}; expected one of {sorted(activation_funcs)}")
    if clamp is not None and clamp < 0:
        raise ValueError(f"bias_act: clamp must be None or >= 0, got {clamp}")
    if b is not None and b.dtype != x.dtype and b.is_floating_point():
        b = b.to(x.dtype)  # the activation's dtype (fp16/bf16 under autocast): the fused kernel takes one dtype
    kw = dict(dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    # The kernel takes a 1-D bias of x's dtype and device along an existing dim; anything else goes to the reference.
    takes = 0 <= dim < x.ndim and (b is None or (b.ndim == 1 and b.shape[0] == x.shape[dim] and b.dtype == x.dtype
                                                 and b.device == x.device))
    ext = dispatch.kernel("bias_act", x, impl, bias_act_ref, bias_act_fused, (x, b), kw, variant=act, takes=takes,
                          magnitude=lambda truth: _bias_grad_magnitude(truth, dim))
    if ext is not None:
        return bias_act_fused(ext, x, b, **kw)
    return bias_act_ref(x, b, **kw)


# Magnitudes of the bias gradients in a self-check (ops.dispatch): the sums of |terms| of the matching x gradients
# (arguments 0 = x and 1 = b), as in scripts/check_ops.py.
def _bias_grad_magnitude(truth, dim):
    pairs = {"d1": "d0", "d1(create_graph)": "d0(create_graph)", "d2 d1": "d2 d0"}
    return {db: sum_except(truth[dx].abs(), dim) for db, dx in pairs.items() if db in truth and dx in truth}


# (alpha, gain, clamp) as floats: alpha and gain default to the activation's, clamp None is -1 (no clamping).
def _params(act, alpha, gain, clamp):
    spec = activation_funcs[act]
    return (float(alpha if alpha is not None else spec.def_alpha), float(gain if gain is not None else spec.def_gain),
            float(clamp if clamp is not None else -1))


def bias_act_ref(x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """The reference path of bias_act: plain PyTorch ops, differentiable to any order."""
    spec = activation_funcs[act]
    alpha, gain, clamp = _params(act, alpha, gain, clamp)
    if b is not None:
        if b.ndim != 1 or b.shape[0] != x.shape[dim]:
            raise ValueError(f"bias_act: bias of shape {tuple(b.shape)} does not match dim {dim} of x {tuple(x.shape)}")
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = spec.func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


# One bias_act kernel call on the dense tensor v (b and g may be None); returns (out, per-channel sum of out or
# None). g is brought to v's layout.
def _kernel(ext, v, b, g, mode, dim, act, alpha, gain, clamp, bias_grad=False):
    e = empty(v)
    b = e if b is None or b.numel() == 0 else b.contiguous()
    g = e if g is None else like(g, v)
    out, gb = ext.bias_act(v, b, g, ACT_IDS[act], mode, alpha, gain, clamp, max(v.stride(dim), 1), v.shape[dim],
                           bias_grad)
    return out, gb


# y = clamp(act(x + b) * gain): one kernel pass forward; saves y when the derivative follows from it (linear, relu,
# lrelu with gain > 0), else x.
class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, ext, dim, act, alpha, gain, clamp):
        x = dense(x)
        y, _ = _kernel(ext, x, b, None, _FWD, dim, act, alpha, gain, clamp)
        from_y = act == "linear" or (act in ("relu", "lrelu") and gain > 0 and alpha >= 0)
        ctx.save_for_backward(y if from_y else x, b.contiguous() if b is not None else empty(x))
        ctx.args = (ext, from_y, dim, act, alpha, gain, clamp)
        return y

    @staticmethod
    def backward(ctx, gy):
        saved, b = ctx.saved_tensors
        ext, from_y, dim, act, alpha, gain, clamp = ctx.args
        if torch.is_grad_enabled():  # create_graph: keep the gradient differentiable
            gz = _BiasActGrad.apply(gy, saved, b, *ctx.args)
            gb = sum_except(gz, dim) if ctx.needs_input_grad[1] else None
        else:  # one kernel pass gives gz and, summed on the fly, the bias gradient
            gz, gb = _kernel(ext, saved, b, gy, _GRAD_Y if from_y else _GRAD_X, dim, act, alpha, gain, clamp,
                             bias_grad=ctx.needs_input_grad[1])
        return gz if ctx.needs_input_grad[0] else None, gb, None, None, None, None, None, None


# gz = gy * dy/dz from the saved x (or y) as an autograd Function; its own backward uses the same kernel (first
# derivative, w.r.t. gy) and the second-derivative kernel (w.r.t. x and b), so gradients of second order are fused.
class _BiasActGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, saved, b, ext, from_y, dim, act, alpha, gain, clamp):
        gy = like(gy, saved)
        gz, _ = _kernel(ext, saved, b, gy, _GRAD_Y if from_y else _GRAD_X, dim, act, alpha, gain, clamp)
        ctx.save_for_backward(gy, saved, b)
        ctx.args = (ext, from_y, dim, act, alpha, gain, clamp)
        return gz

    @staticmethod
    def backward(ctx, ggz):
        gy, saved, b = ctx.saved_tensors
        ext, from_y, dim, act, alpha, gain, clamp = ctx.args
        d_gy = _BiasActGrad.apply(ggz, saved, b, *ctx.args) if ctx.needs_input_grad[0] else None
        d_x = d_b = None
        # With the output saved (piecewise-linear activations) dy/dz is piecewise constant: no second derivative.
        if not from_y and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            want_b = ctx.needs_input_grad[2] and b.numel() > 0
            g2, d_b = _kernel(ext, saved, b, like(ggz, saved) * gy, _GRAD2_X, dim, act, alpha, gain, clamp,
                              bias_grad=want_b)
            d_x = g2 if ctx.needs_input_grad[1] else None
        return d_gy, d_x, d_b, None, None, None, None, None, None, None


def bias_act_fused(ext, x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    """bias_act by the kernels of extension `ext` (from ops.dispatch.kernel, which checked that they take these
    arguments), with the reference signature after it."""
    alpha, gain, clamp = _params(act, alpha, gain, clamp)
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        return _BiasAct.apply(dense(x), None if b is None else b.contiguous(), ext, dim, act, alpha, gain, clamp)
    return _kernel(ext, dense(x), b, None, _FWD, dim, act, alpha, gain, clamp)[0]  # no autograd needed
