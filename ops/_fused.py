"""Helpers shared by the fused ops: supported dtypes, availability, binding to an extension, tensor layouts."""
import functools

import torch

from ops import _build, dispatch

# Dtypes each device's kernels handle.
SUPPORTED_DTYPES = {"cpu": (torch.float32, torch.float64),
                    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64)}

# An empty tensor standing for "no bias" / "no gradient" in kernel calls, by dtype and device.
_empties = {}


def extension(op: str, sources: dict, device_type: str):
    """The extension of `op` for 'cpu' or 'cuda' from sources[device_type]; raises _build.BuildError saying why."""
    return _build.load_extension(op, sources[device_type], cuda=(device_type == "cuda"))


def unavailable_reason(load_ext, x):
    """Why the fused op whose extension `load_ext(device_type)` loads cannot run on x (device, dtype or the build),
    or None when it can."""
    dev = x.device.type
    if dev not in SUPPORTED_DTYPES:
        return f"no fused kernel for device '{dev}'"
    if x.dtype not in SUPPORTED_DTYPES[dev]:
        return f"no fused kernel for {x.dtype} on {dev}"
    try:
        load_ext(dev)
    except _build.BuildError as e:
        return f"build failed: {e}"
    return None


def bind(load_ext, fn, x):
    """fn(ext, ...) bound to the extension `load_ext(device_type)` gives for x's device; raises dispatch.Unavailable
    saying why it cannot run on x."""
    why = unavailable_reason(load_ext, x)
    if why is not None:
        raise dispatch.Unavailable(why)
    return functools.partial(fn, load_ext(x.device.type))


def empty(x):
    """The cached empty tensor of x's dtype and device (kernel arguments that are absent)."""
    key = (x.dtype, x.device)
    e = _empties.get(key)
    if e is None:
        e = _empties[key] = x.new_empty([0])
    return e


def dense(x):
    """x itself when dense (contiguous or channels-last), else a contiguous copy: the kernels index dense storage."""
    if x.is_contiguous() or (x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return x
    return x.contiguous()


def like(t, ref):
    """t with exactly the strides of `ref` (gradients may arrive in any layout, even expanded)."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def sum_except(t, dim):
    """t summed over every dim but `dim` (a bias gradient; differentiable)."""
    return t.sum(dim=[i for i in range(t.ndim) if i != dim])
