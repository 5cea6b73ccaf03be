"""Bilinear grid_sample (zeros padding, align_corners=False) with a double backward w.r.t. the input image."""
import torch

# Fixed op settings, as the integer codes aten's grid sampler takes: bilinear interpolation, zeros padding.
_BILINEAR = 0
_ZEROS = 0
_ALIGN_CORNERS = False


def grid_sample(input: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample `input` [N, C, H, W] at `grid` [N, Ho, Wo, 2] (x, y in [-1, 1], pixel centres, zeros outside).
    Second derivatives are supported for everything that flows through the input image, which is all that R1
    through ADA needs (ADA's grid is built from random numbers and never requires grad). First-order gradients
    w.r.t. the grid also work; a second derivative that involves the grid raises NotImplementedError."""
    return _GridSample2d.apply(input, grid)


# out = S(grid) input, a linear map of the input for a fixed grid; its backward is another custom Function so
# that autograd can differentiate the backward pass itself.
class _GridSample2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, grid):
        ctx.save_for_backward(input, grid)
        return torch.grid_sampler_2d(input, grid, _BILINEAR, _ZEROS, _ALIGN_CORNERS)

    @staticmethod
    def backward(ctx, grad_output):
        input, grid = ctx.saved_tensors
        grad_input, grad_grid = _GridSample2dBackward.apply(grad_output, input, grid, ctx.needs_input_grad[1])
        return (grad_input if ctx.needs_input_grad[0] else None), grad_grid


# (grad_input, grad_grid) = aten's grid_sampler_2d_backward. grad_input = S(grid)^T grad_output is linear in
# grad_output and independent of the input, so its derivative w.r.t. grad_output applied to a cotangent v is
# S(grid) v = grid_sample(v, grid), and its derivative w.r.t. the input is zero. grad_grid is only computed
# when the grid requires grad; its own derivatives (and grad_input's w.r.t. the grid) are not implemented.
class _GridSample2dBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_output, input, grid, need_grid_grad):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grid)
        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad_output, input, grid, _BILINEAR, _ZEROS, _ALIGN_CORNERS, [True, bool(need_grid_grad)])
        if not need_grid_grad:
            grad_grid = None
        return grad_input, grad_grid

    @staticmethod
    def backward(ctx, gg_input, gg_grid):
        (grid,) = ctx.saved_tensors
        if gg_grid is not None or ctx.needs_input_grad[2]:
            raise NotImplementedError(
                "grid_sample_gradfix: second derivatives involving the sampling grid are not implemented "
                "(ADA never needs them: its grid does not require grad)")
        grad_grad_output = None
        if ctx.needs_input_grad[0] and gg_input is not None:
            grad_grad_output = _GridSample2d.apply(gg_input, grid)
        return grad_grad_output, None, None, None
