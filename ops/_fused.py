"""Helpers shared by the fused ops' kernel bindings: empty arguments and the tensor layouts the kernels index."""
import torch

# An empty tensor standing for "no bias" / "no gradient" in kernel calls, by dtype and device.
_empties = {}


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
