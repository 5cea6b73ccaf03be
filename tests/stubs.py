"""Tiny analytic networks shared by the loss tests."""
import torch
import torch.nn as nn


# D(x) = sum(a * x^2) + b: grad_x D = 2 a x, so R1 and the gradient penalty are analytic in a and x.
class QuadraticD(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.a = nn.Parameter(torch.randn(shape, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, img, c, update_emas=False):
        return (self.a * img.square()).sum(dim=[1, 2, 3]).unsqueeze(1) + self.b
