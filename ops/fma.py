"""fma: the fused multiply-add a * b + c used for demodulation plus noise."""
import torch


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in one op (torch.addcmul), with gradients to every broadcast operand reduced to its shape."""
    return torch.addcmul(c, a, b)
