"""Fused bias_act and upfirdn2d: autograd Functions over the C++/CUDA kernels, registered with ops.dispatch."""
import concurrent.futures
import functools

import torch

from ops import _build, dispatch
from ops.bias_act import activation_funcs, bias_act_ref
from ops.upfirdn2d import filter_size, upfirdn2d_ref

# Sources of each op's extension: CPU-only build, and the CUDA build (its .cpp also holds the CPU kernel).
SOURCES = {
    "bias_act": {"cpu": ["bias_act.cpp"], "cuda": ["bias_act.cpp", "bias_act.cu"]},
    "upfirdn2d": {"cpu": ["upfirdn2d.cpp"], "cuda": ["upfirdn2d.cpp", "upfirdn2d.cu"]},
}

# Dtypes each device's kernels handle.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# Activation ids as in bias_act.h (GfAct), and the kernel modes (GfBiasActMode).
ACT_IDS = {n: i for i, n in enumerate(["linear", "relu", "lrelu", "tanh", "sigmoid", "elu", "selu", "softplus",
                                       "swish"])}
_FWD, _GRAD_X, _GRAD2_X, _GRAD_Y = 0, 1, 2, 3

# CPU upfirdn2d kernel choice: 0 = fastest, 1 = direct 2-D loops, 2 = per-output (the CUDA code path); tests set it.
upfirdn2d_cpu_path = 0


# The extension of `op` for a device type ('cpu' or 'cuda'); raises _build.BuildError with the reason.
def load(op: str, device_type: str):
    return _build.load_extension(op, SOURCES[op][device_type], cuda=(device_type == "cuda"))


# Build (or load) every op's extension for a device type at once, in threads so that their compilers run in
# parallel; returns {op: module or the BuildError}.
def load_all(device_type: str):
    with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
        futures = {op: pool.submit(load, op, device_type) for op in SOURCES}
    return {op: (f.exception() or f.result()) for op, f in futures.items()}


# Why the fused `op` cannot run on x (None when it can): device, dtype, or the build.
def unavailable_reason(op: str, x):
    dev = x.device.type
    if dev not in SUPPORTED_DTYPES:
        return f"no fused kernel for device '{dev}'"
    if x.dtype not in SUPPORTED_DTYPES[dev]:
        return f"no fused kernel for {x.dtype} on {dev}"
    try:
        load(op, dev)
    except _build.BuildError as e:
        return f"build failed: {e}"
    return None


# Fused functions already bound to a loaded extension, by (op, device type, dtype): the per-call fast path.
_bound = {}


# Forget bound functions (dispatch.reset calls it with the build cache reset).
def reset() -> None:
    _bound.clear()
    _empties.clear()


# A dispatch loader for `op`: the fused function bound to its extension, or None / RuntimeError with the reason.
def _make_loader(op, fn):
    def loader(x, strict):
        dev = x.device.type
        key = (op, dev, x.dtype)
        bound = _bound.get(key)
        if bound is not None:
            return bound
        if dev in SUPPORTED_DTYPES and x.dtype in SUPPORTED_DTYPES[dev]:
            try:
                bound = _bound[key] = functools.partial(fn, load(op, dev))
                return bound
            except _build.BuildError:
                pass
        why = unavailable_reason(op, x)
        message = f"ops.{op}: fused kernel unavailable on {dev} ({why})"
        if strict:
            raise RuntimeError(f"{message}; impl='fused' was requested")
        dispatch.warn_once(op, f"{message}; using the reference implementation (run scripts/check_ops.py)")
        return None
    return loader


# An empty tensor standing for "no bias" / "no gradient" in kernel calls, cached by dtype and device.
_empties = {}


# The cached empty tensor for x's dtype and device.
def _empty(x):
    key = (x.dtype, x.device)
    e = _empties.get(key)
    if e is None:
        e = _empties[key] = x.new_empty([0])
    return e


# x itself when dense (contiguous or channels-last), else a contiguous copy: the kernels index dense storage.
def _dense(x):
    if x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


# t with exactly the strides of `like` (gradients may arrive in any layout, even expanded).
def _like(t, like):
    if t.stride() == like.stride():
        return t
    return torch.empty_like(like).copy_(t)


# Sum a gradient over every dim but `dim` (the bias gradient, differentiable).
def _sum_except(t, dim):
    return t.sum(dim=[i for i in range(t.ndim) if i != dim])


# One bias_act kernel call on the dense tensor v (b and g may be None); returns (out, per-channel sum of out or
# None). g is brought to v's layout.
def _kernel(ext, v, b, g, mode, dim, act, alpha, gain, clamp, bias_grad=False):
    empty = _empty(v)
    b = empty if b is None or b.numel() == 0 else b.contiguous()
    g = empty if g is None else _like(g, v)
    out, gb = ext.bias_act(v, b, g, ACT_IDS[act], mode, alpha, gain, clamp, max(v.stride(dim), 1), v.shape[dim],
                           bias_grad)
    return out, gb


# y = clamp(act(x + b) * gain): one kernel pass forward; saves y when the derivative follows from it (linear, relu,
# lrelu with gain > 0), else x.
class _BiasAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b, ext, dim, act, alpha, gain, clamp):
        x = _dense(x)
        y, _ = _kernel(ext, x, b, None, _FWD, dim, act, alpha, gain, clamp)
        from_y = act == "linear" or (act in ("relu", "lrelu") and gain > 0 and alpha >= 0)
        ctx.save_for_backward(y if from_y else x, b.contiguous() if b is not None else _empty(x))
        ctx.args = (ext, from_y, dim, act, alpha, gain, clamp)
        return y

    @staticmethod
    def backward(ctx, gy):
        saved, b = ctx.saved_tensors
        ext, from_y, dim, act, alpha, gain, clamp = ctx.args
        if torch.is_grad_enabled():  # create_graph: keep the gradient differentiable
            gz = _BiasActGrad.apply(gy, saved, b, *ctx.args)
            gb = _sum_except(gz, dim) if ctx.needs_input_grad[1] else None
        else:  # one kernel pass gives gz and, summed on the fly, the bias gradient
            gz, gb = _kernel(ext, saved, b, gy, _GRAD_Y if from_y else _GRAD_X, dim, act, alpha, gain, clamp,
                             bias_grad=ctx.needs_input_grad[1])
        return gz if ctx.needs_input_grad[0] else None, gb, None, None, None, None, None, None


# gz = gy * dy/dz from the saved x (or y) as an autograd Function; its own backward uses the same kernel (first
# derivative, w.r.t. gy) and the second-derivative kernel (w.r.t. x and b), so gradients of second order are fused.
class _BiasActGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gy, saved, b, ext, from_y, dim, act, alpha, gain, clamp):
        gy = _like(gy, saved)
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
            g2, d_b = _kernel(ext, saved, b, _like(ggz, saved) * gy, _GRAD2_X, dim, act, alpha, gain, clamp,
                              bias_grad=want_b)
            d_x = g2 if ctx.needs_input_grad[1] else None
        return d_gy, d_x, d_b, None, None, None, None, None, None, None


# The fused bias_act with the reference signature; unusual arguments go to the reference (which validates them).
def bias_act_fused(ext, x, b=None, dim=1, act="linear", alpha=None, gain=None, clamp=None):
    spec = activation_funcs[act]
    alpha = float(alpha if alpha is not None else spec.def_alpha)
    gain = float(gain if gain is not None else spec.def_gain)
    clamp = float(clamp if clamp is not None else -1)
    ok = act in ACT_IDS and x.numel() > 0 and 0 <= dim < x.ndim
    if b is not None:
        ok = ok and b.ndim == 1 and b.shape[0] == x.shape[dim] and b.dtype == x.dtype and b.device == x.device
    if not ok:
        return bias_act_ref(x, b, dim=dim, act=act, alpha=alpha, gain=gain, clamp=clamp)
    if torch.is_grad_enabled() and (x.requires_grad or (b is not None and b.requires_grad)):
        return _BiasAct.apply(_dense(x), None if b is None else b.contiguous(), ext, dim, act, alpha, gain, clamp)
    return _kernel(ext, _dense(x), b, None, _FWD, dim, act, alpha, gain, clamp)[0]  # no autograd needed


# One kernel call; a channels-last input gives a channels-last output, as with the reference.
def _upfirdn2d_call(ext, x, f, up, down, padding, flip, gain):
    (upx, upy), (downx, downy), (px0, px1, py0, py1) = up, down, padding
    y = ext.upfirdn2d(x, f, upx, upy, downx, downy, px0, px1, py0, py1, flip, gain,
                      upfirdn2d_cpu_path if x.device.type == "cpu" else 0)
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)
    return y


# upfirdn2d in one kernel pass; the backward is the same op with up/down swapped, the filter flipped and the
# padding mirrored, so it is differentiable to any order.
class _UpFirDn2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, f, ext, up, down, padding, flip, gain):
        y = _upfirdn2d_call(ext, x, f, up, down, padding, flip, gain)
        ctx.save_for_backward(f)
        ctx.args = (ext, up, down, padding, flip, gain, x.shape[2], x.shape[3])
        return y

    @staticmethod
    def backward(ctx, gy):
        (f,) = ctx.saved_tensors
        ext, (upx, upy), (downx, downy), (px0, px1, py0, py1), flip, gain, h, w = ctx.args
        fw, fh = filter_size(f)
        oh, ow = gy.shape[2], gy.shape[3]
        padding = (fw - 1 - px0, w * upx - ow * downx + px0 - upx + 1,
                   fh - 1 - py0, h * upy - oh * downy + py0 - upy + 1)
        args = ((downx, downy), (upx, upy), padding, not flip, gain)
        if torch.is_grad_enabled():  # create_graph: keep the gradient differentiable
            gx = _UpFirDn2d.apply(gy, f, ext, *args)
        else:
            gx = _upfirdn2d_call(ext, gy, f, *args)
        return gx, None, None, None, None, None, None, None


# The fused upfirdn2d with the reference signature; a filter that needs a gradient goes to the reference.
def upfirdn2d_fused(ext, x, f, up, down, padding, flip_filter=False, gain=1):
    if (f.requires_grad and torch.is_grad_enabled()) or x.numel() == 0 or f.device != x.device:
        return upfirdn2d_ref(x, f, up, down, padding, flip_filter, gain)
    args = (tuple(up), tuple(down), tuple(padding), bool(flip_filter), float(gain))
    if torch.is_grad_enabled() and x.requires_grad:
        return _UpFirDn2d.apply(x, f, ext, *args)
    return _upfirdn2d_call(ext, x, f, *args)  # nothing to differentiate: skip the autograd Function


dispatch.register("bias_act", _make_loader("bias_act", bias_act_fused))
dispatch.register("upfirdn2d", _make_loader("upfirdn2d", upfirdn2d_fused))
