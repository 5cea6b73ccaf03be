"""Distributed concerns in one place: every other module talks to Accelerate through these helpers."""
import os

import torch

# The process-wide Accelerator (None until `init` is called; single-process helpers still work without it).
_accelerator = None


# Create (once) the Accelerator for this process; `mixed_precision` is 'no', 'fp16' or 'bf16'.
def init(mixed_precision: str = "no", cpu: bool = False):
    global _accelerator
    if _accelerator is None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs
        from datetime import timedelta
        # A bounded collective timeout, so that ranks waiting on a dead peer fail instead of hanging forever.
        timeout = timedelta(seconds=float(os.environ.get("GANFORGE_DIST_TIMEOUT", "600")))
        _accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu,
                                   kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    return _accelerator


# The Accelerator, or None when running without one.
def accelerator():
    return _accelerator


# Forget the Accelerator (tests run several trainings in one process).
def reset():
    global _accelerator
    _accelerator = None


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


# The device this process computes on.
def device() -> torch.device:
    if _accelerator is not None:
        return _accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# Print from rank 0 only.
def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if is_initialized():
        torch.distributed.barrier()


# Sum a tensor over all ranks, in place, and return it.
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


# True on every rank when `flag` is true on any rank (one small all-reduce; every rank must call it together).
def any_true(flag: bool) -> bool:
    if not (is_initialized() and get_world_size() > 1):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


# Average a tensor over all ranks, in place, and return it.
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_initialized() and get_world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        t.div_(get_world_size())
    return t


# Concatenate a tensor from all ranks along dim 0 (sizes may differ per rank); rank order is preserved.
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    if not (is_initialized() and get_world_size() > 1):
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(get_world_size())]
    torch.distributed.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = torch.zeros((max_n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(get_world_size())]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)], dim=0)


# Average the gradients of `params` over ranks as one flat buffer (the manual equivalent of DDP's all-reduce,
# which we use because R1 needs double backward through D and DDP does not support it).
def all_reduce_grads(params) -> None:
    params = [p for p in params if p.grad is not None]
    if not params or not (is_initialized() and get_world_size() > 1):
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    all_reduce_mean(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# Make every rank hold rank 0's parameters and buffers.
def broadcast_module(module: torch.nn.Module) -> None:
    if not (is_initialized() and get_world_size() > 1):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        torch.distributed.broadcast(t.data, src=0)


# Broadcast a picklable object from rank 0 (plain data only: numbers, strings, lists, dicts).
def broadcast_object(obj):
    if not (is_initialized() and get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# Gather a picklable object from every rank into a list indexed by rank (plain data only).
def all_gather_object(obj) -> list:
    if not (is_initialized() and get_world_size() > 1):
        return [obj]
    out = [None] * get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# Average a module's floating-point buffers over ranks (running statistics such as w_avg are updated from each
# rank's own batch; averaging keeps every rank bit-identical; constant buffers are unchanged).
def sync_buffers(module: torch.nn.Module) -> None:
    if not (is_initialized() and get_world_size() > 1):
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().flatten().to(torch.float64) for b in bufs])
    all_reduce_mean(flat)
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b).to(b.dtype))
        offset += b.numel()
