"""Worker for test_dispatch: one gloo rank calling bias_act and upfirdn2d under 'auto' (rank 0's bias_act wrong)."""
import json
import sys

import torch
import torch.distributed as dist

import ops.bias_act as bias_act_module
from ops import dispatch
from ops.upfirdn2d import setup_filter, upfirdn2d


# Rank `rank` of `world` on localhost:port; writes {"decisions", "out"} to `path`.
def main(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    if rank == 0:  # only rank 0 has a wrong kernel: rank 1's correct one must not be used either
        real = bias_act_module.bias_act_fused
        bias_act_module.bias_act_fused = lambda ext, *a, **k: real(ext, *a, **k) * (1 + 2.0 ** -16)
    g = torch.Generator().manual_seed(0)  # the same inputs on both ranks
    x = torch.randn(2, 4, 8, 8, generator=g).requires_grad_(True)
    b = torch.randn(4, generator=g)
    y = upfirdn2d(bias_act_module.bias_act(x, b, act="lrelu"), setup_filter([1, 3, 3, 1]), down=2, padding=1)
    (gx,) = torch.autograd.grad(y.square().sum(), [x])
    out = [float(y.double().sum()), float(gx.double().abs().sum())]
    with open(path, "w") as f:
        json.dump({"decisions": dispatch.decisions(), "out": out}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
